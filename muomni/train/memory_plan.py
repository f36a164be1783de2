"""`muomni plan`: an analytic estimate of the GPU memory each training stage needs.

Training memory is four piles (Rajbhandari et al., 2020, "ZeRO", section 3):

- weights: fp32 master copies, 4 bytes per parameter (counted from the stage's own modules, built
  on the ``meta`` device where they can be: exact, and free);
- gradients: 4 bytes per *trainable* parameter;
- AdamW state: two fp32 moments, 8 bytes per trainable parameter (stages A and E step their blocks'
  matrices with Muon, one moment of 4 bytes: for them this pile is an upper bound);
- activations saved for the backward pass: `block_activation_bytes` for one block, `stage_parts`
  (with `head_bytes`, `ctc_bytes`) for what a stage saves outside its blocks (frontends, heads, losses).
  Attention is assumed flash/memory-efficient (no ``seq x seq`` matrix). Gradient checkpointing
  keeps each block's input (and the rotary tables) and recomputes one block at a time, so
  ``n_layers x block`` becomes ``n_layers x input + one block``.

Every term was checked against a measurement (`muomni plan --measure`, `memory_measure`) and
corrected where the first version was wrong:

- the Thinker's head keeps a logits workspace of ``min(1024, tokens)`` rows (not always 1024) plus
  the head's fp32 gradient ``vocab x d_model`` and the hidden states' gradient, computed in the
  forward pass (`muomni.thinker.linear_cross_entropy`);
- under autocast every trainable matmul's weight is also kept as a bf16 copy for the backward pass;
- the rotary tables are cast to bf16 in every attention (four copies per block);
- a norm keeps its input and, for RMSNorm, the normalised input (the CPU's composite ``rms_norm``
  keeps it for the weight's gradient; a fused GPU kernel that recomputes it keeps ``8 d`` bytes per
  token and block less, so there the plan errs on the safe side);
- CTC keeps a table of ``frames x (2 x characters + 1)`` per utterance (stage B, the Talker's
  spelling head), and the Talker's code heads their fp32 log-probabilities;
- stage D keeps only the Talker on the GPU: the Thinker and the codec that make its inputs run
  before it, on the CPU; stage E trains the Talker too (on spoken answers), so its gradients and
  AdamW state count there.

Frozen networks (the encoders during SFT, whose outputs are cached) run without gradients: their
weights count, their activations do not; stage E's Talker speaks `spoken_answers` answers of
`SPOKEN_TOKENS` tokens per batch. Dropout (none in ``base``) is not modelled: it keeps a mask per
dropped tensor and, on a CPU, makes attention keep its ``seq x seq`` weights. The CUDA context
(~0.5 GB) and allocator fragmentation are not included; `muomni bench gpu` measures the real peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from muomni.config import OmniConfig, TrainConfig, TransformerConfig, preset as load_preset

GB = 1024**3
CHARACTERS_PER_SECOND = 14  # speech rate assumed for CTC transcripts (stage B)
CODE_FRAMES_PER_TOKEN = 2.5  # the Talker's pace: ~0.2 s of speech per text token (12.5 code frames/s)
SPOKEN_TOKENS = 16  # length of a spoken answer in stage E
PRECISION_BYTES = {"bf16": 2, "fp32": 4}  # bytes of a matmul's inputs and outputs


def stack_params(cfg: TransformerConfig) -> int:
    """Parameters of a `layers.Transformer` with ``cfg`` (blocks + final norm)."""
    d, hd = cfg.d_model, cfg.head_dim
    bias = int(cfg.bias)
    attention = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    attention += bias * ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd + d)
    mlp = 3 * d * cfg.d_ff if cfg.mlp == "swiglu" else 2 * d * cfg.d_ff + bias * (cfg.d_ff + d)
    if cfg.n_experts:
        mlp = cfg.n_experts * mlp + d * cfg.n_experts
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    return cfg.n_layers * (attention + mlp + 2 * norm) + norm


def block_matrix_params(cfg: TransformerConfig) -> int:
    """Weights of one block's matmuls (what autocast copies to bf16)."""
    d, hd = cfg.d_model, cfg.head_dim
    experts = cfg.n_experts or 1
    return d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d \
        + experts * (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff


def norm_bytes(cfg: TransformerConfig) -> int:
    """Bytes one token's norm keeps: its fp32 input and statistics (RMSNorm: also the normalised input)."""
    return 8 * cfg.d_model + 4 if cfg.norm == "rmsnorm" else 4 * cfg.d_model + 8


def block_activation_bytes(cfg: TransformerConfig, half: int = 2, rope: bool = True) -> int:
    """Bytes one token stores for the backward pass in one block: ``half`` is 2 under bf16 autocast,
    4 in fp32; ``rope``: the block rotates queries and keys (not the ViT and its text tower)."""
    d, hd, h, kv, ff = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    norms = 2 * norm_bytes(cfg)  # attention norm and MLP norm
    normed = 2 * half * d  # the norm outputs as the q/k/v and MLP matmuls read them
    qkv = half * (h + 2 * kv) * hd  # the projection output (v is a view of it)
    rotary = half * (h + kv) * hd + (4 * hd * half if half == 2 else 0) if rope else 0  # rotated q, k;
    # under autocast also the cos/sin tables cast to bf16 for q and for k
    attention = half * h * hd + 4 * h  # attention output (the out-projection's input), log-sum-exp
    mlp = (4 if cfg.mlp == "swiglu" else 2) * half * ff  # gate|up, silu, product / up, gelu
    if cfg.n_experts:
        mlp *= cfg.n_experts_per_token
    mix = half * d if cfg.token_mix else 0  # `layers.TokenMix` keeps its convolution's input window
    return norms + normed + qkv + rotary + attention + mlp + mix


def stack_activations(cfg: TransformerConfig, tokens: int, checkpointing: bool, half: int = 2,
                      rope: bool = True, recompute: bool = True) -> int:
    """Activation bytes of a trainable stack over ``tokens`` tokens (batch x sequence).

    ``recompute``: with checkpointing, whether this stack's block is the one held while it is
    recomputed (the backward pass recomputes one block at a time, so a stage with two stacks
    counts only the larger block).
    """
    block = block_activation_bytes(cfg, half, rope)
    copies = 2 * block_matrix_params(cfg) if half == 2 else 0  # bf16 weight copies, per block
    tables = 2 * 4 * cfg.head_dim if rope else 0  # the fp32 cos/sin tables, shared by the blocks
    if checkpointing:  # each block's input and the tables are held; one block is recomputed at a time
        held = tokens * (cfg.n_layers * 4 * cfg.d_model + tables + norm_bytes(cfg))
        return held + (tokens * (block - 4 * cfg.d_model) + copies if recompute else 0)  # its input is held
    held_tables = tables if half == 4 else 0  # under autocast the blocks keep their bf16 casts instead
    return tokens * (cfg.n_layers * block + held_tables + norm_bytes(cfg)) + cfg.n_layers * copies


@dataclass
class Part:
    """One network of a stage: its parameters, and its activations if gradients flow through it."""

    name: str
    params: int
    trainable: bool
    activations: int = 0  # bytes for the batch, without checkpointing
    activations_ckpt: int = 0  # bytes for the batch, with checkpointing


def _params(build) -> int:
    """Parameters of the module ``build()`` makes, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _part(name: str, params: int, cfg: TransformerConfig, tokens: int, half: int, extra: int = 0,
          rope: bool = True, recompute: bool = True) -> Part:
    """A trainable network: a stack over ``tokens`` tokens plus ``extra`` bytes saved outside it."""
    return Part(name, params, True, stack_activations(cfg, tokens, False, half, rope) + extra,
                stack_activations(cfg, tokens, True, half, rope, recompute) + extra)


def spoken_answers(batch: int) -> int:
    """Spoken answers in a stage E batch of ``batch`` chats (its mixture's share, at least one)."""
    from muomni.train.stage_sft import MIXTURE

    return max(1, round(batch * MIXTURE["speak"]))


def _talker(cfg: OmniConfig, utterances: int, text: int, steps: int, half: int) -> Part:
    """The Talker over ``utterances`` of ``text`` prefix tokens and ``steps`` code steps: its stack,
    each code head's input and fp32 log-probabilities, and the spelling head's CTC."""
    from muomni.talker import Talker

    k, n_q, vocab = cfg.talker, cfg.codec.n_codebooks, cfg.codec.codebook_size + 3
    spell = k.spell_slots * steps * (len(k.spell_chars) + 1) * 4 + ctc_bytes(k.spell_slots * steps, text) \
        if k.spell_weight > 0 else 0
    heads = utterances * (steps * n_q * (half * k.d_model + 4 * vocab) + spell)
    copies = 2 * n_q * k.d_model * vocab if half == 2 else 0
    return _part("talker", _params(lambda: Talker(k, cfg.codec, cfg.thinker.d_model)), k,
                 utterances * (text + steps), half, heads + copies)


def head_bytes(vocab: int, d_model: int, tokens: int, half: int) -> int:
    """The Thinker's fused head + cross-entropy (`muomni.thinker.linear_cross_entropy`): its logits
    workspace, the head's fp32 gradient and the hidden states' gradient, all made in the forward pass."""
    from muomni.thinker import WORKSPACE_BYTES, chunk_rows

    return min(chunk_rows(vocab, WORKSPACE_BYTES), tokens) * vocab * 4 + vocab * d_model * 4 + tokens * d_model * half


def ctc_bytes(frames: int, characters: int) -> int:
    """What CTC keeps for one utterance: the table of ``frames x (2 x characters + 1)`` paths (fp32)."""
    return frames * (2 * characters + 1) * 4


def stage_parts(cfg: OmniConfig, stage: str, train: TrainConfig, precision: str = "bf16") -> list[Part]:
    """The networks a stage holds on the GPU, with activations for ``train.batch_size`` samples."""
    from muomni.audio import AuT
    from muomni.codec import Codec
    from muomni.projector import Projector
    from muomni.thinker import Thinker
    from muomni.vision import CLIP

    half, b = PRECISION_BYTES[precision], train.batch_size
    a, v, k, t = cfg.audio, cfg.vision, cfg.talker, cfg.thinker
    copies = 2 if half == 2 else 0  # bytes per matmul weight of its bf16 copy
    if stage in ("thinker", "sft"):
        tokens = b * train.seq_len
        thinker = _part("thinker", _params(lambda: Thinker(t)), t, tokens, half,
                        head_bytes(t.vocab_size, t.d_model, tokens, half))
        if stage == "thinker":
            return [thinker]
        side = (v.image_size // v.patch_size + 1) // 2
        image_tokens = b * side * side  # one picture per chat, merged 2x2
        d_in, hidden = 4 * v.d_model, cfg.projector_hidden  # the vision projector: norm, up, GELU, down
        projector = image_tokens * (4 * d_in + 8 + half * (d_in + 2 * hidden)) + copies * hidden * (d_in + t.d_model)
        projectors = _params(lambda: Projector(2 * a.d_model, hidden, t.d_model)) \
            + _params(lambda: Projector(d_in, hidden, t.d_model))
        codec = sum(p.numel() for p in Codec(cfg.codec).parameters())  # small, and its mel filterbank
        # cannot be built on the meta device
        return [thinker, Part("projectors", projectors, True, projector, projector),
                _talker(cfg, spoken_answers(b), SPOKEN_TOKENS,
                        int(SPOKEN_TOKENS * CODE_FRAMES_PER_TOKEN) + cfg.codec.n_codebooks, half),
                Part("audio", _params(lambda: AuT(a)), False), Part("vit", _params(lambda: CLIP(v, 1).vision), False),
                Part("codec", codec, False)]
    if stage == "audio":
        frames = int(a.max_seconds * 100)  # 100 mel frames per second
        tokens, m, c = -(-frames // 4), a.n_mels, a.conv_channels  # 25 Hz after the two stride-2 convs
        vocab = len(a.ctc_vocab) + 1
        # per 25 Hz token: the convs' inputs and outputs (4 mel frames, 2 + 2 + 1 + 1 conv columns),
        # the CTC head's input and fp32 log-probabilities; per utterance the CTC table
        frontend = tokens * (half * (4 * m + 6 * c) + half * a.d_model + 4 * vocab + 12)
        extra = b * (frontend + ctc_bytes(tokens, int(a.max_seconds * CHARACTERS_PER_SECOND))) \
            + copies * (3 * m * c + 3 * c * c + c * a.d_model + a.d_model * vocab)
        return [_part("audio", _params(lambda: AuT(a)), a, b * tokens, half, extra)]
    if stage == "vision":
        patches = (v.image_size // v.patch_size) ** 2 + 1
        side = (v.image_size // v.patch_size + 1) // 2
        pixels = 3 * v.image_size**2 * half if half == 2 else 0  # the bf16 copy of each image
        heads = len(v.attribute_classes) * side * side * 4 * v.d_model * half  # each head's input
        # A conv stem (`vision.conv_stem`) keeps per layer its output (the norm's input) and the ReLU's
        # output, which the next convolution reads. (CUDA's autocast runs the norm in fp32: up to twice this.)
        sides = [v.image_size >> layer for layer in range(1, v.patch_size.bit_length())] if v.conv_stem else []
        stem = sum(v.conv_stem * s * s * 2 * half for s in sides)
        clip = _params(lambda: CLIP(v, t.vocab_size))
        text = dataclasses.replace(v, n_layers=v.text_layers, causal=v.text_causal)
        return [_part("vit", clip - _params(lambda: CLIP(v, t.vocab_size).text), v, b * patches, half,
                      b * (pixels + heads + stem) + copies * 3 * v.patch_size**2 * v.d_model, rope=False),
                _part("text tower", _params(lambda: CLIP(v, t.vocab_size).text), text, b * v.text_max_len, half,
                      rope=False, recompute=False)]
    if stage == "speech":
        text = int(k.max_frames / (1 + CODE_FRAMES_PER_TOKEN))  # the prefix; code steps fill max_frames
        return [_talker(cfg, b, text, k.max_frames - text, half)]
    raise ValueError(f"no memory plan for stage '{stage}'")


STAGE_ORDER = ("thinker", "audio", "vision", "speech", "sft")


def stage_train_config(stage: str, preset: str) -> tuple[TrainConfig, str]:
    """The stage's training settings for ``preset`` and where they came from ("stage" or "default")."""
    from muomni.train.stages import STAGES, stage_module

    try:
        return stage_module(stage).TRAIN_DEFAULTS[preset], "stage"
    except ModuleNotFoundError as error:
        if error.name != STAGES[stage]:
            raise
        return TrainConfig(), "default"


def plan_rows(preset: str, batch_size: int | None = None, precision: str = "bf16") -> list[dict]:
    """One row per stage: parameter counts and the four memory piles in bytes, at each stage's
    configured batch or at ``batch_size``, under bf16 autocast or in fp32."""
    cfg = load_preset(preset)
    rows = []
    for stage in STAGE_ORDER:
        train, source = stage_train_config(stage, preset)
        if batch_size is not None:
            train, source = dataclasses.replace(train, batch_size=batch_size), "asked"
        parts = stage_parts(cfg, stage, train, precision)
        params = sum(p.params for p in parts)
        trainable = sum(p.params for p in parts if p.trainable)
        rows.append({"stage": stage, "batch": train.batch_size, "batch_from": source, "params": params,
                     "trainable": trainable, "weights": 4 * params, "grads": 4 * trainable,
                     "adamw": 8 * trainable, "activations": sum(p.activations for p in parts),
                     "activations_ckpt": sum(p.activations_ckpt for p in parts)})
    for row in rows:
        states = row["weights"] + row["grads"] + row["adamw"]
        row["total"], row["total_ckpt"] = states + row["activations"], states + row["activations_ckpt"]
    return rows


def table(rows: list[dict], budget_gb: float) -> str:
    """The plan as a Markdown table (sizes in GB)."""
    lines = ["| stage | batch | params (M) trainable/total | weights | grads | AdamW | activations "
             "| act. w/ ckpt | total | total w/ ckpt | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fits = "yes" if r["total"] < budget_gb * GB else ("with ckpt" if r["total_ckpt"] < budget_gb * GB else "no")
        cells = [r["weights"], r["grads"], r["adamw"], r["activations"], r["activations_ckpt"], r["total"],
                 r["total_ckpt"]]
        lines.append(f"| {r['stage']} | {r['batch']} | {r['trainable'] / 1e6:.1f}/{r['params'] / 1e6:.1f} | "
                     + " | ".join(f"{x / GB:.2f}" for x in cells) + f" | {fits} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """`muomni plan --preset base [--budget-gb 12] [--measure [--measure-batch 2] [--device auto]]`."""
    rows = plan_rows(args.preset)
    print(f"memory plan for preset '{args.preset}' (GB, bf16 autocast, AdamW, flash attention) "
          f"against {args.budget_gb:g} GB")
    print(table(rows, args.budget_gb), end="")
    defaults = [r["stage"] for r in rows if r["batch_from"] == "default"]
    if defaults:
        print(f"(batch of {', '.join(defaults)}: TrainConfig default, the stage module is not present)")
    if args.measure:
        from muomni.train.memory_measure import print_measured
        from muomni.train.trainer import pick_device

        print_measured(args.preset, args.measure_batch, pick_device(args.device))
    return 0
