"""The `muomni` command: doctor, data, train, eval, chat, bench, plan, demo, course.

Each sub-command parses its flags here and hands them to the module that does the work; modules
are imported only when their command runs, so `muomni doctor` works even when a dependency is broken.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> "module:function" taking the parsed argparse.Namespace
COMMANDS = {
    "doctor": "muomni.doctor:main",
    "data": "muomni.data.cli:main",
    "train": "muomni.train.stages:main",
    "eval": "muomni.eval:main",
    "chat": "muomni.chat:main",
    "bench": "muomni.bench:main",
    "plan": "muomni.train.memory_plan:main",
    "demo": "muomni.demo:main",
    "course": "muomni.course:main",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muomni", description="μOmni: a tiny omni-modal model, built from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("doctor", help="check the installation: packages, torch devices, FFmpeg, eSpeak NG")

    data = sub.add_parser("data", help="build the default world or convert real data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    world = data_sub.add_parser("world", help="generate the synthetic multimodal world (no network)")
    world.add_argument("--out", default="data/world", help="output directory")
    world.add_argument("--preset", default="tiny", help="tiny (64 px images) or base (224 px)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--scenes", type=int, default=None, help="number of image scenes (default: by preset)")
    world.add_argument("--utterances", type=int, default=None, help="number of spoken utterances")
    world.add_argument("--clips", type=int, default=None, help="number of video clips")
    world.add_argument("--stories", type=int, default=None, help="number of text-only documents")
    world.add_argument("--chats", type=int, default=None, help="number of SFT chats")
    world.add_argument("--image-size", type=int, default=None, help="image side in pixels")
    world.add_argument("--force", action="store_true", help="rebuild even if the world is complete")
    world.add_argument("--workers", type=int, default=2, help="processes that render media")
    real = data_sub.add_parser("real", help="download a real dataset and convert it to world-style manifests")
    real.add_argument("name", choices=["tinystories", "librispeech", "ljspeech", "coco", "flickr8k"])
    real.add_argument("--out", default=None, help="manifest directory (default: data/<name>)")
    real.add_argument("--root", default=None, help="where the raw files go (default: <out>/raw)")
    real.add_argument("--no-download", action="store_true", help="only convert files already in --root")
    real.add_argument("--max-gb", type=float, default=4.99, help="size cap per download, under 5 GB")

    train = sub.add_parser("train", help="train one stage")
    train.add_argument("--stage", required=True, help="thinker, audio, vision, speech, vocoder or sft")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--data", default="data/world",
                       help="data directory (the world or real manifests); stage sft mixes several with weights: "
                            "data/world,data/coco=0.5,data/ljspeech=0.2")
    train.add_argument("--out", default=None, help="runs directory (default: runs/<preset>)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-3 --set thinker.n_layers=2")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    evaluate = sub.add_parser("eval", help="evaluate trained stages on held-out data")
    evaluate.add_argument("--stage", default="all", help="thinker, audio, vision, speech, sft or all")
    evaluate.add_argument("--preset", default="tiny")
    evaluate.add_argument("--data", default="data/world")
    evaluate.add_argument("--runs", default=None, help="runs directory (default: runs/<preset>)")
    evaluate.add_argument("--out", default=None, help="where eval.json and eval.md go (default: the runs directory)")

    chat = sub.add_parser("chat", help="talk to a trained model")
    chat.add_argument("text", nargs="?", default=None, help="the question; omit for interactive mode")
    chat.add_argument("--ckpt", default="runs/tiny/sft", help="checkpoint directory of the whole model")
    chat.add_argument("--image", default=None)
    chat.add_argument("--audio", default=None)
    chat.add_argument("--video", default=None)
    chat.add_argument("--speak", default=None, metavar="OUT.wav", help="also speak the answer into this WAV file")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0)

    bench = sub.add_parser("bench", help="measure speed and memory (JSON)")
    bench.add_argument("what", help="thinker (model benchmark), train (a training stage) or gpu (every stage on CUDA)")
    bench.add_argument("--preset", default="base")
    bench.add_argument("--stage", default="thinker")
    bench.add_argument("--steps", type=int, default=None, help="timed steps (default: by benchmark)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    bench.add_argument("--data", default="data/world", help="bench train: the world the stage reads")
    bench.add_argument("--runs", default=None, help="bench train: trained earlier stages (default: runs/<preset>)")
    bench.add_argument("--out", default=None, help="also write the JSON here")

    plan = sub.add_parser("plan", help="analytic memory plan of a preset against a GPU budget")
    plan.add_argument("--preset", default="base")
    plan.add_argument("--budget-gb", type=float, default=12.0)
    plan.add_argument("--measure", action="store_true",
                      help="also take one training step of each stage and count what it keeps, beside the plan")
    plan.add_argument("--measure-batch", type=int, default=2, help="batch of the measured steps (the plan scales with it)")
    plan.add_argument("--device", default="auto", help="where the measured steps run")

    demo = sub.add_parser("demo", help="build the world, train every stage, evaluate, answer sample prompts")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--data", default="data/world")
    demo.add_argument("--runs", default=None)
    demo.add_argument("--out", default="demo_out")

    course = sub.add_parser("course", help="the demo, then its encoders trained on and stage E retrained: the full tiny model")
    course.add_argument("--preset", default="tiny")
    course.add_argument("--data", default="data/world")
    course.add_argument("--runs", default=None, help="the demo's runs (default: runs/<preset>); the course writes <runs>-course")
    course.add_argument("--out", default="demo_out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = COMMANDS[args.command].split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:  # our errors are one line that names the problem
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
