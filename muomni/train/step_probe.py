"""One training step of each stage on random inputs, at the shapes the memory plan assumes.

`muomni plan --measure` counts what such a step keeps and `muomni bench gpu` times it. Neither needs
the world or earlier stages: a stage's memory and speed depend on its shapes, not on what its
inputs say. Each probe holds the stage's model as its `Trainer` holds it (frozen parts included),
its loss function (the stage's own) and one batch:

- thinker: ``(batch, seq_len)`` random tokens;
- audio: ``(batch, 100 * max_seconds, n_mels)`` log-mels, the longest utterance the AuT accepts,
  with ~14 characters per second to transcribe;
- vision: ``(batch, 3, image_size, image_size)`` images, captions of ``text_max_len`` tokens and
  attribute targets;
- speech: the Talker over sequences of ``max_frames`` (its prefix of Thinker states, then code
  steps); the Thinker and codec that made its inputs stay on the CPU;
- sft: the whole `OmniModel` (encoders frozen, their outputs cached) over ``(batch, seq_len)``
  chats that each hold one image, the first `spoken_answers` ending in a spoken answer (the Talker
  trains on those).

``units`` counts what the stage's tokens/s meter counts in one step (tokens, 25 Hz frames, code steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from muomni.audio import AuT
from muomni.config import OmniConfig, TrainConfig
from muomni.constants import CTC_ALPHABET, IGNORE_INDEX, IMAGE_ID
from muomni.omni import Media, OmniModel
from muomni.talker import Talker
from muomni.thinker import Thinker
from muomni.tokenizer import Tokenizer
from muomni.train.memory_plan import CHARACTERS_PER_SECOND, CODE_FRAMES_PER_TOKEN, SPOKEN_TOKENS, spoken_answers
from muomni.train.trainer import LossFn
from muomni.vision import CLIP

FIRST_TEXT_ID = 8  # ids below are the special tokens


@dataclass
class Probe:
    """A stage's model, the loss function its `Trainer` runs, and one batch of random inputs."""

    model: nn.Module  # everything the stage keeps on the training device
    loss_fn: LossFn  # the stage's own: (model, batch) -> (loss, metrics)
    batch: dict[str, Any]
    units: float  # what the tokens/s meter counts in this batch


def stage_probe(stage: str, cfg: OmniConfig, train: TrainConfig, seed: int = 0) -> Probe:
    """The probe of ``stage`` at ``train.batch_size`` (and ``train.seq_len`` for text stages)."""
    builders = {"thinker": _thinker, "audio": _audio, "vision": _vision, "speech": _speech, "sft": _sft}
    if stage not in builders:
        raise ValueError(f"no step probe for stage '{stage}'; choose one of {', '.join(builders)}")
    torch.manual_seed(seed)
    return builders[stage](cfg, train.batch_size, train.seq_len)


