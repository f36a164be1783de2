"""`muomni bench thinker` runs end to end on the tiny preset and reports every figure."""

import argparse

import pytest
import torch

from muomni.bench import BenchError, bench_thinker, main


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
    # The tiny preset ties its head; the reference never does.
    assert result["params"]["reference"] - result["params"]["ours"] == 1024 * 128


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
