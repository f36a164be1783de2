"""A chat panel for notebooks (ipywidgets): attach an image, a recording or a clip, ask, hear the answer.

::

    from muomni.panel import ChatPanel
    panel = ChatPanel(model)
    panel.show()

- An upload is attached to the next question only, and cleared once it is answered, so a later
  text-only question is never silently about the old picture. The panel says what each answer saw.
- Jupyter carries an upload in one websocket message, and the server drops messages over 10 MB: a
  larger file never reaches the kernel. Such a file goes in the path box instead, by its path on disk.
- While the model works, Ask is disabled and says so; the text streams in as it is written, then
  the spoken answer plays by itself.
- An empty answer, an unreadable file and an unsupported one each give a readable line in the panel.
  An exception inside a widget callback would only reach the browser's log.

Needs ``ipywidgets`` (the ``dev`` extra) and a notebook frontend that renders widgets (JupyterLab).
"""

from __future__ import annotations

import html
import tempfile
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import torch
from IPython.display import Audio, display

from muomni.constants import MEDIA_KINDS
from muomni.omni import OmniModel

SUFFIXES = {  # the files each loader reads
    "image": (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".mp3"),
    "video": (".mp4", ".gif"),
}
UPLOAD_LIMIT_MB = 10  # Jupyter server's largest websocket message; bigger uploads never arrive


class PanelError(ValueError):
    """A panel request that cannot be answered: nothing asked, or a file of no known kind."""


def media_kind(path: Path) -> str:
    """The chat part kind of a file on disk, from its suffix (a GIF counts as a video)."""
    suffix = path.suffix.lower()
    for kind in ("video", "image", "audio"):
        if suffix in SUFFIXES[kind]:
            return kind
    known = ", ".join(f"{kind} ({' '.join(SUFFIXES[kind])})" for kind in MEDIA_KINDS)
    raise PanelError(f"{path.name}: unsupported file type '{suffix}'; the model reads {known}")


class ChatPanel:
    """Upload boxes, a path box, a question, Ask and Clear; the streamed answer and its speech.

    ``temperature`` is the panel's starting sampling temperature (0: greedy). ``label`` is shown on
    top, to say which model answers.
    """

    def __init__(self, model: OmniModel, temperature: float = 0.0, max_new_tokens: int = 32, label: str = "",
                 work_dir: str | Path | None = None):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="muomni-panel-"))
        self.uploads = {kind: widgets.FileUpload(accept=",".join(SUFFIXES[kind]), multiple=False,
                                                 description=kind)
                        for kind in MEDIA_KINDS}
        self.path = widgets.Text(placeholder=f"or a file on disk (uploads stop at {UPLOAD_LIMIT_MB} MB)",
                                 description="path", layout=widgets.Layout(width="60%"))
        self.question = widgets.Text(placeholder="what colour is the circle?", description="question",
                                     layout=widgets.Layout(width="60%"))
        self.temperature = widgets.FloatSlider(value=temperature, min=0.0, max=1.5, step=0.1, description="temperature")
        self.ask_button = widgets.Button(description="Ask", button_style="primary", icon="comment")
        self.clear_button = widgets.Button(description="Clear", icon="eraser")
        self.status = widgets.HTML()
        self.answer = widgets.HTML()
        self.speech = widgets.Output()
        self.answer_text = ""  # the last answer as plain text
        self.ask_button.on_click(lambda _: self.ask())
        self.clear_button.on_click(lambda _: self.clear())
        self.widget = widgets.VBox([
            widgets.HTML(label), widgets.HBox(list(self.uploads.values())), self.path, self.question,
            widgets.HBox([self.ask_button, self.clear_button, self.temperature]), self.status, self.answer,
            self.speech])
        self.widget.add_class("muomni-panel")  # for styling and for tests that find it in the page

    def show(self) -> None:
        display(self.widget)

    # ------------------------------------------------------------------------------------------

    def attachments(self) -> list[dict[str, Any]]:
        """The chat parts of what is attached now: uploads (saved to ``work_dir``), then the path box."""
        parts = []
        for kind, upload in self.uploads.items():
            for item in upload.value:
                path = self.work_dir / Path(item["name"]).name
                path.write_bytes(bytes(item["content"]))
                parts.append({"type": kind, "path": str(path)})
        if self.path.value.strip():
            path = Path(self.path.value.strip()).expanduser()
            if not path.is_file():
                raise PanelError(f"{path} is not a file")
            parts.append({"type": media_kind(path), "path": str(path)})
        return parts

    def ask(self) -> str:
        """Answer the question with whatever is attached; returns the answer text (also shown)."""
        self.ask_button.disabled, self.ask_button.description = True, "Thinking…"
        self.status.value, self.answer.value, self.answer_text = "<i>thinking…</i>", "", ""
        self.speech.outputs = ()
        start = time.time()
        try:
            parts = self.attachments()
            seen = ", ".join(f"{p['type']} {Path(p['path']).name}" for p in parts) or "text only"
            if self.question.value.strip():
                parts.append({"type": "text", "text": self.question.value.strip()})
            if not parts:
                raise PanelError("nothing to answer: type a question, or attach an image, a recording or a clip")
            self._answer(parts)
            self.status.value = f"answered in {time.time() - start:.1f} s ({html.escape(seen)})"
        except Exception as error:  # noqa: BLE001 - shown in the panel: in a callback it would go unseen
            self.status.value = f"<b style='color:#b00020'>{html.escape(type(error).__name__)}:</b> {html.escape(str(error))}"
        finally:
            self._clear_attachments()
            self.ask_button.disabled, self.ask_button.description = False, "Ask"
        return self.answer_text

    def _answer(self, parts: list[dict[str, Any]]) -> None:
        waves = []
        events = self.model.chat([{"role": "user", "content": parts}], speak=True, stream=True,
                                 max_new_tokens=self.max_new_tokens, temperature=self.temperature.value, seed=0)
        for event in events:
            if isinstance(event, str):
                self.answer_text += event
                self.answer.value = f"<pre style='white-space: pre-wrap'>{html.escape(self.answer_text)}</pre>"
            else:
                waves.append(event)
        if not self.answer_text.strip():
            self.answer.value = ("<i>The answer is empty: there is nothing to show or speak. A model with "
                                 "random weights knows no words; a trained one does (<code>make demo</code>).</i>")
            return
        if waves:
            wave = torch.cat(waves).numpy()
            self.speech.append_display_data(Audio(wave, rate=self.model.cfg.codec.sample_rate, autoplay=True))

    def _clear_attachments(self) -> None:
        for upload in self.uploads.values():
            upload.value = ()
        self.path.value = ""

    def clear(self) -> None:
        """Forget the attachments, the question and the answer."""
        self._clear_attachments()
        self.question.value, self.answer_text = "", ""
        self.status.value, self.answer.value = "", ""
        self.speech.outputs = ()
