"""Small folders in the published layouts of LibriSpeech, LJSpeech and COCO captions (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

LJSPEECH_ROWS = [("LJ001-0001", "Printing, in the only sense", "Printing, in the only sense"),
                 ("LJ001-0002", "In 1850 it rose", "In eighteen fifty it rose"),
                 ("LJ001-0003", "Chapter 12", "")]


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def librispeech_tree(src: Path) -> Path:
    """``src/LibriSpeech``: dev-clean (3 utterances) and train-clean-100 (2), each chapter with a
    transcript line whose audio is missing, as in a size-capped subset."""
    for subset, speaker, chapter, n in (("dev-clean", "84", "121123", 3), ("train-clean-100", "19", "198", 2)):
        folder = src / "LibriSpeech" / subset / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for k in range(n):
            uid = f"{speaker}-{chapter}-{k:04d}"
            lines.append(f"{uid} GO DO YOU HEAR {k + 2} TIMES")
            sf.write(str(folder / f"{uid}.flac"), tone(0.5 + 0.25 * k, 16000), 16000, format="FLAC")
        lines.append(f"{speaker}-{chapter}-9999 THIS ONE HAS NO AUDIO")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return src


def ljspeech_tree(src: Path) -> Path:
    """``src/LJSpeech-1.1``: `LJSPEECH_ROWS` in metadata.csv and 1 s recordings at 22.05 kHz."""
    base = src / "LJSpeech-1.1"
    (base / "wavs").mkdir(parents=True)
    for uid, _, _ in LJSPEECH_ROWS:
        sf.write(str(base / "wavs" / f"{uid}.wav"), tone(1.0, 22050), 22050, subtype="PCM_16")
    (base / "metadata.csv").write_text("\n".join("|".join(r) for r in LJSPEECH_ROWS) + "\n")
    return src


def coco_tree(src: Path, images: int = 6) -> Path:
    """``src``: annotations/captions_val2017.json and val2017/*.jpg, two captions per 40 x 30 image."""
    (src / "annotations").mkdir(parents=True)
    (src / "val2017").mkdir()
    records, annotations = [], []
    for k in range(images):
        name = f"{k:012d}.jpg"
        Image.new("RGB", (40, 30), (k * 40 % 256, 90, 200)).save(src / "val2017" / name)
        records.append({"id": k, "file_name": name, "width": 40, "height": 30})
        annotations += [{"id": 10 * k + j, "image_id": k, "caption": f"A  photo number {k}, take {j}. "} for j in range(2)]
    (src / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": records, "annotations": annotations}))
    return src
