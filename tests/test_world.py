"""The default world: determinism, split hygiene, the world's language, speech and media, atomic builds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from muomni.data import language as L
from muomni.data import scenes as S
from muomni.data import speech as T
from muomni.data import world as W
from muomni.data.datasets import ManifestDataset, asr_pair, chat, image_captions, video_qa

SMALL = W.WorldConfig(seed=3, scenes=40, utterances=40, clips=12, stories=30, chats=60, image_size=32)
SENTENCES = re.compile(r"^[a-z]+( [a-z]+)*[.?]( [a-z]+( [a-z]+)*[.?])*$")  # lowercase words, final . or ?


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
    assert first == second and len(first) == 19
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
    plan = W.plan_world(W.WorldConfig(seed=0, scenes=400, utterances=300, clips=200, stories=200, chats=300))
    held = set(S.HELD_OUT_PAIRS)
    for split in ("train", "val", "test"):
        for record in plan.images[split]:
            assert not {(o["colour"], o["shape"]) for o in record["scene"]["objects"]} & held
        for record in plan.clips[split]:
            assert (record["motion"]["mover"]["colour"], record["motion"]["mover"]["shape"]) not in held
        assert not {u["voice"] for u in plan.speech[split]} & set(T.HELD_OUT_VOICES)
    for record in plan.images["comp"]:
        assert {(o["colour"], o["shape"]) for o in record["scene"]["objects"]} & held
    assert all((r["motion"]["mover"]["colour"], r["motion"]["mover"]["shape"]) in held for r in plan.clips["comp"])
    assert {u["voice"] for u in plan.speech["comp"]} <= set(T.HELD_OUT_VOICES)
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
            # eSpeak at 145-195 words per minute: roughly 0.15-0.9 s per word, plus margins
            words = len(record["text"].split())
            assert 0.15 * words < record["seconds"] < 0.9 * words + 0.5, record


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

        assert len(VideoDecoder(str(path))) == clip["frames"] == SMALL.frames
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
    cfg = W.WorldConfig(seed=1, scenes=8, utterances=6, clips=4, stories=6, chats=10, image_size=16,
                        video_format="gif")
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
