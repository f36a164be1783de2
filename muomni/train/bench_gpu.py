"""`muomni bench gpu --preset base --out gpu.json`: every stage's training step on one CUDA GPU.

For each stage, the `step_probe` batch at the stage's configured batch size under bf16 autocast,
stepped as the `Trainer` steps it (fused AdamW, gradient clipping): ``warm`` steps settle allocation
and kernel choice, then ``steps`` are timed. Reported per stage: the peak of
``torch.cuda.max_memory_allocated`` beside the plan (`memory_plan`), seconds per step, tokens (or
25 Hz frames, or code steps) per second, and the projected wall time of the stage's configured steps.
The random inputs need no data and no earlier stage, so a fresh clone on a fresh GPU runs it in one
command; on a modern GPU the whole run should take a minute or two (13 steps per stage, well under the
8 minutes it is meant to fit).

Stage D's codec, trained before its Talker, is small and not timed here; `muomni bench train
--stage speech` times both on the world.

Every CUDA call goes through one small interface, `Accelerator`, so the logic runs (and is tested)
on a CPU with a stand-in.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Protocol

import torch

from muomni.bench import BenchError, train_step
from muomni.config import preset as load_preset
from muomni.train.memory_plan import GB, STAGE_ORDER, plan_rows, stage_train_config
from muomni.train.step_probe import stage_probe, to_device
from muomni.train.trainer import autocast

WARM_STEPS, TIMED_STEPS = 3, 10
UNITS = {"thinker": "tokens", "audio": "frames", "vision": "tokens", "speech": "code steps", "sft": "tokens"}


class Accelerator(Protocol):
    """What the benchmark asks of the device."""

    device: torch.device
    name: str

    def synchronize(self) -> None: ...  # wait for queued work, so the clock reads finished steps

    def reset_peak(self) -> None: ...  # start a new peak-memory count

    def max_memory_allocated(self) -> int: ...  # bytes: the peak since reset_peak


class Cuda:
    """The CUDA GPU of this process (refuses with a one-line error where there is none)."""

    def __init__(self, index: int = 0):
        if not torch.cuda.is_available():
            raise BenchError("bench gpu needs a CUDA GPU and this machine has none; "
                             "`muomni plan --measure` counts a step's memory on any device")
        self.device = torch.device("cuda", index)
        self.name = torch.cuda.get_device_name(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def bench_stage(stage: str, preset: str, accelerator: Accelerator, warm: int, steps: int,
                batch_size: int | None = None) -> dict:
    """Peak memory, step time, rate and projected wall time of ``stage`` at its configured batch
    (or ``batch_size``)."""
    train, _ = stage_train_config(stage, preset)
    if batch_size is not None:
        train = dataclasses.replace(train, batch_size=batch_size)
    gc.collect()  # the previous stage's tensors go before the peak is reset
    accelerator.reset_peak()
    probe = stage_probe(stage, load_preset(preset), train)
    model = probe.model.to(accelerator.device)
    batch = to_device(probe.batch, accelerator.device)

    def loss() -> torch.Tensor:
        with autocast(accelerator.device, "bf16"):
            return probe.loss_fn(model, batch)[0]

    step = train_step(model, loss, train.grad_clip)
    for _ in range(warm):
        step()
    accelerator.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    accelerator.synchronize()
    step_s = (time.perf_counter() - start) / steps
    total_steps = train.steps * train.grad_accum
    return {"batch": train.batch_size, "seq_len": train.seq_len if stage in ("thinker", "sft") else None,
            "peak_memory_gb": round(accelerator.max_memory_allocated() / GB, 3), "step_s": round(step_s, 4),
            f"{UNITS[stage].replace(' ', '_')}_per_s": round(probe.units / step_s, 1),
            "configured_steps": total_steps, "projected_minutes": round(total_steps * step_s / 60, 1)}


def bench_gpu(preset: str, accelerator: Accelerator, warm: int = WARM_STEPS, steps: int = TIMED_STEPS,
              batch_size: int | None = None) -> dict:
    """`bench_stage` for every stage, with the plan's totals beside each measured peak."""
    plans = {row["stage"]: row for row in plan_rows(preset, batch_size)}
    stages = {}
    for stage in STAGE_ORDER:
        result = bench_stage(stage, preset, accelerator, warm, steps, batch_size)
        plan = plans[stage]
        result["plan_gb"] = round(plan["total"] / GB, 3)
        result["peak_vs_plan"] = round(result["peak_memory_gb"] / result["plan_gb"], 2)
        stages[stage] = result
    return {"preset": preset, "device": accelerator.name, "torch": torch.__version__,
            "precision": "bf16 autocast", "warm_steps": warm, "timed_steps": steps, "stages": stages,
            "projected_hours": round(sum(s["projected_minutes"] for s in stages.values()) / 60, 2)}


def main(args) -> int:
    """`muomni bench gpu [--preset base] [--steps 10] [--out gpu.json]`."""
    result = bench_gpu(args.preset, Cuda(), steps=args.steps or TIMED_STEPS)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
