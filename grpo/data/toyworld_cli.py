"""``nextscene toyworld``: write a toy-world dataset (videos + NSP manifest) to disk.

Heavy imports (torch, PyAV) happen when the command runs, not when ``nextscene --help`` builds
the parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toyworld",
        help="write a toy-world dataset (videos + NSP manifest)",
        description=(
            "Generate toy-world samples (coloured balls with known physics) and write them as an NSP "
            "dataset: videos/<split>-<index>-{context,next}.<format>, manifest.jsonl (loadable with "
            "`datasets` and NSPVideoDataset) and toyworld.json (the settings, to regenerate it)."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--split", default="train", help="train, validation or test (disjoint seed ranges)")
    parser.add_argument("--num", type=int, default=100, help="number of samples (default 100)")
    parser.add_argument(
        "--start", type=int, default=0, help="first sample index within the split (default 0)"
    )
    parser.add_argument("--size", type=int, default=32, help="frame height and width in pixels, 32..128")
    parser.add_argument("--context-frames", type=int, default=9, help="context frames, 8k+1 (default 9)")
    parser.add_argument("--next-frames", type=int, default=9, help="next-scene frames, 8k+1 (default 9)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate stored in the videos (default 8)")
    parser.add_argument(
        "--format",
        choices=("mp4", "npz"),
        default="mp4",
        help="mp4 (H.264 4:4:4, near-lossless) or npz frames",
    )
    parser.add_argument(
        "--audio",
        action="store_true",
        help="add sound: a tone at every wall bounce and strike (AAC in the videos, onsets in the manifest)",
    )
    parser.add_argument(
        "--sample-rate", type=int, default=16000, help="audio sample rate in Hz with --audio (default 16000)"
    )
    parser.add_argument("--parquet", action="store_true", help="also write manifest.parquet")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grpo.data.toyworld import ToyWorld, ToyWorldConfig, export_toyworld

    config = ToyWorldConfig(
        size=args.size,
        context_frames=args.context_frames,
        next_frames=args.next_frames,
        fps=args.fps,
        audio=args.audio,
        sample_rate=args.sample_rate,
    )
    world = ToyWorld(config, split=args.split, num_samples=args.num, start=args.start)
    manifest = export_toyworld(
        world,
        args.out,
        video_format=args.format,
        parquet=args.parquet,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    sound = f" with sound at {config.sample_rate} Hz" if config.audio else ""
    print(f"wrote {len(world)} {args.split} samples{sound} to {manifest}")
    return 0
