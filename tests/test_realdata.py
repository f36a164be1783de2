"""Real-data converters on small local archives that mimic each published layout, and downloads
from a local HTTP server (resume, checksum, size cap, failure message). No internet needed."""

from __future__ import annotations

import hashlib
import http.server
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from muomni.cli import main as cli_main
from muomni.data import realdata as R
from muomni.data.datasets import ManifestDataset, asr_pair, image_captions
from muomni.data.download import DownloadError, download, extract
from muomni.data.index import JsonlIndex
from ports import free_port
from realdata_fixtures import coco_tree, librispeech_tree, ljspeech_tree


def pack(src: Path, archive: Path) -> Path:
    """Pack the folder `src` as its published archive type (by the suffix of `archive`)."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(src.rglob("*")):
                zf.write(path, path.relative_to(src))
    else:
        mode = "w:gz" if archive.name.endswith(".gz") else "w:bz2"
        with tarfile.open(archive, mode) as tf:
            for path in sorted(src.iterdir()):
                tf.add(path, arcname=path.name)
    return archive


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def librispeech_archive(tmp_path) -> Path:
    return pack(librispeech_tree(tmp_path / "src"), tmp_path / "dev-clean.tar.gz")


def test_librispeech_tree_to_speech_manifests(librispeech_archive, tmp_path):
    root = extract(librispeech_archive, tmp_path / "raw", log=lambda _: None)
    counts = R.convert_librispeech(root, tmp_path / "out", log=lambda _: None)
    assert counts == {"train": 2, "val": 3, "test": 0}
    val = read_manifest(tmp_path / "out" / "speech" / "val.jsonl")
    assert val[1]["id"] == "84-121123-0001" and val[1]["text"] == "go do you hear three times"
    assert val[1]["voice"] == "84" and val[1]["seconds"] == pytest.approx(0.75)
    dataset = ManifestDataset(tmp_path / "out" / "speech" / "val.jsonl", asr_pair)
    audio, rate = sf.read(str(dataset[2]["audio"]))
    assert rate == 16000 and len(audio) == 16000
    with pytest.raises(R.RealDataError, match="no LibriSpeech subset"):
        R.convert_librispeech(tmp_path / "out", tmp_path / "x")


def test_ljspeech_metadata_to_speech_manifests(tmp_path):
    root = extract(pack(ljspeech_tree(tmp_path / "src"), tmp_path / "LJSpeech-1.1.tar.bz2"), tmp_path / "raw",
                   log=lambda _: None)
    counts = R.convert_ljspeech(root, tmp_path / "out", log=lambda _: None)
    assert sum(counts.values()) == 3
    records = {r["id"]: r for split in counts for r in read_manifest(tmp_path / "out" / "speech" / f"{split}.jsonl")}
    assert records["LJ001-0001"]["text"] == "printing in the only sense"
    assert records["LJ001-0002"]["text"] == "in eighteen fifty it rose"  # the normalised column
    assert records["LJ001-0003"]["text"] == "chapter twelve"  # no normalised column: digits spelled out
    assert records["LJ001-0003"]["seconds"] == pytest.approx(1.0)
    for split in counts:
        assert all(ManifestDataset(tmp_path / "out" / "speech" / f"{split}.jsonl", asr_pair))


def test_coco_captions_json_to_image_manifests(tmp_path):
    src = coco_tree(tmp_path / "src")
    root = extract(pack(src, tmp_path / "annotations_trainval2017.zip"), tmp_path / "raw", log=lambda _: None)
    counts = R.convert_coco(root, tmp_path / "out", log=lambda _: None)
    assert sum(counts.values()) == 6
    records = [r for split in counts for r in read_manifest(tmp_path / "out" / "images" / f"{split}.jsonl")]
    first = next(r for r in records if r["id"] == "coco0")
    assert first["captions"] == ["A photo number 0, take 0.", "A photo number 0, take 1."]
    for split in counts:
        for sample in ManifestDataset(tmp_path / "out" / "images" / f"{split}.jsonl", image_captions):
            with Image.open(sample["image"]) as image:
                assert image.size == (40, 30)
    (src / "annotations" / "captions_val2017.json").write_text('{"images": []}')
    with pytest.raises(R.RealDataError, match="not a COCO captions file"):
        R.convert_coco(src, tmp_path / "out2")


def test_flickr8k_token_file_with_official_splits(tmp_path):
    root = tmp_path / "flickr"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    names = [f"{k}_abc.jpg" for k in range(4)]
    for name in names:
        Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "Flicker8k_Dataset" / name)
    (root / "Flickr8k.token.txt").write_text("".join(f"{n}#{j}\tA dog runs {j} .\n" for n in names for j in range(5)))
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text(names[2] + "\n")
    (root / "Flickr_8k.testImages.txt").write_text(names[3] + "\n")
    assert R.convert_flickr8k(root, tmp_path / "out", log=lambda _: None) == {"train": 2, "val": 1, "test": 1}
    record = read_manifest(tmp_path / "out" / "images" / "val.jsonl")[0]
    assert record["id"] == names[2] and len(record["captions"]) == 5


def test_tinystories_text_to_text_manifests(tmp_path):
    stories = ["Once upon a time\nthere was a cat.", "Tom had a red ball.", "The end came.", "Lily smiled."]
    (tmp_path / "TinyStories-valid.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n")
    counts = R.convert_tinystories(tmp_path, tmp_path / "out", log=lambda _: None)
    assert counts == {"train": 0, "val": 2, "test": 2}
    val = JsonlIndex(tmp_path / "out" / "text" / "val.jsonl", required=("text",))
    assert val[0]["text"] == "Once upon a time there was a cat." and val[1]["text"] == "The end came."


def test_cli_converts_without_download(librispeech_archive, tmp_path, capsys):
    root = extract(librispeech_archive, tmp_path / "raw", log=lambda _: None)
    assert cli_main(["data", "real", "librispeech", "--root", str(root), "--out", str(tmp_path / "ls"), "--no-download"]) == 0
    assert (tmp_path / "ls" / "speech" / "train.jsonl").exists()
    assert cli_main(["data", "real", "coco", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "c"),
                     "--no-download"]) == 1
    assert "error: no annotations/captions_*.json" in capsys.readouterr().err


def test_truncated_archive_keeps_complete_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        (src / f"f{k}.bin").write_bytes(rng.bytes(20000))  # incompressible, so truncation cuts files
    archive = pack(src, tmp_path / "a.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 6 // 10])
    out = extract(archive, tmp_path / "out", log=lambda _: None)
    kept = sorted(p.name for p in out.glob("*.bin"))
    assert 1 <= len(kept) < 6
    for name in kept:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    # extraction is recorded and not repeated
    assert (out / ".extracted-a.tar.gz").exists()
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        tf.add(src / "f0.bin", arcname="../escape.bin")
    with pytest.raises(DownloadError, match="outside"):
        extract(evil, tmp_path / "evil_out", log=lambda _: None)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (the http.server naming)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if (header := self.headers.get("Range")) is not None:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_checks_sha_and_caps_size(server, tmp_path):
    body = bytes(range(256)) * 400
    _RangeHandler.files = {"/data.bin": body}
    digest = hashlib.sha256(body).hexdigest()
    quiet = {"log": lambda _: None, "backoff_s": 0.0}
    # resume: half the file is already in the .tmp
    (tmp_path / "a.bin.tmp").write_bytes(body[:5000])
    path = download(f"{server}/data.bin", tmp_path / "a.bin", sha256=digest, **quiet)
    assert path.read_bytes() == body and not (tmp_path / "a.bin.tmp").exists()
    # a wrong checksum deletes the download
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/data.bin", tmp_path / "b.bin", sha256="0" * 64, **quiet)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.tmp").exists()
    # over the cap: refused, or its first bytes with partial=True
    with pytest.raises(DownloadError, match="over the"):
        download(f"{server}/data.bin", tmp_path / "c.bin", max_bytes=1000, **quiet)
    path = download(f"{server}/data.bin", tmp_path / "d.bin", max_bytes=1000, partial=True, **quiet)
    assert path.read_bytes() == body[:1000]
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing.bin", tmp_path / "e.bin", **quiet)


def test_network_failure_is_one_clear_line(tmp_path):
    port = free_port()  # nothing listens here once the probe socket closes
    with pytest.raises(DownloadError) as info:
        download(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "x.tar.gz", retries=2, backoff_s=0.0, log=lambda _: None)
    message = str(info.value)
    assert "\n" not in message and "after 2 tries" in message and "check the internet connection" in message
