"""`muomni chat` on every modality with a small random saved model, and its errors."""

from __future__ import annotations

import io
import sys

import pytest
import soundfile

from muomni.cli import main
from omni_fixtures import small_model, small_tokenizer, write_media


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    small_model(small_tokenizer()).save(root / "model")
    return root / "model", write_media(root)


@pytest.mark.parametrize("flags", [[], ["--image"], ["--audio"], ["--video"], ["--image", "--audio"]])
def test_chat_answers_with_each_modality(saved, flags, capsys):
    ckpt, media = saved
    argv = ["chat", "--ckpt", str(ckpt), "--max-new-tokens", "4"]
    for flag in flags:
        argv += [flag, str(media[flag[2:]])]
    assert main(argv + ["what colour is the circle?"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_speaks_into_a_wav(saved, tmp_path, capsys):
    ckpt, media = saved
    out = tmp_path / "answer.wav"
    assert main(["chat", "--ckpt", str(ckpt), "--image", str(media["image"]), "--speak", str(out),
                 "--max-new-tokens", "4", "--temperature", "1.0", "say it aloud."]) == 0
    wave, rate = soundfile.read(out)
    assert rate == 16000 and wave.ndim == 1
    assert "spoken answer" in capsys.readouterr().out


def test_an_empty_answer_is_not_spoken(saved, tmp_path, capsys):
    ckpt, _ = saved
    out = tmp_path / "answer.wav"
    # a random model's greedy answer is white space
    assert main(["chat", "--ckpt", str(ckpt), "--speak", str(out), "--max-new-tokens", "3", "hi."]) == 0
    assert "nothing to speak" in capsys.readouterr().out and not out.exists()


def test_media_without_text_is_the_question(saved, capsys):
    ckpt, media = saved
    assert main(["chat", "--ckpt", str(ckpt), "--image", str(media["image"]), "--audio", str(media["audio"]),
                 "--max-new-tokens", "3"]) == 0


def test_interactive_mode_reads_questions_and_commands(saved, monkeypatch, capsys):
    ckpt, media = saved
    lines = f"/image {media['image']}\nwhat is it?\n/video nowhere.gif\nand now?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(image: " in out and "error: --video nowhere.gif does not exist" in out


@pytest.mark.parametrize("argv, message", [
    (["--image", "missing.png", "hi"], "--image missing.png does not exist"),
    (["--speak", "out.mp3", "hi"], "use a name ending in .wav"),
])
def test_chat_errors_are_one_line(saved, argv, message, capsys):
    ckpt, _ = saved
    assert main(["chat", "--ckpt", str(ckpt), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreadable_media_is_a_clear_error(saved, tmp_path, capsys):
    ckpt, _ = saved
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["chat", "--ckpt", str(ckpt), "--image", str(bad), "hi"]) == 1
    assert "notes.png" in capsys.readouterr().err


def test_missing_checkpoint_says_how_to_get_one(tmp_path, capsys):
    assert main(["chat", "--ckpt", str(tmp_path / "none"), "hi"]) == 1
    assert "train the model" in capsys.readouterr().err


def test_the_payoff_cells_prefer_the_course_run_to_the_demo_run(tmp_path):
    import json

    from muomni.course import course_runs, trained_runs

    demo = tmp_path / "tiny"
    assert course_runs(demo) == tmp_path / "tiny-course"
    assert trained_runs(demo, "sft") is None
    for runs, finished in ((demo, True), (course_runs(demo), False)):
        (runs / "sft").mkdir(parents=True)
        (runs / "sft" / "run.json").write_text(json.dumps({"finished": finished}))
    assert trained_runs(demo, "sft") == demo  # an unfinished course run is not shown
    (course_runs(demo) / "sft" / "run.json").write_text(json.dumps({"finished": True}))
    assert trained_runs(demo, "sft") == course_runs(demo)
