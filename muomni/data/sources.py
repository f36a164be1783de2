"""Several data directories as one training source, each with a weight.

``muomni train --stage sft --data data/world,data/coco=0.5,data/librispeech=0.3`` trains on the
world and on real manifests (`muomni data real ...`) at once: each directory gives its share of the
run's rows in proportion to its weight (1 when left out). The first directory is the main one: its
validation chats and probes are the ones the run reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """A ``--data`` list that names no directory, a missing one, or a weight that is not a positive number."""


@dataclass(frozen=True)
class DataSource:
    path: Path  # a data directory in the world's layout (the world, or converted real data)
    weight: float = 1.0  # its share of the rows, relative to the other sources'


def is_several(spec: str) -> bool:
    """True when ``spec`` lists several sources or gives a weight."""
    return "," in spec or "=" in spec


def parse_sources(spec: str) -> list[DataSource]:
    """``DIR[=WEIGHT],DIR[=WEIGHT],...`` -> the sources, in order: ``data/world,data/coco=0.5`` is the
    world at weight 1 and COCO at 0.5; a single ``data/world`` is one source."""
    sources = []
    for item in spec.split(","):
        path, _, weight = item.strip().partition("=")
        if not path:
            raise SourceError(f"--data '{spec}' has an empty entry; expected DIR[=WEIGHT],DIR[=WEIGHT],...")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not value > 0:
            raise SourceError(f"--data entry '{item.strip()}': the weight must be a positive number, e.g. {path}=0.5")
        if not Path(path).is_dir():
            raise SourceError(f"--data entry '{path}' is not a directory; build the world with `muomni data world` "
                              f"or convert real data with `muomni data real NAME --out {path}`")
        sources.append(DataSource(Path(path), value))
    return sources


def shares(sources: list[DataSource], total: int) -> list[int]:
    """``total`` rows split in proportion to the weights (largest remainders round up, so they sum to ``total``)."""
    weight = sum(s.weight for s in sources)
    exact = [total * s.weight / weight for s in sources]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sources)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
