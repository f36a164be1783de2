"""`muomni bench`: throughput of the Thinker beside a plain Llama-style reference, as JSON.

``muomni bench thinker --preset base`` measures, for the Thinker and for `bench_reference.ReferenceLM`
built with the same shapes (the reference's head is always untied):

- training tokens/s: forward + backward + AdamW on batches of 8 x 256 random tokens;
- greedy decoding tokens/s with the KV cache (and for the Thinker also without it), batch 1,
  a 32-token prompt and 128 new tokens;
- parameter counts and peak memory (CUDA only).

The two models are timed in alternating rounds and the median round is reported, so a machine
that is busy with other work slows both alike. ``muomni bench train`` times a training stage
(`muomni.train.bench_train`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from muomni.bench_reference import ReferenceLM
from muomni.config import preset
from muomni.thinker import Thinker

TRAIN_BATCH, TRAIN_SEQ = 8, 256
PROMPT_LEN, NEW_TOKENS = 32, 128


class BenchError(ValueError):
    """A benchmark that cannot run as asked."""


def main(args: argparse.Namespace) -> int:
    if args.what == "train":
        return importlib.import_module("muomni.train.bench_train").main(args)
    if args.what != "thinker":
        raise BenchError(f"unknown benchmark '{args.what}'; choose 'thinker' or 'train'")
    result = bench_thinker(args.preset, device=pick_device(args.device), steps=args.steps or 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bench_thinker(preset_name: str, device: torch.device, steps: int = 3, rounds: int = 3) -> dict:
    """Time both models in ``rounds`` alternating rounds of ``steps`` training steps and one generation."""
    cfg = preset(preset_name).thinker
    torch.manual_seed(0)
    ours = Thinker(cfg).to(device)
    reference = ReferenceLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
                            cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps).to(device)
    ids = torch.randint(0, cfg.vocab_size, (TRAIN_BATCH, TRAIN_SEQ + 1), device=device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), device=device)

    train = {"ours": train_step(ours, lambda: ours.loss(inputs, targets)),
             "reference": train_step(reference, lambda: reference.loss(inputs, targets))}
    decode = {
        "ours_cached": lambda: ours.generate(prompt, max_new_tokens=NEW_TOKENS, stop_ids=()),
        "ours_uncached": lambda: ours.generate(prompt, max_new_tokens=NEW_TOKENS, stop_ids=(), use_cache=False),
        "reference_cached": lambda: reference.generate(prompt, NEW_TOKENS),
    }
    for step in train.values():  # warm up: first calls allocate and pick kernels
        step()
        step()
    for run in decode.values():
        run()

    train_times = {name: [] for name in train}
    decode_times = {name: [] for name in decode}
    for _ in range(rounds):
        for name, step in train.items():
            train_times[name].append(timed(lambda: [step() for _ in range(steps)], device) / steps)
        for name, run in decode.items():
            decode_times[name].append(timed(run, device))

    tokens = TRAIN_BATCH * TRAIN_SEQ
    train_tps = {name: tokens / statistics.median(t) for name, t in train_times.items()}
    decode_tps = {name: NEW_TOKENS / statistics.median(t) for name, t in decode_times.items()}
    result = {
        "preset": preset_name, "device": str(device), "dtype": "float32", "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "shapes": {"vocab": cfg.vocab_size, "layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                   "kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff, "tied": cfg.tie_embeddings,
                   "train_batch": [TRAIN_BATCH, TRAIN_SEQ], "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS},
        "ours": {
            "params": ours.num_parameters(),
            "train_tokens_per_s": round(train_tps["ours"], 1),
            "decode_cached_tokens_per_s": round(decode_tps["ours_cached"], 1),
            "decode_uncached_tokens_per_s": round(decode_tps["ours_uncached"], 1),
        },
        "reference": {
            "params": sum(p.numel() for p in reference.parameters()),
            "train_tokens_per_s": round(train_tps["reference"], 1),
            "decode_cached_tokens_per_s": round(decode_tps["reference_cached"], 1),
        },
        "ratios": {
            "train_vs_reference": round(train_tps["ours"] / train_tps["reference"], 3),
            "decode_cached_vs_reference": round(decode_tps["ours_cached"] / decode_tps["reference_cached"], 3),
            "decode_cached_vs_uncached": round(decode_tps["ours_cached"] / decode_tps["ours_uncached"], 3),
        },
        "rounds": rounds, "train_steps_per_round": steps,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One forward + backward + AdamW step of ``model``, as the trainer takes it."""
    model.train()
    optimizer = make_optimizer(model)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
