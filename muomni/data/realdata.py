"""Real datasets converted to the world's manifests, so switching to real data is a `--data` flag.

Each converter reads a dataset in its published layout and writes the same JSONL manifests as the
world (see `muomni.data.world`), with media paths relative to the manifest (files are not copied):

    TinyStories   TinyStories-{train,valid}.txt (stories split by <|endoftext|>)  -> text/{split}.jsonl
    LibriSpeech   LibriSpeech/<subset>/<speaker>/<chapter>/*.trans.txt + *.flac   -> speech/{split}.jsonl
    LJSpeech      LJSpeech-1.1/metadata.csv (id|text|normalized) + wavs/*.wav     -> speech/{split}.jsonl
    COCO          annotations/captions_val2017.json + val2017/*.jpg               -> images/{split}.jsonl
    Flickr8k      Flickr8k.token.txt (or captions.txt) + Flicker8k_Dataset/*.jpg   -> images/{split}.jsonl

Splits without an official one are made by a stable hash of the item id (the same on every
machine). Speech transcripts are normalised for CTC like the world's; real images carry captions but
no `qa` or `scene`. `SOURCES` lists the download URLs, sizes and published SHA-256 sums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from muomni.data.download import MAX_BYTES, download, extract
from muomni.data.language import normalize_transcript
from muomni.data.world import write_jsonl

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


LJSPEECH_VOICE = "lj"  # the voice name of LJSpeech's one reader (stage E speaks answers in it)


class RealDataError(ValueError):
    """A real dataset that is missing or not in its published layout."""


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str | None  # published checksum, when there is one
    approx_bytes: int


SOURCES = {
    "tinystories-train": Source("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
                                None, 1_924_281_556),
    "tinystories-valid": Source("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                                None, 19_306_310),
    # SHA-256 sums as published with torchaudio's LIBRISPEECH and LJSPEECH datasets
    "librispeech-dev-clean": Source("https://www.openslr.org/resources/12/dev-clean.tar.gz",
                                    "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3", 337_926_286),
    "librispeech-test-clean": Source("https://www.openslr.org/resources/12/test-clean.tar.gz",
                                     "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23", 346_663_984),
    "librispeech-train-clean-100": Source("https://www.openslr.org/resources/12/train-clean-100.tar.gz",
                                          "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2", 6_387_309_499),
    "ljspeech": Source("https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2",
                       "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5", 2_748_572_632),
    "coco-annotations": Source("http://images.cocodataset.org/annotations/annotations_trainval2017.zip", None, 252_907_541),
    "coco-val2017": Source("http://images.cocodataset.org/zips/val2017.zip", None, 815_585_330),
    "flickr8k-images": Source("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                              None, 1_115_419_746),
    "flickr8k-text": Source("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                            None, 2_340_801),
}


def hash_split(key: str, val: float = 0.05, test: float = 0.05) -> str:
    """A stable split for `key`: the same answer on every machine and Python version."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x100000000
    return "val" if u < val else "test" if u < val + test else "train"


def _rel(path: Path, manifest_dir: Path) -> str:
    return Path(os.path.relpath(path, manifest_dir)).as_posix()


