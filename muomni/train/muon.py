"""Muon for the transformer blocks' matrices, AdamW for everything else, as one optimiser.

AdamW scales every weight's step by that weight's own gradient history. Muon (Jordan et al., 2024)
treats a weight matrix as a whole: it keeps a momentum of the matrix's gradient and steps along the
*orthogonalised* momentum, the matrix with the same singular vectors and every singular value about 1.
Each direction the gradient points in then moves at the same rate, so a rare direction (a head that
has only begun to find the object a question names) is not drowned by the common ones (predicting
"the" after "is"). On the `tiny` world the Thinker reads held-out questions after stage A at 53 %
instead of 35 % with the same 900 steps (study/05).

Orthogonalising costs no SVD: five Newton-Schulz iterations, each three products of small matrices,
push the singular values of the normalised momentum towards 1 (quintic coefficients from Jordan et al.;
they land between about 0.7 and 1.2, which trains as well as exactly 1). The update is scaled by
``0.2 * sqrt(max(rows, cols))`` so that its RMS matches AdamW's and the same learning rate serves both
(Liu et al., 2025, "Muon is scalable for LLM training").

Muon is meant for hidden matrices only: embeddings, the vocabulary head, norms, biases, convolutions
and the small layers outside the blocks keep AdamW. Both kinds are groups of this one optimiser
(``"muon": True`` or ``False``), so checkpoints, resume and the trainer's learning-rate schedule see a
single ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from muomni.layers import Block

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz step: x -> a x + b (x x^T) x + c (x x^T)^2 x
NS_STEPS = 5


def orthogonalise(matrices: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately ``U V^T`` of each matrix ``U S V^T`` in ``matrices`` (n, rows, cols), fp32."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.float()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the short side: x x^T is then the smaller square
        x = x.mT
    # Dividing by the Frobenius norm puts every singular value in (0, 1], where the iteration converges.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def block_matrices(model: nn.Module) -> set[int]:
    """``id`` of every trainable ``nn.Linear`` weight inside a transformer `Block` of ``model``."""
    return {id(sub.weight) for block in model.modules() if isinstance(block, Block)
            for sub in block.modules() if isinstance(sub, nn.Linear) and sub.weight.requires_grad}


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``"muon": True``, AdamW (decoupled decay) on the others.

    Every group carries ``lr`` and ``weight_decay``; Muon groups use ``momentum``, AdamW groups
    ``betas`` and ``eps``. Use `muon_adamw_groups` to split a model.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 momentum: float = 0.95, eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), momentum=momentum, eps=eps,
                                      weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, decay, beta = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            state["momentum"].lerp_(p.grad, 1 - beta)
            by_shape[p.shape].append(p)
        # Matrices of one shape are orthogonalised together, as one batch of matrix products.
        for shape, same in by_shape.items():
            # Nesterov: step along where the momentum is heading, gradient plus momentum.
            heading = torch.stack([p.grad.lerp(self.state[p]["momentum"], beta) for p in same])
            updates = orthogonalise(heading) * (0.2 * max(shape) ** 0.5)
            for p, update in zip(same, updates):
                p.mul_(1 - lr * decay).add_(update.to(p.dtype), alpha=-lr)

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(())
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(eps)
            p.mul_(1 - lr * decay).addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1 ** step))


def muon_adamw_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: the blocks' matrices (Muon, decayed), other matrices (AdamW, decayed), and
    biases, norms and scalars (AdamW, not decayed)."""
    muon_ids = block_matrices(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in muon_ids], "weight_decay": weight_decay, "muon": True},
            {"params": [p for p in params if id(p) not in muon_ids and p.dim() >= 2],
             "weight_decay": weight_decay, "muon": False},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "muon": False}]
