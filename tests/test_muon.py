"""Muon with AdamW: orthogonalised updates, AdamW equal to PyTorch's, which matrices get Muon."""

from __future__ import annotations

import pytest
import torch

from muomni.config import ConfigError, ThinkerConfig, TrainConfig
from muomni.thinker import Thinker
from muomni.train.muon import MuonAdamW, muon_adamw_groups, orthogonalise
from muomni.train.trainer import make_optimizer


@pytest.mark.parametrize("shape", [(3, 16, 48), (3, 48, 16), (1, 32, 32)])
def test_newton_schulz_makes_every_singular_value_about_one(shape):
    torch.manual_seed(0)
    # Badly conditioned on purpose: singular values spread over two orders of magnitude.
    u, _, v = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    spread = torch.logspace(0, -2, min(shape[1:])).expand(shape[0], -1)
    matrices = u @ torch.diag_embed(spread) @ v
    singular = torch.linalg.svdvals(orthogonalise(matrices))
    assert orthogonalise(matrices).shape == shape
    assert singular.min() > 0.6 and singular.max() < 1.2
    # Singular vectors are kept: the result still points where the input did.
    assert torch.nn.functional.cosine_similarity(orthogonalise(matrices).flatten(1), matrices.flatten(1)).min() > 0.3


def test_its_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    groups = lambda m: [{"params": [m.weight], "weight_decay": 0.1, "muon": False},  # noqa: E731
                        {"params": [m.bias], "weight_decay": 0.0, "muon": False}]
    a = MuonAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    b = torch.optim.AdamW([{"params": [theirs.weight], "weight_decay": 0.1},
                           {"params": [theirs.bias], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for step in range(5):
        x = torch.randn(6, 8)
        for model, optimizer in ((ours, a), (theirs, b)):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-6) and torch.allclose(ours.bias, theirs.bias, atol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    thinker = Thinker(ThinkerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                                    mrope_section=(4, 2, 2)))
    muon, other_matrices, vectors = muon_adamw_groups(thinker, 0.1)
    assert muon["muon"] and not other_matrices["muon"] and vectors["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in muon["params"]) and len(muon["params"]) == 2 * 4  # qkv, out, gate_up, down
    assert any(p is thinker.tok_emb.weight for p in other_matrices["params"])  # the embedding stays AdamW
    counted = sum(len(group["params"]) for group in (muon, other_matrices, vectors))
    assert counted == len([p for p in thinker.parameters() if p.requires_grad])
    # A Muon step moves each matrix by the same RMS whatever its gradient's size.
    optimizer = MuonAdamW([muon], lr=1e-2)
    before = [p.detach().clone() for p in muon["params"]]
    for scale, p in enumerate(muon["params"], start=1):
        p.grad = torch.randn_like(p) * 10.0 ** (scale % 4)
    optimizer.step()
    moved = torch.stack([(p.detach() - b).pow(2).mean().sqrt() for p, b in zip(muon["params"], before)])
    assert moved.max() / moved.min() < 1.5


def test_an_unknown_or_sharded_optimizer_is_a_one_line_error():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="train.optimizer must be"):
        make_optimizer(model, TrainConfig(optimizer="sgd"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="FSDP"):
        make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"), sharded=True)
