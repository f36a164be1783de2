"""The default world: determinism, split hygiene, the world's language, speech and media, atomic builds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from muomni.config import ConfigError
from muomni.data import language as L
from muomni.data import perturb as P
from muomni.data import scenes as S
from muomni.data import speech as T
from muomni.data import world as W
from muomni.data.datasets import ManifestDataset, asr_pair, chat, image_captions, video_qa

SMALL = W.WorldConfig(seed=3, scenes=40, utterances=40, clips=12, eval_clips=4, stories=30, chats=60, eval_questions=6,
                      image_size=32)
WORD = r"[a-z]+('[a-z]+)?"
SENTENCES = re.compile(rf"^{WORD}( {WORD})*[.?]( {WORD}( {WORD})*[.?])*$")  # lowercase words, final . or ?


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    return W.build_world(SMALL, tmp_path_factory.mktemp("w") / "world", workers=2, log=lambda _: None)


def manifests(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jsonl"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_identical_manifest_bytes(small_world, tmp_path):
    again = W.build_world(SMALL, tmp_path / "again", workers=1, log=lambda _: None)
    first = {p.relative_to(small_world): p.read_bytes() for p in manifests(small_world)}
    second = {p.relative_to(again): p.read_bytes() for p in manifests(again)}
    assert first == second and len(first) == 23
    assert (small_world / "world.json").read_bytes() == (again / "world.json").read_bytes()


def test_other_seed_gives_another_world():
    a = W.plan_world(SMALL)
    b = W.plan_world(W.WorldConfig(**{**SMALL.__dict__, "seed": 4}))
    assert a.images["train"] != b.images["train"]


def test_layout_and_counts(small_world):
    info = json.loads((small_world / "world.json").read_text())
    for name, folder in (("images", "images"), ("speech", "speech"), ("clips", "video"), ("chats", "chat")):
        for split in W.SPLITS:
            assert len(records(small_world / folder / f"{split}.jsonl")) == info["counts"][name][split]
    assert sum(info["counts"]["images"].values()) == SMALL.scenes
    assert set(info["counts"]["text"]) == {"train", "val", "test"}
    assert not list(small_world.parent.glob("*.tmp"))


def test_held_out_pairs_and_voices_never_leak_into_training():
    plan = W.plan_world(W.WorldConfig(seed=0, scenes=400, utterances=300, clips=200, eval_clips=20, stories=200,
                                      chats=300, eval_questions=20))
    held = set(S.HELD_OUT_PAIRS)
    for split in ("train", "val", "test"):
        for record in plan.images[split]:
            assert not {(o["colour"], o["shape"]) for o in record["scene"]["objects"]} & held
        for record in plan.clips[split]:
            assert (record["motion"]["mover"]["colour"], record["motion"]["mover"]["shape"]) not in held
        assert not {u["voice"] for u in plan.speech[split]} & set(T.HELD_OUT_VOICES + T.WILD_VOICES)
    for record in plan.images["comp"]:
        assert {(o["colour"], o["shape"]) for o in record["scene"]["objects"]} & held
    assert all((r["motion"]["mover"]["colour"], r["motion"]["mover"]["shape"]) in held for r in plan.clips["comp"])
    assert {u["voice"] for u in plan.speech["comp"]} <= set(T.HELD_OUT_VOICES)
    assert {u["voice"] for u in plan.speech["wild"]} <= set(T.WILD_VOICES)
    # no training text names a held-out pair either
    train_text = json.dumps([plan.text["train"], plan.speech["train"], plan.chats["train"], plan.images["train"]])
    for colour, shape in held:
        assert f"{colour} {shape}" not in train_text


def test_scene_objects_are_distinct_and_questions_unambiguous():
    rng = __import__("random").Random(0)
    for _ in range(300):
        objects = S.sample_scene(rng)["objects"]
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        for qa in L.scene_questions(objects, rng):
            if qa["kind"] == "colour":
                shape = qa["question"].split()[-1][:-1]
                assert [o["colour"] for o in objects if o["shape"] == shape] == [qa["answer"]]
            if qa["kind"] == "count" and qa["question"] == "how many shapes are there?":
                assert qa["answer"] == L.NUMBERS[len(objects)]


def test_motion_stories_end_where_their_direction_takes_them():
    rng = __import__("random").Random(0)
    step = {"left": (0, -2), "right": (0, 2), "up": (-2, 0), "down": (2, 0)}
    cells = {phrase: cell for cell, phrase in L.PLACE_PHRASES.items()}
    for direction in L.DIRECTIONS:
        for lane in range(3):
            story = L.motion_story({"shape": "star", "colour": "red", "size": "big"}, direction, lane, rng)
            told = story.split(". ")  # "there is a big red star <place>", "... moves ...", "now the red star is <place>"
            start, end = cells[told[0].split("star ")[1]], cells[told[2].split("star is ")[1].rstrip(".")]
            assert (end[0] - start[0], end[1] - start[1]) == step[direction], story


def test_all_language_follows_the_world_rules(small_world):
    for split in W.SPLITS:
        for record in records(small_world / "images" / f"{split}.jsonl"):
            assert all(SENTENCES.match(c) for c in record["captions"]), record["captions"]
            for qa in record["qa"]:
                assert SENTENCES.match(qa["question"]) and re.fullmatch(r"[a-z]+( [a-z]+)?", qa["answer"]), qa
        for record in records(small_world / "chat" / f"{split}.jsonl"):
            for message in record["messages"]:
                texts = [message["content"]] if isinstance(message["content"], str) else [
                    p["text"] for p in message["content"] if p["type"] == "text"]
                assert all(SENTENCES.match(t) for t in texts), texts
    for split in ("train", "val", "test"):
        assert all(SENTENCES.match(r["text"]) for r in records(small_world / "text" / f"{split}.jsonl"))


def test_speech_transcripts_match_their_audio(small_world):
    for split in W.SPLITS:
        for record in records(small_world / "speech" / f"{split}.jsonl"):
            assert re.fullmatch(r"[a-z']+( [a-z']+)*", record["text"])
            assert record["text"] == L.normalize_transcript(record["sentence"])
            info = sf.info(str(small_world / "speech" / record["audio"]))
            assert info.samplerate == 16000 and info.channels == 1
            assert abs(info.duration - record["seconds"]) < 1e-3
            # eSpeak at 120-220 words per minute, sped up or slowed by up to 10%, a reverb tail:
            # roughly 0.12-1.1 s per word, plus margins
            words = len(record["text"].split())
            assert 0.12 * words < record["seconds"] < 1.1 * words + 0.8, record


def test_every_manifest_reads_through_the_datasets(small_world):
    transforms = {"speech": asr_pair, "images": image_captions, "video": video_qa, "chat": chat}
    for folder, transform in transforms.items():
        for split in W.SPLITS:
            dataset = ManifestDataset(small_world / folder / f"{split}.jsonl", transform)
            samples = [dataset[i] for i in range(len(dataset))]
            assert len(samples) == len(dataset) > 0


def test_spoken_answers_say_the_answer(small_world):
    speech = {r["audio"]: r for split in W.SPLITS for r in records(small_world / "speech" / f"{split}.jsonl")}
    speaks = [c for split in W.SPLITS for c in records(small_world / "chat" / f"{split}.jsonl") if c["speak"]]
    assert speaks
    for c in speaks:
        utterance = speech[c["answer_audio"].removeprefix("../speech/")]
        assert utterance["text"] == L.normalize_transcript(c["messages"][-1]["content"])
        assert utterance["voice"] == T.ASSISTANT["voice"]


def test_images_and_clips_have_the_configured_size(small_world):
    record = records(small_world / "images" / "train.jsonl")[0]
    with Image.open(small_world / "images" / record["image"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    clip = records(small_world / "video" / "train.jsonl")[0]
    path = small_world / "video" / clip["video"]
    if path.suffix == ".mp4":
        from torchcodec.decoders import VideoDecoder

        assert len(VideoDecoder(str(path))) == clip["frames"]
    else:
        with Image.open(path) as gif:
            assert gif.n_frames == clip["frames"]


def test_clip_frames_show_the_motion():
    rng = __import__("random").Random(1)
    for _ in range(8):
        clip = S.sample_clip(rng, 8)
        clip["distractor"], clip["noise"] = None, 0
        frames = S.render_clip(clip, 48).astype(np.float32)
        mass = (np.abs(frames - frames[0, 0, 0]).sum(-1) > 30)  # pixels of the shape
        ys, xs = [], []
        for m in mass:
            y, x = np.nonzero(m)
            ys.append(y.mean())
            xs.append(x.mean())
        dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
        expected = {"left": dx < -10, "right": dx > 10, "up": dy < -10, "down": dy > 10}
        assert expected[clip["direction"]], (clip["direction"], dx, dy)


def test_gif_fallback_writes_all_frames(tmp_path):
    frames = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(8)[:, None, None] * 30
    W.write_clip(frames, tmp_path / "c.gif", fps=4.0)
    with Image.open(tmp_path / "c.gif") as gif:
        assert gif.n_frames == 8


def test_synthesize_gives_16khz_float_speech():
    wave = T.synthesize("what colour is the circle?", "en-us+f1", 170, 50)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.5 < len(wave) / T.SAMPLE_RATE < 3.0 and 0.05 < np.abs(wave).max() <= 1.0
    slower = T.synthesize("what colour is the circle?", "en-us+f1", 120, 50)
    assert len(slower) > len(wave)
    with pytest.raises(T.SpeechError, match="no voice"):
        T.synthesize("hello.", "xx-nonexistent", 170, 50)
    with pytest.raises(T.SpeechError, match="empty"):
        T.synthesize("   ")


def test_interrupted_build_leaves_no_world_and_next_build_recovers(tmp_path, monkeypatch):
    cfg = W.WorldConfig(seed=1, scenes=10, utterances=10, clips=4, eval_clips=1, stories=6, chats=10,
                        eval_questions=2, image_size=16, video_format="gif")
    out = tmp_path / "world"

    def crash(jobs, workers):
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "_render_all", crash)
    with pytest.raises(KeyboardInterrupt):
        W.build_world(cfg, out, workers=1, log=lambda _: None)
    assert not out.exists() and (tmp_path / "world.tmp").exists()
    monkeypatch.undo()
    W.build_world(cfg, out, workers=1, log=lambda _: None)
    assert (out / "world.json").exists() and not (tmp_path / "world.tmp").exists()
    # a complete world is kept; other settings need --force
    W.build_world(cfg, out, workers=1, log=lambda _: None)
    with pytest.raises(W.WorldError, match="other settings"):
        W.build_world(W.WorldConfig(**{**cfg.__dict__, "seed": 2}), out, workers=1, log=lambda _: None)
    W.build_world(W.WorldConfig(**{**cfg.__dict__, "seed": 2}), out, force=True, workers=1, log=lambda _: None)
    assert json.loads((out / "world.json").read_text())["seed"] == 2
    # a world of an older version is rebuilt, saying so
    info = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**info, "version": 1}))
    said = []
    W.build_world(W.WorldConfig(**{**cfg.__dict__, "seed": 2}), out, workers=1, log=said.append)
    assert "version 1" in said[0] and json.loads((out / "world.json").read_text())["version"] == W.VERSION


def test_missing_media_is_reported_with_file_and_line(small_world, tmp_path):
    manifest = tmp_path / "images.jsonl"
    good = records(small_world / "images" / "train.jsonl")[0]
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "a.png").write_bytes((small_world / "images" / good["image"]).read_bytes())
    lines = [{**good, "image": "png/a.png"}, {**good, "image": "png/missing.png"}]
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    dataset = ManifestDataset(manifest, image_captions)
    assert dataset[0]["image"].name == "a.png"
    with pytest.raises(ValueError, match=r"images.jsonl line 2: image file png/missing.png not found"):
        dataset[1]


def test_clip_lengths_vary_within_the_jitter(small_world):
    lengths = {r["frames"] for split in W.SPLITS for r in records(small_world / "video" / f"{split}.jsonl")}
    assert lengths <= set(range(SMALL.frames - SMALL.frame_jitter, SMALL.frames + SMALL.frame_jitter + 1))
    assert len(lengths) > 1


def test_held_out_splits_have_enough_questions_of_every_kind(small_world):
    for split in W.HELD_OUT:
        kinds = [c["kind"] for c in records(small_world / "chat" / f"{split}.jsonl")]
        for kind in W.QUESTION_KINDS:
            assert kinds.count(kind) == SMALL.eval_questions, (split, kind)


def test_wild_split_is_made_by_held_out_factors():
    plan = W.plan_world(W.WorldConfig(seed=0, scenes=300, utterances=200, clips=40, eval_clips=20, stories=20,
                                      chats=40, eval_questions=20))
    train_wordings = {kind: t["train"] for kind, t in L.QUESTION_TEMPLATES.items()}
    for split in W.SPLITS:
        wild = split == "wild"
        for record in plan.images[split]:
            assert record["scene"]["style"]["family"] == ("wild" if wild else "train")
        for record in plan.clips[split]:
            assert record["motion"]["style"]["family"] == ("wild" if wild else "train")
        rooms = {u["room"]["noise"] for u in plan.speech[split] if u["room"].get("noise")}
        assert rooms <= set(P.WILD_NOISES if wild else P.TRAIN_NOISES) and rooms
    # a wild question never uses a training wording: a training wording would match it as a pattern
    slots = {"shape": L.SHAPES, "colour": L.COLOURS, "plural": tuple(L.PLURALS.values()),
             "noun": tuple(f"{c} {s}" for c, s in L.ALL_PAIRS), "place": tuple(L.PLACE_PHRASES.values()),
             "relation": tuple(L.RELATIONS)}

    def pattern(template: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
        text = "".join(re.escape(L.american(part)) if k % 2 == 0 else "(" + "|".join(slots[part]) + ")"
                       for k, part in enumerate(parts))
        return re.compile(text.replace("color", "colou?r") + "$")

    patterns = [pattern(t) for templates in train_wordings.values() for t in templates]
    wild_questions = [qa["question"] for r in plan.images["wild"] for qa in r["qa"]]
    assert wild_questions and not [q for q in wild_questions if any(p.match(q) for p in patterns)][:3]
    assert not set(T.WILD_VOICES) & set(T.TRAIN_VOICES)


@pytest.mark.parametrize("field, value", [("eval_questions", 0), ("clean_speech", 1.5), ("frame_jitter", 7),
                                          ("video_format", "avi")])
def test_a_world_setting_out_of_range_names_itself(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        W.WorldConfig(**{field: value})


def test_randomised_scenes_stay_inside_the_picture_and_apart():
    rng = __import__("random").Random(5)
    for _ in range(300):
        scene = S.sample_scene(rng, family=rng.choice(S.FAMILIES))
        for obj in scene["objects"]:
            reach = S.extent(obj)
            assert reach - 1e-3 <= obj["x"] <= 1 - reach + 1e-3 and reach - 1e-3 <= obj["y"] <= 1 - reach + 1e-3
            assert (int(obj["x"] * 3), int(obj["y"] * 3)) == (obj["col"], obj["row"])  # the centre names the place
        objects = scene["objects"]
        assert all(np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > S.extent(a) + S.extent(b)
                   for k, a in enumerate(objects) for b in objects[k + 1:])


def test_a_shade_keeps_the_name_of_its_colour():
    import colorsys

    rng = __import__("random").Random(2)
    hue = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in S.RGB.items()}
    for name in S.RGB:
        for _ in range(50):
            h = colorsys.rgb_to_hsv(*(c / 255 for c in S.jittered_rgb(name, rng)))[0]
            nearest = min(hue, key=lambda other: min(abs(hue[other] - h), 1 - abs(hue[other] - h)))
            assert nearest == name


def test_every_style_draws_a_picture_of_the_right_size():
    rng = __import__("random").Random(4)
    for family in S.FAMILIES:
        for _ in range(10):
            scene = S.sample_scene(rng, family=family)
            image = S.render_scene(scene, 40)
            assert image.size == (40, 40) and image.mode == "RGB"


def test_the_plan_does_not_depend_on_the_process():
    """Python salts string hashes per process: nothing in the plan may follow set or hash order."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from muomni.data import world as W; "
            "cfg = W.WorldConfig(seed=3, scenes=40, utterances=40, clips=12, eval_clips=4, stories=30, chats=60, "
            "eval_questions=6, image_size=32, video_format='gif'); "
            "print(hashlib.sha256(json.dumps(W.plan_world(cfg).__dict__, sort_keys=True).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_a_story_becomes_one_chat_per_scene_with_its_answers():
    story = ("two shapes. a red star and a blue circle. what colour is the star? red. how many circles are there? "
             "one. there is a green square. which way did it move? up. five is more than four.")
    chats = L.story_chats(story)
    assert [[m["role"] for m in chat] for chat in chats] == [["user", "assistant", "user", "assistant"],
                                                             ["user", "assistant"]]
    assert chats[0][0]["content"] == "two shapes. a red star and a blue circle. what colour is the star?"
    assert chats[0][3]["content"] == "one." and chats[1][1]["content"] == "up."
