"""`muomni eval`: run each trained stage's held-out evaluation and write one report.

Every stage module in `muomni.train.stages.STAGES` has ``evaluate(runs_dir, data_dir) -> dict``
returning metrics per split, e.g. ``{"test": {"perplexity": 3.1}, "comp": {...}}``. This command
calls them, skips stages that have not been trained (saying so), and writes ``eval.json`` and
``eval.md`` (a Markdown table: stage, split, metric, value) into the output directory.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from muomni.train.stages import STAGES, StageError, stage_module


def evaluate_stages(stages: list[str], runs_dir: Path, data_dir: Path) -> dict[str, Any]:
    """``{stage: metrics}`` for every stage in ``stages`` whose run directory exists."""
    results = {}
    for stage in stages:
        if not (runs_dir / stage).is_dir():
            print(f"{stage}: skipped, {runs_dir / stage} does not exist (train it with "
                  f"`muomni train --stage {stage}`)")
            continue
        print(f"{stage}: evaluating {runs_dir / stage}")
        results[stage] = stage_module(stage).evaluate(runs_dir, data_dir)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """One row per (stage, split, metric); nested dicts are flattened with dots."""
    lines = ["| stage | split | metric | value |", "|---|---|---|---|"]
    for stage, splits in results.items():
        for split, metrics in splits.items():
            for name, value in _flatten(metrics if isinstance(metrics, dict) else {"value": metrics}):
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"| {stage} | {split} | {name} | {shown} |")
    return "\n".join(lines) + "\n"


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def main(args) -> int:
    """`muomni eval --stage S|all --preset P [--data DIR] [--runs DIR] [--out DIR]`."""
    runs_dir = Path(args.runs or f"runs/{args.preset}")
    if args.stage == "all":
        stages = [stage for stage in STAGES if importlib.util.find_spec(STAGES[stage]) is not None]
    else:
        stages = [stage.strip() for stage in args.stage.split(",")]
        unknown = [stage for stage in stages if stage not in STAGES]
        if unknown:  # fail before any work
            raise StageError(f"unknown stage '{unknown[0]}'; choose from {', '.join(STAGES)} or all")
    results = evaluate_stages(stages, runs_dir, Path(args.data))
    out_dir = Path(args.out or runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (out_dir / "eval.md").write_text(f"# μOmni evaluation ({runs_dir})\n\n{table}")
    print(table, end="")
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}")
    return 0
