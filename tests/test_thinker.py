"""Thinker: equal to Hugging Face Llama, fused loss == plain cross-entropy, generation paths agree."""

import pytest
import torch
import torch.nn.functional as F

from muomni.config import ThinkerConfig
from muomni.thinker import Thinker, ThinkerError, linear_cross_entropy

CFG = ThinkerConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=64, norm_eps=1e-6, init_std=0.1, mrope_section=(4, 2, 2))


def make_thinker(seed: int = 0, **changes) -> Thinker:
    torch.manual_seed(seed)
    model = Thinker(ThinkerConfig(**{**CFG.__dict__, **changes})).eval()
    with torch.no_grad():  # token-mixing filters start at zero; random ones make the checks below bite
        for block in model.transformer.blocks:
            if block.token_mix is not None:
                block.token_mix.weight.normal_(0, 0.5)
    return model


def to_llama(model: Thinker):
    """A Hugging Face LlamaForCausalLM with the Thinker's weights copied in."""
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attn_implementation="eager")).eval()
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(model.tok_emb.weight)
        for ours, theirs in zip(model.transformer.blocks, llama.model.layers):
            q, k, v = ours.attn.qkv.weight.split([q_dim, kv_dim, kv_dim])
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(ours.attn.out.weight)
            gate, up = ours.mlp.gate_up.weight.chunk(2)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(ours.mlp.down.weight)
            theirs.input_layernorm.weight.copy_(ours.attn_norm.weight + 0.1 * torch.randn(cfg.d_model))
            ours.attn_norm.weight.copy_(theirs.input_layernorm.weight)  # non-trivial norm weights
            theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
        llama.model.norm.weight.copy_(model.transformer.norm.weight)
        llama.lm_head.weight.copy_(model.head.weight)
    return llama


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_hugging_face_llama(tied):
    model = make_thinker(tie_embeddings=tied)
    llama = to_llama(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert theirs.std() > 0.1  # the comparison is not between near-zero numbers


def test_loss_equals_hugging_face_llama():
    model = make_thinker()
    llama = to_llama(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # shifted by the caller
    with torch.no_grad():
        torch.testing.assert_close(model.loss(ids, targets), llama(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size,workspace_rows", [(5, 0), (1024, 0), (None, 7)],
                         ids=["chunks", "one-chunk", "workspace"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["loss", "scaled-loss"])
def test_fused_loss_and_gradients_equal_plain_cross_entropy(chunk_size, workspace_rows, tied, scale):
    model = make_thinker(tie_embeddings=tied).train()
    ids = torch.randint(0, CFG.vocab_size, (3, 9))
    targets = torch.randint(0, CFG.vocab_size, (3, 9))
    targets[0, :4] = -100

    def gradients(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        (scale * loss).backward()  # a weighted loss hands backward an incoming gradient other than 1
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    def fused():
        hidden, _ = model.hidden_states(ids)
        workspace = torch.full((workspace_rows, CFG.vocab_size), float("nan")) if workspace_rows else None
        return linear_cross_entropy(hidden, model.head.weight, targets, chunk_size=chunk_size, workspace=workspace)

    plain_loss, plain = gradients(lambda: F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten()))
    fused_loss, ours = gradients(fused)
    torch.testing.assert_close(fused_loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # the no-grad path gives the same number
        torch.testing.assert_close(model.loss(ids, targets), plain_loss)


def test_training_loss_keeps_one_logits_workspace():
    model = make_thinker().train()
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    with torch.no_grad():
        model.loss(ids, ids)
    assert model._logits_workspace is None  # evaluation needs none
    model.loss(ids, ids).backward()
    workspace = model._logits_workspace
    assert workspace.shape == (16, CFG.vocab_size)  # as tall as the batch, below the byte cap
    model.loss(ids[:1], ids[:1]).backward()
    assert model._logits_workspace is workspace  # reused by the next, smaller step
    model.loss(ids.repeat(2, 1), ids.repeat(2, 1)).backward()
    assert model._logits_workspace.shape == (32, CFG.vocab_size)  # grown for a taller batch


def test_loss_with_every_target_ignored_is_zero_and_backpropagates():
    model = make_thinker().train()
    ids = torch.randint(0, CFG.vocab_size, (1, 4))
    loss = model.loss(ids, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0


def test_inputs_embeds_equal_input_ids():
    model = make_thinker()
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(inputs_embeds=model.embed(ids)).logits)


def test_multimodal_positions_equal_1d_for_text():
    model = make_thinker()
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, position_ids=positions.expand(3, 2, 10)).logits)


def padded_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return ids, mask


@pytest.mark.parametrize("token_mix", [0, 3])
def test_generate_with_cache_equals_without(token_mix):
    model = make_thinker(token_mix=token_mix)
    ids, mask = padded_batch([torch.randint(8, CFG.vocab_size, (n,)) for n in (9, 4, 6)])
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=20, stop_ids=())
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=20, stop_ids=(), use_cache=False)
    assert cached == uncached
    assert all(len(row) == 20 for row in cached)


@pytest.mark.parametrize("token_mix", [0, 3])
def test_greedy_generate_equals_repeated_argmax(token_mix):
    model = make_thinker(token_mix=token_mix)
    ids = torch.randint(8, CFG.vocab_size, (1, 5))
    expected = ids
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert model.generate(ids, max_new_tokens=8, stop_ids=()) == expected[:, 5:].tolist()


@pytest.mark.parametrize("token_mix", [0, 3])
def test_batched_left_padded_generate_equals_one_row_at_a_time(token_mix):
    model = make_thinker(token_mix=token_mix)
    rows = [torch.randint(8, CFG.vocab_size, (n,)) for n in (3, 11, 7)]
    ids, mask = padded_batch(rows)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=())
    alone = [model.generate(row[None], max_new_tokens=12, stop_ids=())[0] for row in rows]
    assert batched == alone


