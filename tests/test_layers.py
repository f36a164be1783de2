"""Layers: KV cache == full forward, causality, GQA == MHA, RoPE, multimodal RoPE, MoE routing."""

import pytest
import torch

from muomni.config import TransformerConfig
from muomni.layers import (Attention, KVCache, MoE, RotaryEmbedding, Transformer, apply_rotary,
                           text_positions)

CFG = TransformerConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def make_transformer(seed: int = 0, **changes) -> tuple[Transformer, RotaryEmbedding]:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{**CFG.__dict__, **changes})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than a fresh init, so any mistake shows up clearly
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.1)
    return model, RotaryEmbedding(cfg.head_dim, cfg.rope_theta, (4, 2, 2))


def left_padded_mask(batch: int, seq: int, pads: list[int]) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


def cached_forward(model, rope, x, mask, chunks):
    """Run ``x`` through the model chunk by chunk with a KV cache; concatenate the outputs."""
    cache = KVCache(len(model.blocks), x.shape[0], CFG.n_kv_heads, x.shape[1], CFG.head_dim)
    positions = text_positions(mask)
    outputs, start = [], 0
    for size in chunks:
        end = start + size
        cache.append_mask(mask[:, start:end], size)
        outputs.append(model(x[:, start:end], rope(positions[:, start:end]), None, cache))
        start = end
    assert cache.length == x.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 3, 5]], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 4, 3], [7, 1, 1, 1, 2]],
                         ids=["one-token", "chunked-prefill", "prefill-then-decode"])
def test_kv_cache_matches_full_forward(pads, chunks):
    model, rope = make_transformer()
    x = torch.randn(3, 12, CFG.d_model)
    mask = left_padded_mask(3, 12, pads)
    with torch.no_grad():
        full = model(x, rope(text_positions(mask)), mask if not mask.all() else None)
        cached = cached_forward(model, rope, x, mask, chunks)
    assert (full - cached)[mask].abs().max() <= 1e-5


def test_left_padding_does_not_change_real_tokens():
    model, rope = make_transformer()
    x = torch.randn(1, 6, CFG.d_model)
    padded = torch.cat([torch.randn(1, 3, CFG.d_model), x], dim=1)
    mask = left_padded_mask(1, 9, [3])
    with torch.no_grad():
        alone = model(x, rope(text_positions(torch.ones(1, 6, dtype=torch.bool))))
        with_pad = model(padded, rope(text_positions(mask)), mask)
    torch.testing.assert_close(with_pad[:, 3:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causality(t):
    model, rope = make_transformer()
    x = torch.randn(2, 12, CFG.d_model)
    changed = x.clone()
    changed[:, t] += torch.randn(2, CFG.d_model)
    positions = rope(text_positions(torch.ones(2, 12)))
    with torch.no_grad():
        before, after = model(x, positions), model(changed, positions)
    assert (before[:, :t] - after[:, :t]).abs().max() <= 1e-6 if t else True
    assert (before[:, t:] - after[:, t:]).abs().max() > 1e-3  # the change is visible from t on


def test_bidirectional_attention_sees_the_future():
    model, rope = make_transformer(causal=False)
    x = torch.randn(1, 8, CFG.d_model)
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        assert (model(x)[:, 0] - model(changed)[:, 0]).abs().max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Attention(CFG)
    mha = Attention(TransformerConfig(**{**CFG.__dict__, "n_kv_heads": CFG.n_heads}))
    d, hd, rep = CFG.d_model, CFG.head_dim, CFG.n_heads // CFG.n_kv_heads
    q, k, v = gqa.qkv.weight.split([d, CFG.n_kv_heads * hd, CFG.n_kv_heads * hd])
    repeat = lambda w: w.view(CFG.n_kv_heads, hd, d).repeat_interleave(rep, dim=0).reshape(-1, d)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.out.weight.copy_(gqa.out.weight)
    rope = RotaryEmbedding(CFG.head_dim)(torch.arange(10).expand(2, 10))
    x = torch.randn(2, 10, d)
    torch.testing.assert_close(gqa(x, rope), mha(x, rope), atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    for shift in (1, 7, 100):
        torch.testing.assert_close(score(5, 2), score(5 + shift, 2 + shift), atol=1e-4, rtol=1e-5)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3  # yet the offset itself matters


def test_rope_preserves_norm():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 5, 16)
    rotated = apply_rotary(x, *rope(torch.arange(5).expand(2, 5)))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_multimodal_rope_with_equal_axes_is_1d_rope():
    rope = RotaryEmbedding(32, mrope_section=(8, 4, 4))
    positions = torch.tensor([[0, 1, 2, 3, 9], [4, 4, 5, 6, 7]])
    for one_d, three_d in zip(rope(positions), rope(positions.expand(3, 2, 5))):
        torch.testing.assert_close(one_d, three_d, atol=0, rtol=0)


def test_multimodal_rope_sections_use_their_axis():
    rope = RotaryEmbedding(32, mrope_section=(8, 4, 4))
    positions = torch.zeros(3, 1, 1, dtype=torch.long)
    positions[1] = 5  # only the height axis moves
    cos, _ = rope(positions)
    half = cos[0, 0, :16]
    assert torch.all(half[:8] == 1) and torch.all(half[12:] == 1) and torch.any(half[8:12] != 1)


def test_multimodal_rope_needs_sections():
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding(16)(torch.zeros(3, 1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="sum"):
        RotaryEmbedding(16, mrope_section=(4, 4, 4))


def make_moe(n_experts=4, top_k=2) -> MoE:
    torch.manual_seed(0)
    return MoE(TransformerConfig(d_model=16, d_ff=32, n_experts=n_experts, n_experts_per_token=top_k))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_mixes_exactly_the_top_k_experts(top_k):
    moe = make_moe(top_k=top_k)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = moe(x)
        tokens = x.reshape(-1, 16)
        probs = moe.router(tokens).softmax(-1)
        expected = torch.zeros_like(tokens)
        for i, token in enumerate(tokens):  # the slow, obvious way: one token at a time
            weights, chosen = probs[i].topk(top_k)
            for weight, expert in zip(weights / weights.sum(), chosen):
                expected[i] += weight * moe.experts[int(expert)](token)
    torch.testing.assert_close(out.reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)


def test_moe_each_token_reaches_top_k_experts():
    moe = make_moe(top_k=2)
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    moe(torch.randn(3, 7, 16))
    assert sum(seen) == 3 * 7 * 2


def test_moe_aux_loss_is_one_for_a_uniform_router_and_larger_when_skewed():
    moe = make_moe()
    x = torch.randn(4, 8, 16)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe(x)
        assert moe.aux_loss.item() == pytest.approx(1.0)
        moe.router.weight[0] = 5.0  # expert 0 wins for tokens whose features sum to > 0
        moe(x.abs())
    assert moe.aux_loss.item() > 1.5


def test_moe_transformer_reports_aux_loss():
    model = Transformer(TransformerConfig(d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=2, n_experts=4))
    model(torch.randn(1, 5, 16))
    assert model.aux_loss().item() >= 2 * (1.0 - 1e-6)  # two layers, each at least balanced
