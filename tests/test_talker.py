"""The Talker: delay pattern, KV cache, end of speech, and that it listens to its conditioning."""

import pytest
import torch
import torch.nn as nn

from muomni.config import CodecConfig, TalkerConfig
from muomni.engine import GREEDY
from muomni.talker import Talker, TalkerError, delay_codes, frame_tokens, spelling, undelay_codes

COND = 24


def small_talker(seed: int = 0) -> Talker:
    torch.manual_seed(seed)
    cfg = TalkerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_frames=20)
    return Talker(cfg, CodecConfig(n_codebooks=3, codebook_size=8), COND)


def test_delay_pattern_round_trip():
    codes = torch.arange(12).view(3, 4)
    delayed = delay_codes(codes, pad=-1, eos=-2)
    assert delayed.tolist() == [[0, 1, 2, 3, -2, -1, -1],
                                [-1, 4, 5, 6, 7, -2, -1],
                                [-1, -1, 8, 9, 10, 11, -2]]
    assert torch.equal(undelay_codes(delayed, 4), codes)


def test_frame_tokens_follow_the_durations_and_skip_empty_tokens():
    durations = torch.tensor([[0, 2, 0, 1], [1, 1, 1, 1]])  # row 0: left padding, then tokens of 2, 0, 1 frames
    token, since, left = frame_tokens(durations, 6)
    assert token.tolist() == [[1, 1, 3, 3, 3, 3], [0, 1, 2, 3, 3, 3]]
    assert since.tolist() == [[0, 1, 0, 1, 2, 3], [0, 0, 0, 0, 1, 2]]
    assert left.tolist() == [[2, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]  # 0: the speech is over


def test_kv_cache_gives_the_same_logits_as_a_full_pass():
    talker = small_talker().eval()
    hidden, embeds = torch.randn(2, 5, COND), torch.randn(2, 5, COND)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded, shorter text
    durations = torch.tensor([[1, 2, 0, 1, 2], [0, 0, 3, 1, 2]])
    inputs, _ = talker.make_batch([torch.randint(0, 8, (3, 6)), torch.randint(0, 8, (3, 6))])
    full = talker(hidden, embeds, mask, inputs, durations)
    cache = talker.new_cache(2, 5 + inputs.shape[2])
    logits, pos, frame_inputs = talker.prefill(hidden, embeds, mask, cache, inputs.shape[2], durations=durations)
    steps = [logits]
    for s in range(1, inputs.shape[2]):
        pos = pos + 1
        steps.append(talker.step(inputs[:, :, s], frame_inputs[:, s], pos, cache))
    torch.testing.assert_close(torch.stack(steps, dim=2), full, atol=1e-5, rtol=1e-4)


class FixedHead(nn.Module):
    """A codebook-0 head with fixed logits: code 1 at 5, end-of-speech at ``eos_logit``, the rest 0."""

    def __init__(self, vocab: int, eos: int, eos_logit: float):
        super().__init__()
        self.bias = torch.zeros(vocab)
        self.bias[1], self.bias[eos] = 5.0, eos_logit

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*h.shape[:-1], -1)


def test_generation_stops_at_end_of_speech():
    talker = small_talker().eval()
    talker.heads[0] = FixedHead(talker.vocab, talker.eos_id, 10.0)
    hidden, embeds = torch.randn(2, 4, COND), torch.randn(2, 4, COND)
    out = talker.generate(hidden, embeds, sampling=GREEDY, min_frames=3, max_frames=20)
    assert [tuple(c.shape) for c in out] == [(3, 3), (3, 3)]  # eos as soon as allowed, not max_frames
    assert out[0][0].tolist() == [1, 1, 1]
    assert int(out[0].max()) < 8  # only real codes come out


def test_rows_that_never_stop_end_at_max_frames():
    talker = small_talker().eval()
    talker.heads[0] = FixedHead(talker.vocab, talker.eos_id, -100.0)  # never says end-of-speech
    out = talker.generate(torch.ones(1, 3, COND), torch.ones(1, 3, COND), max_frames=7,
                          generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (3, 7)


def test_it_learns_two_utterances_and_the_conditioning_picks_which():
    talker = small_talker(1)
    hidden, embeds = torch.randn(2, 4, COND), torch.randn(2, 4, COND)
    mask = torch.ones(2, 4, dtype=torch.bool)
    codes = [torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0], [2, 2, 1, 1]]), torch.tensor([[7, 7, 0], [1, 3, 5], [6, 4, 2]])]
    durations = torch.tensor([[1, 1, 2, 0], [0, 2, 0, 1]])  # 4 and 3 frames
    inputs, targets = talker.make_batch(codes)
    opt = torch.optim.Adam(talker.parameters(), lr=1e-2)
    for _ in range(150):
        loss, metrics = talker.loss(hidden, embeds, mask, inputs, targets, durations)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["duration_loss"] < 0.01
    talker.eval()
    out = talker.generate(hidden, embeds, mask, sampling=GREEDY)  # durations from the duration head
    assert torch.equal(out[0], codes[0]) and torch.equal(out[1], codes[1])
    swapped = talker.generate(hidden.flip(0), embeds.flip(0), mask, sampling=GREEDY)
    assert torch.equal(swapped[0], codes[1])  # other text, other speech


