"""Random access into big line-based files (JSONL, CSV, text) through cached byte offsets.

Reading a manifest of millions of lines into a list of dicts costs gigabytes. Instead we scan the
file once, store where each non-empty line starts (int64 byte offsets, 8 bytes per line) in
`<file>.idx`, and memory-map that array; `index[i]` seeks to the offset and parses one line. The
cache records the file's size and mtime and is rebuilt when either changes, so an edited manifest is
never read through stale offsets. DataLoader workers each reopen the file (handles do not survive
fork/spawn safely).

Errors name the file and the 1-based line: ``ManifestError: images/train.jsonl line 12: missing
field 'image'``.
"""

from __future__ import annotations

import csv
import io
from array import array
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_MAGIC = b"MUIDX1\0\0"  # 8 bytes, then int64 size, mtime_ns, count; then offsets and line numbers
_HEADER = 8 + 3 * 8


class ManifestError(ValueError):
    """A manifest line that is not valid: bad JSON, a missing field, a missing file."""


def _scan(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of every non-blank line of `path`."""
    starts, numbers = array("q"), array("q")  # compact int64 buffers, not lists of Python ints
    position = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                starts.append(position)
                numbers.append(number)
            position += len(line)
    return np.frombuffer(starts, dtype=np.int64), np.frombuffer(numbers, dtype=np.int64)


class LineIndex:
    """`len()` and `[i] -> str` (the i-th non-blank line, without its newline) of a text file.

    Args:
        path: the file.
        skip_header: leave out the first line (a CSV header).
        cache: write/read the offsets in `<path>.idx` (falls back to memory if not writable).
    """

    def __init__(self, path: str | Path, skip_header: bool = False, cache: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: no such file")
        self.idx_path = self.path.with_name(self.path.name + ".idx")
        stat = self.path.stat()
        loaded = self._load_cache(stat) if cache else None
        if loaded is None:
            loaded = _scan(self.path)
            if cache:
                self._save_cache(stat, *loaded)
        self.offsets, self.line_numbers = loaded
        self.start = 1 if skip_header and len(self.offsets) else 0
        self._file: io.BufferedReader | None = None
        self._pid = -1

    def _load_cache(self, stat: os.stat_result) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with open(self.idx_path, "rb") as f:
                header = f.read(_HEADER)
            if len(header) != _HEADER or header[:8] != _MAGIC:
                return None
            size, mtime, count = np.frombuffer(header[8:], dtype=np.int64)
            if size != stat.st_size or mtime != stat.st_mtime_ns:
                return None
            table = np.memmap(self.idx_path, dtype=np.int64, mode="r", offset=_HEADER, shape=(2, int(count)))
            return table[0], table[1]
        except (OSError, ValueError):
            return None

    def _save_cache(self, stat: os.stat_result, offsets: np.ndarray, numbers: np.ndarray) -> None:
        tmp = self.idx_path.with_name(f"{self.idx_path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + np.asarray([stat.st_size, stat.st_mtime_ns, len(offsets)], dtype=np.int64).tobytes())
                f.write(offsets.tobytes() + numbers.tobytes())
            os.replace(tmp, self.idx_path)
        except OSError:  # a read-only data directory: keep the offsets in memory only
            tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.offsets) - self.start

    def line_number(self, i: int) -> int:
        """1-based line number in the file of item `i`."""
        return int(self.line_numbers[self._position(i)])

    def _position(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: index {i} out of range for {len(self)} lines")
        return i + self.start

    def raw(self, i: int) -> str:
        """The text of item `i`, without its newline."""
        return self._read(self._position(i))

    def _read(self, position: int) -> str:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[position]))
        return self._file.readline().decode("utf-8").rstrip("\r\n")

    def __getitem__(self, i: int) -> Any:
        return self.raw(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, -1
        return state

    def error(self, i: int, problem: str) -> ManifestError:
        """A one-line error naming the file and the line of item `i`."""
        return ManifestError(f"{self.path} line {self.line_number(i)}: {problem}")


class JsonlIndex(LineIndex):
    """`[i] -> dict`: one JSON object per line; `required` fields must be present."""

    def __init__(self, path: str | Path, required: Sequence[str] = (), cache: bool = True) -> None:
        super().__init__(path, cache=cache)
        self.required = tuple(required)

    def __getitem__(self, i: int) -> dict:
        text = self.raw(i)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise self.error(i, f"bad JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise self.error(i, f"expected a JSON object, got {type(record).__name__}")
        for field in self.required:
            if field not in record:
                raise self.error(i, f"missing field '{field}'")
        return record


class CsvIndex(LineIndex):
    """`[i] -> dict` for a CSV file with a header line (one record per line, no quoted newlines)."""

    def __init__(self, path: str | Path, delimiter: str = ",", fieldnames: Sequence[str] | None = None,
                 cache: bool = True) -> None:
        super().__init__(path, skip_header=fieldnames is None, cache=cache)
        self.delimiter = delimiter
        if fieldnames is None:
            header = self._read(0) if len(self.offsets) else ""
            fieldnames = next(csv.reader([header], delimiter=delimiter), [])
        self.fieldnames = list(fieldnames)

    def __getitem__(self, i: int) -> dict:
        row = next(csv.reader([self.raw(i)], delimiter=self.delimiter, quoting=csv.QUOTE_MINIMAL))
        if len(row) != len(self.fieldnames):
            raise self.error(i, f"expected {len(self.fieldnames)} fields ({self.delimiter.join(self.fieldnames)}), "
                                f"got {len(row)}")
        return dict(zip(self.fieldnames, row))
