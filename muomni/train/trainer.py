"""One training engine for every μOmni stage.

A stage hands the `Trainer` a model, a map-style dataset, a collate function and a loss function
``loss_fn(model, batch) -> (loss, metrics)``; the Trainer does the rest:

- device auto-detection (cuda > mps > cpu), bf16 autocast on CUDA (on any device with
  ``precision="bf16"``), fp32 elsewhere, optional ``torch.compile`` and gradient checkpointing;
- AdamW (fused kernel on CUDA and CPU) with weight decay on matrices only, or Muon for the blocks'
  matrices (`muomni.train.muon`); linear warmup then cosine decay (Loshchilov & Hutter, 2019),
  gradient accumulation and clipping;
- periodic validation, ``best/`` and ``last/`` checkpoints, ``metrics.jsonl``, ``loss.png``, ``run.json``;
- exact resume: weights, optimiser, schedule position, RNG states and data position are saved, so a
  run killed at step k and resumed reaches bit-identical weights to a run that was never stopped;
- a NaN/inf loss stops the run naming the step and the batch, leaving the last good checkpoint alone;
- under ``torchrun``: DDP with each rank reading its own slice of every global batch, or FSDP2
  (``fully_shard`` per transformer block) with ``TrainConfig.fsdp``.

Batches are dicts; tensors are moved to the device, everything else is passed through.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from muomni.checkpoint import save_checkpoint
from muomni.config import ConfigError, TrainConfig, to_dict
from muomni.data.datasets import EpochShuffler
from muomni.layers import Block
from muomni.train.muon import MuonAdamW, muon_adamw_groups

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


class TrainError(ValueError):
    """A training run that cannot go on: a diverged loss, data too small, nothing to resume."""


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> cuda (this process's GPU under torchrun), then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device: torch.device, precision: str = "auto"):
    """The forward pass's number format: bf16 autocast on CUDA ("auto") or on any device ("bf16"),
    else plain fp32. Master weights, gradients and AdamW state stay fp32 either way."""
    if precision not in PRECISIONS:
        raise TrainError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: matrices decay; biases, norms and scalars do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   sharded: bool = False) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model``'s trainable parameters: AdamW, or Muon with AdamW (`MuonAdamW`)."""
    if cfg.optimizer == "adamw":
        # The fused kernel updates every parameter in one pass (CUDA and CPU); much faster than the loop.
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                 fused=device.type in ("cuda", "cpu") or None)
    if cfg.optimizer != "muon":
        raise ConfigError(f"train.optimizer must be 'adamw' or 'muon', got '{cfg.optimizer}'")
    if sharded:
        # Orthogonalising needs each whole matrix; FSDP holds a shard of it in each process.
        raise ConfigError("train.optimizer 'muon' does not run under FSDP (train.fsdp); use DDP or 'adamw'")
    return MuonAdamW(muon_adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                     momentum=cfg.muon_momentum)


