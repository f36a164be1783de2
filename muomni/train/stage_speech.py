"""Stage D: learn to speak. First the codec, then the Talker on the frozen Thinker.

1. Codec (``runs/<preset>/speech/codec/``): random crops of the training utterances' log-mels,
   reconstruction + commitment loss (`muomni.codec.Codec.loss`).
2. Talker (``runs/<preset>/speech/talker/``): every training utterance becomes codec codes (the
   codec frozen) and Thinker conditioning: the sentence as an assistant turn of the chat template,
   run through the frozen Thinker (stage A); the hidden states and token embeddings of the
   answer's tokens are the prefix the Talker speaks from, the same
   states it gets from the Thinker's answers later (`speech_condition`). A voice token names the
   utterance's voice (the assistant's is the default). The stage-B AuT force-aligns each utterance
   to its tokens (`muomni.align`), which gives the frames each token lasts. Loss: code
   cross-entropy + the duration head's error + the spelling CTC (`muomni.talker.Talker.loss`).

Evaluation on held-out sentences (``test``: training voices, new sentences; ``comp``: held-out
voices): the character error rate (CER) of the stage-B AuT on the original eSpeak audio, on the
original mels through Griffin-Lim (what the vocoder loses), on codec-reconstructed mels through
Griffin-Lim (what the codec adds), and on the Talker's own speech from the text alone (round trip).
Plus per-codebook utilisation and the real-time factor of synthesis (seconds of compute per second
of audio: Talker + codec decoder + vocoder).

Usage: ``muomni train --stage speech --preset tiny [--set codec_train.steps=400]`` then
``muomni eval --stage speech``. ``train.X`` sets the Talker's optimisation, ``codec_train.X`` the codec's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from muomni.align import align_tokens
from muomni.audio import AuT, LogMel, cer, load_audio, transcribe
from muomni.checkpoint import load_checkpoint
from muomni.codec import Codec, MelFrontend, utilisation
from muomni.config import (ConfigError, OmniConfig, SamplingConfig, TrainConfig, apply_overrides, from_dict,
                           to_dict)
from muomni.data.collate import pad
from muomni.data.index import JsonlIndex
from muomni.data.speech import ASSISTANT
from muomni.data.world import HELD_OUT
from muomni.talker import Talker
from muomni.thinker import Thinker
from muomni.tokenizer import Tokenizer
from muomni.train.stage_audio import load_aut
from muomni.train.stage_thinker import load_thinker
from muomni.train.stages import is_finished, resolve_configs, run_stage, stage_checkpoint
from muomni.vocoder import GriffinLimVocoder

STAGE = "speech"
CROP_FRAMES = 96  # codec training crops: 0.96 s, 12 code frames
EVAL_LIMIT = 100  # held-out utterances per split in `evaluate`
FRAMES_PER_TOKEN = 12.5  # `synthesize` caps speech at this many code frames (1 s) per text token

# The Talker's optimisation (``train.X``).
TRAIN_DEFAULTS = {
    # 800 steps: with the spelling loss the round-trip CER on held-out sentences keeps falling up to
    # here (measured: 57% -> 47% against 400 steps without it); 1,200 steps did no better.
    "tiny": TrainConfig(steps=800, batch_size=32, lr=2e-3, warmup_steps=40, weight_decay=0.05,
                        eval_every=200, eval_batches=2, save_every=200, log_every=20),
    "base": TrainConfig(steps=8000, batch_size=64, lr=1e-3, warmup_steps=300, weight_decay=0.05,
                        eval_every=500, eval_batches=4, save_every=500, log_every=50),
}
# The codec's optimisation (``codec_train.X``).
CODEC_TRAIN_DEFAULTS = {
    "tiny": TrainConfig(steps=800, batch_size=16, lr=2e-3, warmup_steps=30, weight_decay=0.0,
                        eval_every=200, eval_batches=4, save_every=200, log_every=20),
    "base": TrainConfig(steps=10000, batch_size=32, lr=1e-3, warmup_steps=300, weight_decay=0.0,
                        eval_every=1000, eval_batches=8, save_every=1000, log_every=50),
}


# ----------------------------------------------------------------------------------------------
# Data


def load_utterances(data_dir: Path, split: str, frontend: MelFrontend, limit: int | None = None,
                    keep_wave: bool = False) -> list[dict[str, Any]]:
    """The clean recordings of ``speech/<split>.jsonl`` (a world's noisy, reverberant ones teach a
    recogniser, not a voice) as dicts with ``mel`` ``(n_mels, frames)``, ``text``, ``sentence``,
    ``voice`` (None if the manifest has none) and, if asked, ``wave`` ``(samples,)``."""
    manifest = Path(data_dir) / "speech" / f"{split}.jsonl"
    index = JsonlIndex(manifest, required=("audio", "text"))
    clean = [i for i in range(len(index)) if index[i].get("room", {"kind": "clean"})["kind"] == "clean"]
    out = []
    for i in clean[:limit]:
        record = index[i]
        wave = load_audio(manifest.parent / record["audio"])
        item = {"mel": frontend(wave[None])[0], "text": record["text"],
                "sentence": record.get("sentence", record["text"]), "voice": record.get("voice")}
        if keep_wave:
            item["wave"] = wave
        out.append(item)
    return out


class MelCrops(Dataset):
    """Log-mels cut to ``crop`` frames: random crops for training, the first ``crop`` for validation."""

    def __init__(self, mels: list[torch.Tensor], crop: int, train: bool):
        self.mels, self.crop, self.train = mels, crop, train

    def __len__(self) -> int:
        return len(self.mels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        mel = self.mels[i]
        start = int(torch.randint(0, mel.shape[1] - self.crop + 1, ())) if self.train and mel.shape[1] > self.crop else 0
        return {"mel": mel[:, start : start + self.crop]}


def collate_mels(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad crops with silence to the longest: ``mel`` ``(batch, n_mels, frames)``, ``frames`` ``(batch,)``."""
    frames = torch.tensor([it["mel"].shape[1] for it in items])
    width = int(frames.max())
    mels = torch.stack([torch.nn.functional.pad(it["mel"], (0, width - it["mel"].shape[1]), value=-11.5129)
                        for it in items])
    return {"mel": mels, "frames": frames}


