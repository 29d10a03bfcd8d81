"""Diffusion policies: video generators wrapped as stochastic samplers with per-step log-probs."""

from policies import sde
from policies.errors import InputError
from policies.ltx import LTXPolicy, SamplingConfig
from policies.ltx2 import LTX2Policy, LTX2SamplingConfig
from policies.nextclip import NextClipPolicy
from policies.nsp import NSPPolicy
from policies.rollout import Rollout

__all__ = [
    "InputError",
    "LTX2Policy",
    "LTX2SamplingConfig",
    "LTXPolicy",
    "NextClipPolicy",
    "NSPPolicy",
    "Rollout",
    "SamplingConfig",
    "sde",
]