def test_multimodal_prompt_continues_after_its_largest_position():
    model = make_thinker()
    ids = torch.randint(8, CFG.vocab_size, (1, 6))
    # A 3-D prompt whose largest position (8, on the height axis) exceeds its length.
    positions = torch.tensor([[0, 1, 1, 1, 1, 5], [0, 1, 1, 8, 8, 5], [0, 1, 2, 1, 2, 5]])[:, None]
    new = model.generate(ids, position_ids=positions, max_new_tokens=5, stop_ids=())
    expected_ids, continuation = ids, positions
    with torch.no_grad():
        for step in range(5):
            token = model(expected_ids, position_ids=continuation).logits[:, -1:].argmax(-1)
            expected_ids = torch.cat([expected_ids, token], dim=1)
            continuation = torch.cat([continuation, torch.full((3, 1, 1), 9 + step)], dim=-1)
    assert new == expected_ids[:, 6:].tolist()


def test_generate_stops_at_stop_tokens_and_excludes_them():
    model = make_thinker()
    ids = torch.randint(8, CFG.vocab_size, (2, 5))
    free = model.generate(ids, max_new_tokens=10, stop_ids=())
    stop = free[0][3]
    stopped = model.generate(ids, max_new_tokens=10, stop_ids=(stop,))
    assert stopped[0] == free[0][:free[0].index(stop)]
    assert stopped[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])


def test_generate_returns_hidden_states_of_each_prediction():
    model = make_thinker()
    ids = torch.randint(8, CFG.vocab_size, (1, 5))
    tokens, hiddens = model.generate(ids, max_new_tokens=4, stop_ids=(), return_hidden=True)
    assert hiddens[0].shape == (4, CFG.d_model)
    torch.testing.assert_close(model.head(hiddens[0]).argmax(-1).tolist(), tokens[0])


def test_context_guard():
    model = make_thinker()
    with pytest.raises(ThinkerError, match="max_seq_len 64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ThinkerError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_sampled_generation_is_reproducible_with_a_generator():
    model = make_thinker()
    ids = torch.randint(8, CFG.vocab_size, (2, 5))
    runs = [model.generate(ids, max_new_tokens=10, temperature=1.0, top_p=0.9, stop_ids=(),
                           generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_parameter_count_counts_tied_weights_once():
    untied, tied = make_thinker(), make_thinker(tie_embeddings=True)
    assert untied.num_parameters() - tied.num_parameters() == CFG.vocab_size * CFG.d_model


def test_generate_follows_weight_updates():
    model = make_thinker()
    ids = torch.randint(8, CFG.vocab_size, (1, 5))
    model.generate(ids, max_new_tokens=3, stop_ids=())  # builds the decoding copy of the head
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))  # what an optimizer step does
        expected = model(ids).logits[:, -1].argmax(-1).item()
    assert model.generate(ids, max_new_tokens=1, stop_ids=())[0] == [expected]


def test_fused_loss_is_exact_for_extreme_logits():
    torch.manual_seed(0)
    hidden = (torch.randn(6, 16) * 30).requires_grad_()
    weight = (torch.randn(50, 16) * 30).requires_grad_()
    targets = torch.randint(0, 50, (6,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    assert torch.isfinite(loss) and expected > 100  # some targets have probability far below 1e-38
    torch.testing.assert_close(loss, expected)
