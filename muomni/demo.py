"""`muomni demo` (`make demo`): the whole course in one command.

1. builds the default world into ``data/world`` when it is missing or was made by an older version
   (`muomni.data.world`);
2. trains the stages thinker, audio, vision, speech and sft through the stage registry, two at a
   time where they do not depend on each other (`STAGE_GROUPS`), one line per stage with its wall
   time; a stage whose ``run.json`` says finished is reused;
3. runs the evaluation suite (`muomni.eval`) on the test, comp and wild splits and prints its table;
4. answers sample prompts from the held-out chats in every modality (a text question, an image
   question, a spoken question about an image, a video question; two from ``test``, one from
   ``wild``), says which answers are wrong, and speaks one answer into ``demo_out/answer.wav``.

A stage that is missing or fails is reported as such and the demo goes on with what exists; the
summary at the end says what ran, what was reused and what failed.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import soundfile

if TYPE_CHECKING:  # the model is imported where it is used: `muomni --help` stays quick
    from muomni.omni import OmniModel

DEMO_STAGES = ("thinker", "audio", "vision", "speech", "sft")
# Groups train one after the other; the stages inside a group need nothing from each other (vision
# reads the thinker's tokenizer; speech needs the thinker and the audio stage; sft needs them all).
STAGE_GROUPS = (("thinker", "audio"), ("vision", "speech"), ("sft",))
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


def _train_one(preset: str, data_dir: Path, runs_dir: Path, stage: str, threads: int,
               overrides: tuple[str, ...] = (), resume: bool = False) -> float:
    """Train one stage (in this process or a worker) with ``threads`` CPU threads; returns seconds."""
    import torch

    from muomni.train.stages import stage_module

    torch.set_num_threads(threads)
    start = time.time()
    stage_module(stage).train(preset, data_dir, runs_dir, list(overrides), resume)
    return time.time() - start


def train_side_by_side(preset: str, data_dir: Path, runs_dir: Path, stages: list[str], workers: int = 2,
                       overrides: dict[str, tuple[str, ...]] | None = None,
                       resume: bool = False) -> dict[str, tuple[float, Exception | None]]:
    """Train ``stages`` (which need nothing from each other): several at once, each in its own process
    on one CPU thread, when there are several and ``workers`` > 1; else one after the other on
    ``workers`` threads. Returns stage -> (seconds, None) or (0, the error)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    overrides = overrides or {}
    if len(stages) > 1 and workers > 1:
        os.environ["TQDM_DISABLE"] = "1"  # inherited by the workers: two bars would garble each other
        try:
            with ProcessPoolExecutor(len(stages), mp_context=multiprocessing.get_context("spawn")) as pool:
                jobs = {stage: pool.submit(_train_one, preset, data_dir, runs_dir, stage, 1,
                                           overrides.get(stage, ()), resume) for stage in stages}
                return {stage: _outcome(job.result) for stage, job in jobs.items()}
        finally:
            del os.environ["TQDM_DISABLE"]
    return {stage: _outcome(lambda s=stage: _train_one(preset, data_dir, runs_dir, s, workers,
                                                       overrides.get(s, ()), resume)) for stage in stages}


def train_stages(preset: str, data_dir: Path, runs_dir: Path, workers: int = 2) -> dict[str, str]:
    """Train each demo stage unless finished; returns stage -> 'reused' / 'trained (Ns)' / 'failed: ...'.

    Stages of one `STAGE_GROUPS` group need nothing from each other, so with ``workers`` > 1 they
    train side by side, each in its own process on one CPU thread: two small models on one thread each
    get through more work than one after the other on two threads, whose matrices are too small to
    split well. Their progress bars are turned off; each stage reports when it ends.
    """
    from muomni.train.stages import is_finished

    status: dict[str, str] = {}
    number = {stage: k for k, stage in enumerate(DEMO_STAGES, 1)}
    for group in STAGE_GROUPS:
        todo = []
        for stage in group:
            if is_finished(runs_dir, stage):
                status[stage] = "reused"
                _line(f"[{number[stage]}/{len(DEMO_STAGES)} {stage}] finished earlier: reusing {runs_dir / stage}")
            else:
                todo.append(stage)
        if not todo:
            continue
        _line(f"[{', '.join(f'{number[s]}/{len(DEMO_STAGES)} {s}' for s in todo)}] training ...")
        outcomes = train_side_by_side(preset, data_dir, runs_dir, todo, workers)
        for stage, (seconds, error) in outcomes.items():
            tag = f"[{number[stage]}/{len(DEMO_STAGES)} {stage}]"
            if error is None:
                status[stage] = f"trained in {seconds:.0f} s"
                _line(f"{tag} trained in {seconds:.0f} s -> {runs_dir / stage}")
            else:  # a failed stage must not hide the ones that work
                status[stage] = f"failed: {type(error).__name__}: {error}"
                _line(f"{tag} FAILED: {type(error).__name__}: {error}")
    return status


def _outcome(run) -> tuple[float, Exception | None]:
    """(seconds, None) when ``run()`` trains its stage, (0, the error) when it fails."""
    try:
        return run(), None
    except Exception as error:
        traceback.print_exc()
        return 0.0, error


