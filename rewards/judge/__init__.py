"""The causal-consistency judge: a vision-language model asked whether a predicted scene follows its context.

`CausalConsistencyJudge` asks a vLLM server (``nextscene judge serve``); `InProcessJudge` computes the
same score with a transformers model in the training process. Both are reward functions.
"""

from rewards.judge.client import CausalConsistencyJudge, JudgeUnavailableError
from rewards.judge.config import JudgeConfig
from rewards.judge.local import InProcessJudge
from rewards.judge.serve import JudgeServer, ServeConfig, build_command, start_server

__all__ = [
    "CausalConsistencyJudge",
    "InProcessJudge",
    "JudgeConfig",
    "JudgeServer",
    "JudgeUnavailableError",
    "ServeConfig",
    "build_command",
    "start_server",
]
