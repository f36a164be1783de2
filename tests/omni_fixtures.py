"""Shared helpers for the whole-model tests: a very small random OmniModel and media files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from muomni.config import apply_overrides, tiny
from muomni.omni import OmniModel
from muomni.tokenizer import Tokenizer

SMALL = [
    "thinker.d_model=64", "thinker.n_layers=2", "thinker.d_ff=128", "thinker.max_seq_len=256",
    "thinker.mrope_section=[4,2,2]",
    "audio.d_model=32", "audio.n_layers=1", "audio.n_heads=2", "audio.n_kv_heads=2", "audio.d_ff=64",
    "audio.conv_channels=32",
    "vision.d_model=32", "vision.n_layers=1", "vision.n_heads=2", "vision.n_kv_heads=2", "vision.d_ff=64",
    "vision.image_size=32", "vision.patch_size=8", "vision.embed_dim=32",
    "codec.hidden=32", "codec.n_codebooks=2", "codec.codebook_size=16", "codec.codebook_dim=8",
    "talker.d_model=32", "talker.n_layers=1", "talker.n_heads=2", "talker.n_kv_heads=2", "talker.d_ff=64",
    "talker.max_frames=12", "projector_hidden=64", "video_frames=3",
]
TEXTS = ["what colour is the circle? the circle is red.", "a big blue square on the left.",
         "which way does the star move? it moves up.", "describe the image. transcribe this."] * 30


def small_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def small_model(tokenizer: Tokenizer, seed: int = 0, overrides: tuple[str, ...] = ()) -> OmniModel:
    cfg = apply_overrides(tiny(), SMALL + [f"thinker.vocab_size={tokenizer.vocab_size}", *overrides])
    torch.manual_seed(seed)
    return OmniModel(cfg, tokenizer).eval()


def write_media(directory: Path) -> dict[str, Path]:
    """A PNG, a one-second WAV and a three-frame GIF in ``directory``."""
    rng = np.random.default_rng(0)
    paths = {"image": directory / "scene.png", "audio": directory / "question.wav", "video": directory / "clip.gif"}
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(paths["image"])
    t = np.arange(16000) / 16000
    soundfile.write(paths["audio"], (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + rng.random(16000))).astype("float32"), 16000)
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(4)]
    frames[0].save(paths["video"], save_all=True, append_images=frames[1:], duration=250)
    return paths


def train_small_world(root: Path, preset: str, world: dict, stages: tuple[str, ...], overrides: list[str],
                      stage_overrides: dict[str, list[str]]) -> tuple[Path, Path]:
    """Build a world of ``preset`` with the ``world`` sizes in ``root/world`` and train ``stages`` in
    order into ``root/runs`` with ``overrides`` (plus each stage's own); returns (data, runs)."""
    from muomni.data.world import build_world, preset_config
    from muomni.train.stages import stage_module

    data, runs = root / "world", root / "runs"
    build_world(preset_config(preset, **world), data, log=lambda message: None)
    for stage in stages:
        stage_module(stage).train(preset, data, runs, overrides + stage_overrides.get(stage, []), False)
    return data, runs
