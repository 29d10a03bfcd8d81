"""Video tensors, MP4 / GIF / NPZ files and report images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from grpo.data.toyworld import ToyWorld
from policies.errors import InputError
from policies.video_io import (
    as_video,
    frame_grid,
    from_uint8,
    probe_video,
    read_video,
    resize_frame,
    side_by_side,
    split_clips,
    to_uint8,
    write_video,
    write_video_strip,
)


@pytest.fixture(scope="module")
def toy() -> torch.Tensor:
    """A real toy-world video (context + next, 18 frames of 32x32)."""
    sample = ToyWorld(split="test", num_samples=1)[0]
    return torch.cat([sample["context"], sample["next"]])


def test_conversions():
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    video = as_video(frames)
    assert video.dtype == torch.float32 and torch.allclose(video * 255, torch.from_numpy(frames).float())
    assert np.array_equal(to_uint8(video), frames) and np.array_equal(to_uint8(from_uint8(frames)), frames)
    assert torch.equal(as_video(torch.from_numpy(frames)), video)
    assert as_video(np.full((1, 2, 2, 3), 1.5)).max() == 1.5  # float is not clipped...
    assert to_uint8(np.full((1, 2, 2, 3), 1.5)).max() == 255  # ...until it becomes pixels
    with pytest.raises(InputError, match="THWC"):
        as_video(torch.zeros(3, 3, 4, 5))
    with pytest.raises(InputError, match="dtype"):
        as_video(torch.zeros(1, 2, 2, 3, dtype=torch.int32))
    with pytest.raises(InputError, match="uint8"):
        from_uint8(np.zeros((1, 2, 2, 3)))
    clips = split_clips(torch.rand(18, 4, 4, 3), 9)
    assert clips.shape == (2, 9, 4, 4, 3)
    with pytest.raises(InputError, match="multiple of clip_frames"):
        split_clips(torch.rand(17, 4, 4, 3), 9)


def test_mp4_near_lossless_444_round_trip(tmp_path, toy):
    path = write_video(tmp_path / "a.mp4", toy, 8.0, pix_fmt="yuv444p", crf=0)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (18, 8.0, 32, 32)
    video, fps = read_video(path)
    assert fps == 8.0 and video.shape == toy.shape
    # float render -> uint8 (0.5/255) -> H.264 4:4:4 lossless up to RGB<->YUV rounding (1/255)
    assert float((video - toy).abs().max()) <= 2.5 / 255


def test_mp4_default_420_keeps_frames_and_fps(tmp_path, toy):
    video, fps = read_video(write_video(tmp_path / "b.mp4", toy, 12.5))
    assert fps == 12.5 and video.shape == toy.shape
    assert float((video - toy).abs().mean()) < 4 / 255  # chroma subsampling smears edges only


def test_odd_sizes(tmp_path):
    video = torch.rand(9, 33, 31, 3)
    back, _ = read_video(write_video(tmp_path / "odd.mp4", video, 8))  # yuv444p chosen automatically
    assert back.shape == (9, 33, 31, 3)
    with pytest.raises(InputError, match="odd side"):
        write_video(tmp_path / "odd420.mp4", video, 8, pix_fmt="yuv420p")
    back, _ = read_video(write_video(tmp_path / "m.mp4", torch.rand(9, 32, 32, 3), 8, codec="mpeg4"))
    assert back.shape == (9, 32, 32, 3)


def test_gif_and_npz_round_trips(tmp_path, toy):
    frozen = torch.cat([toy[:5], toy[4:5].expand(3, -1, -1, -1)])  # repeated frames: GIF encoders merge them
    back, fps = read_video(write_video(tmp_path / "a.gif", frozen, 8))
    assert back.shape == frozen.shape and abs(fps - 8.0) < 0.5  # GIF delays are 1/100 s
    assert float((back - frozen).abs().max()) <= 0.5 / 255 + 1e-6  # few colours: exact after uint8
    assert probe_video(tmp_path / "a.gif").num_frames == 8
    back, fps = read_video(write_video(tmp_path / "a.npz", toy, 8))
    assert fps == 8.0 and np.array_equal(to_uint8(back), to_uint8(toy))


def test_bad_files_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    for call in (read_video, probe_video):
        with pytest.raises(InputError, match="cannot read video") as info:
            call(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(InputError, match="unsupported video suffix"):
        write_video(tmp_path / "a.txt", torch.rand(1, 2, 2, 3), 8)
    with pytest.raises(InputError, match="fps"):
        write_video(tmp_path / "a.mp4", torch.rand(1, 2, 2, 3), 0)
    np.savez(tmp_path / "wrong.npz", frames=np.zeros((2, 4, 4), dtype=np.uint8), fps=8.0)
    with pytest.raises(InputError, match="expected uint8"):
        read_video(tmp_path / "wrong.npz")


def test_resize_frame():
    frame = np.zeros((48, 64, 3), dtype=np.uint8)
    frame[:, 16:48] = 255  # a white stripe, the centre half of the width

    def white_columns(image: np.ndarray) -> int:
        return int((image[16, :, 0] > 127).sum())

    # crop: scale by 32/48 (aspect kept, the stripe becomes ~21 px) then centre-crop the width
    cropped = resize_frame(frame, 32, 32, "crop")
    assert cropped.shape == (32, 32, 3) and white_columns(cropped) in (21, 22)
    assert cropped[:, 0].max() < 40 and cropped[:, -1].max() < 40 and cropped[:, 16].min() > 250
    # stretch: the width is halved, the stripe keeps half of it
    stretched = resize_frame(frame, 32, 32, "stretch")
    assert white_columns(stretched) == 16 and stretched[:, 8:24].min() > 200
    assert resize_frame(frame, 48, 64) is frame
    with pytest.raises(InputError, match="resize mode"):
        resize_frame(frame, 32, 32, "pad")


def test_frame_grid_places_every_frame(toy):
    a, b = toy[:9], toy[9:13]
    grid = frame_grid([a, b], scale=2, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 65 + 1, 9 * 65 + 1, 3)
    big = to_uint8(a).repeat(2, axis=1).repeat(2, axis=2)
    for j in (0, 8):
        assert np.array_equal(grid[1:65, 1 + j * 65 : 65 + j * 65], big[j])
    assert (grid[66:, 1 + 4 * 65 :] == 255).all()  # the shorter row is padded
    labelled = frame_grid([a, b], ["context", "true next"], num_frames=3)
    assert labelled.shape[1] > 3 * 33 + 1 and labelled.shape[0] == 2 * 33 + 1
    assert labelled[:, : labelled.shape[1] - 3 * 33 - 1].min() < 100  # text drawn in the margin
    assert np.array_equal(labelled[1:33, -33:-1], to_uint8(a)[8])  # num_frames keeps the last frame


def test_side_by_side_and_strip_writer(tmp_path, toy):
    strip = side_by_side([toy[:9], toy[9:12]], scale=2, pad=2)
    assert strip.shape == (9, 64 + 4, 64 * 2 + 6, 3)
    assert np.array_equal(
        strip[8, 2:66, 68:132], to_uint8(toy[11:12])[0].repeat(2, 0).repeat(2, 1)
    )  # held last frame
    labelled = side_by_side([toy[:9], toy[9:]], ["context", "true next"], scale=4)
    assert labelled.shape[1] > 128 + 4 and labelled[0, :10].min() < 100  # label band with text
    for suffix in (".gif", ".mp4"):
        path = write_video_strip(tmp_path / f"strip{suffix}", [toy[:9], toy[9:], toy[9:]], 8, ["a", "b", "c"])
        info = probe_video(path)
        assert info.num_frames == 9 and info.width % 2 == 0 and info.width >= 3 * 128
    Image.fromarray(frame_grid([toy])).save(tmp_path / "grid.png")  # a valid image for reports