class _LossModule(nn.Module):
    """model + loss_fn as one module, so DDP/FSDP hooks see the whole loss computation as a forward
    pass even when ``loss_fn`` calls a method other than ``forward`` (e.g. ``Thinker.loss``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.model, batch)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains ``model`` on ``train_data`` with ``loss_fn``; writes the run directory ``out_dir``.

    ``run_config`` (typically ``{"model": ..., "train": ...}``) goes into ``run.json``; its ``"model"``
    entry, merged with ``checkpoint_extra``, becomes each checkpoint's ``config.json``.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path, train_data: Dataset,
                 collate_fn: Callable, loss_fn: LossFn, val_data: Dataset | None = None,
                 run_config: dict | None = None, tokenizer: Any = None,
                 checkpoint_extra: dict | None = None, probe: Callable[[nn.Module], dict[str, float]] | None = None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        # At each validation, ``probe(model)`` measures what the model can do (accuracy per kind, say);
        # the scores go to metrics.jsonl against training minutes and are drawn in learning_curve.png.
        self.probe = probe
        self.train_data, self.val_data, self.collate_fn = train_data, val_data, collate_fn
        self.run_config, self.tokenizer = run_config or {}, tokenizer
        self.checkpoint_extra = checkpoint_extra

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = self.world > 1 and not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        autocast(self.device, cfg.precision)  # an unknown precision fails here, before any work
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        per_step = cfg.batch_size * self.world
        if len(train_data) < per_step:
            raise TrainError(f"training set has {len(train_data)} samples, fewer than one global batch "
                             f"({cfg.batch_size} x {self.world} processes)")

        self.model = model.to(self.device)
        for module in model.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = cfg.grad_checkpointing
        if cfg.compile:
            # Compile block by block: stage losses call methods other than forward (Thinker.loss), and
            # every one of them runs through the blocks.
            for module in model.modules():
                if isinstance(module, Block):
                    module.compile()
        # The loss module is what the optimiser steps through; `wrapped` adds DDP/FSDP when distributed.
        self.loss_module = _LossModule(model, loss_fn)
        if self.world > 1 and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            for module in model.modules():
                if isinstance(module, Block):
                    fully_shard(module)
            fully_shard(self.loss_module)
            self.wrapped = self.loss_module
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # A part may go unused in one process's batch (stage E's Talker sees only spoken answers):
            # DDP must then look for unused parameters, or the processes' gradient exchanges mismatch.
            self.wrapped = DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        else:
            self.wrapped = self.loss_module
        self.optimizer = make_optimizer(model, cfg, self.device, sharded=self.world > 1 and cfg.fsdp)

        # Position of the run: optimiser steps done, and the next micro-batch (epoch, index).
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.best_val = math.inf
        self.last_saved_step = 0

    # ------------------------------------------------------------------------------------------
    # Data

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of sample indices for ``epoch``.

        One permutation per epoch from the seed; global batch i is split into contiguous slices per
        rank, so N processes see exactly the samples that one process with N times the batch sees.
        """
        size, n = self.cfg.batch_size, len(self.train_data)
        shuffler = EpochShuffler(n, seed=self.cfg.seed)
        shuffler.set_epoch(epoch)
        order = list(shuffler)
        per_step = size * self.world
        start = self.rank * size
        return [order[i * per_step + start: i * per_step + start + size] for i in range(n // per_step)]

    def _micro_batches(self):
        """Yields ``(indices, batch)`` forever, continuing from (self.epoch, self.batch_index)."""
        while True:
            batches = self._epoch_batches(self.epoch)[self.batch_index:]
            # A seeded generator makes worker seeds (augmentation) depend only on the position.
            loader = DataLoader(self.train_data, batch_sampler=batches, collate_fn=self.collate_fn,
                                num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.cfg.seed + 7919 * self.epoch + self.batch_index))
            for indices, batch in zip(batches, loader):
                self.batch_index += 1
                yield indices, batch
            self.epoch, self.batch_index = self.epoch + 1, 0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    def _autocast(self):
        return autocast(self.device, self.cfg.precision)

    def _all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # ------------------------------------------------------------------------------------------
    # Steps

    def _train_step(self, batches) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns averaged metrics."""
        accum = self.cfg.grad_accum
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, sums, where = [], {}, []
        for micro in range(accum):
            indices, batch = next(batches)
            where.append((self.epoch, self.batch_index - 1, indices))
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = self.wrapped(self._to_device(batch))
                (loss / accum).backward()
            losses.append(loss.detach().float())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        losses = torch.stack(losses)
        bad = ~torch.isfinite(losses)
        loss_sum, n_bad, tokens = self._all_reduce([losses.nan_to_num(0.0, 0.0, 0.0).sum().item(),
                                                    bad.sum().item(), sums.get("tokens", 0.0)])
        if n_bad:
            if bad.any():
                epoch, index, indices = where[int(bad.nonzero()[0])]
                shown = indices[:8] + (["..."] if len(indices) > 8 else [])
                culprit = f"epoch {epoch}, batch {index}, samples {shown}, rank {self.rank}"
            else:
                culprit = "on another rank"
            raise TrainError(f"loss is not finite at step {self.step + 1} ({culprit}); stopped, last good "
                             f"checkpoint kept in {self.out_dir / 'last'} (step {self.last_saved_step})")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise TrainError(f"gradient norm is {norm} at step {self.step + 1} (epoch {where[-1][0]}, "
                             f"batch {where[-1][1]}); stopped, last good checkpoint kept in "
                             f"{self.out_dir / 'last'} (step {self.last_saved_step})")
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        out = {key: value / accum for key, value in sums.items() if key != "tokens"}
        out.update(loss=loss_sum / (accum * self.world), lr=lr, grad_norm=norm, tokens=tokens)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the first ``eval_batches`` validation micro-batches per rank."""
        size, n = self.cfg.batch_size, len(self.val_data)
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        # Every rank runs the same number of batches: FSDP gathers weights collectively per forward.
        count = min(self.cfg.eval_batches, len(batches) // self.world)
        mine = batches[self.rank::self.world][:count]
        self.model.eval()
        sums: dict[str, float] = {}
        for indices in mine:
            with self._autocast():
                loss, metrics = self.loss_module(self._to_device(self.collate_fn([self.val_data[i] for i in indices])))
            for key, value in {**metrics, "loss": loss.item()}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        keys = sorted(sums) if sums else ["loss"]
        totals = self._all_reduce([sums.get(k, 0.0) for k in keys] + [len(mine)])
        batches_seen = max(1.0, totals[-1])
        return {key: value / batches_seen for key, value in zip(keys, totals) if key != "tokens"}

    # ------------------------------------------------------------------------------------------
    # Files

    def _state_dicts(self, optimizer: bool) -> tuple[dict, dict | None]:
        """Full (unsharded) model and optimiser state dicts; a collective under FSDP."""
        if not self.cfg.fsdp or self.world == 1:
            return self.model.state_dict(), self.optimizer.state_dict() if optimizer else None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=full),
                get_optimizer_state_dict(self.model, self.optimizer, options=full) if optimizer else None)

    def _load_state_dicts(self, weights: dict, optimizer: dict) -> None:
        if not self.cfg.fsdp or self.world == 1:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(self.model, weights, options=full)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=full)

    def _save(self, name: str) -> None:
        """Write ``best/`` or ``last/`` (``last/`` also gets ``trainer_state.pt``); collective."""
        weights, optimizer = self._state_dicts(optimizer=name == "last")
        state = None
        if name == "last":
            rng = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(rng, _rng_state())
            else:
                rng = [_rng_state()]
            state = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                     "best_val": self.best_val, "world": self.world, "rng": rng,
                     "optimizer": optimizer}
        if self.rank == 0:
            path = self.out_dir / name
            save_checkpoint(path, weights, self.run_config.get("model", {}), tokenizer=self.tokenizer,
                            extra=self.checkpoint_extra)
            if state is not None:
                tmp = self.out_dir / "trainer_state.pt.tmp"
                torch.save(state, tmp)
                os.replace(tmp, path / "trainer_state.pt")
                self._plot()
        if name == "last":
            self.last_saved_step = self.step
        if self.world > 1:
            dist.barrier()

    def _load(self) -> None:
        path = self.out_dir / "last" / "trainer_state.pt"
        if not path.exists():
            raise TrainError(f"cannot resume: {path} does not exist; train without --resume first")
        state = torch.load(path, weights_only=True)
        if state["world"] != self.world:
            raise TrainError(f"cannot resume: {path} was written by {state['world']} processes, now {self.world}")
        from muomni.checkpoint import load_checkpoint
        weights, _ = load_checkpoint(self.out_dir / "last")
        self._load_state_dicts(weights, state["optimizer"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.best_val, self.last_saved_step = state["best_val"], state["step"]
        _set_rng_state(state["rng"][self.rank])

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")

    def _metrics(self) -> list[dict[str, Any]]:
        path = self.out_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _plot(self) -> None:
        """loss.png: training and validation loss against the step (no pyplot: the backend stays as is)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = self._metrics()
        figure = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for split in ("train", "val"):
            points = [(r["step"], r["loss"]) for r in records if r.get("split") == split]
            if points:
                axes.plot(*zip(*points), marker="o" if split == "val" else None, label=split)
        axes.set(xlabel="step", ylabel="loss", title=self.out_dir.name)
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.out_dir / "loss.png", dpi=100)

    def _plot_curve(self) -> None:
        """learning_curve.png: every probe score against training minutes."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = [r for r in self._metrics() if r.get("split") == "probe"]
        if self.rank != 0 or not records:
            return
        figure = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for key in sorted(k for k in records[-1] if k not in ("step", "split", "train_minutes")):
            axes.plot([r["train_minutes"] for r in records], [r.get(key) for r in records], marker="o", label=key)
        axes.set(xlabel="training minutes", ylabel="score", title=f"{self.out_dir.name}: what it can do")
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(self.out_dir / "learning_curve.png", dpi=100)

    def _write_run(self, finished: bool, final: dict[str, float] | None = None) -> None:
        if self.rank == 0:
            run = {**self.run_config, "train": to_dict(self.cfg), "world_size": self.world,
                   "device": str(self.device), "step": self.step, "finished": finished}
            if final is not None:
                run["final"] = final
            (self.out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to ``cfg.steps`` optimiser steps (continuing from ``last/`` with ``resume``)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load()
            # Drop metrics logged after the checkpoint: they are about to be recomputed.
            kept = [r for r in self._metrics() if r["step"] <= self.step]
            if self.rank == 0:
                (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.rank == 0:
            (self.out_dir / "metrics.jsonl").write_text("")
        self._write_run(finished=False)

        batches = self._micro_batches()
        # One bar, on rank 0, unless TQDM_DISABLE=1 (tqdm's own switch, which an explicit argument overrides).
        progress = tqdm(total=cfg.steps, initial=self.step, desc=self.out_dir.name,
                        disable=self.rank != 0 or os.environ.get("TQDM_DISABLE") == "1", dynamic_ncols=True)
        # Throughput counts training steps only, not validation or checkpoint writing.
        started, window_seconds, window_tokens = time.perf_counter(), 0.0, 0.0
        train: dict[str, float] = {}
        val: dict[str, float] = {}
        # Training minutes for the learning curve: optimiser steps only, carried over a resume.
        train_seconds = 60 * max([r.get("train_minutes", 0.0) for r in self._metrics()], default=0.0)
        while self.step < cfg.steps:
            step_start = time.perf_counter()
            train = self._train_step(batches)
            window_seconds += time.perf_counter() - step_start
            train_seconds += time.perf_counter() - step_start
            window_tokens += train.pop("tokens")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                train["tokens_per_s"] = window_tokens / max(window_seconds, 1e-9)
                train["step_s"] = window_seconds / cfg.log_every
                window_seconds, window_tokens = 0.0, 0.0
                self._log({"step": self.step, "split": "train", **train,
                           "elapsed_s": round(time.perf_counter() - started, 3)})
                progress.set_postfix(loss=f"{train['loss']:.3f}", lr=f"{train['lr']:.2e}",
                                     tok_s=f"{train['tokens_per_s']:.0f}", refresh=False)
            if self.val_data is not None and (cfg.eval_every and self.step % cfg.eval_every == 0
                                              or self.step == cfg.steps):
                val = self.evaluate()
                self._log({"step": self.step, "split": "val", **val})
                if self.probe is not None:
                    self._log({"step": self.step, "split": "probe", "train_minutes": round(train_seconds / 60, 5),
                               **self.probe(self.model)})
                    self._plot_curve()
                if val["loss"] < self.best_val:
                    self.best_val = val["loss"]
                    self._save("best")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self._save("last")
            progress.update(1)
        progress.close()

        final = {"step": self.step, "train_seconds": round(time.perf_counter() - started, 2)}
        final.update({f"train_{k}": v for k, v in train.items() if k in ("loss", "tokens_per_s")})
        if val:
            final.update(val_loss=val["loss"], best_val_loss=self.best_val)
        self._write_run(finished=True, final=final)
        if self._owns_group:
            dist.destroy_process_group()
        return final
