"""The memory plan against a measurement: one training step of each `base` stage, counted from its tensors."""

import pytest
import torch

from muomni.train.memory_measure import measure_rows
from muomni.train.memory_plan import STAGE_ORDER, plan_rows


@pytest.fixture(scope="module")
def measured():
    # Batch 1: the plan scales with the batch, so agreeing here is agreeing at the configured batch.
    return measure_rows("base", batch_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("precision,suffix", [("bf16", ""), ("fp32", "_fp32")])
def test_plan_agrees_with_the_measured_step_within_20_percent(measured, precision, suffix):
    planned = plan_rows("base", batch_size=1, precision=precision)
    assert [r["stage"] for r in measured] == list(STAGE_ORDER)
    for plan, real in zip(planned, measured):
        states = [r["weights"] + r["grads"] + r["adamw"] for r in (plan, real)]
        assert states[1] == pytest.approx(states[0], rel=0.2), plan["stage"]
        for key in ("activations", "activations_ckpt"):
            assert real[key + suffix] == pytest.approx(plan[key], rel=0.2), (plan["stage"], key, precision)


def test_checkpointing_keeps_less(measured):
    for row in measured:
        assert row["activations_ckpt"] < row["activations"] and row["activations_ckpt_fp32"] < row["activations_fp32"]


def test_plan_measure_prints_both_columns(capsys):
    from muomni.cli import main

    assert main(["plan", "--preset", "tiny", "--measure", "--measure-batch", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for preset 'tiny'" in out and "plan / measured on cpu at batch 1" in out
    assert all(f"| {stage} | 1 |" in out for stage in STAGE_ORDER)
