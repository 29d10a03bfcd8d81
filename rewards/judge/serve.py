"""Start a vLLM OpenAI server for a judge model with the flags the judge relies on.

The judge needs first-token ``logprobs`` (``--max-logprobs`` >= its ``top_logprobs``), room for its
frames (``--limit-mm-per-prompt``), deterministic defaults (``--generation-config vllm`` so a
checkpoint's sampling defaults do not leak in) and, by default, a loopback address with an API key.
The key travels in the child's environment (``VLLM_API_KEY``), never on its command line where
``ps`` would show it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from policies.errors import InputError

VLLM_PYTHON_ENV = "NEXTSCENE_VLLM_PYTHON"


@dataclass
class ServeConfig:
    """A vLLM judge server: model, parallelism, limits, address and key."""

    model: str = field(metadata={"help": "Checkpoint directory (or hub id) of the judge model."})
    host: str = field(
        default="127.0.0.1", metadata={"help": "Address to bind; non-loopback needs an API key."}
    )
    port: int = field(default=8000, metadata={"help": "Port to bind."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "Name clients use in requests (default: vLLM's, the model path)."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs the model is split over."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "Context length cap (default: model's)."}
    )
    max_logprobs: int = field(default=20, metadata={"help": "Largest top_logprobs a request may ask for."})
    max_images: int = field(default=16, metadata={"help": "Images per prompt (judge sends 2 x num_frames)."})
    max_videos: int = field(default=2, metadata={"help": "Videos per prompt (judge's video mode sends 2)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "Fraction of GPU memory vLLM may take (default: vLLM's 0.9)."}
    )
    api_key_env: str = field(
        default="NEXTSCENE_JUDGE_API_KEY",
        metadata={"help": "Environment variable holding the API key to require."},
    )
    no_api_key: bool = field(default=False, metadata={"help": "Serve without a key (loopback hosts only)."})
    python: str = field(
        default_factory=lambda: os.environ.get(VLLM_PYTHON_ENV) or sys.executable,
        metadata={"help": f"Python with vLLM installed (default: ${VLLM_PYTHON_ENV}, else this one)."},
    )
    extra_args: list[str] = field(
        default_factory=list, metadata={"help": "More vLLM flags, passed verbatim."}
    )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def api_key(self) -> str | None:
        """The key the server will require (``None`` with ``no_api_key``); checks it is set."""
        if self.no_api_key:
            if not _is_loopback(self.host):
                raise InputError(f"refusing to serve on {self.host} without an API key; drop --no-api-key")
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise InputError(
                f"set {self.api_key_env} to the API key clients will send (or pass --no-api-key on loopback)"
            )
        return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_multimodal(model: str) -> bool:
    """Whether the checkpoint has a vision tower (``vision_config``); hub ids are assumed multimodal."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return True
    config = json.loads(config_file.read_text())
    return "vision_config" in config or "vision_config" in config.get("text_config", {})


def build_command(config: ServeConfig) -> list[str]:
    """The vLLM server command line for ``config`` (the API key is not on it)."""
    if config.tensor_parallel_size < 1 or config.max_logprobs < 1 or not 0 < config.port < 65536:
        raise InputError("tensor_parallel_size and max_logprobs must be >= 1 and port in 1..65535")
    cmd = [
        config.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--tensor-parallel-size",
        str(config.tensor_parallel_size),
        "--max-logprobs",
        str(config.max_logprobs),
        "--dtype",
        config.dtype,
        "--generation-config",
        "vllm",
    ]
    if config.served_model_name:
        cmd += ["--served-model-name", config.served_model_name]
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if is_multimodal(config.model):
        limits = {"image": config.max_images, "video": config.max_videos}
        cmd += ["--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"))]
    return cmd + list(config.extra_args)


class JudgeServer:
    """A running vLLM judge server (its own process group); `stop` ends it."""

    def __init__(self, process: subprocess.Popen, config: ServeConfig) -> None:
        self.process = process
        self.config = config
        self.url = config.url

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Block until ``/health`` answers 200; return the seconds waited. Raise if it dies or times out."""
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.process.returncode} before becoming healthy"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout_s:
                self.stop()
                raise RuntimeError(
                    f"vLLM server at {self.url} not healthy after {timeout_s:.0f} s; stopped it"
                )
            time.sleep(poll_s)

    def stop(self, grace_s: float = 20.0) -> int:
        """SIGTERM the server's process group, SIGKILL after ``grace_s``; returns its exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server's process group at once (as a crash would)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> JudgeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    config: ServeConfig, log: IO[bytes] | None = None, env: dict[str, str] | None = None
) -> JudgeServer:
    """Start the server in the background (output to ``log``, else inherited); then call `wait_healthy`."""
    key = config.api_key()
    child_env = {**os.environ, **(env or {})}
    child_env.pop("VLLM_API_KEY", None)
    if key:
        child_env["VLLM_API_KEY"] = key
    cmd = build_command(config)
    process = subprocess.Popen(
        cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True
    )
    return JudgeServer(process, config)


def format_command(config: ServeConfig) -> str:
    """The command line as a shell would take it, for ``--dry-run``."""
    return shlex.join(build_command(config))
