"""Sequence layout: one token sequence and its multimodal positions from a chat with media.

`Tokenizer.encode_chat` writes ONE placeholder id per media part; `expand_sequence` repeats each
placeholder as many times as its encoder gives tokens (the copies are later overwritten by the
projected encoder tokens, `muomni.omni.OmniModel.embed`) and computes rotary positions ``(3, seq)``
(time, height, width; Qwen2.5-Omni's TMRoPE):

- text: all three equal a running counter, which is plain 1-D RoPE;
- an image: its merged patches share one time, with height/width their row/column in the grid;
- audio: one token per 80 ms (12.5 Hz); time advances ``TICKS_PER_TOKEN`` ticks per token (one tick is
  40 ms, the unit `muomni.video.frame_positions` uses), height and width follow time;
- video: each frame's patches sit at the time tick of the frame's timestamp, with height/width
  as for an image.

After each media span the counter continues at one more than the largest position used so far.
`shift_targets` turns a loss mask into next-token targets for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from muomni.constants import IGNORE_INDEX, MEDIA_KINDS
from muomni.tokenizer import Tokenizer
from muomni.video import frame_positions

TICKS_PER_SECOND = 25.0  # rotary time ticks per second for audio and video (40 ms each)
TICKS_PER_TOKEN = 2  # a 12.5 Hz audio token lasts 80 ms = two ticks


class MediaError(ValueError):
    """A chat part that names no usable media file, or media that do not match their placeholders."""


@dataclass
class Media:
    """One image, audio or video part of a chat, before or after its encoder ran.

    ``tokens`` (the merged encoder outputs, ready for the projector): image ``(mh * mw, 4 * d_vision)``;
    video ``(n_frames * mh * mw, 4 * d_vision)``; audio ``(n_tokens, 2 * d_audio)``. Until the
    encoder runs, ``raw`` holds the encoder input from `OmniModel.load_media` and ``tokens`` is None;
    ``n_tokens`` is known either way, so sequences can be laid out before encoding. ``grid`` is the
    merged patch grid ``(mh, mw)`` of an image or video frame; ``timestamps`` a video's frame times (s).
    """

    kind: str
    n_tokens: int
    name: str = ""
    grid: tuple[int, int] = (1, 1)
    timestamps: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None
    raw: dict[str, Any] | None = None


def media_parts(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image/audio/video parts of a chat in order of appearance (the placeholders' order)."""
    parts = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") in MEDIA_KINDS]
    return parts


def placeholder_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The placeholder id of each media kind."""
    return {"image": tokenizer.image_id, "audio": tokenizer.audio_id, "video": tokenizer.video_id}


def expand_sequence(ids: list[int], mask: list[bool], media: list[Media],
                    tokenizer: Tokenizer) -> tuple[list[int], list[bool], torch.Tensor]:
    """Expand each placeholder to its media's tokens and compute multimodal positions.

    ``ids``/``mask`` come from `Tokenizer.encode_chat` (one placeholder per media part, in the
    order of ``media``). Returns the expanded ids (placeholder id repeated ``n_tokens`` times), the
    loss mask (False on media tokens) and positions ``(3, len(expanded))``.
    """
    kind_of = {v: k for k, v in placeholder_ids(tokenizer).items()}
    slots = [i for i, t in enumerate(ids) if t in kind_of]
    if len(slots) != len(media):
        raise MediaError(f"the chat has {len(slots)} media placeholders but {len(media)} media parts")
    out_ids: list[int] = []
    out_mask: list[bool] = []
    positions: list[torch.Tensor] = []
    nxt = 0  # the next free position of the running counter
    start = 0
    for slot, item in zip(slots, media):
        if kind_of[ids[slot]] != item.kind:
            raise MediaError(f"placeholder {ids[slot]} at token {slot} is not a {item.kind}")
        text = ids[start:slot]
        out_ids += text
        out_mask += mask[start:slot]
        positions.append(torch.arange(nxt, nxt + len(text)).expand(3, -1))
        nxt += len(text)
        pos = media_positions(item, nxt)
        out_ids += [ids[slot]] * item.n_tokens
        out_mask += [False] * item.n_tokens
        positions.append(pos)
        nxt = int(pos.max()) + 1 if pos.numel() else nxt
        start = slot + 1
    tail = ids[start:]
    out_ids += tail
    out_mask += mask[start:]
    positions.append(torch.arange(nxt, nxt + len(tail)).expand(3, -1))
    return out_ids, out_mask, torch.cat(positions, dim=1)


def media_positions(item: Media, start: int) -> torch.Tensor:
    """(time, height, width) positions ``(3, n_tokens)`` of one media item starting at ``start``."""
    if item.kind == "audio":
        t = start + TICKS_PER_TOKEN * torch.arange(item.n_tokens)
        return t.expand(3, -1)
    times = torch.tensor(item.timestamps or [0.0], dtype=torch.float64)
    if item.kind == "image":
        times = times[:1] * 0  # a still image is one frame at its own start time
    return frame_positions(times, item.grid, start=start, ticks_per_second=TICKS_PER_SECOND)


def shift_targets(ids: list[int], mask: list[bool]) -> list[int]:
    """Next-token targets: ``targets[t] = ids[t + 1]`` where ``mask[t + 1]``, else -100."""
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
