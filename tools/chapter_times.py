"""Per-chapter execution times of the stored notebooks, as a Markdown table for the README.

Each code cell of a notebook run by `jupyter nbconvert --execute` (or saved from JupyterLab) keeps
`metadata.execution` timestamps; a cell's time is ``shell.execute_reply - iopub.execute_input``.
With ``--junit report.xml`` the times come instead from an nbval run,
``pytest --nbval-lax notebooks/ --junitxml=report.xml``, whose test cases are the notebooks' cells.

The table also counts what each chapter holds: code cells, cells whose output nbval compares
(``# NBVAL_CHECK_OUTPUT``), exercises and how many of them have a solution, and drawn figures.

    python tools/chapter_times.py                    # stored notebooks in notebooks/
    python tools/chapter_times.py --junit report.xml # an nbval run's durations

Times measured on a busy machine are longer than on an idle one; the table says nothing about speed
beyond the run it was made from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(start: str, end: str) -> float:
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def stored_times(notebook: dict) -> list[float | None]:
    """Seconds per code cell from the notebook's own execution metadata (None where absent)."""
    times = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        execution = cell.get("metadata", {}).get("execution", {})
        start, end = execution.get("iopub.execute_input"), execution.get("shell.execute_reply")
        times.append(_seconds(start, end) if start and end else None)
    return times


def junit_times(report: Path) -> dict[str, list[float | None]]:
    """Seconds per code cell of each notebook (by file name) from an nbval run's JUnit XML.

    nbval names a test case ``Cell N``, N counting the notebook's code cells from 0.
    """
    per_notebook: dict[str, dict[int, float]] = defaultdict(dict)
    for case in ET.parse(report).getroot().iter("testcase"):
        where = f"{case.get('classname', '')} {case.get('file', '')} {case.get('name', '')}"
        found = re.search(r"(\d\d_[\w-]+)\.ipynb", where) or re.search(r"(\d\d_[\w-]+)[. ]", where)
        cell = re.search(r"Cell (\d+)", case.get("name", ""))
        if found and cell:
            per_notebook[found.group(1) + ".ipynb"][int(cell.group(1))] = float(case.get("time", 0.0))
    return {name: [cells.get(i) for i in range(max(cells) + 1)] for name, cells in per_notebook.items()}


def contents(notebook: dict) -> dict[str, int]:
    """Code cells, checked cells, exercises, solved exercises and figures of one notebook."""
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    source = lambda c: "".join(c["source"]) if isinstance(c["source"], list) else c["source"]  # noqa: E731
    checked = sum("NBVAL_CHECK_OUTPUT" in source(c) for c in code)
    exercises, solved = 0, set()
    for cell in notebook["cells"]:
        text = source(cell)
        if cell["cell_type"] == "markdown" and "## Exercises" in text:
            block = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
            exercises += len(re.findall(r"^\d+\. ", block, flags=re.M))
        solved.update(int(n) for n in re.findall(r"^[#*]+ ?Solution (\d+)\b", text, flags=re.M))
    figures = sum(1 for c in code for out in c.get("outputs", [])
                  if any(k in out.get("data", {}) for k in ("image/png", "image/jpeg")))
    return {"code": len(code), "checked": checked, "exercises": exercises,
            "solved": len({n for n in solved if n <= exercises}), "figures": figures}


def table(notebooks: list[Path], junit: dict[str, list[float]] | None = None) -> str:
    rows = ["| chapter | total (s) | longest cell (s) | code cells | checked | exercises (solved) | figures |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for path in notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        times = junit.get(path.name, []) if junit is not None else stored_times(notebook)
        known = [t for t in times if t is not None]
        total = f"{sum(known):.0f}" if known else "–"
        longest = f"{max(known):.0f} (cell {times.index(max(known)) + 1})" if known else "–"
        c = contents(notebook)
        rows.append(f"| {path.stem} | {total} | {longest} | {c['code']} | {c['checked']} | "
                    f"{c['exercises']} ({c['solved']}) | {c['figures']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--junit", type=Path, help="JUnit XML of an nbval run, instead of the stored timestamps")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(table(notebooks, junit_times(args.junit) if args.junit else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
