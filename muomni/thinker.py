"""The Thinker: a decoder-only language model that reads every modality and writes text.

A Llama-style stack (Touvron et al., 2023) built from `muomni.layers`: token embedding, pre-norm
blocks with RMSNorm, rotary positions, grouped-query attention and SwiGLU, a final norm and a
vocabulary head (tied to the embedding or not). As in Qwen2.5-Omni's Thinker, it can read
``inputs_embeds`` instead of token ids, so projected image/audio/video features can sit in the
sequence, and multimodal positions ``(3, batch, seq)`` (time, height, width) rotate separate
frequency bands; text uses the same value in all three, which equals plain 1-D RoPE.

Shapes::

    input_ids       (batch, seq)               token ids
    inputs_embeds   (batch, seq, d_model)      instead of input_ids
    attention_mask  (batch, seq)               True/1 on real tokens, False/0 on (left) padding
    position_ids    (batch, seq) or (3, batch, seq)
    logits          (batch, seq, vocab_size)
    hidden          (batch, seq, d_model)      after the final norm

`Thinker.loss` fuses the vocabulary head with the cross-entropy and works through the tokens in
chunks, so the full ``(tokens, vocab)`` logits are never stored for the backward pass (the idea
of Liger Kernel's fused linear cross-entropy). `Thinker.generate` prefills a preallocated KV cache
and decodes through `muomni.engine` (greedy, temperature, top-k and top-p sampling, stop tokens),
batched left-padded prompts included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from muomni.config import SamplingConfig, ThinkerConfig
from muomni.constants import EOS_ID, IGNORE_INDEX, IM_END_ID, PAD_ID
from muomni.engine import GREEDY, Rules, decode
from muomni.layers import KVCache, RotaryEmbedding, Transformer, text_positions



class ThinkerError(ValueError):
    """A Thinker input that does not fit the model (too long, wrong shape)."""


class ThinkerOutput(NamedTuple):
    logits: torch.Tensor  # (batch, seq, vocab_size)
    hidden: torch.Tensor  # (batch, seq, d_model), final-normed
    aux_loss: torch.Tensor  # MoE load-balancing loss (0 without experts)


class Thinker(nn.Module):
    """Decoder-only LM over token ids or input embeddings."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.transformer = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Residual projections start smaller so the residual stream's variance does not grow with
        # depth (GPT-2's scaled init).
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "down.weight")):
                nn.init.normal_(param, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self._head_by_column: tuple[tuple, torch.Tensor] | None = None  # see `_decode_head`
        self._logits_workspace: torch.Tensor | None = None  # see `head_loss`

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(batch, seq) -> (batch, seq, d_model)``."""
        return self.tok_emb(input_ids)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions."""
        if max_len > self.cfg.max_seq_len:
            raise ThinkerError(f"cache of {max_len} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        weight = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------------------------------------
    # Forward

    def hidden_states(self, input_ids: torch.Tensor | None = None, *,
                      inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states ``(batch, seq, d_model)`` and the MoE aux loss (no head)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ThinkerError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        past = cache.length if cache is not None else 0
        if past + seq > self.cfg.max_seq_len:
            raise ThinkerError(f"sequence of {past + seq} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # all real tokens: let attention use its fast causal path
        if cache is not None:
            cache.append_mask(attention_mask, seq)
        if position_ids is None:
            position_ids = self._default_positions(batch, seq, x.device, attention_mask, cache)
        rope = self.rope(position_ids)
        # With a cache the attention reads the padding from the cache's own mask.
        key_padding_mask = None if cache is not None else attention_mask
        hidden = self.transformer(x, rope, key_padding_mask, cache)
        return hidden, self.transformer.aux_loss()

    def _default_positions(self, batch: int, seq: int, device: torch.device,
                           attention_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        if cache is not None and cache.length > 0:
            # Count real tokens so far, row by row, so left padding never shifts a position.
            return text_positions(cache.mask[:, : cache.length + seq])[:, cache.length:]
        if attention_mask is not None:
            return text_positions(attention_mask)
        return torch.arange(seq, device=device).expand(batch, seq)

    def forward(self, input_ids: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ThinkerOutput:
        hidden, aux_loss = self.hidden_states(input_ids, inputs_embeds=inputs_embeds,
                                              attention_mask=attention_mask, position_ids=position_ids,
                                              cache=cache)
        return ThinkerOutput(self.head(hidden), hidden, aux_loss)

    def loss(self, input_ids: torch.Tensor | None, targets: torch.Tensor,
             attention_mask: torch.Tensor | None = None, *,
             inputs_embeds: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (+ ``moe_aux_weight`` x MoE aux loss).

        ``targets`` ``(batch, seq)`` is already shifted: ``targets[:, t]`` is the token that should
        follow position ``t`` (``input_ids[:, t + 1]`` for plain text); ``-100`` is ignored.
        """
        hidden, aux_loss = self.hidden_states(input_ids, inputs_embeds=inputs_embeds,
                                              attention_mask=attention_mask, position_ids=position_ids)
        loss = self.head_loss(hidden, targets)
        if self.cfg.n_experts > 0:
            loss = loss + self.cfg.moe_aux_weight * aux_loss
        return loss

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head on ``hidden`` ``(..., d_model)`` against ``targets`` ``(...)``.

        Runs `linear_cross_entropy` with a logits workspace that the Thinker keeps between calls:
        a freshly allocated buffer of this size is handed back to the operating system when freed
        and faulted in again page by page on the next step, which on a CPU costs more than the
        arithmetic on it. The workspace holds at most `WORKSPACE_BYTES`, is made on the first
        training call (evaluation without gradients needs none) and grows with the batch; it is
        not a parameter or a buffer, so it is never saved.
        """
        if not torch.is_grad_enabled():
            return linear_cross_entropy(hidden, self.head.weight, targets)
        vocab = self.head.weight.shape[0]
        rows = min(chunk_rows(vocab, WORKSPACE_BYTES), hidden[..., 0].numel())  # no taller than the batch
        workspace = self._logits_workspace
        if (workspace is None or workspace.device != hidden.device or workspace.shape[1] != vocab
                or workspace.shape[0] < rows):
            workspace = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            self._logits_workspace = workspace
        return linear_cross_entropy(hidden, self.head.weight, targets, workspace=workspace)

    # ------------------------------------------------------------------------------------------
    # Generation

    def _decode_head(self) -> torch.Tensor:
        """The head weight laid out as ``(d_model, vocab)`` for one-token decoding steps.

        A decoding step multiplies one hidden vector by the whole head, which is bound by reading
        the weight from memory; on CPUs (MKL) that read runs about twice as fast from this layout
        as from nn.Linear's ``(vocab, d_model)``. The copy is remade whenever the weight changes.
        """
        weight = self.head.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._head_by_column is None or self._head_by_column[0] != key:
            self._head_by_column = (key, weight.detach().t().contiguous())
        return self._head_by_column[1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *,
                 inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop_ids: tuple[int, ...] = (EOS_ID, IM_END_ID), return_hidden: bool = False,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 ) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
        """Continue each prompt row; return the new token ids per row (stop token excluded).

        Prompts are left-padded: ``attention_mask`` ``(batch, seq)`` marks real tokens. ``temperature=0``
        is greedy. With ``return_hidden`` also returns, per row, the ``(n_new, d_model)`` hidden states
        each new token was predicted from. See `generate_steps` for the rest.
        """
        tokens, hiddens = [], []
        for token, hidden in self.generate_steps(
                input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature, top_k, top_p),
                stop_ids=stop_ids, use_cache=use_cache, generator=generator):
            tokens.append(token)
            hiddens.append(hidden)
        rows = torch.stack(tokens, dim=1).tolist() if tokens else []
        lengths = [next((i for i, t in enumerate(row) if t in stop_ids), len(row)) for row in rows]
        new = [row[:n] for row, n in zip(rows, lengths)]
        if not return_hidden:
            return new
        stacked = torch.stack(hiddens, dim=1) if hiddens else None
        return new, [stacked[i, :n] for i, n in enumerate(lengths)] if stacked is not None else []

    @torch.no_grad()
    def generate_steps(self, input_ids: torch.Tensor | None = None, *,
                       inputs_embeds: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None,
                       max_new_tokens: int = 64, sampling: SamplingConfig = GREEDY,
                       stop_ids: tuple[int, ...] = (EOS_ID, IM_END_ID), use_cache: bool = True,
                       generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill the prompt, then yield per step the new tokens ``(batch,)`` and the hidden states
        ``(batch, d_model)`` they were predicted from (the loop is `muomni.engine.decode`).

        A row that has sampled a stop id writes ``PAD_ID`` until every row is done. New tokens take
        positions (largest prompt position of the row) + 1, + 2, ... in every axis, so 3-D multimodal
        prompts continue correctly. ``use_cache=False`` recomputes the whole sequence every step (for
        comparison). The last new token is never fed back, so the prompt and all new tokens but that
        one must fit ``max_seq_len``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ThinkerError("pass exactly one of input_ids and inputs_embeds")
        prompt = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = prompt.shape[:2]
        held = seq + max(max_new_tokens - 1, 0)  # positions the sequence ever holds
        if held > self.cfg.max_seq_len:
            raise ThinkerError(f"prompt of {seq} tokens + max_new_tokens {max_new_tokens} needs {held} positions, "
                               f"more than max_seq_len {self.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
        device = prompt.device
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        positions = text_positions(mask) if position_ids is None else position_ids
        # Next position of each row, the same in every axis for multimodal positions.
        real = positions.masked_fill(~mask, 0)
        next_pos = (real.amax(dim=(0, 2)) if real.dim() == 3 else real.amax(dim=1)) + 1  # (batch,)
        cache = self.new_cache(batch, held) if use_cache else None
        head = self._decode_head()
        fed = 0  # tokens fed back so far

        def step(token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Feed new tokens ``(batch,)`` back: the next logits ``(batch, vocab)`` and hidden states."""
            nonlocal fed, prompt, mask, positions
            pos = (next_pos + fed).unsqueeze(1)  # (batch, 1)
            pos = pos.expand(3, batch, 1) if positions.dim() == 3 else pos
            fed += 1
            if use_cache:
                hidden, _ = self.hidden_states(token.unsqueeze(1), position_ids=pos, cache=cache)
            else:
                prompt = torch.cat([prompt, self.embed(token.unsqueeze(1))], dim=1)
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                positions = torch.cat([positions, pos], dim=-1)
                hidden, _ = self.hidden_states(inputs_embeds=prompt, attention_mask=mask, position_ids=positions)
            last = hidden[:, -1]
            return last @ head, last

        hidden, _ = self.hidden_states(inputs_embeds=prompt, attention_mask=mask, position_ids=positions, cache=cache)
        last = hidden[:, -1]  # left padding puts every row's last real token in the last column
        yield from decode(step, last @ head, last, max_new_tokens, sampling, generator, Rules(stop_ids, PAD_ID))


# ----------------------------------------------------------------------------------------------
# Fused, chunked vocabulary head + cross-entropy

# Without a workspace, logits are formed for at most this many bytes at a time. Below glibc's
# largest mmap threshold (32 MiB), a freed buffer is reused instead of being handed back to the OS
# and faulted in again page by page, which on a CPU costs more than the arithmetic on it.
CHUNK_BYTES = 32 * 2**20
# The workspace `Thinker.head_loss` keeps: 1024 tokens of a 32 000-word vocabulary. Chunks this
# tall keep the head's matmuls near their peak (at 256 rows the logits matmul runs about 20% slower).
WORKSPACE_BYTES = 128 * 2**20


def chunk_rows(vocab: int, max_bytes: int) -> int:
    """How many rows of fp32 logits fit in ``max_bytes``: a multiple of 64 when large, as matmul
    kernels work in such blocks."""
    rows = max(1, (max_bytes - 1) // (4 * vocab))
    return rows - rows % 64 if rows > 64 else rows


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ignoring ``-100``.

    hidden ``(..., d_model)``, weight ``(vocab, d_model)``, targets ``(...)``. Equal to
    ``F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), targets.flatten())`` but only the
    logits of ``chunk_size`` tokens exist at a time. When gradients are needed they are computed
    in the same pass - softmax minus one-hot is already in hand - and kept for the backward pass,
    so the head costs three matmuls and never stores a ``(tokens, vocab)`` tensor.

    ``workspace`` ``(rows, vocab)`` fp32, if given, holds the logits (``chunk_size`` defaults to its
    rows); otherwise each call allocates chunks of at most `CHUNK_BYTES`.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]  # ignored tokens cost nothing
    if targets.numel() == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # no target: zero loss that still backpropagates
    if chunk_size is None:
        chunk_size = workspace.shape[0] if workspace is not None else chunk_rows(weight.shape[0], CHUNK_BYTES)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, workspace)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = F.linear(hidden[start:start + chunk_size], weight).float()
        total += F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total / targets.numel()


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward hands them on (scaled by
    the incoming gradient when that is not 1)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, workspace: torch.Tensor | None) -> torch.Tensor:
        device_type = hidden.device.type
        # Under autocast, do the matmuls in the autocast dtype and the softmax in float32.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = targets.numel(), weight.shape[0]
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty_like(h) if need_hidden else None
            grad_weight = torch.empty(w.shape, dtype=torch.float32, device=w.device) if need_weight else None
            losses = torch.empty(n, dtype=torch.float32, device=h.device)
            height = min(chunk_size, n)
            if workspace is not None and workspace.shape[0] >= height:
                buffer = workspace[:height]
            else:
                buffer = torch.empty(height, vocab, dtype=torch.float32, device=h.device)
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                h_chunk, rows, cols = h[start:stop], torch.arange(stop - start, device=h.device), targets[start:stop]
                logits = _matmul(h_chunk, w.t(), buffer[: stop - start])  # (chunk, vocab)
                target_logit = logits[rows, cols]
                row_max = logits.amax(dim=-1)  # values only: several times faster than max() with indices
                probs = torch.softmax(logits, dim=-1, out=logits)  # in place: no second buffer
                # loss = logsumexp - target logit, and logsumexp = max - log(probability of the max):
                # that probability is at least 1/vocab, so unlike the target's it never underflows.
                losses[start:stop] = row_max - probs.amax(dim=-1).log() - target_logit
                # d(sum of losses)/d(logits) = softmax - one-hot; the 1/n of the mean comes after the loop.
                grad = probs
                grad[rows, cols] -= 1.0
                grad = grad.to(dtype)
                if need_hidden:
                    _matmul(grad, w, grad_hidden[start:stop])
                if need_weight:
                    _matmul(grad.t(), h_chunk, grad_weight, accumulate=start > 0)
            # Scaled here, once, for the mean: a plain ``loss.backward()`` then needs no further pass.
            if need_hidden:
                grad_hidden.div_(n)
            if need_weight:
                grad_weight.div_(n)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return losses.sum() / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        unit = bool(grad_output == 1)  # the usual case: the loss itself is differentiated
        grad_hidden, grad_weight = (None if grad is None else (grad if unit else grad * grad_output).to(dtype)
                                    for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return grad_hidden, grad_weight, None, None, None


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out = a @ b`` (or ``out += a @ b``) written into ``out``, whose dtype may be wider."""
    if out.dtype == a.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    return out.add_(a @ b) if accumulate else out.copy_(a @ b)