def _text(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(FIRST_TEXT_ID, vocab, (batch, length))


def _thinker(cfg: OmniConfig, batch: int, seq_len: int) -> Probe:
    from muomni.train.stage_thinker import lm_loss

    ids = _text(batch, seq_len + 1, cfg.thinker.vocab_size)
    return Probe(Thinker(cfg.thinker), lm_loss, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, batch * seq_len)


def _audio(cfg: OmniConfig, batch: int, seq_len: int) -> Probe:
    from muomni.train.stage_audio import loss_fn

    a = cfg.audio
    frames = int(a.max_seconds * 100)  # 10 ms hop
    chars = int(a.max_seconds * CHARACTERS_PER_SECOND)
    batch_dict = {"mels": torch.randn(batch, frames, a.n_mels), "mel_lengths": torch.full((batch,), frames),
                  "targets": torch.randint(1, len(a.ctc_vocab) + 1, (batch, chars)),
                  "target_lengths": torch.full((batch,), chars), "texts": [""] * batch}
    return Probe(AuT(a), loss_fn, batch_dict, batch * -(-frames // 4))


def _vision(cfg: OmniConfig, batch: int, seq_len: int) -> Probe:
    from muomni.train.stage_vision import loss_fn

    v = cfg.vision
    model = CLIP(v, cfg.thinker.vocab_size)
    gh, gw = model.vision.patch_grid(v.image_size, v.image_size)
    merged = ((gh + 1) // 2) * ((gw + 1) // 2)
    attributes = torch.stack([torch.randint(n, (batch, merged)) for n in v.attribute_classes], dim=-1)
    batch_dict = {"images": torch.randn(batch, 3, v.image_size, v.image_size),
                  "ids": _text(batch, v.text_max_len, cfg.thinker.vocab_size),
                  "mask": torch.ones(batch, v.text_max_len, dtype=torch.bool), "groups": torch.arange(batch),
                  "captions": [""] * batch, "attributes": attributes if v.attribute_classes else None}
    return Probe(model, loss_fn, batch_dict, batch * (v.text_max_len + 1 + gh * gw))


def _speech(cfg: OmniConfig, batch: int, seq_len: int) -> Probe:
    from muomni.train.stage_speech import talker_loss

    talker = Talker(cfg.talker, cfg.codec, cfg.thinker.d_model)
    text = int(cfg.talker.max_frames / (1 + CODE_FRAMES_PER_TOKEN))  # prefix + code steps = max_frames
    frames = cfg.talker.max_frames - text - talker.n_q  # the delay pattern adds n_q steps
    codes = [torch.randint(cfg.codec.codebook_size, (talker.n_q, frames)) for _ in range(batch)]
    inputs, targets = talker.make_batch(codes)
    durations = torch.full((batch, text), frames // text)
    durations[:, -1] += frames - durations.sum(dim=1)
    width = cfg.thinker.d_model
    batch_dict = {"hidden": torch.randn(batch, text, width), "embeds": torch.randn(batch, text, width),
                  "cond_mask": torch.ones(batch, text, dtype=torch.bool), "inputs": inputs, "targets": targets,
                  "durations": durations, "voices": torch.zeros(batch, dtype=torch.long),
                  "texts": ["".join(CTC_ALPHABET[1 + i % 26] for i in range(text))] * batch}
    return Probe(talker, talker_loss, batch_dict, float((targets != IGNORE_INDEX).sum()))


def _sft(cfg: OmniConfig, batch: int, seq_len: int) -> Probe:
    from muomni.train.stage_sft import freeze, loss_fn

    # The placeholders' ids are fixed; the tokenizer only spells the spoken answer for the Talker.
    tokenizer = Tokenizer.train(["a picture of a red star"], vocab_size=300)
    model = OmniModel(cfg, tokenizer)
    freeze(model, cfg.sft_train_encoders)
    gh, gw = model.vision.patch_grid(cfg.vision.image_size, cfg.vision.image_size)
    grid = ((gh + 1) // 2, (gw + 1) // 2)
    n_image = grid[0] * grid[1]
    ids = _text(batch, seq_len, cfg.thinker.vocab_size)
    ids[:, 1:1 + n_image] = IMAGE_ID
    targets = torch.roll(ids, -1, dims=1)
    targets[:, : 1 + n_image] = IGNORE_INDEX  # loss on the text after the picture
    # The frozen ViT's merged outputs, as `ChatSamples` caches them: (n_image, 4 * d_vision) per picture.
    media = [Media("image", n_image, grid=grid, tokens=torch.randn(n_image, 4 * cfg.vision.d_model))
             for _ in range(batch)]
    # The first chats end in spoken answers (as many as stage E's mixture puts in a batch).
    start, frames = seq_len - SPOKEN_TOKENS, int(SPOKEN_TOKENS * CODE_FRAMES_PER_TOKEN)
    spoken = spoken_answers(batch)
    ids[:spoken, start:] = torch.randint(FIRST_TEXT_ID, tokenizer.vocab_size, (spoken, SPOKEN_TOKENS))
    durations = torch.full((SPOKEN_TOKENS,), frames // SPOKEN_TOKENS)
    durations[-1] += frames - durations.sum()
    speak = [(start, seq_len, torch.randint(cfg.codec.codebook_size, (cfg.codec.n_codebooks, frames)), durations)
             for _ in range(spoken)]
    positions = torch.arange(seq_len).expand(3, batch, seq_len)
    batch_dict = {"input_ids": ids, "targets": targets, "position_ids": positions,
                  "attention_mask": torch.ones(batch, seq_len, dtype=torch.bool), "media": media,
                  "speak": speak + [None] * (batch - spoken),
                  "ids": [str(i) for i in range(batch)]}
    return Probe(model, loss_fn, batch_dict, batch * seq_len)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (media tokens move when the model embeds them)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
