"""`muomni plan --measure`: what one training step keeps, counted from the tensors themselves.

Each stage's `step_probe.Probe` (its model, its loss, a random batch at the plan's shapes) takes one
training step, forward, backward and AdamW, on any device, and the piles of `memory_plan` are
counted from what is really there:

- weights (parameters and buffers), gradients and AdamW state: bytes of the real tensors;
- activations: what autograd saves for the backward pass, seen by
  `torch.autograd.graph.saved_tensors_hooks` and counted once per storage (views of one tensor, or a
  tensor saved by several operations, cost their storage once) and only if still held when the
  forward pass ends. Saved parameters are weights and saved batch tensors are data: neither counts.
  The Thinker's logits workspace, kept between steps, does count: it is the head's share in the plan;
- with gradient checkpointing autograd saves nothing inside a block: the checkpoint holds the block's
  inputs and recomputes it in the backward pass, one block at a time. So the count is what is saved
  outside the blocks, plus the blocks' inputs, plus the largest block's own saved tensors (from the
  step without checkpointing), which the backward pass holds while it recomputes that block.

Every stage is measured in fp32 and under bf16 autocast (CPUs run it too), without and with
checkpointing, and `table` prints the measurement beside the plan at the same batch.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn

from muomni.config import preset as load_preset
from muomni.layers import Block
from muomni.train.memory_plan import STAGE_ORDER, plan_rows, stage_train_config
from muomni.train.step_probe import Probe, stage_probe, to_device
from muomni.train.trainer import autocast, param_groups

MB = 2**20


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Bytes per storage (keyed by address) of ``tensors``, each storage once."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


class _Held:
    """A saved tensor as the autograd graph stores it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensors:
    """While active, records every tensor autograd saves and which `Block` was running then.

    With ``checkpointing`` the blocks' inputs are recorded too: the checkpoint holds them until the
    backward pass. ``excluded`` storages (weights, the batch) are not activations.
    """

    def __init__(self, model: nn.Module, excluded: set[int], checkpointing: bool):
        self.excluded, self.checkpointing = excluded, checkpointing
        self.saved: list[tuple[weakref.ref, int]] = []  # (tensor, block index or -1 outside blocks)
        self.block_inputs: dict[int, list[weakref.ref]] = {}
        self.block = -1
        self.blocks = [m for m in model.modules() if isinstance(m, Block)]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        held = _Held(tensor)  # the graph keeps this box while it needs the tensor: a weak reference
        self.saved.append((weakref.ref(held), self.block))  # to it tells whether the tensor is still held
        return held

    def _enter(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.block = index
            tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if torch.is_tensor(t)]
            self.block_inputs[index] = [weakref.ref(t) for t in tensors]  # x, the rotary tables, the mask
        return hook

    def _leave(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.block = -1

    def __enter__(self) -> SavedTensors:
        self.handles = [h for i, block in enumerate(self.blocks)
                        for h in (block.register_forward_pre_hook(self._enter(i)), block.register_forward_hook(self._leave))]
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def _alive(self, refs: Iterable[weakref.ref]) -> list[torch.Tensor]:
        boxes = [ref() for ref in refs]
        return [box if torch.is_tensor(box) else box.tensor for box in boxes if box is not None]

    def held(self) -> dict[int, int]:
        """Storages still saved (with checkpointing: outside the blocks, and the blocks' inputs)."""
        held = self._alive(ref for ref, _ in self.saved)
        if self.checkpointing:
            held += self._alive(ref for refs in self.block_inputs.values() for ref in refs)
        return {k: v for k, v in _storage_bytes(held).items() if k not in self.excluded}

    def largest_block(self) -> int:
        """Bytes the largest block saves besides its inputs (what recomputing it holds)."""
        sizes = [0]
        for index in range(len(self.blocks)):
            inputs = _storage_bytes(self._alive(self.block_inputs.get(index, [])))
            own = _storage_bytes(self._alive(ref for ref, block in self.saved if block == index))
            sizes.append(sum(v for k, v in own.items() if k not in self.excluded and k not in inputs))
        return max(sizes)


def _workspaces(model: nn.Module) -> list[torch.Tensor]:
    """Buffers the model keeps between steps outside its state dict (the Thinker's logits workspace)."""
    found = [getattr(m, "_logits_workspace", None) for m in model.modules()]
    return [t for t in found if t is not None]


def measure_step(probe: Probe, device: torch.device, precision: str, checkpointing: bool,
                 largest_block: int = 0) -> dict[str, int]:
    """Bytes of each pile after one training step of ``probe`` (see the module docstring).

    ``largest_block`` (with checkpointing): the largest block's own saved bytes, from a step without.
    Returns weights, grads, adamw, activations and, for later use, largest_block.
    """
    model = probe.model.to(device).train()
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    batch = to_device(probe.batch, device)
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    excluded = set(weights) | set(_storage_bytes(v for v in batch.values() if torch.is_tensor(v)))
    with SavedTensors(model, excluded, checkpointing) as saved, autocast(device, precision):
        loss, _ = probe.loss_fn(model, batch)
    held = {**saved.held(), **_storage_bytes(_workspaces(model))}
    own_block = saved.largest_block()
    activations = sum(held.values()) + (largest_block if checkpointing else 0)
    loss.backward()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), fused=device.type in ("cuda", "cpu"))
    optimizer.step()
    grads = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    states = _storage_bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    model.zero_grad(set_to_none=True)
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "adamw": sum(states.values()),
            "activations": activations, "largest_block": own_block}


