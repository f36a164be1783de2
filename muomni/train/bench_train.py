"""`muomni bench train --stage thinker`: time the real training engine and measure its peak memory.

Runs the shared `Trainer` for ``2 x steps`` optimiser steps on random tokens at the stage's
configured batch and sequence length (`stage_thinker.TRAIN_DEFAULTS[preset]`): the first ``steps``
warm up (allocation, kernel choice), the next ``steps`` are timed. On CUDA the peak of
``torch.cuda.max_memory_allocated`` is reported next to the `memory_plan` estimate, so the plan can
be checked against a measurement. Prints (and optionally writes) JSON.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from muomni.thinker import Thinker
from muomni.train.memory_plan import GB, plan_rows
from muomni.train.stage_thinker import TRAIN_DEFAULTS, PackedText, collate, lm_loss
from muomni.train.stages import resolve_configs
from muomni.train.trainer import Trainer, pick_device


def bench_thinker(preset: str, steps: int, device: str) -> dict:
    """Tokens/s, seconds per step and peak memory of stage A training at ``preset`` size."""
    omni, train = resolve_configs(preset, TRAIN_DEFAULTS, [])
    train = dataclasses.replace(train, steps=2 * steps, warmup_steps=1, log_every=steps, eval_every=0,
                                save_every=10**9, device=device)
    torch.manual_seed(0)
    rows = torch.randint(8, omni.thinker.vocab_size, (train.batch_size * 2 * steps, train.seq_len + 1))
    target = pick_device(device)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(Thinker(omni.thinker), train, Path(run_dir), PackedText(rows, pad_id=0), collate, lm_loss)
        trainer.fit()
        timed = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    plan = next(row for row in plan_rows(preset) if row["stage"] == "thinker")
    return {
        "stage": "thinker", "preset": preset, "device": str(target), "torch": torch.__version__,
        "precision": "bf16 autocast" if target.type == "cuda" else "fp32",
        "batch": train.batch_size, "seq_len": train.seq_len, "timed_steps": steps,
        "tokens_per_s": round(timed["tokens_per_s"], 1), "step_s": round(timed["step_s"], 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(target) / GB, 3) if target.type == "cuda" else None,
        "plan_gb": round((plan["total_ckpt"] if train.grad_checkpointing else plan["total"]) / GB, 3),
    }


def main(args) -> int:
    """`muomni bench train --stage thinker [--preset base] [--steps N] [--device auto] [--out FILE]`."""
    if args.stage != "thinker":
        raise ValueError(f"bench train measures stage 'thinker'; got '{args.stage}'")
    result = bench_thinker(args.preset, args.steps or 10, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
