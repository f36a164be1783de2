"""Configuration for every μOmni component, the presets, and JSON in/out.

Each component has one dataclass whose fields carry a short comment. `OmniConfig` groups them, and
`TrainConfig` holds the optimisation settings of one training stage. Presets:

- ``tiny``: every stage trains in about two minutes on two CPU cores.
- ``base``: the reference size for one 12 GB GPU (bf16 autocast, optional gradient checkpointing).

Configs round-trip through plain dicts and JSON. A key that no dataclass knows raises
`ConfigError` naming the key (and the closest known one), so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from muomni.constants import CTC_ALPHABET

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that μOmni does not understand."""


@dataclass
class TransformerConfig:
    """Settings shared by every transformer stack (Thinker, AuT, ViT, text tower, Talker)."""

    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # number of blocks
    n_heads: int = 4  # query heads; head_dim = d_model // n_heads
    n_kv_heads: int = 2  # key/value heads; fewer than n_heads means grouped-query attention
    d_ff: int = 1024  # hidden width of the MLP (per expert for MoE)
    mlp: str = "swiglu"  # "swiglu" (gated SiLU, three matrices) or "gelu" (two matrices)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-5  # epsilon inside the norms
    bias: bool = False  # biases in the linear layers (the ViT reference uses them)
    rope_theta: float = 10000.0  # base of the rotary frequencies
    dropout: float = 0.0  # dropout on attention weights and residual branches
    causal: bool = True  # causal (decoder) or bidirectional (encoder) attention
    n_experts: int = 0  # >0 replaces each MLP with a mixture of this many experts
    n_experts_per_token: int = 2  # top-k experts a token is routed to
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss
    # >0: each block first adds to its normalised input a causal depthwise convolution over this many
    # positions (`layers.TokenMix`), so a token also carries the few tokens before it and "the word
    # before 'star'" is one attention lookup instead of two composed heads. 0: a plain Llama block.
    token_mix: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SamplingConfig:
    """How the decode loop picks each next id from the logits (`muomni.engine.sample`)."""

    temperature: float = 0.0  # 0 takes the most likely id (greedy); higher flattens the distribution
    top_k: int = 0  # sample among the k most likely ids only (0: no limit)
    top_p: float = 1.0  # sample within the smallest set of ids holding this much probability (1: all)


@dataclass
class ThinkerConfig(TransformerConfig):
    """The decoder-only language model that reads every modality and writes text."""

    vocab_size: int = 32000  # tokenizer vocabulary including special tokens
    # Stage A: share of the world's stories it reads as the chats of stage E (each scene's statements
    # and question a user turn, the answer the assistant's), the rest as plain text; 0: all text. Half
    # made the tiny Thinker read 46% of chat-layout questions before stage E instead of none, but stage E
    # answered no more questions after it in two runs (study/10), so it is off by default.
    chat_share: float = 0.0
    max_seq_len: int = 1024  # longest sequence the model accepts (prompt + generation)
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    # Split of the rotary frequency pairs into (time, height, width) sections for multimodal
    # positions (Qwen2.5-Omni's TMRoPE). Must sum to head_dim // 2. Text uses t = h = w.
    mrope_section: tuple[int, int, int] = (16, 8, 8)


@dataclass
class AudioConfig(TransformerConfig):
    """The AuT speech encoder: log-mel frontend, conv downsampling, transformer, CTC head."""

    causal: bool = False
    sample_rate: int = 16000  # every waveform is resampled to this rate
    n_mels: int = 128  # mel bins of the frontend
    win_ms: float = 25.0  # STFT window length
    hop_ms: float = 10.0  # STFT hop: 100 mel frames per second
    max_seconds: float = 30.0  # longer audio is rejected with a clear error
    normalize: str = "utterance"  # "utterance" (per-utterance mean/std) or "global"
    conv_channels: int = 256  # channels of the 4x downsampling convolutions
    ctc_vocab: str = CTC_ALPHABET  # characters the CTC head predicts (blank is 0)
    spec_time_masks: int = 2  # SpecAugment: time masks per utterance
    spec_time_width: int = 20  # SpecAugment: widest time mask in frames
    spec_freq_masks: int = 2  # SpecAugment: frequency masks per utterance
    spec_freq_width: int = 16  # SpecAugment: widest frequency mask in bins
    augment_prob: float = 0.5  # share of training draws perturbed by noise, reverb, band, gain, speed