def measure_rows(preset: str, batch_size: int, device: torch.device, stages: Iterable[str] = STAGE_ORDER) -> list[dict]:
    """Per stage at ``batch_size``: measured weights, grads and AdamW state (bf16 step), and
    activations without/with checkpointing in bf16 (``activations``, ``activations_ckpt``) and
    fp32 (``activations_fp32``, ``activations_ckpt_fp32``)."""
    cfg = load_preset(preset)
    rows = []
    for stage in stages:
        train = dataclasses.replace(stage_train_config(stage, preset)[0], batch_size=batch_size)
        probe = stage_probe(stage, cfg, train)
        row = {"stage": stage, "batch": batch_size}
        for precision, suffix in (("fp32", "_fp32"), ("bf16", "")):
            plain = measure_step(probe, device, precision, checkpointing=False)
            ckpt = measure_step(probe, device, precision, checkpointing=True, largest_block=plain["largest_block"])
            row[f"activations{suffix}"], row[f"activations_ckpt{suffix}"] = plain["activations"], ckpt["activations"]
            row.update(weights=plain["weights"], grads=plain["grads"], adamw=plain["adamw"])
        rows.append(row)
        del probe
    return rows


def table(planned: dict[str, list[dict]], measured: list[dict]) -> str:
    """Plan and measurement side by side (MB); in brackets measured / planned."""
    def pair(plan: int, real: int) -> str:
        return f"{plan / MB:.1f} / {real / MB:.1f} ({real / plan:.2f})"

    lines = ["| stage | batch | weights+grads+AdamW | activations bf16 | w/ ckpt bf16 | activations fp32 "
             "| w/ ckpt fp32 |", "|---|---|---|---|---|---|---|"]
    for bf16, fp32, real in zip(planned["bf16"], planned["fp32"], measured):
        cells = [pair(*(r["weights"] + r["grads"] + r["adamw"] for r in (bf16, real)))]
        cells += [pair(plan[key], real[key + suffix]) for plan, suffix in ((bf16, ""), (fp32, "_fp32"))
                  for key in ("activations", "activations_ckpt")]
        lines.append(f"| {bf16['stage']} | {real['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_measured(preset: str, batch_size: int, device: torch.device) -> None:
    """Print the measured piles beside the plan at ``batch_size``."""
    measured = measure_rows(preset, batch_size, device)
    planned = {precision: plan_rows(preset, batch_size, precision) for precision in ("bf16", "fp32")}
    print(f"\nplan / measured on {device} at batch {batch_size} (MB, measured / planned in brackets): one "
          "training step of each stage on random inputs. The plan scales with the batch, so this checks it at any.")
    print(table(planned, measured), end="")
