"""Shared fixtures: a tiny judge tokenizer, tiny text and Qwen-VL judges built locally, the vLLM python."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from policies.tiny_qwen_vl import TinyQwenVLSpec, build_tiny_qwen_tokenizer, build_tiny_qwen_vl


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the machine's cores between the workers (and their subprocesses).

    Torch's default (every core in every worker) oversubscribes the CPU and makes the suite slower.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


CORPUS = [
    "yes no Yes No yes. no. 1 2 3 4 5",
    "Does the second scene causally follow from the first scene? Answer with one word: yes or no.",
    "First scene: a red ball rolls left and bounces off the wall. Second scene: the blue square falls.",
]


def build_judge_tokenizer():
    """A byte-level BPE tokenizer (Qwen's kind) trained on a few judge sentences, with Qwen special tokens."""
    return build_tiny_qwen_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def judge_tokenizer():
    return build_judge_tokenizer()


@pytest.fixture(scope="session")
def tiny_text_judge(tmp_path_factory, judge_tokenizer) -> Path:
    """A random 2-layer Qwen2 causal LM (head_dim 64, as CPU vLLM needs) saved with its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_text_judge")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(judge_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=judge_tokenizer.eos_token_id,
        pad_token_id=judge_tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    judge_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vl_judge(tmp_path_factory) -> Path:
    """A random tiny Qwen2.5-VL checkpoint: model, tokenizer, pre-processing config (head_dim 64, for vLLM).

    Frames are resized to at most 32 x 32 pixels (patch 8, merge 2: 4 tokens per image).
    """
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_vl_judge"), TinyQwenVLSpec(hidden_size=128))


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM venv's python from $NEXTSCENE_VLLM_PYTHON; missing fails in CI, skips elsewhere."""
    python = os.environ.get("NEXTSCENE_VLLM_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("NEXTSCENE_VLLM_PYTHON is not set in CI; run .ci/install_vllm.sh and export it")
        pytest.skip(
            "install the CPU vLLM server to run the judge's vLLM tests: bash .ci/install_vllm.sh .vllm-venv"
            " && export NEXTSCENE_VLLM_PYTHON=$PWD/.vllm-venv/bin/python"
        )
    if not Path(python).is_file():
        pytest.fail(f"NEXTSCENE_VLLM_PYTHON={python} does not exist")
    return python