@dataclass
class VisionConfig(TransformerConfig):
    """The ViT image encoder and the CLIP-style text tower used to train it (stage C)."""

    causal: bool = False
    mlp: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    bias: bool = True
    n_kv_heads: int = 4
    image_size: int = 224  # images are resized to image_size x image_size
    patch_size: int = 16  # square patches; the grid is image_size // patch_size per side
    conv_stem: int = 0  # channels of a convolutional stem in place of the linear patch embedding (0: none):
    # 3x3 convolutions of stride 2 until a pixel is a patch (`vision.conv_stem`). Early convolutions see
    # edges and corners, which a tiny ViT otherwise learns slowly (Xiao et al., 2021)
    embed_dim: int = 128  # width of the shared image-text embedding space
    text_layers: int = 2  # depth of the contrastive text tower
    text_max_len: int = 48  # longest caption (tokens) the text tower reads
    text_causal: bool = True  # causal text tower (as in CLIP) or bidirectional
    text_pool: str = "eos"  # caption vector: "eos" (state at the end-of-text token) or "mean"
    augment_min_scale: float = 1.0  # training crops keep at least this fraction of the area (1: none; the
    # attribute targets below assume uncropped pictures)
    # Attribute heads (stage C): linear readouts of each merged 2x2 token that name the object centred
    # in it, one head per attribute with this many classes, class 0 meaning "no object centred here".
    # For the world: colour (6 + 1), shape (4 + 1), size (2 + 1), place on the 3x3 grid (9 + 1). They
    # give the ViT a reason to tell shapes apart, which captions alone do not. (): no heads.
    attribute_classes: tuple[int, ...] = (7, 5, 3, 10)
    attribute_weight: float = 1.0  # weight of the attribute loss beside InfoNCE
    init_temperature: float = 1 / 0.07  # initial logit scale of InfoNCE
    max_temperature: float = 100.0  # the learnable logit scale is clamped to at most this


@dataclass
class CodecConfig:
    """The speech codec: groups of mel frames -> conv encoder -> RVQ -> conv decoder -> mel."""

    sample_rate: int = 16000  # waveform rate
    n_fft: int = 400  # STFT size (25 ms, as the AuT): 201 bins, which 80 mels invert well
    hop_length: int = 160  # 10 ms hop: 100 mel frames per second
    n_mels: int = 80  # mel bins the codec reconstructs
    frames_per_code: int = 8  # mel frames per code frame: 100 / 8 = 12.5 code frames per second
    hidden: int = 256  # channels of the conv encoder/decoder
    n_codebooks: int = 4  # residual quantisers
    codebook_size: int = 256  # entries per codebook
    codebook_dim: int = 64  # dimension of each code vector
    ema_decay: float = 0.99  # EMA rate of the codebook updates
    dead_code_threshold: float = 0.1  # EMA uses per batch below which a code restarts on batch data
    commitment_weight: float = 0.25  # weight of the commitment loss
    quantizer_dropout: float = 0.5  # probability of training with a random number of codebooks
    vocoder_channels: int = 256  # HiFi-GAN generator width (halved at each upsampling)


@dataclass
class TalkerConfig(TransformerConfig):
    """The Talker: an autoregressive predictor of codec codes conditioned on the Thinker."""

    d_model: int = 192
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 768
    max_frames: int = 400  # longest utterance in code frames (32 s at 12.5 Hz)
    # Voices the Talker can speak in (a learned embedding each, first in the prefix); the first is
    # the default, the assistant's. Empty: no voice token. Stage D fills it from the training data.
    voices: tuple[str, ...] = ()
    # Spelling loss (training only): a small head reads the characters of the text back out of the
    # Talker's states with CTC, which makes the states follow the text in order. 0 turns it off.
    spell_weight: float = 0.5
    spell_chars: str = CTC_ALPHABET  # characters spelled; others are dropped (blank is 0)
    spell_slots: int = 4  # characters per code frame the head may emit: letters come faster than 12.5 Hz
    # Alignment: each code step also reads the token spoken at its frame, with how many of the
    # token's frames have passed and are left. Durations come from forced alignment in training and
    # from the duration head when speaking.
    duration_weight: float = 1.0  # weight of the duration head's loss (squared error of log(1 + frames))
    max_span: int = 24  # frame counts above this share one embedding (24 frames = 1.9 s)
    # How codes are sampled when speaking: chat speaks with the setting stage D's round-trip CER
    # is measured with (`--set talker.sampling.temperature=0` for argmax codes).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.3, top_k=10))


