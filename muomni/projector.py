"""Projectors: small MLPs that turn merged encoder outputs into tokens the Thinker can read.

The encoders speak their own widths and rates; the Thinker reads ``(batch, seq, d_model)``.
Before projection, neighbouring encoder outputs are *merged* by concatenation: fewer, wider tokens,
because the Thinker's context is the scarce resource. The encoders' own helpers do the merging
(`muomni.audio.merge_pairs`: 25 Hz AuT frames in pairs -> 12.5 Hz, width ``2 * d_audio``, or
`muomni.audio.pool_words`: one token per heard word, the same width;
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


class VisualWords(nn.Module):
    """The ViT's attribute heads read as words: each merged image token also gets the Thinker's own
    embeddings of the words that name what it holds ("red", "star", "big", "top left").

    Stage C trains linear attribute heads on the merged patches (class 0: nothing there). Here each
    head's softmax weighs a table of word embeddings, initialised from the Thinker's embeddings of the
    class names (`init_words`), so an image token arrives already looking like the words a question
    uses: finding "the star" becomes matching a word the Thinker knows, and the answer can be copied
    off the token. The heads stay frozen; the word tables are trained.

    Shapes: merged ``(..., d_in)`` -> ``(..., d_model)``.
    """

    def __init__(self, d_in: int, classes: tuple[int, ...], d_model: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d_in, n) for n in classes)
        self.words = nn.ParameterList(nn.Parameter(torch.zeros(n, d_model)) for n in classes)

    @torch.no_grad()
    def init_words(self, embed_word) -> None:
        """Row ``c`` of table ``a`` <- ``embed_word(a, c)`` for every named class (row 0, "none", stays zero)."""
        for attribute, table in enumerate(self.words):
            for cls in range(1, table.shape[0]):
                table[cls] = embed_word(attribute, cls)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """merged ``(..., d_in)`` -> the expected word embedding per attribute, summed ``(..., d_model)``."""
        return sum(head(merged).softmax(-1) @ table for head, table in zip(self.heads, self.words))
