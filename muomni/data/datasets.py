"""Map-style datasets over indexed manifests, and a deterministic per-epoch shuffler.

- `ManifestDataset(path, transform)`: item `i` is `transform(record, base_dir)` for line `i` of a
  JSONL manifest, with `base_dir` the manifest's folder (media paths are relative to it). Errors in a
  record come back naming the file and line.
- Record transforms for each stage: `asr_pair` / `tts_pair` (audio + transcript), `image_captions`,
  `video_qa`, `chat` (messages with absolute media paths). They resolve and check paths; loading the
  pixels or samples is the job of `muomni.vision` / `muomni.audio` / `muomni.video`.
- `EpochShuffler`: a sampler whose order is a function of (seed, epoch) only, so a resumed run sees
  the same batches; it shards across DDP ranks and can start mid-epoch. The Trainer draws each
  epoch's order from it.
- `TensorCache`: decoded inputs kept in memory up to a size limit. (Text for the Thinker is packed by `muomni.train.stage_thinker.pack`.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from muomni.data.index import JsonlIndex, ManifestError

Transform = Callable[[dict, Path], Any]


class RecordError(ManifestError):
    """A problem inside one record; `ManifestDataset` adds the file and line to the message."""


def media_path(record: dict, key: str, base_dir: Path) -> Path:
    """The absolute path of `record[key]` (relative to `base_dir`); an error if missing or empty."""
    if key not in record:
        raise RecordError(f"missing field '{key}'")
    path = Path(os.path.normpath(base_dir / record[key]))  # "chat/../images/x.png" -> "images/x.png"
    if not path.is_file():
        raise RecordError(f"{key} file {record[key]} not found in {base_dir}")
    if path.stat().st_size == 0:
        raise RecordError(f"{key} file {record[key]} is empty (0 bytes)")
    return path


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field '{key}' must be a non-empty string, got {value!r}")
    return value


def asr_pair(record: dict, base_dir: Path) -> dict:
    """Speech record -> ``{"audio": Path, "text": str}`` (the CTC transcript)."""
    return {"audio": media_path(record, "audio", base_dir), "text": _text(record, "text")}


def tts_pair(record: dict, base_dir: Path) -> dict:
    """Speech record -> ``{"audio": Path, "text": str}`` with the punctuated sentence when present."""
    return {"audio": media_path(record, "audio", base_dir), "text": record.get("sentence") or _text(record, "text")}


def image_captions(record: dict, base_dir: Path) -> dict:
    """Image record -> ``{"image": Path, "captions": [str, ...], "qa": [...]}``."""
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise RecordError(f"field 'captions' must be a non-empty list of strings, got {captions!r}")
    return {"image": media_path(record, "image", base_dir), "captions": captions, "qa": record.get("qa", [])}


def video_qa(record: dict, base_dir: Path) -> dict:
    """Clip record -> ``{"video": Path, "question", "answer", "caption"}``."""
    return {"video": media_path(record, "video", base_dir), "question": _text(record, "question"),
            "answer": _text(record, "answer"), "caption": record.get("caption", "")}


def chat(record: dict, base_dir: Path) -> dict:
    """Chat record -> ``{"messages", "kind", "speak", "answer_audio"}`` with absolute media paths."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"field 'messages' must be a non-empty list, got {messages!r}")
    resolved = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"bad message {message!r}: needs role system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") in ("image", "audio", "video"):
                    part = {**part, "path": str(media_path(part, "path", base_dir))}
                elif part.get("type") != "text":
                    raise RecordError(f"bad content part {part!r}: type must be text, image, audio or video")
                parts.append(part)
            content = parts
        elif not isinstance(content, str):
            raise RecordError(f"message content must be a string or a list of parts, got {content!r}")
        resolved.append({"role": message["role"], "content": content})
    speak = bool(record.get("speak", False))
    answer_audio = media_path(record, "answer_audio", base_dir) if speak else None
    return {"messages": resolved, "kind": record.get("kind", ""), "speak": speak, "answer_audio": answer_audio}


class ManifestDataset(Dataset):
    """Item `i` = `transform(record_i, base_dir)` (the record itself when no transform).

    Args:
        path: a JSONL manifest.
        transform: `(record, base_dir) -> sample`; `base_dir` is the manifest's folder.
        required: fields every record must have.
    """

    def __init__(self, path: str | Path, transform: Transform | None = None, required: Sequence[str] = ()) -> None:
        self.index = JsonlIndex(path, required=required)
        self.base_dir = Path(path).resolve().parent
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        record = self.index[i]
        if self.transform is None:
            return record
        try:
            return self.transform(record, self.base_dir)
        except RecordError as error:
            raise self.index.error(i, str(error)) from None
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, ManifestError):
                raise
            raise self.index.error(i, f"{type(error).__name__}: {error}") from error


class TensorCache:
    """Tensors kept in memory up to ``limit_mb``; once full, further items are recomputed on each use.

    Stages whose inputs are costly to decode (log-mels, PNGs) wrap the decoding in
    ``cache.get(i, compute)`` so later epochs skip it while memory stays bounded.
    """

    def __init__(self, limit_mb: float = 1024) -> None:
        self.items: dict[Any, torch.Tensor] = {}
        self.bytes, self.limit = 0, limit_mb * 2**20

    def get(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.items:
            return self.items[key]
        value = compute()
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.limit:
            self.items[key] = value
            self.bytes += size
        return value


class EpochShuffler(Sampler[int]):
    """Indices in an order fixed by (seed, epoch); optionally one shard of them per DDP rank.

    Call `set_epoch(epoch, start)` before each epoch; `start` skips the first `start` indices of this
    rank, which is how a resumed run continues mid-epoch with exactly the batches it would have seen.
    """

    def __init__(self, data: Sized | int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n = data if isinstance(data, int) else len(data)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world_size) if self.n else 0
        order += order[: per_rank * self.world_size - self.n]  # pad so every rank gets as many
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size) if self.n else 0
        return max(0, per_rank - self.start)
