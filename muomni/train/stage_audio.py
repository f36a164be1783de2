"""Stage B: the AuT encoder learns to hear by transcribing speech with CTC.

Each utterance of ``speech/<split>.jsonl`` becomes a normalised log-mel ``(frames, n_mels)`` and a
character transcript. Training draws are augmented on the fly: with probability ``audio.augment_prob``
a fresh random perturbation (`muomni.data.perturb`: noise, babble of other training utterances,
reverb, telephone band, gain, speed) is applied to the waveform before the log-mel, so each epoch
hears the corpus in new rooms and channels; then SpecAugment masks the mel. Decoded waveforms are
kept in memory, so later epochs skip decoding. Validation and evaluation are never augmented and
keep the mels themselves. The AuT minimises the CTC loss of its 25 Hz character logits; validation
also decodes greedily and reports the character error rate.

Evaluation transcribes every held-out split there is: ``test`` (unseen utterances), ``comp`` (voices
never heard in training) and ``wild`` (held-out accents, voice variants and noises), and reports CER
and WER, both computed with ``torchaudio.functional.edit_distance``.

Usage: ``muomni train --stage audio --preset tiny`` then ``muomni eval --stage audio``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from muomni.audio import (
    AudioError, AuT, LogMel, cer, ctc_greedy_decode, ctc_loss, encode_text, load_audio, normalize_transcript,
    spec_augment, wer,
)
from muomni.checkpoint import load_checkpoint, resolve
from muomni.config import AudioConfig, TrainConfig, from_dict
from muomni.data.datasets import TensorCache
from muomni.data.index import JsonlIndex
from muomni.data.perturb import TALKERS, TRAIN_NOISES, apply_perturbation, sample_perturbation
from muomni.train.stages import StageError, manifest, resolve_configs, run_stage

STAGE = "audio"
HELD_OUT_SPLITS = ("test", "comp", "wild")  # evaluated whenever the data has them

TRAIN_DEFAULTS = {
    # About 3.5 minutes on one CPU core on the randomised world (~2,100 utterances, half of them noisy,
    # in 120 voices): ~12 epochs. Validation CER was still falling fast at 800 steps (41% at 200, 15% at
    # 800). CTC likes a high peak learning rate after a short warmup. Muon for the blocks' matrices:
    # CER 7.3 % on `test` and 14.9 % on `wild` where AdamW reaches 10.2 and 18.3 % (study/06).
    "tiny": TrainConfig(steps=1600, batch_size=16, lr=2e-3, min_lr_ratio=0.1, warmup_steps=50,
                        weight_decay=0.01, betas=(0.9, 0.98), optimizer="muon", eval_every=200,
                        eval_batches=4, save_every=400, log_every=20),
    "base": TrainConfig(steps=8000, batch_size=64, lr=1.5e-3, min_lr_ratio=0.05, warmup_steps=400,
                        weight_decay=0.01, betas=(0.9, 0.98), optimizer="muon", eval_every=500,
                        eval_batches=8, save_every=1000, log_every=50, num_workers=2),
}


class SpeechFeatures(Dataset):
    """``speech/<split>.jsonl`` as ``{"mels": (frames, n_mels), "targets": (chars,), "text": str}``.

    Features are computed on first use and cached in memory up to ``cache_mb`` (the default world
    fits many times over); a bad file raises a one-line error naming the manifest line. With
    ``augment`` > 0 (training), each draw is perturbed with that probability by a fresh random
    `sample_perturbation` of `TRAIN_NOISES` (babble from other utterances of the same manifest), so
    the cache keeps waveforms, and the mel only of the clean version.
    """

    def __init__(self, manifest: Path, cfg: AudioConfig, cache_mb: float = 1024, augment: float = 0.0):
        if not 0.0 <= augment <= 1.0:
            raise ValueError(f"augment is {augment}; expected a probability from 0 to 1")
        self.index = JsonlIndex(manifest, required=("audio", "text"))
        self.base = Path(manifest).parent
        self.cfg = cfg
        self.frontend = LogMel(cfg)
        self.cache = TensorCache(cache_mb)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.index[i]
        text = normalize_transcript(record["text"])
        try:
            targets = torch.tensor(encode_text(text, self.cfg.ctc_vocab))
            mels = self.features(i, record)
        except AudioError as error:
            raise self.index.error(i, str(error)) from None
        if len(text) == 0:
            raise self.index.error(i, "has an empty transcript")
        return {"mels": mels, "targets": targets, "text": text}

    @torch.no_grad()
    def features(self, i: int, record: dict) -> torch.Tensor:
        """The normalised log-mel ``(frames, n_mels)`` of item ``i``: cached, or freshly perturbed."""
        if self.augment == 0.0:
            path = self.base / record["audio"]
            return self.cache.get(i, lambda: self.frontend(load_audio(path, self.cfg.sample_rate, self.cfg.max_seconds)))
        # drawn from torch's generator: seeded by the trainer, saved for resume, distinct in each loader worker
        rng = random.Random(int(torch.randint(2**62, ())))
        if rng.random() >= self.augment:
            return self.cache.get(("mel", i), lambda: self.frontend(self.waveform(i)))
        many = len(self) > TALKERS[1]  # babble needs enough other utterances to mix
        spec = sample_perturbation(rng, TRAIN_NOISES if many else tuple(k for k in TRAIN_NOISES if k != "babble"))
        babble = None
        if spec["noise"] == "babble":
            others = [j + (j >= i) for j in rng.sample(range(len(self) - 1), spec["talkers"])]
            babble = [self.waveform(j).numpy() for j in others]
        wave = apply_perturbation(self.waveform(i).numpy(), spec, babble)
        return self.frontend(torch.from_numpy(wave))

    def waveform(self, i: int) -> torch.Tensor:
        """The decoded waveform ``(samples,)`` of item ``i`` at ``cfg.sample_rate``, cached."""
        def decode() -> torch.Tensor:
            try:
                return load_audio(self.base / self.index[i]["audio"], self.cfg.sample_rate, self.cfg.max_seconds)
            except AudioError as error:
                raise self.index.error(i, str(error)) from None

        return self.cache.get(("wave", i), decode)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Zero-pad mels ``(batch, frames, n_mels)`` and targets ``(batch, chars)``, with their lengths."""
    return {"mels": pad_sequence([item["mels"] for item in items], batch_first=True),
            "mel_lengths": torch.tensor([len(item["mels"]) for item in items]),
            "targets": pad_sequence([item["targets"] for item in items], batch_first=True),
            "target_lengths": torch.tensor([len(item["targets"]) for item in items]),
            "texts": [item["text"] for item in items]}


