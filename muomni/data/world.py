"""The default world: a deterministic synthetic multimodal dataset built offline in about a minute.

Scenes of coloured shapes (`muomni.data.scenes`), a closed-vocabulary grammar that describes and
questions them (`muomni.data.language`), the same sentences spoken by eSpeak NG in several voices
(`muomni.data.speech`), short clips of a moving shape, a text corpus, and chat mixtures for
instruction tuning. Everything follows from one seed: the same seed gives byte-identical manifests.

Layout of the world directory (default `data/world/`)::

    world.json                          settings, seed, counts, vocabulary, held-out pairs and voices;
                                        written LAST, so its presence marks a complete world
    text/{train,val,test}.jsonl         {"text"}                              documents for stage A
    images/{train,val,test,comp}.jsonl  {"id", "image": "png/000001.png", "captions": [str, ...],
                                         "qa": [{"question", "answer", "kind"}], "scene": {...}}
    images/png/*.png                    RGB, image_size x image_size (64 tiny, 224 base)
    speech/{train,val,test,comp}.jsonl  {"id", "audio": "wav/000001.wav", "text", "sentence", "voice",
                                         "rate", "pitch", "seconds"}
    speech/wav/*.wav                    16 kHz mono 16-bit PCM
    video/{train,val,test,comp}.jsonl   {"id", "video": "clips/000001.mp4", "frames", "fps", "question",
                                         "answer", "caption", "motion": {...}}
    video/clips/*.mp4 (or *.gif)        `frames` RGB frames at `fps`; GIF when FFmpeg is unavailable
    chat/{train,val,test,comp}.jsonl    {"id", "kind", "question_kind" (questions only), "messages": [...],
                                         "speak": bool, "answer_audio": "../speech/wav/..." (only when speak)}

Paths inside a manifest are relative to the manifest's directory (chat parts point at
`../images/png/...`). Speech `text` is the CTC transcript (lowercase a-z, space, apostrophe);
`sentence` is the punctuated sentence that was spoken. Chat kinds: text_qa, image_qa, caption,
transcribe, spoken_qa (audio question about an image), video_qa, speak ("say the answer aloud":
the answer is also in `answer_audio`, spoken by the one assistant voice `speech.ASSISTANT`). A
question's `question_kind` says what it asks (colour, shape, size, count, position, exist, relation,
fact, motion), so evaluation can say which skills a model lacks.

Splits: train/val/test by seed; `comp` is compositional: its scenes and clips contain colour-shape
pairs (`scenes.HELD_OUT_PAIRS`) and its speech uses voices (`speech.HELD_OUT_VOICES`) that never occur
in train/val/test. A build goes into `<out>.tmp/` and is renamed to `<out>` only when complete, so an
interrupted build leaves no half-written world; the next build starts that directory afresh.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from muomni.data import language as L
from muomni.data import perturb as P
from muomni.data import scenes as S
from muomni.data import speech as T

VERSION = 4  # 2: randomised rendering, voices, noise and wording; the `wild` split; evaluation-sized held-out
# chats. 3: four times the pictures (the ViT learnt its 1,680 training pictures, not shapes). 4: a motion
# story ends where its direction takes the shape (a third of them had it stay put at an edge)
SPLITS = ("train", "val", "test", "comp", "wild")
HELD_OUT = ("test", "comp", "wild")  # the splits evaluation reads
FRACTIONS = {"val": 0.05, "test": 0.10, "comp": 0.05, "wild": 0.10}  # train takes the rest
TEXT_FRACTIONS = {"val": 0.05, "test": 0.05}
CHAT_KINDS = {  # kind -> share of the chat mixture of train and val
    "text_qa": 0.15, "image_qa": 0.25, "caption": 0.12, "transcribe": 0.10,
    "spoken_qa": 0.15, "video_qa": 0.13, "speak": 0.10,
}
QUESTION_KINDS = ("text_qa", "image_qa", "spoken_qa", "video_qa")  # `eval_questions` each per held-out split
CAPTION_PROMPTS = ("describe the image.", "what do you see?", "what is in the picture?")
VIDEO_PROMPTS = ("describe the video.", "what happens in the video?")
TRANSCRIBE_PROMPTS = ("transcribe this.", "what is said?", "write down what you hear.")


class WorldError(ValueError):
    """The world cannot be built or read as asked."""


@dataclass
class WorldConfig:
    """What to generate. Defaults come from the preset (`PRESETS`); any field can be overridden."""

    seed: int = 0  # everything follows from this seed
    scenes: int = 9600  # images with captions and questions
    utterances: int = 3000  # spoken sentences in varied voices (plus the assistant's answers and the spoken
    # questions of the held-out chats)
    clips: int = 600  # short videos of a moving shape for train and val (held-out splits get eval_clips each)
    eval_clips: int = 300  # clips in each held-out split (test, comp, wild): one motion question each
    stories: int = 3000  # text-only documents for stage A
    chats: int = 4000  # instruction-tuning conversations of train and val (they reuse the media above)
    eval_questions: int = 300  # questions per kind (text, image, spoken, video) in each held-out split's chats
    image_size: int = 64  # side of images and video frames in pixels
    frames: int = 8  # frames per clip (each clip has frames +- frame_jitter)
    frame_jitter: int = 2  # clips vary in length by up to this many frames
    fps: float = 4.0  # frames per second of a clip
    free_speech: float = 0.3  # share of utterances that are free sentences (not the caption grammar)
    clean_speech: float = 0.5  # share of utterances kept free of noise, reverb and filtering (stage D
    # learns to speak from these)
    video_format: str = "auto"  # "mp4" (torchcodec/FFmpeg), "gif" (Pillow) or "auto"

    def __post_init__(self) -> None:
        """A one-line `ConfigError` naming the first field out of its range."""
        from muomni.config import ConfigError

        at_least = {"scenes": 10, "utterances": 10, "clips": 4, "eval_clips": 1, "stories": 1, "chats": 10,
                    "eval_questions": 1, "image_size": 16, "frames": 2, "frame_jitter": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"world setting '{name}' is {getattr(self, name)}; it must be at least {low}")
        if self.frames - self.frame_jitter < 2:
            raise ConfigError(f"world setting 'frame_jitter' ({self.frame_jitter}) leaves clips of fewer than 2 "
                              f"frames (frames={self.frames})")
        for name in ("free_speech", "clean_speech"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"world setting '{name}' is {getattr(self, name)}; it is a share from 0 to 1")
        if self.fps <= 0:
            raise ConfigError(f"world setting 'fps' is {self.fps}; it must be positive")
        if self.video_format not in ("auto", "mp4", "gif"):
            raise ConfigError(f"world setting 'video_format' is {self.video_format!r}; expected auto, mp4 or gif")


PRESETS = {
    "tiny": WorldConfig(),
    "base": WorldConfig(scenes=20000, utterances=20000, clips=5000, eval_clips=500, stories=30000, chats=30000,
                        eval_questions=500, image_size=224),
}


def preset_config(preset: str, **overrides) -> WorldConfig:
    """The preset's config with non-None `overrides` applied."""
    if preset not in PRESETS:
        raise WorldError(f"unknown world preset '{preset}'; expected one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def split_sizes(n: int, fractions: dict[str, float] = FRACTIONS) -> dict[str, int]:
    """How many of `n` items go to each split (train gets the remainder)."""
    sizes = {name: int(round(n * share)) for name, share in fractions.items()}
    return {"train": n - sum(sizes.values()), **sizes}


def family(split: str) -> str:
    """How a split's media and questions are made: "wild" for the wild split, else the training family."""
    return "wild" if split == "wild" else "train"


# ---------------------------------------------------------------------------------------------
# planning: every record and every media job, decided in the main process from the seed


def _rng(cfg: WorldConfig, stream: str) -> random.Random:
    """An independent random stream per part, so e.g. more clips do not change the images."""
    return random.Random(f"{cfg.seed}/{stream}")


def _plan_images(cfg: WorldConfig) -> dict[str, list[dict]]:
    rng, number, out = _rng(cfg, "images"), 0, {}
    for split, n in split_sizes(cfg.scenes).items():
        out[split] = []
        for _ in range(n):
            number += 1
            scene = S.sample_scene(rng, comp=split == "comp", family=family(split))
            qa = L.scene_questions(scene["objects"], rng, S.allowed_pairs(split == "comp"), family=family(split))
            out[split].append({"id": f"img{number:06d}", "image": f"png/{number:06d}.png",
                               "captions": L.captions(scene["objects"], rng), "qa": qa, "scene": scene})
    return out


def _plan_clips(cfg: WorldConfig) -> dict[str, list[dict]]:
    rng, number, out = _rng(cfg, "video"), 0, {}
    ext = cfg.video_format
    sizes = {**split_sizes(cfg.clips, {"val": FRACTIONS["val"]}), **{split: cfg.eval_clips for split in HELD_OUT}}
    for split, n in sizes.items():
        out[split] = []
        for _ in range(n):
            number += 1
            frames = rng.randint(cfg.frames - cfg.frame_jitter, cfg.frames + cfg.frame_jitter)
            clip = S.sample_clip(rng, frames, comp=split == "comp", family=family(split))
            qa = L.motion_question(clip["mover"], clip["direction"], rng, family(split))
            out[split].append({"id": f"vid{number:06d}", "video": f"clips/{number:06d}.{ext}", "frames": frames,
                               "fps": cfg.fps, "question": qa["question"], "answer": qa["answer"],
                               "caption": L.motion_caption(clip["mover"], clip["direction"]), "motion": clip})
    return out


def _speech_sentence(images: list[dict], rng: random.Random, free_share: float, pairs: list[tuple[str, str]]) -> str:
    """A sentence to speak: a free sentence naming only ``pairs``, or one drawn from the split's scenes
    (a question, a description, an answer)."""
    if rng.random() < free_share:
        return L.free_sentence(rng, pairs)
    record = rng.choice(images)
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(record["qa"])["question"]
    obj = rng.choice(record["scene"]["objects"])
    if roll < 0.8:
        return L.describe(obj) + "."
    if roll < 0.9:
        return rng.choice(record["qa"])["answer"] + "."
    return f"the {L.full_noun(obj)}."


def _voices(split: str) -> tuple[str, ...]:
    return {"comp": T.HELD_OUT_VOICES, "wild": T.WILD_VOICES}.get(split, T.TRAIN_VOICES)


def _plan_speech(cfg: WorldConfig, images: dict[str, list[dict]], answers: list[str]) -> dict[str, list[dict]]:
    """Utterances per split: varied sentences in the split's voices, each with a recorded-room
    perturbation (`muomni.data.perturb`: noise, reverb, band-limit...; a share stays clean); the held-out
    splits also speak the questions of their spoken-question chats (``"asks"``: image id, question index)."""
    rng, number, out = _rng(cfg, "speech"), 0, {}
    noises = {"wild": P.WILD_NOISES}

    def record(sentence: str, split: str, voice: str | None = None, rate: int | None = None,
               pitch: int | None = None, clean: bool | None = None) -> dict:
        nonlocal number
        number += 1
        voice = voice or rng.choice(_voices(split))
        rate = rate or rng.randint(*T.RATES)
        pitch = pitch if pitch is not None else rng.randint(*T.PITCHES)
        clean = rng.random() < cfg.clean_speech if clean is None else clean
        room = {"kind": "clean"} if clean else P.sample_perturbation(rng, noises.get(split, P.TRAIN_NOISES))
        babble = []
        if room.get("noise") == "babble":  # other voices talking behind the speaker
            pairs = S.allowed_pairs(split == "comp")
            babble = [[L.free_sentence(rng, pairs), rng.choice(_voices(split)), rng.randint(*T.RATES),
                       rng.randint(*T.PITCHES)] for _ in range(room["talkers"])]
        return {"id": f"utt{number:06d}", "audio": f"wav/{number:06d}.wav", "text": L.normalize_transcript(sentence),
                "sentence": sentence, "voice": voice, "rate": rate, "pitch": pitch, "room": room, "babble": babble,
                "seconds": None}

    for split, n in split_sizes(cfg.utterances).items():
        pairs = S.allowed_pairs(split == "comp")
        out[split] = [record(_speech_sentence(images[split], rng, cfg.free_speech, pairs), split) for _ in range(n)]
        if split in HELD_OUT and images[split]:  # the spoken questions of the held-out chats
            for _ in range(cfg.eval_questions):
                img = rng.choice(images[split])
                k = rng.randrange(len(img["qa"]))
                out[split].append({**record(img["qa"][k]["question"], split), "asks": [img["id"], k]})
    # the assistant's spoken answers: every answer a "speak" chat can give, in the one assistant voice
    out["train"] += [record(answer + ".", "train", clean=True, **T.ASSISTANT) for answer in answers]
    return out


def _plan_text(cfg: WorldConfig) -> dict[str, list[dict]]:
    rng, out = _rng(cfg, "text"), {}
    for split, n in split_sizes(cfg.stories, TEXT_FRACTIONS).items():
        docs = []
        for _ in range(n):
            parts = []
            for _ in range(rng.randint(1, 3)):
                roll = rng.random()
                if roll < 0.5:
                    parts.append(L.scene_document(S.sample_scene(rng)["objects"], rng, S.allowed_pairs(comp=False),
                                                  family="train"))
                elif roll < 0.7:
                    clip = S.sample_clip(rng, cfg.frames)
                    parts.append(L.motion_story(clip["mover"], clip["direction"], rng.randrange(3), rng))
                elif roll < 0.85:
                    parts.append(L.facts_document(rng))
                else:
                    qa = rng.choice(L.TEXT_QA)
                    parts.append(f"{qa['question']} {qa['answer']}.")
            docs.append({"text": " ".join(parts)})
        out[split] = docs
    return out


def _user(*parts: dict | str) -> dict:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _chat_kinds(split: str, n: int, rng: random.Random, cfg: WorldConfig) -> list[str]:
    """The kinds of a split's chats: drawn by `CHAT_KINDS` shares for train and val; for a held-out
    split `eval_questions` of each question kind and a third as many of the others, so every
    accuracy is measured on enough questions to tell two recipes apart."""
    if split not in HELD_OUT:
        return rng.choices(list(CHAT_KINDS), list(CHAT_KINDS.values()), k=n)
    others = [kind for kind in CHAT_KINDS if kind not in QUESTION_KINDS and not (kind == "speak" and split == "comp")]
    return [kind for kind in QUESTION_KINDS for _ in range(cfg.eval_questions)] + \
           [kind for kind in others for _ in range(max(1, cfg.eval_questions // 3))]


def _plan_chats(cfg: WorldConfig, images, speech, clips, assistant_audio: dict[str, str]) -> dict[str, list[dict]]:
    rng, number, out = _rng(cfg, "chat"), 0, {}
    for split, n in {**split_sizes(cfg.chats, {"val": FRACTIONS["val"]}), **{s: 0 for s in HELD_OUT}}.items():
        if split in HELD_OUT and not (images[split] and clips[split]):
            out[split] = []  # a world too small to hold out pictures and clips asks nothing there
            continue
        assistant = set(assistant_audio.values())
        voices = [u for u in speech[split] if u["audio"] not in assistant]  # the varied voices only
        by_sentence: dict[str, list[dict]] = {}
        for u in voices:
            by_sentence.setdefault(u["sentence"], []).append(u)
        images_by_id = {img["id"]: img for img in images[split]}
        # spoken questions: the held-out splits' own spoken questions, one chat each; train and val
        # pair an image with a question that was spoken in the split
        if split in HELD_OUT:
            askable = [(images_by_id[u["asks"][0]], images_by_id[u["asks"][0]]["qa"][u["asks"][1]], u)
                       for u in voices if "asks" in u]
        else:
            askable = [(img, qa, None) for img in images[split] for qa in img["qa"] if qa["question"] in by_sentence]
        clip_order = list(clips[split])
        chats = []
        for index, kind in enumerate(_chat_kinds(split, n, rng, cfg)):
            if kind == "speak" and split == "comp":
                kind = "image_qa"  # the assistant's voice is trained on train/val/test answers only
            if kind == "spoken_qa" and not askable:
                kind = "image_qa"
            number += 1
            chat = {"id": f"chat{number:06d}", "kind": kind}
            wording = family(split)
            if kind == "text_qa":
                if rng.random() < 0.4:
                    qa = rng.choice(L.TEXT_QA)
                else:
                    comp = split == "comp"
                    qa = L.text_scene_question(S.sample_scene(rng, comp)["objects"], rng, S.allowed_pairs(comp),
                                               family=wording)
                messages = [{"role": "user", "content": qa["question"]}, _assistant(L.as_sentence(qa["answer"]))]
                chat["question_kind"] = qa["kind"]
            elif kind in ("image_qa", "speak", "caption"):
                img = rng.choice(images[split])
                part = {"type": "image", "path": f"../images/{img['image']}"}
                if kind == "caption":
                    messages = [_user(part, rng.choice(CAPTION_PROMPTS)), _assistant(img["captions"][0])]
                else:
                    qa = rng.choice(img["qa"])
                    question = qa["question"] + (" say the answer aloud." if kind == "speak" else "")
                    messages = [_user(part, question), _assistant(L.as_sentence(qa["answer"]))]
                    chat["question_kind"] = qa["kind"]
                    if kind == "speak":
                        chat["answer_audio"] = f"../speech/{assistant_audio[qa['answer']]}"
            elif kind == "transcribe":
                utt = rng.choice(voices)
                messages = [_user({"type": "audio", "path": f"../speech/{utt['audio']}"}, rng.choice(TRANSCRIBE_PROMPTS)),
                            _assistant(utt["sentence"])]
            elif kind == "spoken_qa":
                if split in HELD_OUT:
                    img, qa, utt = askable[index % len(askable)]
                else:
                    img, qa, _ = rng.choice(askable)
                    utt = rng.choice(by_sentence[qa["question"]])
                messages = [_user({"type": "image", "path": f"../images/{img['image']}"},
                                  {"type": "audio", "path": f"../speech/{utt['audio']}"}),
                            _assistant(L.as_sentence(qa["answer"]))]
                chat["question_kind"] = qa["kind"]
            else:  # video_qa: held-out splits ask each clip's motion question once
                clip = clip_order[index % len(clip_order)] if split in HELD_OUT else rng.choice(clips[split])
                part = {"type": "video", "path": f"../video/{clip['video']}"}
                if split in HELD_OUT or rng.random() < 0.7:
                    messages = [_user(part, clip["question"]), _assistant(L.as_sentence(clip["answer"]))]
                    chat["question_kind"] = "motion"
                else:
                    messages = [_user(part, rng.choice(VIDEO_PROMPTS)), _assistant(clip["caption"])]
            chat["messages"] = messages
            chat["speak"] = kind == "speak"
            chats.append({k: chat[k] for k in ("id", "kind", "question_kind", "messages", "speak", "answer_audio")
                          if k in chat})
        out[split] = chats
    return out


@dataclass
class Plan:
    images: dict[str, list[dict]]
    speech: dict[str, list[dict]]
    clips: dict[str, list[dict]]
    text: dict[str, list[dict]]
    chats: dict[str, list[dict]]


def plan_world(cfg: WorldConfig) -> Plan:
    """Every record of the world, before any media is rendered (speech `seconds` still None)."""
    images = _plan_images(cfg)
    clips = _plan_clips(cfg)
    answers = sorted({qa["answer"] for split in ("train", "val", "test", "wild") for img in images[split] for qa in img["qa"]})
    speech = _plan_speech(cfg, images, answers)
    assistant_audio = {u["sentence"][:-1]: u["audio"] for u in speech["train"][-len(answers):]} if answers else {}
    text = _plan_text(cfg)
    chats = _plan_chats(cfg, images, speech, clips, assistant_audio)
    return Plan(images, speech, clips, text, chats)


# ---------------------------------------------------------------------------------------------
# rendering: media jobs run in worker processes; each writes one file and returns what it measured


def _render_job(job: tuple) -> float | None:
    kind, spec, path, cfg = job
    if kind == "image":
        S.render_scene(spec, cfg.image_size).save(path, optimize=False)
    elif kind == "speech":
        wave = T.synthesize(spec["sentence"], spec["voice"], spec["rate"], spec["pitch"])
        babble = [T.synthesize(*voice) for voice in spec["babble"]]
        wave = P.apply_perturbation(wave, spec["room"], babble)
        T.write_wav(path, wave)
        return round(len(wave) / T.SAMPLE_RATE, 3)
    else:
        write_clip(S.render_clip(spec, cfg.image_size), path, cfg.fps)
    return None


def write_clip(frames: np.ndarray, path: str | Path, fps: float) -> None:
    """Write `(frames, height, width, 3)` uint8 as MP4 (torchcodec) or GIF (Pillow) by the suffix."""
    path = Path(path)
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    import torch
    from torchcodec.encoders import VideoEncoder

    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    VideoEncoder(tensor, frame_rate=fps).to_file(str(path), codec="libx264", pixel_format="yuv420p", crf=18)


def detect_video_format(image_size: int) -> str:
    """'mp4' when torchcodec can encode with FFmpeg here (and the size is even), else 'gif'."""
    if image_size % 2:
        return "gif"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_clip(np.zeros((2, image_size, image_size, 3), dtype=np.uint8), Path(tmp) / "probe.mp4", 4.0)
        return "mp4"
    except Exception:  # any missing FFmpeg library or encoder: fall back to Pillow's GIF
        return "gif"


def _start_worker(parent: int) -> None:
    """Worker start-up: one torch thread (the workers already fill the cores; torch's own pool on top
    of them made the build twice as slow on two cores), and quit when the building process dies (a
    killed build leaves no orphans)."""
    import torch  # here, not at the top: `muomni.data.world` stays light to import

    torch.set_num_threads(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _render_all(jobs: list[tuple], workers: int) -> list[float | None]:
    if workers <= 1:
        return [_render_job(job) for job in jobs]
    # Fresh interpreters, never fork: a process that has already run torch holds OpenMP threads,
    # and a forked child that touches torch again can deadlock on them.
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (os.getpid(),)) as pool:
        return list(pool.imap(_render_job, jobs, chunksize=32))


# ---------------------------------------------------------------------------------------------
# writing


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one per line via `<path>.tmp` + rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n")
    os.replace(tmp, path)


def world_settings(cfg: WorldConfig) -> dict:
    return dataclasses.asdict(cfg)


def build_world(cfg: WorldConfig, out: str | Path, force: bool = False, workers: int = 2,
                log: Callable[[str], None] = print) -> Path:
    """Build the world into `out` (atomically: `<out>.tmp` then rename). Returns `out`.

    A complete world with the same settings is kept unless `force`; one with other settings is an
    error without `force`, so a differently sized world is never silently reused. A world made by an
    older version of this code is rebuilt, with a message: it lacks what training now expects.
    """
    out = Path(out)
    marker = out / "world.json"
    if cfg.video_format == "auto":
        cfg = dataclasses.replace(cfg, video_format=detect_video_format(cfg.image_size))
    if marker.exists() and not force:
        existing = json.loads(marker.read_text())
        if existing.get("version") != VERSION:
            log(f"{out} holds a world of version {existing.get('version', 1)}; this code makes version {VERSION}: "
                "rebuilding it")
        elif existing.get("settings") == world_settings(cfg):
            log(f"world at {out} is complete; use --force to rebuild")
            return out
        else:
            raise WorldError(f"{out} holds a world with other settings; pass --force to replace it")
    start = time.time()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous build was interrupted: start it afresh
    for sub in ("text", "images/png", "speech/wav", "video/clips", "chat"):
        (tmp / sub).mkdir(parents=True)

    plan = plan_world(cfg)
    jobs: list[tuple] = []
    owners: list[dict] = []
    for split in SPLITS:
        jobs += [("image", r["scene"], str(tmp / "images" / r["image"]), cfg) for r in plan.images[split]]
        jobs += [("clip", r["motion"], str(tmp / "video" / r["video"]), cfg) for r in plan.clips[split]]
        for r in plan.speech[split]:
            jobs.append(("speech", r, str(tmp / "speech" / r["audio"]), cfg))
            owners.append(r)
    jobs.sort(key=lambda job: job[2][-10:])  # mix the kinds evenly over the run
    log(f"planned {len(jobs)} media files in {time.time() - start:.1f}s; rendering with {workers} worker(s)")
    results = _render_all(jobs, workers)
    seconds = {job[2]: value for job, value in zip(jobs, results) if job[0] == "speech"}
    for r in owners:
        r["seconds"] = seconds[str(tmp / "speech" / r["audio"])]

    for split in SPLITS:
        write_jsonl(tmp / "images" / f"{split}.jsonl", plan.images[split])
        write_jsonl(tmp / "speech" / f"{split}.jsonl", plan.speech[split])
        write_jsonl(tmp / "video" / f"{split}.jsonl", plan.clips[split])
        write_jsonl(tmp / "chat" / f"{split}.jsonl", plan.chats[split])
    for split, docs in plan.text.items():
        write_jsonl(tmp / "text" / f"{split}.jsonl", docs)

    counts = {name: {split: len(records) for split, records in part.items()}
              for name, part in dataclasses.asdict(plan).items()}
    info = {
        "version": VERSION, "seed": cfg.seed, "settings": world_settings(cfg), "counts": counts,
        "vocabulary": {"colours": L.COLOURS, "shapes": L.SHAPES, "sizes": L.SIZES, "numbers": L.NUMBERS,
                       "directions": L.DIRECTIONS, "places": sorted(L.PLACE_NAMES.values())},
        "held_out": {"pairs": [list(p) for p in S.HELD_OUT_PAIRS], "voices": list(T.HELD_OUT_VOICES)},
        "wild": {  # what the wild split holds that training never sees
            "voices": list(T.WILD_VOICES), "noises": list(P.WILD_NOISES),
            "rendering": "textured backgrounds, shapes with a contrasting border, no anti-aliasing, rotation up to 30 degrees",
            "templates": {kind: list(t["wild"]) for kind, t in L.QUESTION_TEMPLATES.items()},
        },
        "voices": list(T.TRAIN_VOICES), "noises": list(P.TRAIN_NOISES), "assistant_voice": T.ASSISTANT, "sample_rate": T.SAMPLE_RATE,
    }
    tmp_marker = tmp / "world.json.tmp"
    tmp_marker.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_marker, tmp / "world.json")  # last: the world is complete

    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    log(f"built {out} in {time.time() - start:.1f}s: " + ", ".join(
        f"{name} {sum(c.values())}" for name, c in counts.items()))
    return out


def load_world_info(root: str | Path) -> dict:
    """The world's `world.json`; a clear error if the world is missing or was not finished."""
    marker = Path(root) / "world.json"
    if not marker.exists():
        raise WorldError(f"{root} has no world.json (missing or unfinished world); run `muomni data world --out {root}`")
    return json.loads(marker.read_text())
