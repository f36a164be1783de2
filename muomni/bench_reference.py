"""A plain Llama-style language model: the yardstick `muomni bench thinker` measures the Thinker against.

Written the straightforward way a careful engineer would: ``F.rms_norm``, fused QKV and fused
gate/up projections, rotary tables precomputed once, ``F.scaled_dot_product_attention`` with
``is_causal`` and ``enable_gqa``, an untied head, ``F.cross_entropy`` over the full logits, and a
preallocated static KV cache for greedy decoding. It shares no code with `muomni.layers`.

Shapes: ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)``; the cache holds
``(layers, 2, batch, n_kv_heads, max_len, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class ReferenceBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, d_model // n_heads, eps
        self.attn_norm = nn.Parameter(torch.ones(d_model))
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(d_model))
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: torch.Tensor | None, start: int) -> torch.Tensor:
        batch, seq, d_model = x.shape
        h = F.rms_norm(x, (d_model,), self.attn_norm, self.eps)
        q, k, v = self.qkv(h).view(batch, seq, self.n_heads + 2 * self.n_kv_heads, self.head_dim) \
            .transpose(1, 2).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            cache[0, :, :, start:start + seq] = k
            cache[1, :, :, start:start + seq] = v
            k, v = cache[0, :, :, :start + seq], cache[1, :, :, :start + seq]
        # A prefill starting at position 0 is causal; one decoded token may see the whole cache.
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, seq, d_model))
        gate, up = self.gate_up(F.rms_norm(x, (d_model,), self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ReferenceLM(nn.Module):
    """Llama-style decoder: embedding, blocks, final RMSNorm, untied head."""

    def __init__(self, vocab_size: int = 32000, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 n_kv_heads: int = 2, d_ff: int = 1024, max_len: int = 2048, theta: float = 10000.0,
                 eps: float = 1e-5):
        super().__init__()
        self.n_kv_heads, self.head_dim, self.eps = n_kv_heads, d_model // n_heads, eps
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(d_model, n_heads, n_kv_heads, d_ff, eps) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(d_model))
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (max_len, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids: torch.Tensor, cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = self.embed(ids)
        cos, sin = self.cos[start:start + ids.shape[1]], self.sin[start:start + ids.shape[1]]
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[layer] if cache is not None else None, start)
        return self.head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(ids)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a static cache allocated once for prompt + new tokens."""
        batch, seq = ids.shape
        weight = self.head.weight
        cache = torch.zeros(len(self.blocks), 2, batch, self.n_kv_heads, seq + max_new_tokens, self.head_dim,
                            dtype=weight.dtype, device=weight.device)
        token = self(ids, cache, 0)[:, -1].argmax(-1, keepdim=True)
        new = [token]
        for step in range(max_new_tokens - 1):
            token = self(token, cache, seq + step)[:, -1].argmax(-1, keepdim=True)
            new.append(token)
        return torch.cat(new, dim=1)
