"""Resumable, checked downloads and safe archive extraction for the real-data scripts.

`download(url, dest)` streams into `<dest>.tmp`, resumes an interrupted `.tmp` with an HTTP Range
request, retries with back-off, checks the SHA-256 where the dataset publishes one, and renames to
`dest` only when complete. Nothing larger than `max_bytes` (under 5 GB) is fetched: an archive bigger
than that is either refused or, with `partial=True`, fetched as its first `max_bytes` bytes, of which
`extract` keeps every complete file (a subset of a big corpus). A network failure is one line:
``DownloadError: could not download URL after 5 tries (...); check the internet connection or put
the file at PATH by hand``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable

MAX_BYTES = 5 * 10**9 - 1  # the cap for any single download: under 5 GB
_BLOCK = 1 << 20


class DownloadError(ValueError):
    """A download or extraction that could not be completed."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "muomni-data/0.1"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download(url: str, dest: str | Path, sha256: str | None = None, max_bytes: int = MAX_BYTES,
             partial: bool = False, retries: int = 5, timeout: float = 60.0, backoff_s: float = 2.0,
             log: Callable[[str], None] = print) -> Path:
    """Fetch `url` into `dest` (resumable); returns `dest`. See the module docstring."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    last_error: Exception | None = None
    truncated = False
    for attempt in range(1, retries + 1):
        have = tmp.stat().st_size if tmp.exists() else 0
        try:
            with _open(url, have, timeout) as response:
                if have and response.status != 206:  # the server ignored the Range: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length else None
                if total is not None and total > max_bytes:
                    if not partial:
                        raise DownloadError(f"{url} is {total / 1e9:.2f} GB, over the {max_bytes / 1e9:.2f} GB cap")
                    truncated = True
                limit = min(total or max_bytes, max_bytes)
                log(f"downloading {url} -> {dest} ({limit / 1e6:.0f} MB{', resuming' if have else ''})")
                with open(tmp, "ab" if have else "wb") as f:
                    while have < limit and (block := response.read(min(_BLOCK, limit - have))):
                        f.write(block)
                        have += len(block)
                if total is None and have >= max_bytes:
                    truncated = True
                if not truncated and total is not None and have < total:
                    raise http.client.IncompleteRead(b"", total - have)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # nothing left to fetch: the .tmp is already complete
                break
            if 400 <= error.code < 500:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
            last_error = error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            last_error = error
        if attempt < retries:
            time.sleep(backoff_s * attempt)
    else:
        reason = getattr(last_error, "reason", last_error)
        raise DownloadError(f"could not download {url} after {retries} tries ({reason}); check the internet "
                            f"connection or put the file at {dest} by hand") from None
    if truncated:
        log(f"kept the first {max_bytes / 1e9:.2f} GB of {url} (size cap): a subset, checksum not checked")
    elif sha256:
        actual = sha256_of(tmp)
        if actual != sha256:
            tmp.unlink()
            raise DownloadError(f"{url}: SHA-256 {actual} does not match the published {sha256}; deleted, try again")
    os.replace(tmp, dest)
    return dest


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DownloadError(f"archive member '{name}' would be written outside {root}")
    return target


def extract(archive: str | Path, dest_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Unpack a .tar(.gz/.bz2) or .zip into `dest_dir` once (a marker file records completion).

    A truncated tar archive (a `partial` download) yields every member that is complete; the one
    cut in half is removed.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = dest_dir / f".extracted-{archive.name}"
    if marker.exists():
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    log(f"extracting {archive} -> {dest_dir}")
    count = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = _safe_target(dest_dir, member.filename)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    else:
        current: Path | None = None
        try:
            with tarfile.open(archive, mode="r|*") as tf:  # a stream: works on truncated archives
                for member in tf:
                    target = _safe_target(dest_dir, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        current = target
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tf.extractfile(member) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        current = None
                        count += 1
        except (EOFError, tarfile.ReadError, zlib.error, OSError) as error:
            if count == 0:
                raise DownloadError(f"{archive} is not a readable archive ({error})") from None
            if current is not None:
                current.unlink(missing_ok=True)
            log(f"{archive} ends early (a size-capped download): kept {count} complete files")
    marker.write_text(f"{count}\n")
    return dest_dir
