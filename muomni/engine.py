"""The inference engine: one sampler and one KV-cached decode loop for every model that writes.

The Thinker writes text tokens and the Talker writes codec frames, but both decode the same way::

    logits = prefill(prompt)        # once: the whole prompt fills the KV cache
    repeat:
        ids = sample(logits)        # greedy, or temperature / top-k / top-p
        stop once every row has finished
        logits = step(ids)          # feed the chosen ids back: one position more in the cache

`decode` is that loop, and the only one in μOmni. A model runs its own prefill and hands `decode`
the last logits and a ``step`` callable that feeds ids back through its cache (the model knows its
positions and inputs; the loop does not need to). `Rules` say what may be sampled and when a row is
finished: by default a row ends at a stop token; the Talker's delay pattern is its own `Rules`.
(nanochat keeps its ``Engine`` apart from the model in the same way.)

Shapes: logits ``(batch, vocab)`` when each step picks one id per row, ``(batch, n_q, vocab)`` when it
picks several (the Talker's codebooks); the ids are ``(batch,)`` or ``(batch, n_q)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from muomni.config import SamplingConfig

GREEDY = SamplingConfig()  # temperature 0: always the most likely id

# Feeds chosen ids back into the model; returns the next logits and a state the caller may want
# back (the Thinker's hidden state; None for the Talker).
Step = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of logits ``(..., vocab)`` -> ``(...)``: greedy at temperature 0, else sampled
    from the temperature-scaled distribution restricted to the top-k ids and the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    rows = logits.reshape(-1, logits.shape[-1]).float() / temperature
    if 0 < top_k < rows.shape[-1]:
        kth = rows.topk(top_k, dim=-1).values[:, -1:]
        rows = rows.masked_fill(rows < kth, float("-inf"))
    if top_p < 1.0:
        sorted_rows, order = rows.sort(dim=-1, descending=True)
        probs = sorted_rows.softmax(dim=-1)
        # Drop an id when the ids ranked above it already hold top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        rows = rows.scatter(-1, order, sorted_rows.masked_fill(drop, float("-inf")))
    ids = torch.multinomial(rows.softmax(dim=-1), 1, generator=generator)
    return ids.view(logits.shape[:-1])


class Rules:
    """What the loop may sample and when a row is done: a row ends when it samples a stop id, and a
    finished row writes ``pad_id`` until the whole batch is done."""

    def __init__(self, stop_ids: Sequence[int] = (), pad_id: int = 0):
        self.stop_ids, self.pad_id = tuple(stop_ids), pad_id

    def allow(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The logits to sample from at ``step`` (here: all ids are allowed)."""
        return logits

    def settle(self, ids: torch.Tensor, step: int, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids kept at ``step`` and which rows ``(batch,)`` are finished after it."""
        ids = ids.masked_fill(done, self.pad_id)
        return ids, done | torch.isin(ids, torch.tensor(self.stop_ids, device=ids.device))


@torch.no_grad()
def decode(step: Step, logits: torch.Tensor, state: Any, max_steps: int,
           sampling: SamplingConfig = GREEDY, generator: torch.Generator | None = None,
           rules: Rules | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
    """The decode loop: yield ``(ids, state)`` per step, ``state`` being what the ids were predicted from.

    ``logits`` and ``state`` come from the model's prefill. At most ``max_steps`` ids are sampled; the
    last ones are not fed back, as nothing would read the logits they give. ``generator`` makes
    sampling reproducible.
    """
    rules = rules or Rules()
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for index in range(max_steps):
        allowed = rules.allow(logits, index)
        ids = sample(allowed, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        ids, done = rules.settle(ids, index, done)
        yield ids, state
        if bool(done.all()) or index == max_steps - 1:
            return
        logits, state = step(ids)
