"""`muomni data ...`: build the default world or convert real data into world-style manifests."""

from __future__ import annotations

import argparse
import time

from muomni.data.world import build_world, preset_config


def _directory_size(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def world(args: argparse.Namespace) -> int:
    cfg = preset_config(args.preset, seed=args.seed, scenes=args.scenes, utterances=args.utterances,
                        clips=args.clips, stories=args.stories, chats=args.chats, image_size=args.image_size)
    start = time.time()
    out = build_world(cfg, args.out, force=args.force, workers=args.workers)
    print(f"world: {out} ({_directory_size(out) / 1e6:.1f} MB, {time.time() - start:.1f}s)")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.data_command == "world":
        return world(args)
    from muomni.data.realdata import cli_convert

    return cli_convert(args)
