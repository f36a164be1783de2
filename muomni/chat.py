"""`muomni chat`: ask a trained model a question about text, an image, a recording or a clip.

::

    muomni chat --ckpt runs/tiny/sft --image scene.png "what colour is the circle?"
    muomni chat --ckpt runs/tiny/sft --image scene.png --audio question.wav --speak answer.wav
    muomni chat --ckpt runs/tiny/sft            # interactive: /image P, /audio P, /video P, /speak P, /quit

With media but no text, the media alone are the question (a spoken question in ``--audio``).

The answer streams to the terminal as it is generated. With ``--speak`` the Talker also speaks it
into a 16 kHz WAV file. Each question is answered on its own (the model was tuned on one-turn chats).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import soundfile
import torch

from muomni.constants import MEDIA_KINDS
from muomni.omni import OmniModel


class ChatError(ValueError):
    """A chat request that cannot be run: a missing file or an unsupported output format."""


def build_messages(text: str | None, media: dict[str, str | None]) -> list[dict[str, Any]]:
    """One user message: the media parts first (image, audio, video), then the text."""
    content: list[dict[str, Any]] = []
    for kind in MEDIA_KINDS:
        path = media.get(kind)
        if path is None:
            continue
        if not Path(path).exists():
            raise ChatError(f"--{kind} {path} does not exist")
        if not Path(path).is_file():
            raise ChatError(f"--{kind} {path} is not a file")
        content.append({"type": kind, "path": str(path)})
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        raise ChatError("nothing to answer: give a question, or --image/--audio/--video")
    return [{"role": "user", "content": content}]


def check_speak_path(path: str | None) -> None:
    if path is not None and Path(path).suffix.lower() != ".wav":
        raise ChatError(f"--speak {path}: spoken answers are written as WAV; use a name ending in .wav")


def answer(model: OmniModel, messages: list[dict[str, Any]], speak: str | None, max_new_tokens: int,
           temperature: float, out: TextIO | None = None) -> str:
    """Stream one answer to ``out`` (default stdout); write the spoken answer to ``speak`` when given."""
    out = out or sys.stdout
    pieces, chunks = [], []
    for event in model.chat(messages, speak=speak is not None, stream=True, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=0):
        if isinstance(event, str):
            pieces.append(event)
            out.write(event)
            out.flush()
        else:
            chunks.append(event)
    out.write("\n")
    if speak is not None and not chunks:
        out.write(f"(the answer is empty: nothing to speak, {speak} not written)\n")
    elif speak is not None:
        wave = torch.cat(chunks)
        Path(speak).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(speak, wave.float().cpu().numpy(), model.cfg.codec.sample_rate)
        out.write(f"(spoken answer: {speak}, {wave.numel() / model.cfg.codec.sample_rate:.1f} s)\n")
    return "".join(pieces)


def interactive(model: OmniModel, args: argparse.Namespace) -> None:
    """Read questions from stdin; ``/image P`` etc. attach media to the next question."""
    media: dict[str, str | None] = {kind: getattr(args, kind) for kind in MEDIA_KINDS}
    speak = args.speak
    print("ask a question; /image P, /audio P, /video P attach media, /speak P.wav speaks the answers, /quit ends")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        try:
            if command.lstrip("/") in MEDIA_KINDS and command.startswith("/"):
                media[command[1:]] = rest.strip() or None
                print(f"({command[1:]}: {media[command[1:]] or 'none'})")
                continue
            if command == "/speak":
                check_speak_path(rest.strip() or None)
                speak = rest.strip() or None
                continue
            answer(model, build_messages(line, media), speak, args.max_new_tokens, args.temperature)
        except ValueError as error:  # a bad file or path: say so and keep the session going
            print(f"error: {error}")
        media = {kind: None for kind in MEDIA_KINDS}


def main(args: argparse.Namespace) -> int:
    check_speak_path(args.speak)
    if not Path(args.ckpt).exists():
        raise ChatError(f"--ckpt {args.ckpt} does not exist; train the model (muomni demo, or "
                        f"muomni train --stage sft) or point --ckpt at a saved OmniModel directory")
    media = {kind: getattr(args, kind) for kind in MEDIA_KINDS}
    if args.text is None and not any(media.values()):
        interactive(OmniModel.load(args.ckpt), args)
        return 0
    # A question, or media alone (a spoken question in --audio about --image needs no text).
    messages = build_messages(args.text, media)
    answer(OmniModel.load(args.ckpt), messages, args.speak, args.max_new_tokens, args.temperature)
    return 0
