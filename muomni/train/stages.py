"""The training stages and the `muomni train` command.

Each stage is a module with the same three names:

- ``TRAIN_DEFAULTS: dict[str, TrainConfig]`` — optimisation settings per preset;
- ``train(preset, data_dir, runs_dir, overrides, resume) -> Path`` — trains into ``runs_dir/<stage>/``;
- ``evaluate(runs_dir, data_dir) -> dict`` — held-out metrics, ``{"test": {...}, "comp": {...}}``.

The helpers here keep those modules short: `resolve_configs` turns a preset plus ``--set`` overrides
into configs, `run_stage` runs the shared `Trainer`, `stage_checkpoint` finds an earlier stage's
checkpoint for a later one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from muomni.checkpoint import resolve
from muomni.config import ConfigError, OmniConfig, TrainConfig, apply_overrides, preset as load_preset, to_dict
from muomni.data.sources import is_several
from muomni.data.world import VERSION as WORLD_VERSION
from muomni.train.trainer import LossFn, Trainer

STAGES = {
    "thinker": "muomni.train.stage_thinker",  # A: language model + tokenizer
    "audio": "muomni.train.stage_audio",  # B: AuT encoder with CTC
    "vision": "muomni.train.stage_vision",  # C: ViT with a contrastive text tower
    "speech": "muomni.train.stage_speech",  # D: codec, then Talker
    "vocoder": "muomni.train.stage_vocoder",  # D': optional HiFi-GAN
    "sft": "muomni.train.stage_sft",  # E: multimodal supervised fine-tuning
}


class StageError(ValueError):
    """An unknown stage, or a stage whose dependency has not been trained yet."""


def stage_module(stage: str) -> ModuleType:
    """The module of ``stage`` (imported on demand)."""
    if stage not in STAGES:
        raise StageError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES)}")
    return importlib.import_module(STAGES[stage])


def resolve_configs(preset: str, train_defaults: dict[str, TrainConfig],
                    overrides: list[str]) -> tuple[OmniConfig, TrainConfig]:
    """The preset's model config and the stage's train config with ``key=value`` overrides applied.

    ``train.X=...`` sets a `TrainConfig` field, anything else (``thinker.d_model=...``) the
    `OmniConfig`. An unknown key raises `ConfigError` naming it.
    """
    omni = load_preset(preset)
    if preset not in train_defaults:
        raise ConfigError(f"no training defaults for preset '{preset}' in this stage; "
                          f"known: {', '.join(train_defaults)}")
    train = dataclasses.replace(train_defaults[preset])
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    train_items, model_items = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("train."):
            if key[len("train."):] not in train_fields:
                close = difflib.get_close_matches(key[len("train."):], train_fields, n=1)
                hint = f" (did you mean 'train.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
            train_items.append(item.strip()[len("train."):])
        elif key in train_fields:
            raise ConfigError(f"unknown config key '{key}' (did you mean 'train.{key}'?)")
        else:
            model_items.append(item)
    return apply_overrides(omni, model_items), apply_overrides(train, train_items)


def run_stage(stage: str, runs_dir: Path, model: nn.Module, model_config: Any, train_cfg: TrainConfig,
              train_data: Dataset, collate_fn: Callable, loss_fn: LossFn, *, val_data: Dataset | None = None,
              tokenizer: Any = None, resume: bool = False, preset: str = "",
              probe: Callable[[nn.Module], dict[str, float]] | None = None) -> Path:
    """Train ``model`` with the shared `Trainer` into ``runs_dir/<stage>/`` and return that directory.

    ``model_config`` (a dataclass) is saved in every checkpoint with ``"kind": stage``; ``probe``
    scores the model at each validation for the learning curve (see `Trainer`).
    """
    run_dir = Path(runs_dir) / stage
    run_config = {"stage": stage, "preset": preset, "model": to_dict(model_config), "train": to_dict(train_cfg)}
    trainer = Trainer(model, train_cfg, run_dir, train_data, collate_fn, loss_fn, val_data=val_data,
                      run_config=run_config, tokenizer=tokenizer, checkpoint_extra={"kind": stage}, probe=probe)
    final = trainer.fit(resume=resume)
    if trainer.rank == 0:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float))
        print(f"{stage}: {final['step']} steps ({shown}); checkpoints in {run_dir}")
    return run_dir


def stage_checkpoint(runs_dir: Path, stage: str) -> Path:
    """The checkpoint directory of a trained stage (``best/`` else ``last/``), or a StageError saying
    which command trains it."""
    run_dir = Path(runs_dir) / stage
    if not run_dir.is_dir():
        raise StageError(f"stage '{stage}' has not been trained: {run_dir} does not exist; "
                         f"run `muomni train --stage {stage}` first")
    return resolve(run_dir)


def manifest(data_dir: Path, folder: str, split: str) -> Path:
    """``data_dir/<folder>/<split>.jsonl``, or a StageError saying how to build it."""
    path = Path(data_dir) / folder / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(f"{path} does not exist; build the world with `muomni data world --out {data_dir}`")
    info = Path(data_dir) / "world.json"
    if info.is_file() and (version := json.loads(info.read_text()).get("version", 1)) != WORLD_VERSION:
        raise StageError(f"{data_dir} holds a world of version {version} (this code makes version {WORLD_VERSION}); "
                         f"rebuild it with `muomni data world --out {data_dir} --force`")
    return path


def is_finished(runs_dir: Path, stage: str) -> bool:
    """True when ``runs_dir/<stage>/run.json`` says the stage completed."""
    path = Path(runs_dir) / stage / "run.json"
    return path.exists() and bool(json.loads(path.read_text()).get("finished"))


def main(args) -> int:
    """`muomni train --stage S --preset P [--data DIR] [--out DIR] [--set k=v ...] [--resume]`."""
    module = stage_module(args.stage)
    if is_several(args.data) and args.stage != "sft":
        raise StageError(f"stage {args.stage} reads one data directory; only stage sft mixes several "
                         f"(--data DIR[=WEIGHT],DIR[=WEIGHT],...), got '{args.data}'")
    runs_dir = Path(args.out or f"runs/{args.preset}")
    module.train(args.preset, Path(args.data), runs_dir, list(args.overrides), args.resume)
    return 0