def test_predicted_durations_are_whole_frames_zero_on_padding_and_never_all_zero():
    talker = small_talker()
    mask = torch.tensor([[False, True, True], [True, True, True]])
    log_durations = torch.tensor([[5.0, 1.1, 0.0], [-3.0, -2.0, 0.2]])
    frames = talker.predict_durations(log_durations, mask)
    assert frames.tolist() == [[0, 2, 0], [0, 0, 1]]  # expm1(1.1) = 2.0; row 1 would be silent: its last token gets 1


def test_the_voice_token_leads_the_prefix_and_changes_the_speech():
    torch.manual_seed(0)
    cfg = TalkerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_frames=6, voices=("a", "b"))
    talker = Talker(cfg, CodecConfig(n_codebooks=3, codebook_size=8), COND).eval()
    hidden, embeds = torch.randn(1, 4, COND), torch.randn(1, 4, COND)
    prefix, mask, log_durations = talker.condition(hidden, embeds, torch.ones(1, 4, dtype=torch.bool))
    assert prefix.shape == (1, 5, 32) and bool(mask.all()) and log_durations.shape == (1, 4)
    torch.testing.assert_close(prefix[0, 0], talker.voice_embed.weight[0])  # default: the first voice
    inputs, _ = talker.make_batch([torch.randint(0, 8, (3, 4))])
    durations = torch.tensor([[1, 1, 1, 1]])
    as_a = talker(hidden, embeds, torch.ones(1, 4, dtype=torch.bool), inputs, durations, voices=torch.tensor([0]))
    as_b = talker(hidden, embeds, torch.ones(1, 4, dtype=torch.bool), inputs, durations,
                  voices=torch.tensor([talker.voice_id("b")]))
    assert (as_a - as_b).abs().max() > 1e-3  # another voice, other code predictions
    with pytest.raises(TalkerError, match="unknown voice 'c'"):
        talker.voice_id("c")


def test_spelling_targets_keep_only_the_spelled_characters():
    chars = " abcdefghijklmnopqrstuvwxyz'"
    assert spelling("What's  UP?", chars).tolist() == [chars.index(c) + 1 for c in "what's up"]


def test_the_spelling_head_learns_to_read_the_text_from_the_talker_states():
    talker = small_talker(2)
    hidden, embeds = torch.randn(2, 4, COND), torch.randn(2, 4, COND)
    mask = torch.ones(2, 4, dtype=torch.bool)
    inputs, targets = talker.make_batch([torch.randint(0, 8, (3, 5)), torch.randint(0, 8, (3, 4))])
    durations = torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]])
    texts = ["ab", "ba"]
    code_only, metrics = talker.loss(hidden, embeds, mask, inputs, targets, durations)
    assert "spell_loss" not in metrics  # no texts, no spelling
    opt = torch.optim.Adam(talker.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss, metrics = talker.loss(hidden, embeds, mask, inputs, targets, durations, texts=texts)
        first = first if first is not None else metrics["spell_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["spell_loss"] < 0.2 * first
    with torch.no_grad():  # greedy CTC read-out of the first row: collapse repeats, drop blanks
        states, _ = talker.states(hidden, embeds, mask, inputs, durations)
        slots = talker.cfg.spell_slots
        best = talker.spell(states).view(2, -1, len(talker.cfg.spell_chars) + 1).argmax(-1)[0, : (5 + 3) * slots]
    read = [int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])]
    assert read == spelling("ab", talker.cfg.spell_chars).tolist()


def test_no_spelling_head_when_its_weight_is_zero():
    cfg = TalkerConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, spell_weight=0.0)
    talker = Talker(cfg, CodecConfig(n_codebooks=3, codebook_size=8), COND)
    assert talker.spell is None
    inputs, targets = talker.make_batch([torch.randint(0, 8, (3, 4))])
    _, metrics = talker.loss(torch.randn(1, 2, COND), torch.randn(1, 2, COND), torch.ones(1, 2, dtype=torch.bool),
                             inputs, targets, torch.tensor([[2, 2]]), texts=["a"])
    assert "spell_loss" not in metrics
