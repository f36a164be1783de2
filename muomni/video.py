"""Video frames with timestamps, and the time/height/width positions of their patch tokens.

A video reaches the model as a few sampled frames, each encoded by the ViT like an image. Frames are
picked uniformly over the clip (``n_frames``) or at a fixed rate (``fps``): MP4 and other containers
are decoded by torchcodec (FFmpeg underneath), GIFs by Pillow. Every frame keeps the time in seconds
at which it is shown, so the Thinker can be told *when* it happened: `frame_positions` gives each
patch token a (time, height, width) position for the multimodal rotary embedding of `layers.py`
(TMRoPE of Qwen2.5-Omni: time counts 25 ticks per second, one per 40 ms, rather than frame numbers).

Shapes: `Clip.frames` ``(n_frames, 3, height, width)`` uint8, `Clip.timestamps` ``(n_frames,)``
seconds; `frame_positions` -> ``(3, n_frames * grid_h * grid_w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

GIF_DEFAULT_FRAME_MS = 100  # a GIF frame without a duration is shown for 100 ms, as browsers do
FFMPEG_HINT = ("install FFmpeg (conda install -c conda-forge ffmpeg, sudo apt install ffmpeg, "
               "or brew install ffmpeg), or convert the clip to GIF")


class VideoError(ValueError):
    """A video that is missing, unreadable, or cannot be decoded on this machine."""


@dataclass
class Clip:
    """Frames sampled from a video with the times (seconds) at which they are shown."""

    frames: torch.Tensor  # (n_frames, 3, height, width) uint8 RGB
    timestamps: torch.Tensor  # (n_frames,) float64 seconds from the start of the clip
    duration: float  # length of the whole clip in seconds
    fps: float  # average frame rate of the source


def read_video(path: str | Path, n_frames: int | None = 8, fps: float | None = None,
               max_frames: int = 64) -> Clip:
    """Sample frames from an MP4 (or any container FFmpeg reads) or a GIF.

    With ``fps`` frames are taken every ``1 / fps`` seconds from the start; otherwise ``n_frames``
    are spread uniformly, one at the middle of each of ``n_frames`` equal stretches of the clip.
    At most ``max_frames`` are returned (a long clip at a fixed rate is thinned uniformly).
    Clips shorter than ``n_frames`` frames repeat frames.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes); expected an MP4 or GIF clip")
    if fps is None and (n_frames is None or n_frames < 1):
        raise VideoError(f"asked for {n_frames} frames of {path}; give n_frames >= 1 or an fps")
    if fps is not None and fps <= 0:
        raise VideoError(f"fps must be positive to sample {path}, got {fps}")
    reader = _read_gif if path.suffix.lower() == ".gif" else _read_with_torchcodec
    return reader(path, n_frames, fps, max_frames)


def sample_times(duration: float, n_frames: int | None, fps: float | None, max_frames: int) -> np.ndarray:
    """The times (seconds) to show: every ``1 / fps`` s, or the middles of ``n_frames`` equal stretches."""
    if fps is not None:
        times = np.arange(0.0, duration, 1.0 / fps)
        if len(times) > max_frames:
            times = times[np.linspace(0, len(times) - 1, max_frames).round().astype(int)]
        return times
    count = min(n_frames, max_frames)
    return (np.arange(count) + 0.5) * duration / count


