"""The transformer building blocks every μOmni model is made of.

- `RMSNorm` (Zhang & Sennrich, 2019) and LayerNorm, picked by `make_norm`.
- `RotaryEmbedding` (RoPE, Su et al., 2021): 1-D positions ``(batch, seq)``, or multimodal positions
  ``(3, batch, seq)`` whose time/height/width sections rotate separate frequency bands, as in
  Qwen2.5-Omni's TMRoPE. Text tokens use the same value in all three.
- `Attention`: multi-head or grouped-query (``n_kv_heads < n_heads``), causal or bidirectional,
  key-padding masks, a preallocated `KVCache` for chunked prefill and one-token decode, computed by
  ``F.scaled_dot_product_attention``.
- `MLP` (GELU) and `SwiGLU` (Shazeer, 2020); `MoE`: top-k routing with batched expert dispatch and
  the Switch-Transformer load-balancing loss.
- `Block`: pre-norm attention + MLP with residuals; `Transformer`: a stack of blocks and a final norm.

Shapes: activations are ``(batch, seq, d_model)``; inside attention ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from muomni.config import TransformerConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    raise ValueError(f"unknown norm '{cfg.norm}'; expected 'rmsnorm' or 'layernorm'")


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings, 1-D or multimodal (time, height, width).

    ``forward(position_ids)`` takes ``(batch, seq)`` integer positions, or ``(3, batch, seq)`` for
    multimodal positions, and returns ``cos, sin`` of shape ``(batch, seq, head_dim)``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0,
                 mrope_section: tuple[int, int, int] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        if mrope_section is not None and sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim // 2 = {head_dim // 2}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = tuple(mrope_section) if mrope_section is not None else None

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # (..., seq, hd/2)
        if position_ids.dim() == 3:
            if self.mrope_section is None:
                raise ValueError("multimodal (3, batch, seq) positions need mrope_section in the config")
            # Frequency band i takes its angle from the t, h or w positions by section.
            bands = angles.split(list(self.mrope_section), dim=-1)
            angles = torch.cat([band[axis] for axis, band in enumerate(bands)], dim=-1)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, seq, head_dim)`` by tables ``(batch, seq, head_dim)``."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def text_positions(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions ``(batch, seq)`` that start at 0 on each row's first real (non-pad) token."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0) + offset


# ----------------------------------------------------------------------------------------------
# Attention


class KVCache:
    """Preallocated keys and values for every layer of one model.

    ``k[layer]`` and ``v[layer]`` are ``(batch, n_kv_heads, max_len, head_dim)``; ``length`` counts
    the positions filled so far. ``mask`` (``(batch, max_len)``, True for real tokens) remembers the
    padding of batched prompts so later steps keep ignoring it.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.recent: dict[int, torch.Tensor] = {}  # layer -> its last inputs, for `TokenMix`
        self.padded = False  # whether any recorded position is padding (checked once, not per layer)
        self.max_len = max_len
        self.length = 0

    def append_mask(self, attention_mask: torch.Tensor | None, new_tokens: int) -> None:
        """Record the padding of the next ``new_tokens`` positions (None: all real)."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {new_tokens} tokens > max_len {self.max_len}")
        if attention_mask is not None:
            self.mask[:, self.length : self.length + new_tokens] = attention_mask.bool()
            self.padded = self.padded or not bool(attention_mask.all())

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


def build_attention_mask(q_len: int, kv_len: int, causal: bool,
                         key_padding_mask: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean mask ``(batch or 1, 1, q_len, kv_len)``, True where a query may attend.

    Queries are the last ``q_len`` of ``kv_len`` positions. Each query may always see itself, so a
    padding query never has an empty row (its output is ignored, but an empty row would give NaN).
    """
    if not causal and key_padding_mask is None:
        return None
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = (k_pos <= q_pos) if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :kv_len].bool()
    return mask | (k_pos == q_pos)[None, None]


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional rotary embeddings and KV cache."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"d_model {cfg.d_model} must divide by n_heads {cfg.n_heads}, "
                             f"and n_heads by n_kv_heads {cfg.n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.causal, self.dropout = cfg.causal, cfg.dropout
        # One fused projection for queries, keys and values: one matmul instead of three.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x ``(batch, seq, d_model)`` -> ``(batch, seq, d_model)``.

        ``key_padding_mask`` ``(batch, seq)`` is True for real tokens. With a ``cache`` the new keys
        and values are written at ``cache.length`` and attention spans everything cached so far
        (the cache's own mask then replaces ``key_padding_mask``).
        """
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            end = cache.length + seq
            cache.k[layer][:, :, cache.length:end] = k
            cache.v[layer][:, :, cache.length:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            key_padding_mask = cache.mask[:, :end] if cache.padded else None
        kv_len = k.shape[2]
        mask = None
        if key_padding_mask is not None or (self.causal and seq > 1 and seq != kv_len):
            mask = build_attention_mask(seq, kv_len, self.causal, key_padding_mask, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None and seq > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1))


# ----------------------------------------------------------------------------------------------
# Feed-forward layers


class MLP(nn.Module):
    """Linear -> GELU -> Linear (the original transformer and ViT feed-forward)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one fused matmul."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def make_mlp(cfg: TransformerConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, cfg.bias)
    if cfg.mlp == "gelu":
        return MLP(cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout)
    raise ValueError(f"unknown mlp '{cfg.mlp}'; expected 'swiglu' or 'gelu'")


class MoE(nn.Module):
    """A mixture of experts: each token goes to its top-k experts, outputs mixed by router weight.

    Dispatch is batched: tokens are sorted by expert so each expert runs once on all its tokens.
    After a forward pass ``aux_loss`` holds the Switch-Transformer load-balancing loss
    ``n_experts * sum_e(fraction_routed_e * mean_prob_e)``, which is 1.0 when the load is balanced.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"n_experts_per_token must be in 1..n_experts, got {self.top_k}")
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (n_tokens, d_model)
        probs = self.router(tokens).float().softmax(dim=-1)  # (n_tokens, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (n_tokens, top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        flat_expert = chosen.flatten()
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        token_of_slot = order // self.top_k
        routed = tokens[token_of_slot]  # (n_tokens * top_k, d_model), grouped by expert
        outputs = torch.cat([expert(chunk) for expert, chunk in
                             zip(self.experts, routed.split(counts.tolist()))])
        mixed = torch.zeros_like(tokens).index_add_(0, token_of_slot, outputs * weights.flatten()[order, None])

        fraction_routed = counts.float() / flat_expert.numel()
        self.aux_loss = self.n_experts * (fraction_routed * probs.mean(0)).sum()
        return mixed.view(shape)


# ----------------------------------------------------------------------------------------------
# Blocks


class TokenMix(nn.Module):
    """h + a causal depthwise convolution of h over the last ``kernel`` positions (each channel its own
    filter): ``(batch, seq, d_model) -> (batch, seq, d_model)``, as the "Canon layers" of Allen-Zhu
    (2025, "Physics of Language Models: Part 4.1"). The filters start at zero, so the block starts as
    a plain transformer block. Padding is zeroed first, so it never leaks into the next real token.
    With a cache, the last ``kernel - 1`` inputs of each layer are kept in ``cache.recent``.
    """

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(d_model, 1, kernel))

    def forward(self, h: torch.Tensor, real: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        if real is not None:  # (batch, seq) True on real tokens
            h = h * real.unsqueeze(-1).to(h.dtype)
        if cache is None:
            before = h.new_zeros(h.shape[0], self.kernel - 1, h.shape[2])
        else:
            before = cache.recent.get(layer, h.new_zeros(h.shape[0], self.kernel - 1, h.shape[2]))
        window = torch.cat([before, h], dim=1)  # (batch, kernel - 1 + seq, d_model)
        if cache is not None:
            cache.recent[layer] = window[:, window.shape[1] - (self.kernel - 1):]
        mixed = F.conv1d(window.transpose(1, 2), self.weight.to(h.dtype), groups=h.shape[2])
        return h + mixed.transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with ``token_mix`` the
    attention reads norm(x) mixed with its few predecessors (`TokenMix`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.token_mix = TokenMix(cfg.d_model, cfg.token_mix) if cfg.token_mix > 0 else None
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts > 0 else make_mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        h = self.attn_norm(x)
        if self.token_mix is not None:
            real = key_padding_mask if cache is None else cache.mask[:, cache.length : cache.length + x.shape[1]]
            h = self.token_mix(h, real, cache, layer)
        x = x + self.dropout(self.attn(h, rope, key_padding_mask, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """A stack of `Block`s and a final norm: ``(batch, seq, d_model) -> (batch, seq, d_model)``.

    Rotary embeddings are applied when ``rope`` tables are given. ``grad_checkpointing`` recomputes
    each block in the backward pass instead of storing its activations.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, key_padding_mask, None, layer, use_reentrant=False)
            else:
                x = block(x, rope, key_padding_mask, cache, layer)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward pass (0 without MoE)."""
        losses = [block.mlp.aux_loss for block in self.blocks if isinstance(block.mlp, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())
