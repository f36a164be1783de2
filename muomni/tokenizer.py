"""Byte-level BPE tokenizer with μOmni's special tokens and chat template.

Byte-level BPE (GPT-2; Sennrich et al., 2016 for BPE) first maps text to its UTF-8 bytes, so any
string - emoji, CJK, combining marks, control characters - encodes without an unknown token and
decodes back exactly (unless it was trained to normalise its input: `Tokenizer.train`). Merges are
learned with Hugging Face ``tokenizers``.

Special tokens have fixed ids so every checkpoint agrees on them::

    0 <|pad|>  1 <|bos|>  2 <|eos|>  3 <|im_start|>  4 <|im_end|>  5 <|image|>  6 <|audio|>  7 <|video|>

Special tokens enter a sequence only through structure: `encode_chat` places them, and media parts
become one placeholder id each (5/6/7) that the omni model later expands into encoder features.
Plain `encode` treats a special token's text written in raw input (a user typing ``<|im_end|>``) as
ordinary characters, so user text can never end a turn; ``encode(text, allow_special=True)`` opts in
to reading them as single ids.

Chat template, one block per message, and ``<|im_start|>assistant\\n`` as the generation prompt::

    <|im_start|>{role}\\n{content}<|im_end|>\\n
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from muomni.constants import (AUDIO_ID, BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, IMAGE_ID, MEDIA_KINDS, PAD_ID,
                              SPECIAL_TOKENS, VIDEO_ID)

ROLES = ("system", "user", "assistant")
N_BYTES = 256  # the byte-level alphabet every vocabulary starts from


class TokenizerError(ValueError):
    """A tokenizer file or chat message that μOmni cannot use."""


class Tokenizer:
    """Byte-level BPE over ``tokenizers`` with fixed special ids and a chat template."""

    pad_id, bos_id, eos_id, im_start_id, im_end_id = PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID
    image_id, audio_id, video_id = IMAGE_ID, AUDIO_ID, VIDEO_ID

    def __init__(self, backend: HFTokenizer):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found = backend.token_to_id(token)
            if found != expected_id:
                raise TokenizerError(f"special token {token} has id {found}; μOmni needs it at id {expected_id}")
        self.backend = backend
        self.backend.encode_special_tokens = True  # raw text never produces special ids (see module doc)
        self._newline = self.encode("\n")

    # ------------------------------------------------------------------------------------------
    # Building, saving, loading

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, normalize: bool = False) -> Tokenizer:
        """Learn BPE merges from ``texts`` until the vocabulary (specials included) has ``vocab_size`` ids.

        ``normalize``: every text is lowercased and runs of spaces become one before it is split, in
        training and in every later `encode` (the rule is saved in ``tokenizer.json``). For a corpus
        written that way, as the world's is: "What  Colour" then reads as the "what colour" the model
        learnt, instead of bytes it never saw. Decoding then gives the normalised text back.
        """
        smallest = len(SPECIAL_TOKENS) + N_BYTES
        if vocab_size < smallest:
            raise TokenizerError(f"vocab_size {vocab_size} is too small; byte-level BPE needs at least "
                                 f"{smallest} (8 special tokens + 256 bytes)")
        backend = HFTokenizer(models.BPE())
        if normalize:
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                                       normalizers.Replace(Regex(" {2,}"), " ")])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a ``tokenizer.json`` file (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({error})") from None
        return cls(backend)

    def save(self, path: str | Path) -> None:
        """Write one ``tokenizer.json`` (``path`` may be the file or a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------
    # Text

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are plain text unless ``allow_special``."""
        if not allow_special:
            return self.backend.encode(text, add_special_tokens=False).ids
        self.backend.encode_special_tokens = False
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in ``tokenizers``)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special`` is False."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, token_id: int) -> str:
        """The vocabulary entry of one id (byte-level symbols, e.g. 'Ġ' for a leading space)."""
        return self.backend.id_to_token(token_id)

    # ------------------------------------------------------------------------------------------
    # Chat

    def encode_chat(self, messages: Sequence[dict[str, Any]],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Ids of a conversation and a loss mask, True exactly on what the assistant must learn to say.

        Each message is ``{"role": "system"|"user"|"assistant", "content": str | list[part]}``, with
        parts ``{"type": "text", "text": ...}`` or ``{"type": "image"|"audio"|"video", "path": ...}``.
        The mask covers the assistant's content tokens and its closing ``<|im_end|>``, not the role
        header. ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` for the model to continue.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                raise TokenizerError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
            header = [self.im_start_id, *self.encode(role + "\n")]
            body = [*self._content_ids(message.get("content", ""), index), self.im_end_id]
            learn = role == "assistant"
            ids += header + body + self._newline
            mask += [False] * len(header) + [learn] * len(body) + [False] * len(self._newline)
        if add_generation_prompt:
            prompt = [self.im_start_id, *self.encode("assistant\n")]
            ids += prompt
            mask += [False] * len(prompt)
        return ids, mask

    def _content_ids(self, content: str | list[dict[str, Any]], index: int) -> list[int]:
        if isinstance(content, str):
            return self.encode(_inside(content))
        if not isinstance(content, list):
            raise TokenizerError(f"message {index} content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
        ids: list[int] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                ids += self.encode(_inside(part.get("text", "")))
            elif kind in MEDIA_KINDS:
                ids.append({"image": self.image_id, "audio": self.audio_id, "video": self.video_id}[kind])
            else:
                raise TokenizerError(f"message {index} has a part of type {kind!r}; "
                                     f"expected text, image, audio or video")
        return ids

    def __len__(self) -> int:
        return self.vocab_size


def _inside(text: str) -> str:
    """Message text as it would appear inside a sentence: with a leading space. Byte-level BPE gives
    " small" (one token, as stage A read it) and "small" (s, ma, ll) different ids; with the space, an
    answer's first word is the very token that names it in a question or a caption."""
    return text if not text or text[0].isspace() else " " + text

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
