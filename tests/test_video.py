"""Video: frame sampling with timestamps from a generated MP4 and GIF, positions, errors."""

from __future__ import annotations

import builtins

import pytest
import torch
from PIL import Image

from muomni.video import VideoError, frame_positions, read_video, sample_times


def brightness_ramp(n: int, height: int = 32, width: int = 48) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 frames whose red channel grows by 12 per frame: frame i reads as ~12 i."""
    frames = torch.zeros(n, 3, height, width, dtype=torch.uint8)
    for i in range(n):
        frames[i, 0] = 12 * i
    return frames


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    encoders = pytest.importorskip("torchcodec.encoders")
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    encoders.VideoEncoder(brightness_ramp(20), frame_rate=10).to_file(path, crf=0)  # 2 s at 10 fps
    return path


@pytest.fixture(scope="module")
def gif(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "ramp.gif"
    frames = [Image.new("RGB", (16, 8), (20 * i, 0, 0)) for i in range(10)]
    # five 100 ms frames, then five 200 ms frames: 1.5 s
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100] * 5 + [200] * 5, loop=0)
    return path


def test_uniform_times_are_the_middles_of_equal_stretches():
    assert sample_times(2.0, 4, None, 64).tolist() == [0.25, 0.75, 1.25, 1.75]
    assert sample_times(1.0, None, 4.0, 64).tolist() == [0.0, 0.25, 0.5, 0.75]
    thinned = sample_times(10.0, None, 10.0, 5)  # 100 frames at 10 fps thinned to 5
    assert len(thinned) == 5 and thinned[0] == 0.0 and thinned[-1] == pytest.approx(9.9)


def test_mp4_uniform_frames_and_timestamps(mp4):
    clip = read_video(mp4, n_frames=4)
    assert clip.frames.shape == (4, 3, 32, 48) and clip.frames.dtype == torch.uint8
    assert clip.duration == pytest.approx(2.0) and clip.fps == pytest.approx(10.0)
    # middles 0.25, 0.75, 1.25, 1.75 s fall in frames 2, 7, 12, 17, shown from 0.2, 0.7, 1.2, 1.7 s
    torch.testing.assert_close(clip.timestamps, torch.tensor([0.2, 0.7, 1.2, 1.7], dtype=torch.float64))
    red = clip.frames[:, 0].float().mean((1, 2))
    torch.testing.assert_close(red, torch.tensor([24.0, 84.0, 144.0, 204.0]), atol=4.0, rtol=0)


def test_mp4_fixed_fps(mp4):
    clip = read_video(mp4, fps=2.0)
    torch.testing.assert_close(clip.timestamps, torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64))
    red = clip.frames[:, 0].float().mean((1, 2))
    torch.testing.assert_close(red, torch.tensor([0.0, 60.0, 120.0, 180.0]), atol=4.0, rtol=0)


def test_gif_frames_follow_their_durations(gif):
    clip = read_video(gif, n_frames=5)  # middles of 0.3 s stretches: 0.15, 0.45, 0.75, 1.05, 1.35 s
    assert clip.frames.shape == (5, 3, 8, 16) and clip.duration == pytest.approx(1.5)
    torch.testing.assert_close(clip.timestamps, torch.tensor([0.1, 0.4, 0.7, 0.9, 1.3], dtype=torch.float64))
    assert clip.frames[:, 0, 0, 0].tolist() == [20, 80, 120, 140, 180]  # frames 1, 4, 6, 7, 9
    assert read_video(gif, n_frames=None, fps=1.0).timestamps.tolist() == [0.0, 0.9]


def test_frame_positions_count_time_rows_and_columns():
    positions = frame_positions(torch.tensor([0.0, 0.5]), (2, 3), start=10)
    assert positions.shape == (3, 12)
    assert positions[0].tolist() == [10] * 6 + [10 + 12 for _ in range(6)]  # 0.5 s = 12.5 ticks -> 12
    assert positions[1].tolist() == [10, 10, 10, 11, 11, 11] * 2
    assert positions[2].tolist() == [10, 11, 12] * 4
    assert frame_positions(torch.tensor([1.0]), (1, 1), ticks_per_second=2.0).tolist() == [[2], [0], [0]]


def test_missing_empty_and_broken_videos(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4 does not exist"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty.mp4 is empty \(0 bytes\)"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoError, match="junk.mp4 cannot be decoded"):
        read_video(tmp_path / "junk.mp4")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a but not really")
    with pytest.raises(VideoError, match="junk.gif is not a GIF Pillow can read"):
        read_video(tmp_path / "junk.gif")


def test_missing_ffmpeg_names_how_to_install_it(mp4, monkeypatch):
    real_import = builtins.__import__

    def no_torchcodec(name, *args, **kwargs):
        if name.startswith("torchcodec"):
            raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchcodec)
    with pytest.raises(VideoError, match="torchcodec could not load FFmpeg.*install FFmpeg.*apt install ffmpeg"):
        read_video(mp4, n_frames=2)
