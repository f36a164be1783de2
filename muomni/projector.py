"""Projectors: small MLPs that turn merged encoder outputs into tokens the Thinker can read.

The encoders speak their own widths and rates; the Thinker reads ``(batch, seq, d_model)``.
Before projection, neighbouring encoder outputs are *merged* by concatenation: fewer, wider tokens,
because the Thinker's context is the scarce resource. The encoders' own helpers do the merging
(`muomni.audio.merge_pairs`: 25 Hz AuT frames in pairs -> 12.5 Hz, width ``2 * d_audio``;
`muomni.vision.merge_2x2`: 2x2 blocks of ViT patches, width ``4 * d_vision``). The projector then
maps each merged token with LayerNorm -> Linear -> GELU -> Linear, the recipe of Qwen2-VL's
``PatchMerger`` and nanoVLM's ``ModalityProjector``.

Shapes: ``(..., d_in) -> (..., d_model)``, applied to every token independently.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """norm -> Linear(d_in, hidden) -> GELU -> Linear(hidden, d_model), token by token."""

    def __init__(self, d_in: int, hidden: int, d_model: int):
        super().__init__()
        # The norm puts every encoder on the same scale, whatever its own final norm produced.
        self.norm = nn.LayerNorm(d_in)
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """merged ``(..., d_in)`` -> ``(..., d_model)``."""
        return self.down(F.gelu(self.up(self.norm(merged))))
