"""Checkpoints: one directory holding the weights, the config and (optionally) the tokenizer.

::

    <checkpoint>/
        model.safetensors   every tensor of the state dict (safetensors: no code is ever unpickled)
        config.json         the model config, plus any ``extra`` entries such as {"kind": "thinker"}
        tokenizer.json      when a tokenizer is given

Tensors that share storage (a head tied to the embedding) are stored once; the other names are
recorded in the safetensors metadata and restored on load. Writes are atomic: everything goes
into ``<checkpoint>.tmp-XXXX`` first and is renamed into place only when complete, so a crash
mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
_ALIASES = "muomni.aliases"  # metadata key: JSON {dropped name: stored name} for shared tensors


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def save_checkpoint(path: str | Path, model_or_state_dict: nn.Module | dict[str, torch.Tensor], config: Any,
                    tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically, replacing any old one; returns ``path``.

    ``config`` is a dataclass or a dict; ``extra`` entries are merged into config.json's top level;
    ``tokenizer`` is anything with ``save(file)`` (a `muomni.tokenizer.Tokenizer`).
    """
    path = Path(path)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    config_dict.update(extra or {})
    tensors, aliases = _dedupe(state)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={_ALIASES: json.dumps(aliases)})
        (tmp / CONFIG).write_text(json.dumps(config_dict, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if path.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage; map every dropped name to the kept one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state dict entry '{name}' is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        key = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # A different view of storage already stored (e.g. a slice) gets its own copy.
        shares = tensor.numel() and storage in storages
        storages.add(storage)
        tensor = tensor.to("cpu").contiguous()
        tensors[name] = tensor.clone() if shares else tensor
    return tensors, aliases


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, config dict)`` from a checkpoint directory (tensors on the CPU)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}; it is incomplete")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as weights:
            metadata = weights.metadata() or {}
            state = {name: weights.get_tensor(name) for name in weights.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path / WEIGHTS} is truncated or corrupt ({error})") from None
    for name, stored in json.loads(metadata.get(_ALIASES, "{}")).items():
        state[name] = state[stored]
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / CONFIG} is not valid JSON ({error})") from None
    return state, config


def resolve(run_dir: str | Path) -> Path:
    """The checkpoint to use from a run: ``best/`` if present, else ``last/``, else ``run_dir`` itself."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "best", run_dir / "last", run_dir):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise CheckpointError(f"no checkpoint in {run_dir} (expected best/ or last/ with {WEIGHTS}); "
                          f"train this stage first")
