"""Stage E's warm start for spoken words: put each heard word where the Thinker keeps the written one.

With ``audio_tokens="words"`` the AuT gives the Thinker one token per word its CTC head hears
(`muomni.audio.pool_words`). Before stage E, the audio projector alone is fitted so that the token of
a spoken word lands on the Thinker's input embedding of that word (the mean of its BPE pieces, as it
appears inside a sentence). Stage E then starts from a Thinker that reads a spoken question almost as
it reads the written one, so what it learns from text questions carries over to spoken ones.

Recordings whose heard word count differs from their transcript's are skipped: their words cannot be
paired one to one. Shapes: pooled words ``(n, 2 * d_audio)`` -> projected ``(n, d_model)``, fitted
to targets ``(n, d_model)`` by mean squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from muomni.omni import OmniModel

BATCH = 256  # word pairs per step of the fit
LR = 1e-3  # AdamW learning rate of the fit


@torch.no_grad()
def spoken_word_pairs(model: OmniModel, rows: list[dict[str, Any]], base_dir: Path,
                      embed_word: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pooled word tokens ``(n, 2 * d_audio)``, their words' embeddings ``(n, d_model)`` and how many
    recordings gave them, from speech manifest rows ``{"audio": path, "text": transcript}``."""
    tokens, targets, used = [], [], 0
    for row in rows:
        item = model.load_media({"type": "audio", "path": row["audio"]}, base_dir)
        words = row["text"].split()
        if item.n_tokens != len(words):
            continue
        model.encode([item])
        tokens.append(item.tokens.cpu())
        targets += [embed_word(word).cpu() for word in words]
        used += 1
    if not tokens:
        return torch.empty(0), torch.empty(0), 0
    return torch.cat(tokens), torch.stack(targets), used


def fit_audio_projector(model: OmniModel, tokens: torch.Tensor, targets: torch.Tensor, steps: int,
                        seed: int = 0) -> float:
    """``steps`` AdamW steps of the audio projector alone towards ``targets``; the last batch's loss."""
    optimizer = torch.optim.AdamW(model.audio_proj.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randint(len(tokens), (BATCH,), generator=generator)
        loss = F.mse_loss(model.audio_proj(tokens[batch].to(model.device)), targets[batch].to(model.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