def answer_tokens(tokenizer: Tokenizer, sentence: str) -> tuple[list[int], list[bool]]:
    """Ids of ``<|im_start|>assistant\\n{sentence}<|im_end|>`` and which of them the Talker speaks
    from: the answer's tokens as the Thinker writes them (generation stops before feeding
    ``<|im_end|>`` back)."""
    ids, keep = tokenizer.encode_chat([{"role": "assistant", "content": sentence}])
    return ids, keep[:-1] + [False]


def spoken_token_texts(tokenizer: Tokenizer, sentence: str) -> list[str]:
    """The text of each token the Talker speaks ``sentence`` from (see `answer_tokens`)."""
    ids, keep = answer_tokens(tokenizer, sentence)
    return [tokenizer.decode([i]) for i, k in zip(ids, keep) if k]


@torch.no_grad()
def speech_condition(thinker: Thinker, tokenizer: Tokenizer, sentences: list[str],
                     batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sentence, the frozen Thinker's (hidden states, token embeddings), each ``(tokens, d_model)``,
    over the tokens `answer_tokens` picks: the states the Thinker has at each token of an answer it
    writes (`muomni.omni.OmniModel.speak_tokens` reads the same)."""
    device = next(thinker.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        encoded = [answer_tokens(tokenizer, s) for s in sentences[start : start + batch_size]]
        ids, mask = pad([torch.tensor(e[0]) for e in encoded], tokenizer.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = thinker(input_ids=ids, attention_mask=mask).hidden
        embeds = thinker.embed(ids)
        for row, (_, keep) in enumerate(encoded):
            sel = torch.tensor(keep + [False] * (ids.shape[1] - len(keep)), device=device)
            out.append((hidden[row, sel].float().cpu(), embeds[row, sel].float().cpu()))
    return out


def voice_list(utts: list[dict]) -> tuple[str, ...]:
    """The voices of the training speech, the assistant's first (the Talker's default), or () if unnamed."""
    names = sorted({u["voice"] for u in utts if u.get("voice")})
    if ASSISTANT["voice"] in names:
        names.remove(ASSISTANT["voice"])
        names.insert(0, ASSISTANT["voice"])
    return tuple(names)


def utterance_durations(aut: AuT, tokenizer: Tokenizer, utts: list[dict], codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Frames per spoken token ``(tokens_i,)`` of each utterance (with ``wave``), force-aligned by
    the AuT; ``codes`` ``(n_q, frames_i)`` give each utterance's code frames."""
    return align_tokens(aut, LogMel(aut.cfg), [u["wave"] for u in utts],
                        [spoken_token_texts(tokenizer, u["sentence"]) for u in utts], [c.shape[1] for c in codes])


class SpokenTexts(Dataset):
    """(Thinker conditioning, voice, codec codes, durations, text): ``hidden``/``embeds``
    ``(tokens, d)``, ``voice`` (an index into the Talker's voices), ``codes`` ``(n_q, frames)``,
    ``durations`` ``(tokens,)`` (code frames per token), ``text`` (the sentence, for the Talker's
    spelling loss)."""

    def __init__(self, conds: list[tuple[torch.Tensor, torch.Tensor]], voices: list[int], codes: list[torch.Tensor],
                 durations: list[torch.Tensor], texts: list[str]):
        self.conds, self.voices, self.codes, self.durations, self.texts = conds, voices, codes, durations, texts

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"hidden": self.conds[i][0], "embeds": self.conds[i][1], "voice": self.voices[i],
                "codes": self.codes[i], "durations": self.durations[i], "text": self.texts[i]}