@dataclass
class OmniConfig:
    """The whole model: every component plus the projectors that join them."""

    thinker: ThinkerConfig = field(default_factory=ThinkerConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    talker: TalkerConfig = field(default_factory=TalkerConfig)
    projector_hidden: int = 512  # hidden width of the encoder -> Thinker projector MLPs
    # The names of the classes of the ViT's attribute heads (`vision.attribute_classes`), one tuple per
    # head without class 0 ("none"), e.g. the world's colours, shapes, sizes and places: each image token
    # then also gets the Thinker's embeddings of the words its heads read (`projector.VisualWords`).
    # Off by default: on the tiny preset it did not answer more image questions (study/10). (): off.
    visual_words: tuple[tuple[str, ...], ...] = ()
    # How the AuT's 25 Hz frames become Thinker tokens: "pairs", two frames side by side at 12.5 Hz as
    # in Qwen-Omni, or "words", one token per word its CTC head hears (`muomni.audio.pool_words`), so
    # a spoken question takes as many tokens as the written one. The tiny preset hears words: its
    # small Thinker answered more spoken questions with them, in less time (study/10).
    audio_tokens: str = "pairs"
    # With "words": steps that fit the audio projector, before stage E, to put each spoken word of the
    # world's training speech on the Thinker's embedding of the written word (`train.spoken_words`). 0: off.
    sft_word_fit_steps: int = 400
    # Frames sampled uniformly from each video clip for the Thinker. The tiny preset reads two: a motion
    # question then compares where the object is in one frame and in the other, and in 800 stage-E
    # steps its small Thinker answered 61-71% of `wild` motion questions so, 25-43% with four (study/10).
    video_frames: int = 4
    # How a clip's frames reach the Thinker: "frames", each frame's merged ViT tokens, or "difference",
    # the first frame's and then each frame minus the one before (`video.frame_differences`), so what
    # moved stands out and what stayed still cancels. The tiny preset reads differences: in 800 stage-E
    # steps its Thinker answered 92% of `wild` motion questions so, 26% with frames (study/10).
    video_tokens: str = "frames"
    sft_train_encoders: bool = False  # stage E also fine-tunes the AuT and ViT (no cached encoder outputs)
    # Stage E asks up to this many questions about one picture in one chat, a turn each: the picture
    # is read once and every answer teaches, so a step holds several lookups instead of one.
    sft_questions_per_chat: int = 4


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 16  # samples per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimiser step
    seq_len: int = 256  # packed sequence length of text stages
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0
    # "adamw", or "muon": orthogonalised momentum for the transformer blocks' matrices and AdamW for
    # the rest (muomni/train/muon.py); both take the same learning rate.
    optimizer: str = "adamw"
    weight_decay: float = 0.1  # decoupled decay, applied to matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    eval_every: int = 200  # steps between validations (0 disables)
    eval_batches: int = 8  # micro-batches per validation
    save_every: int = 200  # steps between "last" checkpoints
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0  # seeds model init, data order and augmentation
    device: str = "auto"  # "auto" picks cuda > mps > cpu
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16": autocast on any device
    # (CPUs too, which checks the GPU's number path without one); "fp32": no autocast
    compile: bool = False  # torch.compile the model (off by default: slow to start on CPU)
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    fsdp: bool = False  # under torchrun, shard with FSDP2 instead of DDP
    num_workers: int = 0  # DataLoader worker processes


# ----------------------------------------------------------------------------------------------
# Dicts and JSON


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain, JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys raise `ConfigError` naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}' for {cls.__name__}{hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or hint
    if isinstance(expected, type) and not isinstance(value, expected):
        raise ConfigError(f"config key '{where}' expects {expected.__name__}, got {value!r}")
    return value


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Apply ``key=value`` strings (dotted keys, JSON values) and return a new config.

    >>> apply_overrides(OmniConfig(), ["thinker.n_layers=2"]).thinker.n_layers
    2
    """
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{'.'.join(parents[: depth + 1])}'")
            node = node[part]
        if leaf not in node:
            close = difflib.get_close_matches(leaf, list(node), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key.strip()}'{hint}")
        try:
            node[leaf] = json.loads(raw)
        except json.JSONDecodeError:
            node[leaf] = raw  # bare strings such as mlp=gelu
    return from_dict(type(config), data)


# ----------------------------------------------------------------------------------------------
# Presets


def tiny() -> OmniConfig:
    """Every stage in about two minutes on two CPU cores."""
    return OmniConfig(
        thinker=ThinkerConfig(
            d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=1024,
            max_seq_len=512, tie_embeddings=True, mrope_section=(8, 4, 4), token_mix=4,
        ),
        audio=AudioConfig(d_model=144, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=432, n_mels=80,
                          conv_channels=144, max_seconds=12.0),
        vision=VisionConfig(d_model=96, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=288,
                            image_size=64, patch_size=8, embed_dim=96, text_layers=2, conv_stem=48,
                            attribute_weight=4.0),  # heavier heads: shape 46 -> 56% on `test` (study/07)
        codec=CodecConfig(hidden=128, n_codebooks=4, codebook_size=128, codebook_dim=32, ema_decay=0.95,
                          vocoder_channels=64),
        talker=TalkerConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384, dropout=0.1),
        projector_hidden=256, audio_tokens="words", video_frames=2, video_tokens="difference",
    )


def base() -> OmniConfig:
    """The reference size for one 12 GB GPU."""
    return OmniConfig(
        thinker=ThinkerConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=1024,
                              vocab_size=32000, max_seq_len=2048, mrope_section=(16, 8, 8)),
        audio=AudioConfig(d_model=192, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768,
                          conv_channels=192),
        vision=VisionConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512,
                            image_size=224, patch_size=16, embed_dim=128),
        codec=CodecConfig(),
        talker=TalkerConfig(d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768),
        projector_hidden=512,
    )


PRESETS = {"tiny": tiny, "base": base}


def preset(name: str) -> OmniConfig:
    """The named preset as a fresh `OmniConfig`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
