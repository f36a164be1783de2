"""Batching variable-length samples: pad to the longest and return a mask of the real positions.

`pad([a (3, d), b (5, d)], value=0)` -> `(padded (2, 5, d), mask (2, 5) bool)`, True where real.
Right padding is for training; left padding (`side="left"`) lines up the ends of prompts for batched
generation. `collate_dicts` applies this per key to a list of sample dicts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def pad(seqs: Sequence[Tensor], value: float = 0, side: str = "right") -> tuple[Tensor, Tensor]:
    """Pad tensors `(length_i, *rest)` to `(batch, max_length, *rest)`; mask `(batch, max_length)`."""
    if not seqs:
        raise ValueError("pad() needs at least one sequence")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got '{side}'")
    rest = seqs[0].shape[1:]
    for s in seqs:
        if s.shape[1:] != rest:
            raise ValueError(f"cannot pad sequences with trailing shapes {tuple(rest)} and {tuple(s.shape[1:])}")
    longest = max(len(s) for s in seqs)
    padded = seqs[0].new_full((len(seqs), longest, *rest), value)
    mask = torch.zeros(len(seqs), longest, dtype=torch.bool, device=seqs[0].device)
    for row, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
        padded[row, span] = s
        mask[row, span] = True
    return padded, mask


def collate_dicts(batch: list[dict[str, Any]], pad_values: dict[str, float] | None = None) -> dict[str, Any]:
    """Merge sample dicts into one batch dict.

    Tensors of equal shape are stacked; tensors of different lengths are padded (with
    `pad_values[key]`, default 0) and get a `<key>_mask`. Everything else becomes a list.
    """
    pad_values = pad_values or {}
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if all(isinstance(v, Tensor) for v in values):
            if all(v.shape == values[0].shape for v in values):
                out[key] = torch.stack(values)
            else:
                out[key], out[f"{key}_mask"] = pad(values, pad_values.get(key, 0))
        else:
            out[key] = values
    return out
