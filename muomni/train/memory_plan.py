"""`muomni plan`: an analytic estimate of the GPU memory each training stage needs.

Training memory is four piles (Rajbhandari et al., 2020, "ZeRO", section 3):

- weights: fp32 master copies, 4 bytes per parameter (bf16 autocast casts on the fly);
- gradients: 4 bytes per *trainable* parameter;
- AdamW state: two fp32 moments, 8 bytes per trainable parameter;
- activations saved for the backward pass: per token and layer, the block inputs and the outputs of
  every matmul, norm and nonlinearity (bf16 under autocast, the residual stream in fp32), see
  `block_activation_bytes`. Attention is assumed flash/memory-efficient (no ``seq x seq`` matrix).
  Gradient checkpointing keeps only each block's input and recomputes one block at a time, so
  ``n_layers x full`` becomes ``n_layers x input + one block``.

Frozen networks (the Thinker while the Talker trains, the encoders during SFT) run under no_grad:
their weights count, their activations do not. The CUDA context (~0.5 GB) and allocator
fragmentation are not included; `muomni bench train` measures the real peak to compare.
"""

from __future__ import annotations

from dataclasses import dataclass

from muomni.config import OmniConfig, TrainConfig, TransformerConfig, preset as load_preset

GB = 1024**3


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


def block_activation_bytes(cfg: TransformerConfig) -> int:
    """Bytes one token stores for the backward pass in one block under bf16 autocast."""
    d, hd, h, kv, ff = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    residual = 2 * 4 * d  # the two norm inputs, fp32
    normed = 2 * 2 * d  # the two norm outputs (matmul inputs)
    qkv = 2 * (h + 2 * kv) * hd * 2  # projection output, and q/k/v after rotary (attention inputs)
    attention = 2 * h * hd + 4 * h  # attention output (out-projection input) + log-sum-exp
    mlp = 8 * ff if cfg.mlp == "swiglu" else 4 * ff  # gate|up (2ff), silu, product / up, gelu
    if cfg.n_experts:
        mlp *= cfg.n_experts_per_token
    return residual + normed + qkv + attention + mlp


def stack_activations(cfg: TransformerConfig, tokens: int, checkpointing: bool) -> int:
    """Activation bytes of a stack over ``tokens`` tokens (batch x sequence)."""
    block = block_activation_bytes(cfg)
    if checkpointing:
        return tokens * (cfg.n_layers * 4 * cfg.d_model + block)
    return tokens * cfg.n_layers * block


@dataclass
class Part:
    """One network of a stage: its parameters, and its activations if gradients flow through it."""

    name: str
    params: int
    trainable: bool
    activations: int = 0  # bytes for the batch, without checkpointing
    activations_ckpt: int = 0  # bytes for the batch, with checkpointing


def _transformer_part(name: str, cfg: TransformerConfig, extra_params: int, tokens: int,
                      trainable: bool = True, extra_act_per_token: int = 0) -> Part:
    act = stack_activations(cfg, tokens, False) + tokens * extra_act_per_token
    act_ckpt = stack_activations(cfg, tokens, True) + tokens * extra_act_per_token
    return Part(name, stack_params(cfg) + extra_params, trainable, act if trainable else 0,
                act_ckpt if trainable else 0)


def _thinker(cfg: OmniConfig, tokens: int, trainable: bool = True) -> Part:
    t = cfg.thinker
    embeddings = t.vocab_size * t.d_model * (1 if t.tie_embeddings else 2)
    # embedding output (fp32) per token; the chunked head holds its fp32 logits workspace (at most
    # 128 MiB, 1024 rows at a 32k vocabulary) and the head's fp32 gradient: 1024 x vocab x 8 bytes
    part = _transformer_part("thinker", t, embeddings, tokens, trainable, 4 * t.d_model)
    if trainable:
        head = 1024 * t.vocab_size * 4 * 2
        part.activations += head
        part.activations_ckpt += head
    return part


