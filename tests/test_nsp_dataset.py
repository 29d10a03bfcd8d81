"""NSP manifests: the toy-world export, the loader, batching, bad input and the `toyworld` command."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from grpo.data import toyworld_cli
from grpo.data.nsp_dataset import NSPDataConfig, NSPVideoDataset, collate_nsp, load_manifest, select_frames
from grpo.data.toyworld import ToyWorld, ToyWorldConfig, export_toyworld
from policies.errors import InputError
from policies.video_io import write_video

NUM = 6
# float render -> uint8 rounding (0.5/255) -> H.264 4:4:4 crf 0 (RGB<->YUV rounding, 1/255 measured)
MP4_BOUND = 3.0 / 255
NPZ_BOUND = 0.5 / 255 + 1e-6


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(split="validation", num_samples=NUM)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("toy")
    export_toyworld(world, out, parquet=True, progress=False)
    return out


def _copy(exported, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(exported, target)
    return target


@pytest.mark.parametrize("video_format", ["mp4", "npz"])
def test_round_trip_equals_in_memory_samples(tmp_path, world, exported, video_format):
    if video_format == "npz":
        exported = tmp_path / "npz"
        export_toyworld(world, exported, video_format="npz", progress=False)
    bound = MP4_BOUND if video_format == "mp4" else NPZ_BOUND
    loaded = NSPVideoDataset(exported / "manifest.jsonl")
    assert len(loaded) == NUM
    worst = 0.0
    for i in range(NUM):
        got, want = loaded[i], world[i]
        assert list(got) == list(want)
        for key in ("context_caption", "next_caption", "instruction", "fps", "world"):
            assert got[key] == want[key], key
        for key in ("context", "next"):
            assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape
            worst = max(worst, float((got[key] - want[key]).abs().max()))
    assert worst <= bound
    print(f"round-trip max |error| ({video_format}): {worst * 255:.2f}/255 (bound {bound * 255:.2f}/255)")


def test_manifest_loads_with_datasets_and_parquet_matches(tmp_path, exported):
    import datasets  # slow to import: only here

    rows, _ = load_manifest(exported)
    for name, builder in (("manifest.jsonl", "json"), ("manifest.parquet", "parquet")):
        table = datasets.load_dataset(
            builder, data_files=str(exported / name), split="train", cache_dir=str(tmp_path)
        )
        assert table.column_names == [
            "context_video",
            "next_video",
            "context_caption",
            "next_caption",
            "instruction",
            "world",
        ]
        assert table.to_list() == rows
    from_parquet = NSPVideoDataset(exported / "manifest.parquet")
    from_jsonl = NSPVideoDataset(exported)  # a folder means its manifest.jsonl
    assert torch.equal(from_parquet[2]["next"], from_jsonl[2]["next"])
    assert from_parquet[2]["world"] == from_jsonl[2]["world"]
    json.loads(rows[0]["world"])  # the world column is JSON text in the file


def test_select_frames_matches_brute_force_nearest():
    times = np.arange(48) / 24.0  # 2 s at 24 fps
    assert select_frames(times, 9, None, "start").tolist() == list(range(9))
    assert select_frames(times, 9, None, "end").tolist() == list(range(39, 48))
    for fps in (8.0, 10.0, 12.5):
        for anchor in ("start", "end"):
            got = select_frames(times, 9, fps, anchor)
            ticks = (
                times[0] + np.arange(9) / fps
                if anchor == "start"
                else times[-1] - 8 / fps + np.arange(9) / fps
            )
            brute = [int(np.argmin(np.abs(times - t))) for t in ticks]
            assert got.tolist() == brute, (fps, anchor)
    assert select_frames(times, 9, 4.0, "start") is None  # 8 / 4 = 2 s > 47 / 24 s + half a frame
    assert select_frames(times, 49, None, "end") is None


def test_fps_sampling_and_resizing(tmp_path):
    # 24 fps videos whose frame k is uniformly grey level 5 * k: the decoded level tells the frame index
    levels = np.arange(40) * 5
    frames = (
        np.repeat(levels.astype(np.uint8)[:, None, None, None], 48, axis=1)
        .repeat(64, axis=2)
        .repeat(3, axis=3)
    )
    write_video(tmp_path / "ctx.npz", frames, 24.0)
    write_video(tmp_path / "nxt.npz", frames, 24.0)
    rows = [{"context_video": "ctx.npz", "next_video": "nxt.npz"}]
    config = NSPDataConfig(context_frames=5, next_frames=4, fps=8.0, height=32, width=32)
    sample = NSPVideoDataset(rows, config, root=tmp_path)[0]
    assert sample["next"].shape == (4, 32, 32, 3) and sample["context"].shape == (5, 32, 32, 3)
    index = (sample["next"][:, 16, 16, 0] * 255).round().numpy() / 5
    assert index.tolist() == [0, 3, 6, 9]  # every third frame from the start
    index = (sample["context"][:, 16, 16, 0] * 255).round().numpy() / 5
    assert index.tolist() == [27, 30, 33, 36, 39]  # ending at the last frame
    assert sample["fps"] == 8.0 and sample["instruction"] == "What happens next?"
    assert sample["context_caption"] == "" and "world" not in sample
    clipped = NSPVideoDataset(
        rows, NSPDataConfig(context_frames=9, next_frames=9, clip_frames=9), root=tmp_path
    )[0]
    assert clipped["clips"].shape == (2, 9, 32, 32, 3) and clipped["fps"] == 24.0


def _rewrite(folder, edit) -> None:
    path = folder / "manifest.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_missing_corrupt_unknown_and_short_rows(tmp_path, exported):
    folder = _copy(exported, tmp_path)
    rows, _ = load_manifest(folder)
    (folder / rows[1]["next_video"]).unlink()
    (folder / rows[2]["context_video"]).write_bytes(b"\x00garbage" * 100)
    _rewrite(folder, lambda r: r[3].update(caption="typo column"))
    short = folder / "videos" / "short.mp4"
    write_video(short, torch.rand(5, 32, 32, 3), 8, pix_fmt="yuv444p", crf=0)
    _rewrite(folder, lambda r: r[4].update(next_video="videos/short.mp4"))

    expected = [
        (1, "next_video file not found", rows[1]["next_video"]),
        (2, "cannot read video", rows[2]["context_video"]),
        (3, "unknown column(s) ['caption']", "extra_columns"),
        (4, "too short (5 frames at 8 fps; need 9 frames)", "short.mp4"),
    ]
    for number, problem, name in expected:
        with pytest.raises(InputError) as info:
            NSPVideoDataset(folder)
        message = str(info.value)
        assert f"row {number}" in message and problem in message and name in message, message
        assert "\n" not in message
        # fix this row, so that the next check reaches the next bad row
        _rewrite(folder, lambda r, n=number: r.__setitem__(n, dict(json.loads(json.dumps(rows[0])))))

    # skip mode: the same four bad rows are dropped, counted, and warned about once
    folder = _copy(exported, tmp_path / "again")
    (folder / rows[1]["next_video"]).unlink()
    (folder / rows[2]["context_video"]).write_bytes(b"\x00garbage" * 100)
    write_video(folder / "videos" / "short.mp4", torch.rand(5, 32, 32, 3), 8)
    _rewrite(folder, lambda r: (r[3].update(caption="x"), r[4].update(next_video="videos/short.mp4")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = NSPVideoDataset(folder, NSPDataConfig(on_error="skip"))
    assert len(caught) == 1 and "skipped 4 of 6 rows" in str(caught[0].message)
    assert [n for n, _ in dataset.skipped_rows] == [1, 2, 3, 4] and len(dataset) == 2
    assert dataset[1]["world"]["index"] == 5  # rows keep their identity after skipping
    # an unknown column is fine once declared
    with pytest.warns(UserWarning, match="skipped 3 of 6 rows"):
        declared = NSPVideoDataset(folder, NSPDataConfig(on_error="skip", extra_columns=("caption",)))
    assert len(declared) == 3 and declared[1]["caption"] == "x" and declared[0]["caption"] is None


def test_decode_failure_behind_a_good_header(tmp_path, exported):
    """With probe=False (no header check up front) a damaged file fails at __getitem__, by row."""
    folder = _copy(exported, tmp_path)
    rows, _ = load_manifest(folder)
    (folder / rows[0]["next_video"]).write_bytes(b"\x00garbage" * 100)
    dataset = NSPVideoDataset(folder, NSPDataConfig(probe=False))
    with pytest.raises(InputError, match="row 0: next_video: cannot"):
        dataset[0]
    skipping = NSPVideoDataset(folder, NSPDataConfig(probe=False, on_error="skip"))
    with pytest.warns(UserWarning, match="skipping undecodable rows"):
        assert skipping[0] is None
    assert skipping.num_decode_skips == 1
    loader = torch.utils.data.DataLoader(skipping, batch_size=3, collate_fn=collate_nsp)
    first, second = list(loader)
    assert first["next"].shape == (2, 9, 32, 32, 3) and second["next"].shape == (3, 9, 32, 32, 3)
    assert [w["index"] for w in first["world"]] == [1, 2]


def test_collate(world):
    batch = collate_nsp([world[0], None, world[1]])
    assert batch["context"].shape == (2, 9, 32, 32, 3) and torch.equal(batch["next"][1], world[1]["next"])
    assert batch["next_caption"] == [world[0]["next_caption"], world[1]["next_caption"]]
    assert batch["world"][1] == world[1]["world"]
    assert collate_nsp([None, None]) is None
    small = ToyWorld(ToyWorldConfig(next_frames=17), split="validation", num_samples=1)[0]
    with pytest.raises(InputError, match="shapes differ"):
        collate_nsp([world[0], small])


def test_bad_manifests(tmp_path):
    with pytest.raises(InputError, match="no manifest.jsonl or manifest.parquet"):
        NSPVideoDataset(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"context_video": "a.mp4", "next_video": "b.mp4"}\n{oops\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        NSPVideoDataset(tmp_path)
    with pytest.raises(InputError, match="on_error"):
        NSPDataConfig(on_error="ignore")
    with pytest.raises(InputError, match="row 0: column 'context_video' must be a video path, got None"):
        NSPVideoDataset([{"next_video": "a.mp4"}], root=tmp_path)
    with pytest.raises(InputError, match="row 0: column 'next_caption' must be text"):
        write_video(tmp_path / "a.npz", torch.rand(9, 8, 8, 3), 8)
        NSPVideoDataset([{"context_video": "a.npz", "next_video": "a.npz", "next_caption": 3}], root=tmp_path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextscene")
    toyworld_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_toyworld_command(tmp_path, capsys):
    out = tmp_path / "toy"
    args = _parser().parse_args(
        ["toyworld", "--out", str(out), "--split", "test", "--num", "3", "--no-progress"]
    )
    assert args.func(args) == 0
    assert "wrote 3 test samples" in capsys.readouterr().out
    rows, _ = load_manifest(out)
    assert [r["context_video"] for r in rows] == [f"videos/test-{i:07d}-context.mp4" for i in range(3)]
    assert json.loads((out / "toyworld.json").read_text())["config"]["size"] == 32
    assert NSPVideoDataset(out)[2]["world"]["seed"] == 10_000_002
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        args.func(args)
    args = _parser().parse_args(
        [
            "toyworld",
            "--out",
            str(out),
            "--split",
            "train",
            "--num",
            "2",
            "--size",
            "64",
            "--format",
            "npz",
            "--overwrite",
            "--no-progress",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    sample = NSPVideoDataset(out, NSPDataConfig(height=64, width=64))[1]
    assert sample["next"].shape == (9, 64, 64, 3) and sample["world"]["split"] == "train"
    for argv, message in (
        (["--split", "dev"], "unknown split"),
        (["--size", "20"], "32..128"),
        (["--context-frames", "8"], "8k\\+1"),
    ):
        args = _parser().parse_args(["toyworld", "--out", str(tmp_path / "x"), *argv])
        with pytest.raises(InputError, match=message):
            args.func(args)


def test_command_module_and_package_import_lazily():
    """`nextscene --help` imports every command module: ours must not pull in torch or PyAV."""
    code = (
        "import sys, grpo.data, grpo.data.toyworld_cli; "
        "heavy = {'torch', 'av', 'numpy'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_main_prints_one_line_errors(tmp_path, capsys, monkeypatch):
    from grpo import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["grpo.data.toyworld_cli"])
    assert cli.main(["toyworld", "--out", str(tmp_path), "--num", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nextscene toyworld: error:") and "\n" not in err


def _truncated_mp4(path, frames: int = 9, fps: int = 8) -> None:
    """An MP4 whose header (written first: faststart) promises ``frames`` frames but whose data stops
    half-way: it passes the header probe and fails only when decoded."""
    import av

    full = path.with_suffix(".full.mp4")
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)
        for frame in noise:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_trainers_run_through_an_undecodable_row_with_on_error_skip(tmp_path, stage):
    """A row whose video only fails when decoded (good header) is skipped by training and evaluation
    alike: the rows the trainers read take the next decodable row in its place, deterministically."""
    from grpo.recipe import load_recipe
    from grpo.tracking import read_metrics
    from grpo.train import build_datasets, run, validate
    from policies.tiny import build_tiny_ltx

    world = ToyWorld(split="train", num_samples=4)
    manifest = export_toyworld(world, tmp_path / "data", video_format="npz", progress=False)
    rows, _ = load_manifest(manifest)
    _truncated_mp4(manifest.parent / "videos" / "broken.mp4")
    rows[1]["next_video"] = "videos/broken.mp4"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))

    recipe = tmp_path / "recipe.yaml"
    trainer = (
        "{max_steps: 1, batch_size: 4, eval_every: 1, save_steps: 0}"
        if stage == "sft"
        else "{num_generations: 2, num_prompts_per_iteration: 4, max_iterations: 1, num_inference_steps: 2,"
        " eval_every: 1, save_steps: 0, sample_every: 0, save_eval_videos: 4, num_frames: 9}"
    )
    recipe.write_text(
        f"name: skip\nstage: {stage}\npolicy: {{type: ltx, path: {build_tiny_ltx(tmp_path / 'tiny')}}}\n"
        f"data: {{type: nsp_manifest, path: {manifest}, eval_path: {manifest}, fps: 8, on_error: skip}}\n"
        + ("rewards: [{name: redness}]\n" if stage == "grpo" else "")
        + f"trainer: {trainer}\noutput_dir: {tmp_path / 'run'}\n"
    )
    loaded = load_recipe(recipe)
    train, _ = build_datasets(validate(loaded)[1])
    with pytest.warns(UserWarning, match="skipping undecodable rows"):
        assert train[1]["next_caption"] == train[2]["next_caption"] == rows[2]["next_caption"]
    history = run(loaded)
    assert (tmp_path / "run" / "final").is_dir()
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    key = "loss" if stage == "sft" else "eval/redness/mean"
    assert any(key in m and np.isfinite(m[key]) for m in logged), history