def _number_words(n: int) -> str:
    if n < 20:
        return _NUMBER_WORDS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _NUMBER_WORDS[n % 10])
    if n < 1000:
        rest = n % 100
        return _NUMBER_WORDS[n // 100] + " hundred" + (" and " + _number_words(rest) if rest else "")
    return " ".join(_NUMBER_WORDS[int(d)] for d in str(n))  # long numbers read digit by digit


def ctc_text(text: str) -> str:
    """Real transcripts -> the CTC alphabet: numbers spelled out, lowercase a-z, apostrophe, space."""
    return normalize_transcript(re.sub(r"\d+", lambda m: f" {_number_words(int(m.group()))} ", text))


def _write_splits(out: Path, records: dict[str, list[dict]], log: Callable[[str], None]) -> dict[str, int]:
    for split, rows in records.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    counts = {split: len(rows) for split, rows in records.items()}
    log(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


# ---------------------------------------------------------------------------------------------
# text


def iter_tinystories(path: Path) -> Iterable[str]:
    """Stories of a TinyStories .txt file, one string each (whitespace collapsed)."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip() == "<|endoftext|>":
                if lines:
                    yield " ".join(" ".join(lines).split())
                lines = []
            elif line.strip():
                lines.append(line.strip())
    if lines:
        yield " ".join(" ".join(lines).split())


def convert_tinystories(root: str | Path, out: str | Path, log: Callable[[str], None] = print) -> dict[str, int]:
    """TinyStories-train.txt -> train; TinyStories-valid.txt -> val and test (alternating)."""
    root, out = Path(root), Path(out) / "text"
    train, valid = root / "TinyStories-train.txt", root / "TinyStories-valid.txt"
    if not valid.exists() and not train.exists():
        raise RealDataError(f"{root} has neither TinyStories-train.txt nor TinyStories-valid.txt")
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    if train.exists():
        records["train"] = [{"text": s} for s in iter_tinystories(train)]
    if valid.exists():
        for i, story in enumerate(iter_tinystories(valid)):
            records["val" if i % 2 == 0 else "test"].append({"text": story})
    return _write_splits(out, records, log)


# ---------------------------------------------------------------------------------------------
# speech


def _speech_record(uid: str, audio: Path, manifest_dir: Path, sentence: str, voice: str) -> dict:
    import soundfile as sf

    try:
        seconds = round(sf.info(str(audio)).duration, 3)
    except RuntimeError as error:
        raise RealDataError(f"{audio}: unreadable audio ({error})") from None
    return {"id": uid, "audio": _rel(audio, manifest_dir), "text": ctc_text(sentence), "sentence": sentence,
            "voice": voice, "rate": None, "pitch": None, "seconds": seconds}


LIBRISPEECH_SPLITS = {"train-clean-100": "train", "train-clean-360": "train", "dev-clean": "val", "test-clean": "test"}


def convert_librispeech(root: str | Path, out: str | Path, log: Callable[[str], None] = print) -> dict[str, int]:
    """Every subset found under `root` (or `root/LibriSpeech`): train-clean-* -> train, dev -> val, test -> test.

    Utterances whose FLAC is missing (a size-capped subset) are skipped and counted.
    """
    root, out = Path(root), Path(out) / "speech"
    base = root / "LibriSpeech" if (root / "LibriSpeech").is_dir() else root
    subsets = [d for d in sorted(base.iterdir()) if d.is_dir() and d.name in LIBRISPEECH_SPLITS] if base.is_dir() else []
    if not subsets:
        raise RealDataError(f"no LibriSpeech subset ({', '.join(LIBRISPEECH_SPLITS)}) under {base}")
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    missing = 0
    for subset in subsets:
        for trans in sorted(subset.glob("*/*/*.trans.txt")):
            for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                uid, _, sentence = line.partition(" ")
                if not sentence:
                    raise RealDataError(f"{trans} line {line_no}: expected '<utterance-id> <TRANSCRIPT>'")
                audio = trans.parent / f"{uid}.flac"
                if not audio.exists():
                    missing += 1
                    continue
                records[LIBRISPEECH_SPLITS[subset.name]].append(
                    _speech_record(uid, audio, out, sentence.lower(), uid.split("-")[0]))
    if missing:
        log(f"skipped {missing} LibriSpeech utterances without audio (a partial download)")
    return _write_splits(out, records, log)


def convert_ljspeech(root: str | Path, out: str | Path, log: Callable[[str], None] = print) -> dict[str, int]:
    """LJSpeech-1.1: metadata.csv `id|text|normalized text` and wavs/<id>.wav; split by id hash."""
    root, out = Path(root), Path(out) / "speech"
    base = root / "LJSpeech-1.1" if (root / "LJSpeech-1.1").is_dir() else root
    meta = base / "metadata.csv"
    if not meta.exists():
        raise RealDataError(f"{meta} not found (expected the LJSpeech-1.1 layout)")
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2:
            raise RealDataError(f"{meta} line {line_no}: expected 'id|text|normalized text'")
        uid, sentence = fields[0], (fields[2] if len(fields) > 2 and fields[2] else fields[1])
        audio = base / "wavs" / f"{uid}.wav"
        if not audio.exists():
            raise RealDataError(f"{meta} line {line_no}: audio {audio} not found")
        records[hash_split(uid)].append(_speech_record(uid, audio, out, sentence.lower(), LJSPEECH_VOICE))
    return _write_splits(out, records, log)


# ---------------------------------------------------------------------------------------------
# images


def _image_records(captions: dict[str, list[str]], files: dict[str, Path], out: Path,
                   split_of: Callable[[str], str]) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for key in sorted(captions):
        if key in files:
            records[split_of(key)].append({"id": key, "image": _rel(files[key], out),
                                           "captions": [" ".join(c.split()) for c in captions[key]], "qa": [],
                                           "scene": None})
    return records


def convert_coco(root: str | Path, out: str | Path, log: Callable[[str], None] = print) -> dict[str, int]:
    """COCO captions: every annotations/captions_<name>.json with its <name>/ image folder; split by id hash."""
    root, out = Path(root), Path(out) / "images"
    annotation_files = sorted((root / "annotations").glob("captions_*.json"))
    if not annotation_files:
        raise RealDataError(f"no annotations/captions_*.json under {root} (expected the COCO layout)")
    captions: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for path in annotation_files:
        folder = root / path.stem.removeprefix("captions_")
        if not folder.is_dir():
            log(f"skipping {path.name}: no image folder {folder}")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {image["id"]: image["file_name"] for image in data["images"]}
            for ann in data["annotations"]:
                key = f"coco{ann['image_id']}"
                captions.setdefault(key, []).append(ann["caption"].strip())
                files[key] = folder / names[ann["image_id"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise RealDataError(f"{path}: not a COCO captions file ({type(error).__name__}: {error})") from None
    files = {k: p for k, p in files.items() if p.exists()}
    return _write_splits(out, _image_records(captions, files, out, hash_split), log)


def convert_flickr8k(root: str | Path, out: str | Path, log: Callable[[str], None] = print) -> dict[str, int]:
    """Flickr8k: Flickr8k.token.txt (`name.jpg#n<TAB>caption`) or captions.txt (`image,caption`),
    images in Flicker8k_Dataset/ or Images/; the official split files when present, else by hash."""
    import csv

    root, out = Path(root), Path(out) / "images"
    image_dir = next((root / d for d in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images") if (root / d).is_dir()), None)
    if image_dir is None:
        raise RealDataError(f"no Flicker8k_Dataset/ or Images/ folder under {root}")
    captions: dict[str, list[str]] = {}
    token = next(iter(root.rglob("Flickr8k.token.txt")), None)
    if token is not None:
        for line in token.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                name, caption = line.split("\t", 1)
                captions.setdefault(name.split("#")[0], []).append(caption.strip())
    elif (root / "captions.txt").exists():
        with open(root / "captions.txt", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                captions.setdefault(row["image"], []).append(row["caption"].strip())
    else:
        raise RealDataError(f"no Flickr8k.token.txt or captions.txt under {root}")
    official: dict[str, str] = {}
    for split, name in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
                        ("test", "Flickr_8k.testImages.txt")):
        found = next(iter(root.rglob(name)), None)
        if found is not None:
            official.update({line.strip(): split for line in found.read_text().splitlines() if line.strip()})
    files = {name: image_dir / name for name in captions if (image_dir / name).exists()}
    return _write_splits(out, _image_records(captions, files, out, lambda k: official.get(k) or hash_split(k)), log)


CONVERTERS = {"tinystories": convert_tinystories, "librispeech": convert_librispeech, "ljspeech": convert_ljspeech,
              "coco": convert_coco, "flickr8k": convert_flickr8k}
DOWNLOADS = {  # dataset -> the sources it needs
    "tinystories": ["tinystories-valid", "tinystories-train"],
    "librispeech": ["librispeech-dev-clean", "librispeech-test-clean", "librispeech-train-clean-100"],
    "ljspeech": ["ljspeech"],
    "coco": ["coco-annotations", "coco-val2017"],
    "flickr8k": ["flickr8k-text", "flickr8k-images"],
}


def fetch(name: str, root: str | Path, max_bytes: int = MAX_BYTES, log: Callable[[str], None] = print) -> Path:
    """Download (resumably) and unpack dataset `name` into `root`; returns `root`."""
    root = Path(root)
    for key in DOWNLOADS[name]:
        source = SOURCES[key]
        filename = source.url.rsplit("/", 1)[-1]
        plain = filename.endswith(".txt")  # TinyStories: the text itself, no archive
        target = (root if plain else root / "downloads") / filename
        path = download(source.url, target, sha256=source.sha256, max_bytes=min(max_bytes, MAX_BYTES),
                        partial=True, log=log)
        if not plain:
            extract(path, root, log=log)
    return root


def prepare(name: str, root: str | Path, out: str | Path, fetch_first: bool = True,
            max_bytes: int = MAX_BYTES, log: Callable[[str], None] = print) -> dict[str, int]:
    """Optionally download dataset `name` into `root`, then write its manifests under `out`."""
    if name not in CONVERTERS:
        raise RealDataError(f"unknown dataset '{name}'; expected one of {', '.join(CONVERTERS)}")
    if fetch_first:
        fetch(name, root, max_bytes=max_bytes, log=log)
    return CONVERTERS[name](root, out, log=log)


def cli_convert(args: argparse.Namespace) -> int:
    """`muomni data real NAME --root DIR --out DIR [--no-download] [--max-gb G]`."""
    out = args.out or f"data/{args.name}"
    root = args.root or f"{out}/raw"
    prepare(args.name, root, out, fetch_first=not args.no_download, max_bytes=int(args.max_gb * 1e9))
    return 0
