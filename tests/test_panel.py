"""The notebook chat panel without a browser: attachments, streaming, speech, readable errors."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from omni_fixtures import small_model, small_tokenizer, write_media

widgets = pytest.importorskip("ipywidgets")
from muomni.panel import ChatPanel, PanelError, media_kind  # noqa: E402 - needs ipywidgets


@pytest.fixture(scope="module")
def model():
    return small_model(small_tokenizer())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("media"))


def upload(panel, kind, path):
    data = path.read_bytes()
    panel.uploads[kind].value = ({"name": path.name, "type": "", "size": len(data), "content": memoryview(data),
                                  "last_modified": datetime.now(timezone.utc)},)


def test_an_upload_is_answered_spoken_and_then_cleared(model, media, tmp_path):
    panel = ChatPanel(model, temperature=1.0, max_new_tokens=6, work_dir=tmp_path)
    upload(panel, "image", media["image"])
    panel.question.value = "what colour is the circle?"
    text = panel.ask()
    assert text.strip() and "image scene.png" in panel.status.value
    assert panel.speech.outputs and "audio" in str(panel.speech.outputs[0]["data"]).lower()
    assert panel.uploads["image"].value == () and not panel.ask_button.disabled
    panel.ask()  # the next question is text only
    assert "text only" in panel.status.value


def test_an_empty_answer_and_bad_files_are_readable_lines(model, media, tmp_path):
    panel = ChatPanel(model, temperature=0.0, max_new_tokens=3, work_dir=tmp_path)
    panel.question.value = "hi."  # a random model's greedy answer is white space
    panel.ask()
    assert "answer is empty" in panel.answer.value and not panel.speech.outputs
    (tmp_path / "notes.txt").write_text("hello")
    panel.path.value = str(tmp_path / "notes.txt")
    panel.ask()
    assert "PanelError" in panel.status.value and "unsupported file type" in panel.status.value
    panel.question.value = ""
    panel.ask()
    assert "nothing to answer" in panel.status.value


def test_kinds_by_suffix():
    assert [media_kind(Path(name)) for name in ("a.PNG", "b.wav", "c.gif")] == ["image", "audio", "video"]
    with pytest.raises(PanelError, match="unsupported"):
        media_kind(Path("d.txt"))
