"""`muomni doctor`: one [OK]/[FAIL] line per requirement, the text to paste into a bug report."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import shutil
import subprocess

# (import name, distribution name) of everything μOmni imports at run time or in tests.
PACKAGES = [
    ("torch", "torch"), ("torchaudio", "torchaudio"), ("torchvision", "torchvision"),
    ("torchcodec", "torchcodec"), ("tokenizers", "tokenizers"), ("safetensors", "safetensors"),
    ("soundfile", "soundfile"), ("numpy", "numpy"), ("PIL", "pillow"), ("tqdm", "tqdm"),
    ("espeakng_loader", "espeakng-loader"), ("matplotlib", "matplotlib"),
    ("transformers", "transformers"), ("nbval", "nbval"), ("pytest", "pytest"),
]


def check_package(module: str, dist: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as error:  # any import failure is what the learner needs to see
        return False, f"{dist}: cannot import ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return True, f"{dist} {version}"


def device_lines() -> list[tuple[bool, str]]:
    import torch

    lines = [(True, f"torch threads: {torch.get_num_threads()}")]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        lines.append((True, f"CUDA: {name}, {total:.1f} GiB, bf16={torch.cuda.is_bf16_supported()}"))
    else:
        lines.append((True, "CUDA: not available (training runs on the CPU; the tiny preset is made for that)"))
    mps = getattr(torch.backends, "mps", None)
    lines.append((True, f"MPS: {'available' if mps is not None and mps.is_available() else 'not available'}"))
    return lines


def ffmpeg_line() -> tuple[bool, str]:
    path = shutil.which("ffmpeg")
    if path is None:
        return False, "FFmpeg: not found (MP4 video needs it; install with `apt-get install ffmpeg`, " \
                      "`brew install ffmpeg` or `conda install ffmpeg`; GIF clips work without it)"
    first = subprocess.run([path, "-version"], capture_output=True, text=True).stdout.splitlines()
    return True, f"FFmpeg: {first[0] if first else path}"


def espeak_line() -> tuple[bool, str]:
    try:
        import espeakng_loader

        return True, f"eSpeak NG library: {espeakng_loader.get_library_path()}"
    except Exception as error:
        return False, f"eSpeak NG library: not loadable ({error})"


def main(args: argparse.Namespace | None = None) -> int:
    results = [(True, f"python {platform.python_version()} on {platform.system()} {platform.machine()}")]
    results += [check_package(module, dist) for module, dist in PACKAGES]
    if results[1][0]:
        results += device_lines()
    results += [ffmpeg_line(), espeak_line()]
    for ok, text in results:
        print(f"[{'OK' if ok else 'FAIL'}] {text}")
    failed = sum(not ok for ok, _ in results)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
