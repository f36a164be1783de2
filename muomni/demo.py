"""`muomni demo` (`make demo`): the whole course in one command.

1. builds the default world into ``data/world`` when it is missing (`muomni.data.world`);
2. trains the stages thinker, audio, vision, speech and sft through the stage registry, one
   progress line per stage with its wall time; a stage whose ``run.json`` says finished is reused;
3. runs the evaluation suite (`muomni.eval`) and prints its table;
4. answers sample prompts from the held-out chats in every modality (a text question, an image
   question, a spoken question about an image, a video question) and speaks one answer into
   ``demo_out/answer.wav``.

A stage that is missing or fails is reported as such and the demo goes on with what exists; the
summary at the end says what ran, what was reused and what failed.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import soundfile

DEMO_STAGES = ("thinker", "audio", "vision", "speech", "sft")
SAMPLE_KINDS = {  # chat kind -> what the sample shows
    "text_qa": "text question",
    "image_qa": "image question",
    "spoken_qa": "spoken question about an image",
    "video_qa": "video question",
}


def _line(message: str) -> None:
    print(message, flush=True)


def build_world(preset: str, data_dir: Path) -> str:
    """Build the world unless ``data_dir/world.json`` marks it complete and current; returns a status word."""
    from muomni.data.world import VERSION, build_world as build, preset_config

    marker = data_dir / "world.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION:
        _line(f"[world]   {data_dir} is complete: reused")
        return "reused"

    start = time.time()
    _line(f"[world]   building the {preset} world into {data_dir} ...")
    build(preset_config(preset), data_dir, log=lambda message: _line(f"[world]   {message}"))
    _line(f"[world]   built in {time.time() - start:.0f} s")
    return "built"


def train_stages(preset: str, data_dir: Path, runs_dir: Path) -> dict[str, str]:
    """Train each demo stage unless finished; returns stage -> 'reused' / 'trained (Ns)' / 'failed: ...'."""
    from muomni.train.stages import is_finished, stage_module

    status: dict[str, str] = {}
    for number, stage in enumerate(DEMO_STAGES, 1):
        tag = f"[{number}/{len(DEMO_STAGES)} {stage}]"
        if is_finished(runs_dir, stage):
            status[stage] = "reused"
            _line(f"{tag} finished earlier: reusing {runs_dir / stage}")
            continue
        start = time.time()
        _line(f"{tag} training ...")
        try:
            module = stage_module(stage)
            module.train(preset, data_dir, runs_dir, [], False)
        except ImportError as error:
            status[stage] = f"missing: {error}"
            _line(f"{tag} NOT TRAINED: its module is missing ({error})")
            continue
        except Exception as error:  # a failed stage must not hide the ones that work
            status[stage] = f"failed: {type(error).__name__}: {error}"
            _line(f"{tag} FAILED after {time.time() - start:.0f} s: {type(error).__name__}: {error}")
            traceback.print_exc()
            continue
        seconds = time.time() - start
        status[stage] = f"trained in {seconds:.0f} s"
        _line(f"{tag} trained in {seconds:.0f} s -> {runs_dir / stage}")
    return status


def run_eval(data_dir: Path, runs_dir: Path) -> str:
    """Evaluate each trained stage (one failing does not stop the rest); print and write the table."""
    from muomni.eval import evaluate_stages, markdown_table

    start = time.time()
    _line("[eval]    evaluating every trained stage on the test and comp splits ...")
    results, failed = {}, []
    for stage in DEMO_STAGES:
        try:
            results.update(evaluate_stages([stage], runs_dir, data_dir))
        except Exception as error:
            failed.append(stage)
            _line(f"[eval]    {stage} FAILED: {type(error).__name__}: {error}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (runs_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    (runs_dir / "eval.md").write_text(f"# μOmni evaluation ({runs_dir})\n\n{table}")
    _line(f"[eval]    done in {time.time() - start:.0f} s: {runs_dir / 'eval.json'}, {runs_dir / 'eval.md'}")
    _line("")
    _line(table)
    return f"failed for {', '.join(failed)}" if failed else "done"


def pick_samples(data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """One held-out chat per sample kind (the first of each kind in ``chat/test.jsonl``)."""
    from muomni.train.stage_sft import is_video_caption

    path = data_dir / "chat" / "test.jsonl"
    picked: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        kind = row["kind"]
        if is_video_caption(row):  # show a motion question
            continue
        if kind in SAMPLE_KINDS and kind not in picked:
            picked[kind] = row
    return [(kind, picked[kind]) for kind in SAMPLE_KINDS if kind in picked]


def describe(messages: list[dict[str, Any]]) -> str:
    parts = []
    content = messages[0]["content"]
    for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
        parts.append(part["text"] if part["type"] == "text" else f"<{part['type']} {Path(part['path']).name}>")
    return " ".join(parts)


def answer_samples(data_dir: Path, runs_dir: Path, out_dir: Path) -> str:
    """Ask the trained model one question per modality and speak one answer into ``out_dir``."""
    from muomni.omni import OmniModel
    from muomni.train.stages import is_finished

    if not is_finished(runs_dir, "sft"):
        _line(f"[answers] skipped: there is no whole model ({runs_dir / 'sft'} did not finish)")
        return "skipped"
    model = OmniModel.load(runs_dir / "sft")
    chat_dir = data_dir / "chat"
    _line(f"[answers] {runs_dir / 'sft'} answers held-out questions it never saw:")
    spoken = None
    for kind, row in pick_samples(data_dir):
        question = row["messages"][:-1]
        text = model.chat(question, max_new_tokens=32, base_dir=chat_dir)
        _line(f"  {SAMPLE_KINDS[kind]}: {describe(question)}")
        _line(f"    muomni: {text.strip()}   (expected: {row['messages'][-1]['content']})")
        if kind == "image_qa":
            spoken = question
    if spoken is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        text, wave = model.chat(spoken, speak=True, max_new_tokens=32, base_dir=chat_dir)
        path = out_dir / "answer.wav"
        soundfile.write(path, wave.float().numpy(), model.cfg.codec.sample_rate)
        _line(f"  spoken answer to the image question ('{text.strip()}'): {path} "
              f"({wave.numel() / model.cfg.codec.sample_rate:.1f} s)")
    return "done"


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_dir, out_dir = Path(args.data), Path(args.out)
    runs_dir = Path(args.runs or f"runs/{args.preset}")
    _line(f"μOmni demo: preset {args.preset}, data {data_dir}, runs {runs_dir}, outputs {out_dir}")
    build_world(args.preset, data_dir)
    status = train_stages(args.preset, data_dir, runs_dir)
    evaluated = run_eval(data_dir, runs_dir)
    answered = answer_samples(data_dir, runs_dir, out_dir)
    _line("")
    _line(f"demo finished in {(time.time() - start) / 60:.1f} min")
    for stage, state in status.items():
        _line(f"  {stage:8s} {state}  ({runs_dir / stage})")
    _line(f"  eval     {evaluated}  ({runs_dir / 'eval.md'})")
    _line(f"  answers  {answered}  ({out_dir / 'answer.wav'})")
    _line(f"talk to it: muomni chat --ckpt {runs_dir / 'sft'} --image <picture.png> \"what colour is the circle?\"")
    failed = [stage for stage, state in status.items() if state.startswith(("failed", "missing"))]
    return 1 if failed or evaluated != "done" else 0
