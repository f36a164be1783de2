"""Stage D': the optional HiFi-GAN vocoder (`muomni.vocoder.VocoderGAN`).

Random half-second windows of the training waveforms and their log-mels (the codec's frontend);
one optimiser steps the generator and the discriminators together (the losses keep each to its own
side). The tiny default is a short run that shows the losses moving, not a finished vocoder:
HiFi-GAN needs hours of GPU time, so Griffin-Lim stays the default vocoder.

Evaluation on held-out utterances compares HiFi-GAN and Griffin-Lim resynthesis of the original
mels: the log-mel L1 distance of the result to the original, and (when stage B has run) the AuT's
character error rate on each.

Usage: ``muomni train --stage vocoder --preset tiny`` then ``muomni eval --stage vocoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from muomni.audio import LogMel, cer, load_audio, transcribe
from muomni.checkpoint import load_checkpoint
from muomni.codec import MelFrontend
from muomni.config import TrainConfig
from muomni.data.index import JsonlIndex
from muomni.data.world import HELD_OUT
from muomni.train.stage_audio import load_aut
from muomni.train.stage_speech import _omni_config, load_utterances
from muomni.train.stages import StageError, resolve_configs, run_stage, stage_checkpoint
from muomni.vocoder import GriffinLimVocoder, HiFiGAN, VocoderGAN

STAGE = "vocoder"
SEGMENT_FRAMES = 50  # training windows of 0.5 s
EVAL_LIMIT = 30  # held-out utterances per split in `evaluate`

TRAIN_DEFAULTS = {
    "tiny": TrainConfig(steps=100, batch_size=4, lr=5e-4, betas=(0.8, 0.99), warmup_steps=10, weight_decay=0.0,
                        eval_every=0, save_every=100, log_every=10, grad_clip=10.0),
    "base": TrainConfig(steps=50000, batch_size=16, lr=2e-4, betas=(0.8, 0.99), warmup_steps=500,
                        weight_decay=0.0, eval_every=2000, eval_batches=4, save_every=2000, log_every=100,
                        grad_clip=10.0),
}


class WaveWindows(Dataset):
    """Windows of ``frames * hop`` samples: random for training, the first window for validation."""

    def __init__(self, waves: list[torch.Tensor], frames: int, hop: int, train: bool):
        self.waves, self.length, self.hop, self.train = waves, frames * hop, hop, train

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        wave = self.waves[i]
        if wave.numel() < self.length:
            return {"wave": torch.nn.functional.pad(wave, (0, self.length - wave.numel()))}
        hops = (wave.numel() - self.length) // self.hop
        start = int(torch.randint(0, hops + 1, ())) * self.hop if self.train else 0
        return {"wave": wave[start : start + self.length]}


def _waves(data_dir: Path, split: str) -> list[torch.Tensor]:
    manifest = Path(data_dir) / "speech" / f"{split}.jsonl"
    index = JsonlIndex(manifest, required=("audio",))
    return [load_audio(manifest.parent / index[i]["audio"]) for i in range(len(index))]


def _loss(model: VocoderGAN, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    wave = batch["wave"]
    with torch.no_grad():
        mel = model.frontend(wave)
    return model.loss(mel, wave)


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Train HiFi-GAN into ``runs_dir/vocoder/``."""
    omni, train_cfg = resolve_configs(preset, TRAIN_DEFAULTS, overrides)
    torch.manual_seed(train_cfg.seed)
    hop = omni.codec.hop_length
    return run_stage(STAGE, runs_dir, VocoderGAN(omni.codec), omni, train_cfg,
                     WaveWindows(_waves(data_dir, "train"), SEGMENT_FRAMES, hop, train=True),
                     lambda items: {"wave": torch.stack([it["wave"] for it in items])}, _loss,
                     resume=resume, preset=preset)


def load_hifigan(checkpoint_dir: Path) -> HiFiGAN:
    """The trained generator from a vocoder checkpoint directory."""
    weights, config = load_checkpoint(checkpoint_dir)
    generator = HiFiGAN(_omni_config(config).codec)
    generator.load_state_dict({k[len("generator."):]: v for k, v in weights.items() if k.startswith("generator.")})
    return generator.eval()


@torch.no_grad()
def evaluate(runs_dir: Path, data_dir: Path) -> dict[str, Any]:
    """HiFi-GAN against Griffin-Lim on held-out utterances: log-mel L1 and (with stage B) CER."""
    generator = load_hifigan(stage_checkpoint(runs_dir, STAGE))
    cfg = generator.cfg
    frontend, griffin_lim = MelFrontend(cfg), GriffinLimVocoder(cfg)
    try:
        aut = load_aut(stage_checkpoint(runs_dir, "audio"))
        aut_frontend = LogMel(aut.cfg)
    except StageError:
        aut = None
    results: dict[str, Any] = {}
    for split in HELD_OUT:
        if not (Path(data_dir) / "speech" / f"{split}.jsonl").is_file():
            continue
        utts = load_utterances(data_dir, split, frontend, EVAL_LIMIT, keep_wave=True)
        metrics: dict[str, float] = {"utterances": len(utts)}
        for name, vocode in (("hifigan", lambda m: generator(m[None])[0]), ("griffin_lim", lambda m: griffin_lim(m[None])[0])):
            waves = [vocode(u["mel"]) for u in utts]
            metrics[f"mel_l1_{name}"] = sum(float((frontend(w[None])[0] - u["mel"]).abs().mean())
                                            for w, u in zip(waves, utts)) / len(utts)
            if aut is not None:
                metrics[f"cer_{name}"] = cer([u["text"] for u in utts], transcribe(aut, aut_frontend, waves))
        results[split] = metrics
    return results
