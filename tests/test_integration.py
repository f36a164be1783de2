"""End to end: a very small world, every stage for a few steps, evaluation, and the whole model talking."""

from __future__ import annotations

import json

import pytest

from muomni.omni import OmniModel, SpeechError
from muomni.train.stages import is_finished, stage_module
from omni_fixtures import train_small_world

STAGES = ("thinker", "audio", "vision", "speech", "sft")
# Small models and a handful of steps: this checks the plumbing, not the learning.
OVERRIDES = [
    "train.steps=3", "train.batch_size=4", "train.eval_every=0", "train.save_every=3", "train.log_every=1",
    "train.seq_len=64", "train.warmup_steps=1",
    "thinker.d_model=64", "thinker.n_layers=1", "thinker.d_ff=128", "thinker.mrope_section=[4,2,2]",
    "audio.d_model=32", "audio.n_layers=1", "audio.n_heads=2", "audio.n_kv_heads=2", "audio.d_ff=64",
    "audio.conv_channels=32",
    "vision.d_model=32", "vision.n_layers=1", "vision.n_heads=2", "vision.n_kv_heads=2", "vision.d_ff=64",
    "vision.embed_dim=32", "vision.text_layers=1",
    "codec.hidden=32", "codec.codebook_size=16", "codec.codebook_dim=8",
    "talker.d_model=32", "talker.n_layers=1", "talker.n_heads=2", "talker.n_kv_heads=2", "talker.d_ff=64",
    "talker.max_frames=12", "projector_hidden=64",
]
STAGE_OVERRIDES = {"speech": ["codec_train.steps=3", "codec_train.batch_size=4", "codec_train.eval_every=0",
                              "codec_train.save_every=3", "codec_train.log_every=1"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    world = {"scenes": 40, "utterances": 60, "clips": 20, "eval_clips": 6, "stories": 60, "chats": 80,
             "eval_questions": 8}
    return train_small_world(tmp_path_factory.mktemp("integration"), "tiny", world, STAGES, OVERRIDES,
                             STAGE_OVERRIDES)


@pytest.mark.slow
def test_every_stage_trains_and_evaluates(trained):
    data, runs = trained
    for stage in STAGES:
        assert is_finished(runs, stage), stage
        metrics = stage_module(stage).evaluate(runs, data)
        assert set(metrics) >= {"test"}, stage
        assert json.loads((runs / stage / "run.json").read_text())["finished"]
    sft = stage_module("sft").evaluate(runs, data)["test"]
    assert {"image_qa_acc", "text_qa_acc"} <= set(sft)
    assert all(0.0 <= value <= 1.0 for key, value in sft.items() if key.endswith("_acc"))


@pytest.mark.slow
def test_the_finished_model_answers_and_speaks(trained):
    data, runs = trained
    model = OmniModel.load(runs / "sft")
    row = json.loads((data / "chat" / "test.jsonl").read_text().splitlines()[0])
    text = model.chat(row["messages"][:-1], max_new_tokens=4, base_dir=data / "chat")
    assert isinstance(text, str)
    try:  # a three-step model may well answer with blank lines: then there is nothing to speak, and it says so
        spoken, wave = model.chat(row["messages"][:-1], speak=True, max_new_tokens=4, base_dir=data / "chat")
        assert spoken == text and spoken.strip() and wave.dim() == 1 and wave.numel() > 0
    except SpeechError as error:
        assert not text.strip() and "nothing to speak" in str(error)


@pytest.mark.slow
def test_bench_train_times_a_stage_with_its_own_code_and_leaves_the_runs_alone(trained):
    from muomni.train.bench_train import bench_stage

    data, runs = trained
    before = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*"))
    result = bench_stage("speech", "tiny", steps=1, device="cpu", data_dir=data, runs_dir=runs)
    assert set(result["runs"]) == {"speech/codec", "speech/talker"}  # two networks, each timed
    assert all(run["tokens_per_s"] > 0 and run["step_s"] > 0 for run in result["runs"].values())
    assert result["peak_memory_gb"] is None and result["plan_gb"]["total"] > 0  # no CUDA here
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*")) == before