def stage_parts(cfg: OmniConfig, stage: str, train: TrainConfig) -> list[Part]:
    """The networks a stage holds in memory, with activations for ``train.batch_size`` samples."""
    b = train.batch_size
    a, v, c, k = cfg.audio, cfg.vision, cfg.codec, cfg.talker
    audio_tokens = int(a.max_seconds * 25)  # 25 Hz after the 4x conv downsampling of 100 Hz mels
    audio_frontend = a.n_mels * a.conv_channels * 3 + a.conv_channels**2 * 3 + a.conv_channels * a.d_model
    ctc_head = a.d_model * (len(a.ctc_vocab) + 1)
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vit_embed = 3 * v.patch_size**2 * v.d_model + patches * v.d_model
    text_tower_params = {f: getattr(v, f) for f in TransformerConfig.__dataclass_fields__}
    text_tower = TransformerConfig(**{**text_tower_params, "n_layers": v.text_layers})
    codec = 2 * (c.frames_per_code * c.n_mels * c.hidden * 3 + 4 * c.hidden**2 * 3) \
        + c.n_codebooks * c.codebook_size * c.codebook_dim
    talker_extra = 2 * c.n_codebooks * (c.codebook_size + 2) * k.d_model \
        + 2 * cfg.thinker.d_model * k.d_model + k.d_model**2
    projectors = (2 * a.d_model + 4 * v.d_model + 2 * cfg.thinker.d_model) * cfg.projector_hidden
    if stage == "thinker":
        return [_thinker(cfg, b * train.seq_len)]
    if stage == "audio":
        frontend_act = 4 * a.n_mels * 4 + 2 * a.conv_channels * 2 * 3  # per 25 Hz token: 4 mel frames, convs
        return [_transformer_part("audio", a, audio_frontend + ctc_head, b * audio_tokens,
                                  extra_act_per_token=frontend_act)]
    if stage == "vision":
        return [_transformer_part("vit", v, vit_embed + v.d_model * v.embed_dim, b * patches),
                _transformer_part("text tower", text_tower, cfg.thinker.vocab_size * v.d_model,
                                  b * v.text_max_len)]
    if stage == "speech":
        return [_thinker(cfg, 0, trainable=False), Part("codec", codec, False),
                _transformer_part("talker", k, talker_extra, b * k.max_frames)]
    if stage == "sft":
        return [_thinker(cfg, b * train.seq_len), Part("projectors", projectors, True),
                Part("audio", stack_params(a) + audio_frontend, False),
                Part("vit", stack_params(v) + vit_embed, False),
                Part("talker", stack_params(k) + talker_extra, False), Part("codec", codec, False)]
    raise ValueError(f"no memory plan for stage '{stage}'")


def plan_rows(preset: str) -> list[dict]:
    """One row per stage: parameter counts and the four memory piles in bytes."""
    from muomni.train.stages import STAGES, stage_module

    cfg = load_preset(preset)
    rows = []
    for stage in ("thinker", "audio", "vision", "speech", "sft"):
        try:
            train = stage_module(stage).TRAIN_DEFAULTS[preset]
            source = "stage"
        except ModuleNotFoundError as error:
            if error.name != STAGES[stage]:
                raise
            train, source = TrainConfig(), "default"
        parts = stage_parts(cfg, stage, train)
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
    """`muomni plan --preset base [--budget-gb 12]`."""
    rows = plan_rows(args.preset)
    print(f"memory plan for preset '{args.preset}' (GB, bf16 autocast, AdamW, flash attention) "
          f"against {args.budget_gb:g} GB")
    print(table(rows, args.budget_gb), end="")
    defaults = [r["stage"] for r in rows if r["batch_from"] == "default"]
    if defaults:
        print(f"(batch of {', '.join(defaults)}: TrainConfig default, the stage module is not present)")
    return 0
