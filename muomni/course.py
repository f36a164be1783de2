"""`muomni course` (`make course`): the course's full `tiny` model, built on what `make demo` trained.

The demo stops every stage early to keep within its minutes, and its learning curves
(`runs/tiny/*/metrics.jsonl`, `runs/tiny/sft/learning_curve.png`) are still rising where they stop.
The course copies the demo's stages into ``runs/<preset>-course``, trains the two encoders on from
the demo's last checkpoints (the AuT and the ViT, side by side, each on one CPU thread; their
learning-rate schedules restart over the longer runs), reuses the Thinker and the speech stage as they
are, and then trains stage E afresh for `COURSE_STEPS["sft"]` steps on the better encoders (the
demo's stage E learnt to read the demo's encoders). It runs whatever part of the demo is missing
first, then evaluates and answers the sample prompts like the demo. About an hour on two cores after
the demo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from muomni.demo import _line, build_world, finish, train_side_by_side, train_stages

COURSE_STEPS = {"audio": 4000, "vision": 1200, "sft": 3500}  # each stage's steps in all (the demo's included)
CONTINUED = ("audio", "vision")  # trained on from the demo's checkpoints, side by side
REUSED = ("thinker", "speech")  # copied as the demo left them


def course_runs(demo_runs: Path) -> Path:
    """Where the course trains: ``<demo_runs>-course``, beside the demo's runs."""
    return demo_runs.with_name(demo_runs.name + "-course")


def trained_runs(demo_runs: Path, stage: str) -> Path | None:
    """The runs directory whose ``stage`` is finished, the course's before the demo's; None if neither."""
    from muomni.train.stages import is_finished

    return next((runs for runs in (course_runs(demo_runs), demo_runs) if is_finished(runs, stage)), None)


def train_course(preset: str, data_dir: Path, demo_runs: Path, runs_dir: Path) -> dict[str, str]:
    """Copy the demo's stages into ``runs_dir`` and train the course's steps; stage -> status."""
    from muomni.train.stages import is_finished

    status: dict[str, str] = {}
    for stage in REUSED + CONTINUED:
        if not (runs_dir / stage).is_dir():
            shutil.copytree(demo_runs / stage, runs_dir / stage)
        status[stage] = "reused from the demo"
    todo = [s for s in CONTINUED if json.loads((runs_dir / s / "run.json").read_text()).get("step", 0) < COURSE_STEPS[s]]
    if todo:
        _line(f"[course]  training {', '.join(todo)} on to {', '.join(str(COURSE_STEPS[s]) for s in todo)} steps ...")
        steps = {s: (f"train.steps={COURSE_STEPS[s]}",) for s in todo}
        outcomes = train_side_by_side(preset, data_dir, runs_dir, todo, overrides=steps, resume=True)
        for stage, (seconds, error) in outcomes.items():
            status[stage] = f"trained on in {seconds:.0f} s" if error is None else f"failed: {error}"
            _line(f"[course]  {stage}: {status[stage]}")
    if not is_finished(runs_dir, "sft") and not any(v.startswith("failed") for v in status.values()):
        _line(f"[course]  training sft for {COURSE_STEPS['sft']} steps on the course's encoders ...")
        seconds, error = train_side_by_side(preset, data_dir, runs_dir, ["sft"],
                                            overrides={"sft": (f"train.steps={COURSE_STEPS['sft']}",)})["sft"]
        status["sft"] = f"trained in {seconds:.0f} s" if error is None else f"failed: {error}"
    elif "sft" not in status:
        status["sft"] = "finished earlier: reused"
    return status


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_dir, out_dir = Path(args.data), Path(args.out)
    demo_runs = Path(args.runs or f"runs/{args.preset}")
    runs_dir = course_runs(demo_runs)
    _line(f"μOmni course: preset {args.preset}, data {data_dir}, the demo's runs {demo_runs}, the course's {runs_dir}")
    build_world(args.preset, data_dir)
    demo = train_stages(args.preset, data_dir, demo_runs)
    if any(state.startswith("failed") for state in demo.values()):
        _line("[course]  a demo stage failed; fix that first")
        return 1
    status = train_course(args.preset, data_dir, demo_runs, runs_dir)
    return finish("course", start, status, data_dir, runs_dir, out_dir)