def loss_fn(model: AuT, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """CTC loss (SpecAugment while training); in evaluation also the greedy-decoding CER of the batch."""
    mels, lengths = batch["mels"], batch["mel_lengths"]
    if model.training:
        mels = spec_augment(mels, lengths, model.cfg)
    logits, out_lengths = model.ctc_logits(mels, lengths)
    loss = ctc_loss(logits, out_lengths, batch["targets"], batch["target_lengths"])
    metrics = {"tokens": float(out_lengths.sum())}  # tokens/s counts 25 Hz encoder frames
    if not model.training:
        hypotheses = ctc_greedy_decode(logits, out_lengths, model.cfg.ctc_vocab)
        metrics["cer"] = cer(batch["texts"], hypotheses)
    return loss, metrics


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Train the AuT with CTC on ``data_dir/speech`` into ``runs_dir/audio``."""
    omni, train_cfg = resolve_configs(preset, TRAIN_DEFAULTS, overrides)
    cfg = omni.audio
    train_data = SpeechFeatures(manifest(data_dir, "speech", "train"), cfg, augment=cfg.augment_prob)
    val_path = Path(data_dir) / "speech" / "val.jsonl"
    val_data = SpeechFeatures(val_path, cfg) if val_path.is_file() else None
    torch.manual_seed(train_cfg.seed)
    model = AuT(cfg)
    return run_stage(STAGE, Path(runs_dir), model, cfg, train_cfg, train_data, collate, loss_fn,
                     val_data=val_data, resume=resume, preset=preset)


def load_aut(run_dir: Path) -> AuT:
    """The trained AuT (eval mode) from an audio run directory or checkpoint directory."""
    weights, config = load_checkpoint(resolve(Path(run_dir)))
    model = AuT(from_dict(AudioConfig, {k: v for k, v in config.items() if k != "kind"}))
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def transcribe_split(model: AuT, data: SpeechFeatures, batch_size: int = 64) -> tuple[list[str], list[str]]:
    """(references, greedy hypotheses) for every utterance of ``data``."""
    references, hypotheses = [], []
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        logits, lengths = model.ctc_logits(batch["mels"], batch["mel_lengths"])
        hypotheses += ctc_greedy_decode(logits, lengths, model.cfg.ctc_vocab)
        references += batch["texts"]
    return references, hypotheses


def evaluate(runs_dir: Path, data_dir: Path) -> dict:
    """CER and WER of greedy CTC transcripts on each of `HELD_OUT_SPLITS` the data holds."""
    model = load_aut(Path(runs_dir) / STAGE)
    results = {}
    for split in HELD_OUT_SPLITS:
        path = Path(data_dir) / "speech" / f"{split}.jsonl"
        if path.is_file():
            references, hypotheses = transcribe_split(model, SpeechFeatures(path, model.cfg))
            results[split] = {"cer": cer(references, hypotheses), "wer": wer(references, hypotheses),
                              "utterances": len(references)}
    if not results:
        raise StageError(f"no held-out speech in {Path(data_dir) / 'speech'} (expected "
                         f"{', '.join(split + '.jsonl' for split in HELD_OUT_SPLITS)})")
    return results