def _read_with_torchcodec(path: Path, n_frames: int | None, fps: float | None, max_frames: int) -> Clip:
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, OSError, RuntimeError) as error:  # torchcodec loads FFmpeg's libraries on import
        raise VideoError(f"cannot decode {path}: torchcodec could not load FFmpeg ({str(error).splitlines()[0]}); "
                         f"{FFMPEG_HINT}") from None
    try:
        decoder = VideoDecoder(str(path), seek_mode="approximate")
        meta = decoder.metadata
        duration = float(meta.duration_seconds or 0.0)
        if duration <= 0 or not meta.num_frames:
            raise VideoError(f"{path} has no video frames")
        times = sample_times(duration, n_frames, fps, max_frames)
        # Stay strictly inside the stream: the last frame is shown until `duration`, exclusive.
        times = np.clip(times, float(meta.begin_stream_seconds or 0.0), duration - 1e-6)
        batch = decoder.get_frames_played_at(times.tolist())
    except VideoError:
        raise
    except (RuntimeError, ValueError, IndexError) as error:
        raise VideoError(f"{path} cannot be decoded as video ({str(error).splitlines()[0]})") from None
    average_fps = float(meta.average_fps or meta.num_frames / duration)
    return Clip(batch.data.contiguous(), batch.pts_seconds.to(torch.float64), duration, average_fps)


def _read_gif(path: Path, n_frames: int | None, fps: float | None, max_frames: int) -> Clip:
    try:
        with Image.open(path) as gif:
            starts_ms, images = [], []
            elapsed_ms = 0  # GIF durations are whole milliseconds: sum them exactly
            for frame in ImageSequence.Iterator(gif):
                starts_ms.append(elapsed_ms)
                elapsed_ms += int(frame.info.get("duration") or GIF_DEFAULT_FRAME_MS)
                # Transparent pixels are shown on white, as for still images.
                rgba = frame.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                images.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VideoError(f"{path} is not a GIF Pillow can read ({error})") from None
    starts, elapsed = np.asarray(starts_ms) / 1000.0, elapsed_ms / 1000.0
    times = sample_times(elapsed, n_frames, fps, max_frames)
    # The frame shown at time t is the last one that started at or before t.
    index = np.searchsorted(starts, times, side="right") - 1
    frames = torch.from_numpy(np.stack([images[i] for i in index])).permute(0, 3, 1, 2).contiguous()
    return Clip(frames, torch.from_numpy(starts[index]).to(torch.float64), elapsed, len(images) / elapsed)


def frame_positions(timestamps: torch.Tensor, grid: tuple[int, int], start: int = 0,
                    ticks_per_second: float = 25.0) -> torch.Tensor:
    """(time, height, width) positions ``(3, n_frames * grid_h * grid_w)`` of frames' patch tokens.

    Tokens are ordered frame by frame, each frame row-major (as `vision.merge_2x2` returns them).
    Time is ``round(timestamp * ticks_per_second)``, so frames keep their real spacing however
    they were sampled; height and width are the row and column. Everything is offset by ``start``
    (the position after the preceding text). A still image is one frame at time 0. The text after
    the clip continues at ``positions.max() + 1``.
    """
    grid_h, grid_w = grid
    n_frames = timestamps.shape[0]
    t = (timestamps.double() * ticks_per_second).round().long()
    t = t.view(n_frames, 1, 1).expand(n_frames, grid_h, grid_w)
    h = torch.arange(grid_h).view(1, grid_h, 1).expand(n_frames, grid_h, grid_w)
    w = torch.arange(grid_w).view(1, 1, grid_w).expand(n_frames, grid_h, grid_w)
    return torch.stack([t, h, w]).reshape(3, -1) + start


def frame_differences(tokens: torch.Tensor, n_frames: int) -> torch.Tensor:
    """A clip's tokens ``(n_frames * tokens_per_frame, d)`` with every frame after the first replaced
    by its difference from the frame before, same shape.

    The first frame still says what is in the clip. In each later one, whatever stayed where it was
    cancels and what moved stands out twice: where it left and where it arrived. A motion question
    then asks where the only tokens that are not nearly zero lie, rather than asking the Thinker to find
    one object in two frames and compare (`OmniConfig.video_tokens`; study/10).
    """
    frames = tokens.reshape(n_frames, -1, tokens.shape[-1])
    return torch.cat([frames[:1], frames[1:] - frames[:-1]]).reshape(tokens.shape)
