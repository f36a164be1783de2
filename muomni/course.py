"""`muomni course` (`make course`): the course's full `tiny` model, on top of what `make demo` trained.

The demo stops stage E after `TRAIN_DEFAULTS["tiny"].steps` steps to stay inside its 15 minutes;
the learning curve (`runs/tiny/sft/learning_curve.png`) shows the answers still improving there.
The course reuses the demo's world and stages A–D as they are, and continues stage E from the
demo's last checkpoint to `COURSE_SFT_STEPS` steps (about half an hour on two CPU cores; the
learning-rate schedule restarts over the longer run). It runs whatever part of the demo is missing
first, then evaluates and answers the sample prompts like the demo.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from muomni.demo import _line, answer_samples, build_world, run_eval, train_stages

COURSE_SFT_STEPS = 4000  # stage E's steps in the course's model (the demo's 700 included)


def continue_sft(preset: str, data_dir: Path, runs_dir: Path, steps: int) -> str:
    """Continue stage E from ``runs_dir/sft/last`` to ``steps`` steps; returns a status line."""
    from muomni.train.stages import stage_module

    run = json.loads((runs_dir / "sft" / "run.json").read_text())
    if run.get("step", 0) >= steps:
        return f"reused ({run['step']} steps)"
    start = time.time()
    _line(f"[course]  stage sft: from step {run.get('step', 0)} to {steps} ...")
    stage_module("sft").train(preset, data_dir, runs_dir, [f"train.steps={steps}"], True)
    return f"trained to {steps} steps in {time.time() - start:.0f} s"


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_dir, out_dir = Path(args.data), Path(args.out)
    runs_dir = Path(args.runs or f"runs/{args.preset}")
    args.sft_steps = args.sft_steps or COURSE_SFT_STEPS
    _line(f"μOmni course: preset {args.preset}, data {data_dir}, runs {runs_dir}, stage E to {args.sft_steps} steps")
    build_world(args.preset, data_dir)
    status = train_stages(args.preset, data_dir, runs_dir)
    if status.get("sft", "").startswith("failed"):
        _line("[course]  stage sft failed in the demo part; fix that first")
        return 1
    status["sft"] = continue_sft(args.preset, data_dir, runs_dir, args.sft_steps)
    evaluated = run_eval(data_dir, runs_dir)
    answered = answer_samples(data_dir, runs_dir, out_dir)
    _line("")
    _line(f"course finished in {(time.time() - start) / 60:.1f} min")
    for stage, state in status.items():
        _line(f"  {stage:8s} {state}  ({runs_dir / stage})")
    _line(f"  eval     {evaluated}  ({runs_dir / 'eval.md'}); learning curve: {runs_dir / 'sft' / 'learning_curve.png'}")
    _line(f"  answers  {answered}  ({out_dir / 'answer.wav'})")
    failed = [stage for stage, state in status.items() if state.startswith("failed")]
    return 1 if failed or evaluated != "done" else 0
