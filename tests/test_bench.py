"""`muomni bench thinker` runs end to end on the tiny preset and reports every figure."""

import argparse

import pytest
import torch

from muomni.bench import BenchError, bench_thinker, main, train_step_flops
from muomni.config import preset


def test_bench_thinker_reports_ours_and_reference():
    result = bench_thinker("tiny", torch.device("cpu"), steps=1, rounds=1, batch=2, seq=32, prompt_len=8,
                           new_tokens=8)
    for clock in ("wall", "cpu"):
        rates = result["tokens_per_s"][clock]
        assert set(rates["ours"]) == {"train", "decode_cached", "decode_uncached"}
        assert set(rates["reference"]) == {"train", "decode_cached"}
        assert all(value > 0 for side in rates.values() for value in side.values())
        assert set(result["ratios"][clock]) == {"train_vs_reference", "decode_cached_vs_reference",
                                                "decode_cached_vs_uncached"}
    use = result["utilisation"]
    assert use["matmul_peak_gflop_s"] > 0 and use["train_gflop_s"]["ours"] > 0
    assert use["train_ceiling_vs_reference"] > 1.0  # the reference does more than its matmuls
    # The tiny preset ties its head, which the reference never does, and adds a TokenMix filter of
    # ``token_mix`` taps per channel to each block, which the reference never has.
    cfg = preset("tiny").thinker
    token_mix = cfg.n_layers * cfg.d_model * cfg.token_mix
    assert result["params"]["reference"] - result["params"]["ours"] == cfg.vocab_size * cfg.d_model - token_mix


def test_train_step_flops_count_every_matmul():
    from muomni.config import ThinkerConfig

    cfg = ThinkerConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8)
    # q 4x4, k 4x2, v 4x2, out 4x4, gate/up/down 3 x 4x8 = 144 multiply-adds per token; attention
    # 2 heads x 2 dims x (3 + 1) / 2 keys x 2 products = 16; head 4 x 10 = 40. Forward x 3, x 2 FLOPs.
    assert train_step_flops(cfg, batch=2, seq=3) == 3 * 2 * 2 * 3 * (144 + 16 + 40)


def test_unknown_benchmark_is_named():
    args = argparse.Namespace(what="thinkr", preset="tiny", steps=1, device="cpu", out=None, threads=None)
    with pytest.raises(BenchError, match="thinkr"):
        main(args)


def test_bench_train_thinker_needs_no_data_and_names_unknown_stages():
    from muomni.train.bench_train import bench_stage
    from muomni.train.stages import StageError

    result = bench_stage("thinker", "tiny", steps=1, device="cpu")
    assert result["runs"]["thinker"]["tokens_per_s"] > 0 and result["plan_gb"]["total"] > 0
    with pytest.raises(StageError, match="unknown stage 'thinkr'"):
        bench_stage("thinkr", "tiny", steps=1, device="cpu")
    with pytest.raises(StageError, match="pass --data"):
        bench_stage("audio", "tiny", steps=1, device="cpu", data_dir=None)


class CpuStandIn:
    """The `bench_gpu.Accelerator` interface on the CPU, counting what the benchmark asks of it."""

    device, name = torch.device("cpu"), "a CPU standing in for a GPU"

    def __init__(self):
        self.calls = {"synchronize": 0, "reset_peak": 0}

    def synchronize(self):
        self.calls["synchronize"] += 1

    def reset_peak(self):
        self.calls["reset_peak"] += 1

    def max_memory_allocated(self):
        return 3 * 2**30


def test_bench_gpu_times_every_stage_and_projects_its_configured_steps():
    from muomni.train.bench_gpu import bench_gpu
    from muomni.train.memory_plan import STAGE_ORDER

    device = CpuStandIn()
    result = bench_gpu("tiny", device, warm=1, steps=1, batch_size=2)
    assert list(result["stages"]) == list(STAGE_ORDER) and result["device"] == device.name
    assert device.calls == {"synchronize": 2 * len(STAGE_ORDER), "reset_peak": len(STAGE_ORDER)}
    for stage, row in result["stages"].items():
        assert row["batch"] == 2 and row["step_s"] > 0 and row["peak_memory_gb"] == 3.0
        rate = next(value for key, value in row.items() if key.endswith("_per_s"))
        assert rate > 0 and row["peak_vs_plan"] == pytest.approx(3.0 / row["plan_gb"], rel=0.01)
        assert row["projected_minutes"] == pytest.approx(row["configured_steps"] * row["step_s"] / 60, abs=0.06)
    assert result["projected_hours"] > 0


def test_bench_gpu_refuses_politely_without_cuda(capsys):
    from muomni.cli import main as cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert cli(["bench", "gpu", "--preset", "base", "--out", "gpu.json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU" in err and "Traceback" not in err