def talker_collate(talker: Talker):
    """Collate for `SpokenTexts`: left-padded conditioning, delayed code inputs and targets."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        hidden, cond_mask = pad([it["hidden"] for it in items], 0.0, side="left")
        embeds, _ = pad([it["embeds"] for it in items], 0.0, side="left")
        durations, _ = pad([it["durations"] for it in items], 0, side="left")
        inputs, targets = talker.make_batch([it["codes"] for it in items])
        return {"hidden": hidden, "embeds": embeds, "cond_mask": cond_mask, "inputs": inputs, "targets": targets,
                "durations": durations, "voices": torch.tensor([it["voice"] for it in items]),
                "texts": [it["text"] for it in items]}

    return collate


def talker_loss(model: Talker, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The Talker's training loss on a `talker_collate` batch (see `muomni.talker.Talker.loss`)."""
    return model.loss(batch["hidden"], batch["embeds"], batch["cond_mask"], batch["inputs"], batch["targets"],
                      batch["durations"], batch["voices"], batch["texts"])


# ----------------------------------------------------------------------------------------------
# Loading trained parts


def _omni_config(config: dict) -> OmniConfig:
    config = dict(config)
    config.pop("kind", None)
    return from_dict(OmniConfig, config)


def load_codec(checkpoint_dir: Path) -> Codec:
    """The codec from its checkpoint directory (``runs/<preset>/speech/codec/best``)."""
    weights, config = load_checkpoint(checkpoint_dir)
    codec = Codec(_omni_config(config).codec)
    codec.load_state_dict(weights)
    return codec.eval()


def load_talker(checkpoint_dir: Path) -> Talker:
    """The Talker from its checkpoint directory (``runs/<preset>/speech/talker/best``)."""
    weights, config = load_checkpoint(checkpoint_dir)
    omni = _omni_config(config)
    talker = Talker(omni.talker, omni.codec, omni.thinker.d_model)
    talker.load_state_dict(weights)
    return talker.eval()


def load_speech(runs_dir: Path) -> tuple[Talker, Codec]:
    """The trained Talker and codec of ``runs_dir`` (stage D must have run)."""
    return (load_talker(stage_checkpoint(runs_dir, f"{STAGE}/talker")),
            load_codec(stage_checkpoint(runs_dir, f"{STAGE}/codec")))


