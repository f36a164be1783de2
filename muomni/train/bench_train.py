"""`muomni bench train --stage S`: time the real training engine and measure its peak memory.

Every stage is timed with its own training code at its configured batch, for ``2 x steps``
optimiser steps: the first ``steps`` warm up (allocation, kernel choice), the next ``steps`` are
timed (the rate the `Trainer` logs for them). On CUDA the peak of ``torch.cuda.max_memory_allocated``
is reported next to the `memory_plan` estimate, so the plan can be checked against a measurement.

- ``thinker`` needs no data: it trains on random tokens at the stage's batch and sequence length.
- the other stages read the world (``--data``) and, where they build on earlier stages, the trained
  stages of ``--runs`` (stage sft needs A–D, vision the thinker's tokenizer, speech the thinker and
  the AuT that aligns its speech). The run goes to a temporary directory that links to those
  stages, so nothing in ``--runs`` changes.

Prints (and optionally writes) JSON: one entry per trained network (stage speech trains the codec
and then the Talker).
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
from muomni.train.stages import StageError, resolve_configs, stage_module
from muomni.train.trainer import Trainer, pick_device


def _timed(metrics_file: Path) -> dict:
    """Rate and step time of the last logged training window of a run."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    last = [line for line in lines if line.get("split") == "train"][-1]
    return {"tokens_per_s": round(last["tokens_per_s"], 1), "step_s": round(last["step_s"], 4)}


def _thinker_run(preset: str, steps: int, device: str) -> dict[str, dict]:
    """Stage A on random tokens (no data needed)."""
    omni, train = resolve_configs(preset, TRAIN_DEFAULTS, [])
    train = dataclasses.replace(train, steps=2 * steps, warmup_steps=1, log_every=steps, eval_every=0,
                                save_every=10**9, device=device)
    torch.manual_seed(0)
    rows = torch.randint(8, omni.thinker.vocab_size, (train.batch_size * 2 * steps, train.seq_len + 1))
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(Thinker(omni.thinker), train, Path(run_dir), PackedText(rows, pad_id=0), collate, lm_loss).fit()
        return {"thinker": {**_timed(Path(run_dir) / "metrics.jsonl"), "batch": train.batch_size,
                            "seq_len": train.seq_len}}


def _stage_run(stage: str, preset: str, steps: int, device: str, data_dir: Path, runs_dir: Path) -> dict[str, dict]:
    """Any stage, with its own `train`, into a temporary runs directory beside links to the others."""
    settings = [f"steps={2 * steps}", "warmup_steps=1", f"log_every={steps}", "eval_every=0",
                f"save_every={10**9}", f"device={device}"]
    overrides = [f"train.{s}" for s in settings]
    if stage == "speech":
        overrides += [f"codec_train.{s}" for s in settings]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        if Path(runs_dir).is_dir():
            for entry in Path(runs_dir).iterdir():
                if entry.name != stage:
                    (runs / entry.name).symlink_to(entry.resolve())
        stage_module(stage).train(preset, Path(data_dir), runs, overrides, False)
        return {metrics.parent.relative_to(runs).as_posix(): _timed(metrics)
                for metrics in sorted((runs / stage).rglob("metrics.jsonl"))}


def bench_stage(stage: str, preset: str, steps: int, device: str, data_dir: Path | None = None,
                runs_dir: Path | None = None) -> dict:
    """Rates, seconds per step and peak memory of one stage's training at ``preset`` size."""
    stage_module(stage)  # an unknown stage fails here, naming the stages there are
    target = pick_device(device)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    if stage == "thinker":
        parts = _thinker_run(preset, steps, device)
    else:
        if data_dir is None or not Path(data_dir).is_dir():
            raise StageError(f"bench train --stage {stage} reads the world: pass --data DIR (got {data_dir})")
        parts = _stage_run(stage, preset, steps, device, Path(data_dir), Path(runs_dir or f"runs/{preset}"))
    plan = next((row for row in plan_rows(preset) if row["stage"] == stage), None)
    return {
        "stage": stage, "preset": preset, "device": str(target), "torch": torch.__version__,
        "precision": "bf16 autocast" if target.type == "cuda" else "fp32", "timed_steps": steps,
        "runs": parts,  # per trained network: tokens (or frames, images) per second and seconds per step
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(target) / GB, 3) if target.type == "cuda" else None,
        # the analytic estimate (`muomni plan`) without and with gradient checkpointing
        "plan_gb": {"total": round(plan["total"] / GB, 3), "with_checkpointing": round(plan["total_ckpt"] / GB, 3)}
        if plan else None,
    }


def main(args) -> int:
    """`muomni bench train --stage S [--preset base] [--steps N] [--device auto] [--data D] [--runs R] [--out F]`."""
    result = bench_stage(args.stage, args.preset, args.steps or 10, args.device, args.data, args.runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
