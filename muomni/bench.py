"""`muomni bench`: throughput of the Thinker beside a plain Llama-style reference, as JSON.

``muomni bench thinker --preset base`` measures, for the Thinker and for `bench_reference.ReferenceLM`
built with the same shapes (the reference's head is always untied):

- training tokens/s: forward + backward + AdamW on batches of 8 x 256 random tokens;
- greedy decoding tokens/s with the KV cache (and for the Thinker also without it), batch 1,
  a 32-token prompt and 128 new tokens;
- parameter counts and peak memory (CUDA only);
- the matmul FLOPs of one training step, the rate each model reaches, and the device's measured
  fp32 matmul peak. Both models do the same matmuls, so ``train_ceiling_vs_reference`` (peak over
  the reference's rate) is the largest training ratio any implementation could show on this
  machine: one that spent no time outside its matmuls and ran every one at the peak.

The two models are timed in alternating rounds, so a machine that is busy with other work slows
both alike, and the fastest round of each is reported (as `timeit` does: it is the round least
disturbed by that other work). ``muomni bench train`` times a training stage on the world
(`muomni.train.bench_train`), ``muomni bench gpu`` every stage on a CUDA GPU (`muomni.train.bench_gpu`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from muomni.bench_reference import ReferenceLM
from muomni.config import ThinkerConfig, preset
from muomni.thinker import Thinker

TRAIN_BATCH, TRAIN_SEQ = 8, 256
PROMPT_LEN, NEW_TOKENS = 32, 128
PEAK_MATMUL_SIZE = 2048  # square fp32 matmuls timed for the device's peak


class BenchError(ValueError):
    """A benchmark that cannot run as asked."""


def main(args: argparse.Namespace) -> int:
    if args.what in ("train", "gpu"):
        return importlib.import_module(f"muomni.train.bench_{args.what}").main(args)
    if args.what != "thinker":
        raise BenchError(f"unknown benchmark '{args.what}'; choose 'thinker', 'train' or 'gpu'")
    if args.threads:
        torch.set_num_threads(args.threads)
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


def bench_thinker(preset_name: str, device: torch.device, steps: int = 3, rounds: int = 5,
                  batch: int = TRAIN_BATCH, seq: int = TRAIN_SEQ, prompt_len: int = PROMPT_LEN,
                  new_tokens: int = NEW_TOKENS) -> dict:
    """Time both models in ``rounds`` alternating rounds of ``steps`` training steps and one generation."""
    cfg = preset(preset_name).thinker
    torch.manual_seed(0)
    ours = Thinker(cfg).to(device)
    reference = ReferenceLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
                            cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps).to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)

    train = {"ours": train_step(ours, lambda: ours.loss(inputs, targets)),
             "reference": train_step(reference, lambda: reference.loss(inputs, targets))}
    decode = {
        "ours_cached": lambda: ours.generate(prompt, max_new_tokens=new_tokens, stop_ids=()),
        "ours_uncached": lambda: ours.generate(prompt, max_new_tokens=new_tokens, stop_ids=(), use_cache=False),
        "reference_cached": lambda: reference.generate(prompt, new_tokens),
    }
    for step in train.values():  # warm up: first calls allocate and pick kernels
        step()
        step()
    for run in decode.values():
        run()

    wall = {name: [] for name in [*train, *decode]}
    cpu = {name: [] for name in wall}
    peak_before = matmul_peak_gflop_s(device)  # measured again after the rounds, outside their timing
    for _ in range(rounds):
        for name, step in train.items():
            seconds, cpu_seconds = timed(lambda: [step() for _ in range(steps)], device)
            wall[name].append(seconds / steps)
            cpu[name].append(cpu_seconds / steps)
        for name, run in decode.items():
            seconds, cpu_seconds = timed(run, device)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    # Tokens per second of wall-clock time, and per second of this process's CPU time: the second
    # stays meaningful on a machine shared with other work when running one thread.
    tokens = {"ours": batch * seq, "reference": batch * seq}
    per_s = {clock: {name: round(tokens.get(name, new_tokens) / min(times[name]), 1)
                     for name in times} for clock, times in (("wall", wall), ("cpu", cpu))}

    def ratios(rate: dict[str, float]) -> dict[str, float]:
        return {"train_vs_reference": round(rate["ours"] / rate["reference"], 3),
                "decode_cached_vs_reference": round(rate["ours_cached"] / rate["reference_cached"], 3),
                "decode_cached_vs_uncached": round(rate["ours_cached"] / rate["ours_uncached"], 3)}

    flops = train_step_flops(cfg, batch, seq)
    peak = max(peak_before, matmul_peak_gflop_s(device))
    achieved = {name: flops / min(wall[name]) / 1e9 for name in train}
    result = {
        "preset": preset_name, "device": str(device), "dtype": "float32", "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "optimizer": "torch.optim.AdamW(fused=True), the same for both models",
        "shapes": {"vocab": cfg.vocab_size, "layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                   "kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff, "tied": cfg.tie_embeddings,
                   "train_batch": [batch, seq], "prompt": prompt_len, "new_tokens": new_tokens},
        "params": {"ours": ours.num_parameters(), "reference": sum(p.numel() for p in reference.parameters())},
        "tokens_per_s": {
            clock: {"ours": {"train": rate["ours"], "decode_cached": rate["ours_cached"],
                             "decode_uncached": rate["ours_uncached"]},
                    "reference": {"train": rate["reference"], "decode_cached": rate["reference_cached"]}}
            for clock, rate in per_s.items()},
        "ratios": {clock: ratios(rate) for clock, rate in per_s.items()},
        "utilisation": {
            "train_step_gflop": round(flops / 1e9, 2),
            "train_gflop_s": {name: round(rate, 1) for name, rate in achieved.items()},
            "matmul_peak_gflop_s": round(peak, 1),
            "train_ceiling_vs_reference": round(peak / achieved["reference"], 3),
        },
        "rounds": rounds, "train_steps_per_round": steps,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def train_step_flops(cfg: ThinkerConfig, batch: int, seq: int) -> int:
    """Matmul FLOPs of one training step of ``batch`` x ``seq`` tokens (2 per multiply-add).

    Per token and layer: the q/k/v, output, gate/up and down projections, and causal attention's
    two products (scores, weighted values) over (seq + 1) / 2 keys on average; then the vocabulary
    head. The backward pass costs twice the forward (gradients of inputs and of weights).
    """
    d, hd = cfg.d_model, cfg.head_dim
    projections = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d + 3 * d * cfg.d_ff
    attention = 2 * cfg.n_heads * hd * (seq + 1) / 2
    forward = 2 * batch * seq * (cfg.n_layers * (projections + attention) + d * cfg.vocab_size)
    return int(3 * forward)


def matmul_peak_gflop_s(device: torch.device, size: int = PEAK_MATMUL_SIZE, repeats: int = 5) -> float:
    """The fastest of ``repeats`` fp32 ``(size, size) @ (size, size)`` products, in GFLOP/s.

    The product is written into one preallocated tensor, so only the arithmetic is timed.
    `bench_thinker` measures it before and after its rounds and keeps the faster.
    """
    a, b, out = (torch.randn(size, size, device=device) for _ in range(3))
    torch.mm(a, b, out=out)  # warm up
    seconds = min(timed(lambda: torch.mm(a, b, out=out), device)[0] for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], clip: float = 0.0) -> Callable[[], None]:
    """One forward + backward + AdamW step of ``model``, as the trainer takes it (with ``clip`` > 0,
    the gradient norm is clipped to it first, as the trainer does)."""
    model.train()
    optimizer = make_optimizer(model)
    trained = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # The fused kernel updates every tensor in one pass (on CPU too): several times faster than
    # the default loop, and the same for both models so only the models are compared.
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
