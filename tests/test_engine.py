"""The engine: the sampler's masks, and the one decode loop on a toy model and on a Thinker."""

import pytest
import torch

from muomni.config import SamplingConfig, ThinkerConfig
from muomni.engine import GREEDY, Rules, decode, sample
from muomni.thinker import Thinker

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(200, 4)  # probabilities about 0.64, 0.24, 0.09, 0.03


def test_greedy_takes_the_argmax_of_every_row():
    logits = torch.randn(3, 5, 7)  # several ids per row (codebooks) as well as one
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits[:, 0]), logits[:, 0].argmax(-1))


def test_top_k_and_top_p_keep_only_their_ids():
    generator = torch.Generator().manual_seed(0)
    assert sample(LOGITS, temperature=1.0, top_k=1, generator=generator).tolist() == [1] * 200
    assert set(sample(LOGITS, temperature=1.0, top_k=2, generator=generator).tolist()) == {1, 3}
    # a 0.8 nucleus holds exactly the top two; 0.5 only the first
    assert set(sample(LOGITS, temperature=1.0, top_p=0.8, generator=generator).tolist()) == {1, 3}
    assert set(sample(LOGITS, temperature=1.0, top_p=0.5, generator=generator).tolist()) == {1}
    assert set(sample(LOGITS, temperature=5.0, generator=generator).tolist()) == {0, 1, 2, 3}


def test_sampling_with_a_seeded_generator_is_reproducible():
    logits = torch.randn(4, 3, 50)
    runs = [sample(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].shape == (4, 3) and torch.equal(runs[0], runs[1])


def bigram(vocab: int = 12, seed: int = 0):
    """A toy model whose next logits depend only on the last id: ``table[id]``."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def step(ids):
        return table[ids], None
    return table, step


def run(step, logits, max_steps, **kwargs):
    return torch.stack([ids for ids, _ in decode(step, logits, None, max_steps, **kwargs)], dim=1)


def test_greedy_decoding_follows_the_argmax_chain():
    table, step = bigram()
    out = run(step, table[[3, 5]], 6)
    expected = [[int(table[first].argmax())] for first in (3, 5)]
    for row in expected:
        for _ in range(5):
            row.append(int(table[row[-1]].argmax()))
    assert out.tolist() == expected


def test_rows_stop_at_their_stop_id_and_then_write_padding():
    table, step = bigram()
    free = run(step, table[[3, 5]], 8, sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(1))
    stop = int(free[0, 2])
    out = run(step, table[[3, 5]], 8, sampling=SamplingConfig(temperature=1.0), generator=torch.Generator().manual_seed(1),
              rules=Rules(stop_ids=(stop,), pad_id=-1))
    first = free[0].tolist().index(stop)
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist() and set(out[0, first + 1:].tolist()) <= {-1}
    both_done = max(row.index(stop) if stop in row else 7 for row in free.tolist())
    assert out.shape[1] == both_done + 1  # the loop ends once every row has stopped


def test_the_last_ids_are_not_fed_back():
    table, step = bigram()
    fed = []

    def counting_step(ids):
        fed.append(ids)
        return step(ids)
    assert run(counting_step, table[[1]], 4).shape == (1, 4) and len(fed) == 3


@pytest.fixture(scope="module")
def thinker():
    torch.manual_seed(0)
    cfg = ThinkerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48,
                        init_std=0.1, mrope_section=(2, 1, 1))
    return Thinker(cfg).eval()


def test_the_thinker_greedy_equals_the_argmax_of_a_full_forward(thinker):
    ids = torch.randint(8, 64, (1, 6))
    sequence = ids
    with torch.no_grad():
        for _ in range(7):
            sequence = torch.cat([sequence, thinker(sequence).logits[:, -1:].argmax(-1)], dim=1)
    steps = thinker.generate_steps(ids, max_new_tokens=7, sampling=GREEDY, stop_ids=())
    assert [int(token) for token, _ in steps] == sequence[0, 6:].tolist()


def test_a_left_padded_batch_equals_one_prompt_at_a_time(thinker):
    rows = [torch.randint(8, 64, (n,)) for n in (2, 9, 5)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, True
    batched = thinker.generate(ids, attention_mask=mask, max_new_tokens=10, stop_ids=())
    alone = [thinker.generate(row[None], max_new_tokens=10, stop_ids=())[0] for row in rows]
    assert batched == alone


def test_seeded_generation_is_reproducible(thinker):
    ids = torch.randint(8, 64, (2, 4))
    runs = [thinker.generate(ids, max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, stop_ids=(),
                             generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]
