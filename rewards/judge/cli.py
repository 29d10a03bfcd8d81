"""``nextscene judge serve`` (start a vLLM judge server) and ``nextscene judge score`` (score a manifest)."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from policies.errors import InputError
from policies.files import check_output_dir
from policies.video_io import read_video
from rewards.judge.client import CausalConsistencyJudge
from rewards.judge.config import JudgeConfig
from rewards.judge.prompts import ASPECTS, MODES
from rewards.judge.serve import ServeConfig, format_command, start_server


def _help(cls: type, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``judge {serve,score}`` to the ``nextscene`` command."""
    judge = subparsers.add_parser("judge", help="serve the causal-consistency judge, or score videos with it")
    commands = judge.add_subparsers(dest="judge_command", metavar="{serve,score}")
    commands.required = True

    serve = commands.add_parser("serve", help="start a vLLM server for a judge model and wait until healthy")
    serve.add_argument("--model", required=True, help=_help(ServeConfig, "model"))
    for name, kind in (
        ("host", str), ("port", int), ("served_model_name", str), ("tensor_parallel_size", int),
        ("max_model_len", int), ("max_logprobs", int), ("max_images", int), ("max_videos", int),
        ("dtype", str), ("gpu_memory_utilization", float), ("api_key_env", str), ("python", str),
    ):  # fmt: skip
        serve.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, help=_help(ServeConfig, name)
        )
    serve.add_argument("--no-api-key", action="store_true", help=_help(ServeConfig, "no_api_key"))
    serve.add_argument(
        "--vllm-args", default="", help="More vLLM flags as one string, e.g. '--enforce-eager'."
    )
    serve.add_argument("--startup-timeout", type=float, default=1800.0, help="Seconds to wait for health.")
    serve.add_argument("--dry-run", action="store_true", help="Print the vLLM command line and exit.")
    serve.set_defaults(func=_serve)

    score = commands.add_parser("score", help="score a JSONL manifest of (context, next scene) pairs")
    score.add_argument(
        "manifest",
        type=Path,
        help="JSONL rows with 'context'/'next' video paths (relative to the manifest) and/or "
        "'context_caption'/'next_caption'; optional 'id', 'prompt'.",
    )
    score.add_argument(
        "--url", action="append", required=True, help="Judge server base URL (repeat for more)."
    )
    score.add_argument(
        "--out", type=Path, default=None, help="Output JSONL (default: MANIFEST.scores.jsonl)."
    )
    score.add_argument("--batch-size", type=int, default=32, help="Rows decoded and scored at a time.")
    score.add_argument(
        "--aspects", nargs="*", default=[], choices=list(ASPECTS), help=_help(JudgeConfig, "aspects")
    )
    score.add_argument("--mode", choices=MODES, default="images", help=_help(JudgeConfig, "mode"))
    for name, kind in (
        ("model", str), ("scoring", str), ("num_frames", int), ("top_logprobs", int),
        ("max_concurrency", int), ("timeout_s", float), ("max_retries", int), ("health_timeout_s", float),
        ("api_key_env", str), ("failure_policy", str), ("abort_threshold", float),
        ("binary_threshold", float),
    ):  # fmt: skip
        score.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, help=_help(JudgeConfig, name)
        )
    score.set_defaults(func=_score)


def _given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _serve(args: argparse.Namespace) -> int:
    names = [f.name for f in fields(ServeConfig) if f.name not in ("model", "no_api_key", "extra_args")]
    config = ServeConfig(
        model=args.model,
        no_api_key=args.no_api_key,
        extra_args=shlex.split(args.vllm_args),
        **_given(args, names),
    )
    if args.dry_run:
        print(format_command(config))
        return 0
    server = start_server(config)
    # the server runs in its own process group: stop it on SIGTERM too, not only on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        waited = server.wait_healthy(args.startup_timeout)
        key_note = "no API key" if config.no_api_key else f"API key from ${config.api_key_env}"
        print(f"judge ready at {server.url} after {waited:.0f} s ({key_note}); "
              f"point a recipe's judge at urls: [{server.url}]", flush=True)  # fmt: skip
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _read_manifest(path: Path, mode: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"manifest {path} not found; give a JSONL file of (context, next) rows")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{line_no}: not JSON ({err.msg}); one JSON object per line") from None
        need = ("context_caption", "next_caption") if mode == "text" else ("context", "next")
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in need):
            raise InputError(f"{path}:{line_no}: mode {mode!r} needs string fields {list(need)}")
        if mode != "text":
            for key in need:
                if not (path.parent / row[key]).is_file():
                    raise InputError(
                        f"{path}:{line_no}: {key} video file not found: {path.parent / row[key]}"
                    )
        row.setdefault("id", line_no)
        rows.append(row)
    if not rows:
        raise InputError(f"manifest {path} has no rows")
    return rows


def _score(args: argparse.Namespace) -> int:
    names = ["model", "scoring", "num_frames", "top_logprobs", "max_concurrency", "timeout_s", "max_retries",
             "health_timeout_s", "api_key_env", "failure_policy", "abort_threshold",
             "binary_threshold"]  # fmt: skip
    judge = CausalConsistencyJudge(
        urls=args.url, mode=args.mode, aspects=tuple(args.aspects), **_given(args, names)
    )
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be >= 1")
    rows = _read_manifest(args.manifest, args.mode)
    out_path = args.out or args.manifest.with_suffix(".scores.jsonl")
    check_output_dir(out_path.parent, "--out")
    if out_path.is_dir():
        raise InputError(f"--out: {out_path} is a folder; give the path of a JSONL file to write")
    judge.check_health()  # before the output file is opened: a dead server leaves nothing behind
    root = args.manifest.parent
    scores: list[float | None] = []
    with out_path.open("w") as out:
        for begin in range(0, len(rows), args.batch_size):
            batch = rows[begin : begin + args.batch_size]
            if args.mode == "text":
                videos = contexts = None
            else:
                videos = [read_video(root / row["next"])[0] for row in batch]
                contexts = [read_video(root / row["context"])[0] for row in batch]
            result = judge(
                videos,
                [row.get("prompt", "") for row in batch],
                contexts,
                context_caption=[row.get("context_caption") for row in batch],
                prediction_caption=[row.get("next_caption") for row in batch],
            )
            for i, row in enumerate(batch):
                record = {"id": row["id"], "score": result.scores[i]}
                record.update({key: column[i] for key, column in result.metadata.items()})
                out.write(json.dumps(record) + "\n")
            scores += result.scores
    valid = [s for s in scores if s is not None]
    mean = f"{sum(valid) / len(valid):.4f}" if valid else "n/a"
    print(
        f"scored {len(valid)}/{len(scores)} rows ({len(scores) - len(valid)} None), mean {mean} -> {out_path}"
    )
    return 0 if valid else 1