def run_eval(data_dir: Path, runs_dir: Path) -> str:
    """Evaluate each trained stage (one failing does not stop the rest); print and write the table."""
    from muomni.eval import evaluate_stages, markdown_table

    start = time.time()
    _line("[eval]    evaluating every trained stage on the test, comp and wild splits ...")
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


def pick_samples(data_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Per sample kind, the first two held-out chats of ``chat/test.jsonl`` and the first of
    ``chat/wild.jsonl`` (when the world has one): ``[(split, kind, row), ...]``."""
    from muomni.train.stage_sft import is_video_caption

    picked = []
    for split, per_kind in (("test", 2), ("wild", 1)):
        path = data_dir / "chat" / f"{split}.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for kind in SAMPLE_KINDS:  # motion questions, not "describe the video"
            picked += [(split, kind, row) for row in rows if row["kind"] == kind and not is_video_caption(row)][:per_kind]
    return picked


def describe(messages: list[dict[str, Any]]) -> str:
    parts = []
    content = messages[0]["content"]
    for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
        parts.append(part["text"] if part["type"] == "text" else f"<{part['type']} {Path(part['path']).name}>")
    return " ".join(parts)


def ask(model: OmniModel, samples: list[tuple[str, str, dict[str, Any]]], base_dir: Path | None
        ) -> Iterator[tuple[str, str, dict[str, Any], str, bool]]:
    """Ask ``model`` each sample's question: yields ``(split, kind, row, answer, correct)``, where
    ``correct`` compares the answer with the row's own (`normalize_answer`)."""
    from muomni.train.stage_sft import normalize_answer

    for split, kind, row in samples:
        answer = model.chat(row["messages"][:-1], max_new_tokens=32, base_dir=base_dir).strip()
        yield split, kind, row, answer, normalize_answer(answer) == normalize_answer(row["messages"][-1]["content"])


def answer_samples(data_dir: Path, runs_dir: Path, out_dir: Path) -> str:
    """Ask the trained model two test questions and one wild question per modality, saying which answers
    are wrong, and speak one answer into ``out_dir``."""
    from muomni.omni import OmniModel, SpeechError
    from muomni.train.stages import is_finished

    if not is_finished(runs_dir, "sft"):
        _line(f"[answers] skipped: there is no whole model ({runs_dir / 'sft'} did not finish)")
        return "skipped"
    model = OmniModel.load(runs_dir / "sft")
    chat_dir = data_dir / "chat"
    _line(f"[answers] {runs_dir / 'sft'} answers held-out questions it never saw (wild: made by factors held "
          "out of training):")
    spoken, right, asked = None, 0, 0
    for split, kind, row, text, correct in ask(model, pick_samples(data_dir), chat_dir):
        question = row["messages"][:-1]
        right, asked = right + correct, asked + 1
        verdict = "right" if correct else f"WRONG, expected: {row['messages'][-1]['content']}"
        _line(f"  {split} {SAMPLE_KINDS[kind]}: {describe(question)}")
        _line(f"    muomni: {text or '(an empty answer)'}   ({verdict})")
        if kind == "image_qa" and spoken is None:
            spoken = question
    _line(f"  {right} of {asked} sample answers right")
    if spoken is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            text, wave = model.chat(spoken, speak=True, max_new_tokens=32, base_dir=chat_dir)
        except SpeechError as error:  # an empty answer: nothing to speak
            _line(f"  no spoken answer: {error}")
            return "done"
        path = out_dir / "answer.wav"
        soundfile.write(path, wave.float().numpy(), model.cfg.codec.sample_rate)
        _line(f"  spoken answer to the image question ('{text.strip()}'): {path} "
              f"({wave.numel() / model.cfg.codec.sample_rate:.1f} s)")
    return "done"


def finish(what: str, start: float, status: dict[str, str], data_dir: Path, runs_dir: Path, out_dir: Path) -> int:
    """Evaluate ``runs_dir``, answer the samples, print the summary of the ``what`` run; its exit code."""
    evaluated = run_eval(data_dir, runs_dir)
    answered = answer_samples(data_dir, runs_dir, out_dir)
    _line("")
    _line(f"{what} finished in {(time.time() - start) / 60:.1f} min")
    for stage, state in status.items():
        _line(f"  {stage:8s} {state}  ({runs_dir / stage})")
    _line(f"  eval     {evaluated}  ({runs_dir / 'eval.md'}); learning curve: {runs_dir / 'sft' / 'learning_curve.png'}")
    _line(f"  answers  {answered}  ({out_dir / 'answer.wav'})")
    _line(f"talk to it: muomni chat --ckpt {runs_dir / 'sft'} --image <picture.png> \"what colour is the circle?\"")
    failed = [stage for stage, state in status.items() if state.startswith("failed")]
    return 1 if failed or evaluated != "done" else 0


def main(args: argparse.Namespace) -> int:
    start = time.time()
    data_dir, out_dir = Path(args.data), Path(args.out)
    runs_dir = Path(args.runs or f"runs/{args.preset}")
    _line(f"μOmni demo: preset {args.preset}, data {data_dir}, runs {runs_dir}, outputs {out_dir}")
    build_world(args.preset, data_dir)
    status = train_stages(args.preset, data_dir, runs_dir)
    return finish("demo", start, status, data_dir, runs_dir, out_dir)