# ----------------------------------------------------------------------------------------------
# Train


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    codec_items = [o.strip()[len("codec_train."):] for o in overrides if o.strip().startswith("codec_train.")]
    return [o for o in overrides if not o.strip().startswith("codec_train.")], codec_items


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Train the codec, then the Talker, into ``runs_dir/speech/{codec,talker}/``."""
    rest, codec_items = _split_overrides(overrides)
    omni, talker_train = resolve_configs(preset, TRAIN_DEFAULTS, rest)
    if preset not in CODEC_TRAIN_DEFAULTS:
        raise ConfigError(f"no codec training defaults for preset '{preset}'")
    codec_train = apply_overrides(CODEC_TRAIN_DEFAULTS[preset], codec_items)
    runs_dir, stage_dir = Path(runs_dir), Path(runs_dir) / STAGE
    thinker, tokenizer = load_thinker(stage_checkpoint(runs_dir, "thinker"))  # fails early if stage A is missing
    aut = load_aut(stage_checkpoint(runs_dir, "audio"))  # ... or stage B: it aligns text to speech
    if thinker.cfg.d_model != omni.thinker.d_model:
        omni = dataclasses.replace(omni, thinker=thinker.cfg)

    started = time.time()
    frontend = MelFrontend(omni.codec)
    train_utts = load_utterances(data_dir, "train", frontend, keep_wave=True)
    val_utts = load_utterances(data_dir, "val", frontend, keep_wave=True)

    # 1. the codec
    if not (resume and is_finished(stage_dir, "codec")):
        torch.manual_seed(codec_train.seed)
        run_stage(f"{STAGE}/codec", runs_dir, Codec(omni.codec), omni, codec_train,
                  MelCrops([u["mel"] for u in train_utts], CROP_FRAMES, train=True), collate_mels,
                  lambda model, batch: model.loss(batch["mel"], batch["frames"]),
                  val_data=MelCrops([u["mel"] for u in val_utts], CROP_FRAMES, train=False),
                  resume=resume, preset=preset)
    codec = load_codec(stage_checkpoint(runs_dir, f"{STAGE}/codec"))

    # 2. the Talker on (Thinker conditioning, voice, codes)
    omni = dataclasses.replace(omni, talker=dataclasses.replace(omni.talker, voices=voice_list(train_utts)))
    torch.manual_seed(talker_train.seed)
    talker = Talker(omni.talker, omni.codec, omni.thinker.d_model)

    def spoken(utts: list[dict]) -> SpokenTexts:
        codes = [codec.encode(u["mel"][None])[0] for u in utts]
        voices = [omni.talker.voices.index(u["voice"]) if u.get("voice") in omni.talker.voices else 0 for u in utts]
        sentences = [u["sentence"] for u in utts]
        return SpokenTexts(speech_condition(thinker, tokenizer, sentences), voices, codes,
                           utterance_durations(aut, tokenizer, utts, codes), sentences)

    run_stage(f"{STAGE}/talker", runs_dir, talker, omni, talker_train, spoken(train_utts), talker_collate(talker),
              talker_loss, val_data=spoken(val_utts), resume=resume, preset=preset)

    summary = {"stage": STAGE, "preset": preset, "model": to_dict(omni), "train": to_dict(talker_train),
               "codec_train": to_dict(codec_train), "seconds": round(time.time() - started, 1), "finished": True}
    (stage_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return stage_dir


# ----------------------------------------------------------------------------------------------
# Synthesis and evaluation


@torch.no_grad()
def synthesize(talker: Talker, codec: Codec, vocoder: GriffinLimVocoder,
               conds: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0, batch_size: int = 16,
               sampling: SamplingConfig | None = None) -> list[torch.Tensor]:
    """Thinker conditioning per sentence -> waveforms ``(samples,)``: Talker -> codec decoder -> vocoder."""
    generator = torch.Generator().manual_seed(seed)
    waves = []
    for start in range(0, len(conds), batch_size):
        chunk = conds[start : start + batch_size]
        hidden, mask = pad([c[0] for c in chunk], 0.0, side="left")
        embeds, _ = pad([c[1] for c in chunk], 0.0, side="left")
        # A Talker that never says eos stops at 1 s per text token (world speech takes ~0.2 s).
        cap = min(talker.cfg.max_frames, int(FRAMES_PER_TOKEN * hidden.shape[1]))
        said = list(talker.generate(hidden, embeds, mask, max_frames=cap, sampling=sampling, generator=generator))
        voiced = iter(vocoder.vocode_each([codec.decode(codes[None])[0] for codes in said if codes.shape[1]], seed=seed))
        silence = torch.zeros(codec.cfg.frames_per_code * codec.cfg.hop_length)  # a Talker that said nothing
        waves += [next(voiced) if codes.shape[1] else silence for codes in said]
    return waves


@torch.no_grad()
def evaluate(runs_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Round-trip CER and its baselines, codebook utilisation, real-time factor; per held-out split."""
    runs_dir = Path(runs_dir)
    talker, codec = load_speech(runs_dir)
    thinker, tokenizer = load_thinker(stage_checkpoint(runs_dir, "thinker"))
    aut = load_aut(stage_checkpoint(runs_dir, "audio"))
    aut_frontend = LogMel(aut.cfg)
    vocoder = GriffinLimVocoder(codec.cfg)
    results: dict[str, Any] = {}
    for split in HELD_OUT:
        if not (Path(data_dir) / "speech" / f"{split}.jsonl").is_file():
            continue
        utts = load_utterances(data_dir, split, codec.frontend, EVAL_LIMIT, keep_wave=True)
        refs = [u["text"] for u in utts]

        def judge(waves: list[torch.Tensor]) -> float:
            return cer(refs, transcribe(aut, aut_frontend, waves))

        codes = [codec.encode(u["mel"][None]) for u in utts]
        gl_original = vocoder.vocode_each([u["mel"] for u in utts])
        gl_codec = vocoder.vocode_each([codec.decode(c)[0] for c in codes])
        conds = speech_condition(thinker, tokenizer, [u["sentence"] for u in utts])
        start = time.perf_counter()
        spoken = synthesize(talker, codec, vocoder, conds)
        seconds = time.perf_counter() - start
        audio_seconds = sum(w.numel() for w in spoken) / codec.cfg.sample_rate
        all_codes = torch.cat([c[0] for c in codes], dim=1)  # (n_q, frames)
        results[split] = {
            "utterances": len(utts),
            "cer_original": judge([u["wave"] for u in utts]),
            "cer_griffin_lim": judge(gl_original),
            "cer_codec": judge(gl_codec),
            "cer_round_trip": judge(spoken),
            "codebook_utilisation": [round(utilisation(all_codes[q], codec.cfg.codebook_size), 4)
                                     for q in range(all_codes.shape[0])],
            "real_time_factor": seconds / max(audio_seconds, 1e-9),
            "spoken_seconds_per_utterance": audio_seconds / len(utts),
            "original_seconds_per_utterance": sum(u["wave"].numel() for u in utts) / codec.cfg.sample_rate / len(utts),
        }
    return results
