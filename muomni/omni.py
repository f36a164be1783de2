"""OmniModel: the whole μOmni, from a chat with images, audio and video to text and speech.

The Thinker–Talker design of Qwen2.5-Omni (Xu et al., 2025), small::

    image/video frames -> ViT -> 2x2 merge ---> vision projector --+
    audio -> log-mel -> AuT (25 Hz) -> pairs (12.5 Hz) or words -> audio projector --+--> Thinker -> text
    text -> token embeddings -----------------------------------------------+       |
                                                          hidden states + text ids  v
                                                   Talker -> codec codes -> codec decoder
                                                   -> log-mel -> vocoder -> waveform (16 kHz)

`OmniModel` holds the modules, reads and encodes media, and saves and loads the whole model as one
directory. The layout of a chat as one sequence (placeholders, multimodal positions) is
`muomni.sequence`, re-exported here; every decoding step, the Thinker's and the Talker's, runs in
the one loop of `muomni.engine`. `chat` streams text pieces and speaks each finished sentence.

Audio reaches the Thinker as 12.5 Hz pairs of AuT frames, or, with ``audio_tokens="words"`` (the tiny
preset), as one token per word the AuT's CTC head hears (`muomni.audio.pool_words`). A clip's frames
reach it as each frame's merged tokens, or, with ``video_tokens="difference"``, as the first frame's
and then each frame's difference from the one before (`muomni.video.frame_differences`).

Shapes: merged image tokens ``(n_images, mh * mw, 4 * d_vision)``; audio tokens ``(n_tokens,
2 * d_audio)``; the Thinker sees ``(batch, seq, d_model)`` with ``position_ids`` ``(3, batch, seq)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from muomni.audio import AuT, LogMel, conv_output_lengths, load_audio, merge_pairs, pool_words, word_spans
from muomni.checkpoint import load_checkpoint, resolve, save_checkpoint
from muomni.codec import LOG_FLOOR, Codec
from muomni.config import ConfigError, OmniConfig, SamplingConfig, from_dict
from muomni.constants import EOS_ID, IM_END_ID, MEDIA_KINDS
from muomni.data.collate import pad
from muomni.engine import GREEDY
from muomni.projector import Projector, VisualWords
# The sequence layout is imported from here too (`from muomni.omni import Media, expand_sequence`).
from muomni.sequence import (TICKS_PER_SECOND, TICKS_PER_TOKEN, Media, MediaError,  # noqa: F401
                             expand_sequence, media_parts, media_positions, placeholder_ids, shift_targets)
from muomni.talker import Talker
from muomni.thinker import Thinker
from muomni.tokenizer import Tokenizer
from muomni.video import frame_differences, read_video
from muomni.vision import ViT, image_transform, load_image, merge_2x2
from muomni.vocoder import GriffinLimVocoder

MAX_LOG_MEL = 8.0  # ceiling of a log-magnitude mel handed to the vocoder
AUDIO_TOKENS = ("pairs", "words")  # how AuT frames become Thinker tokens (`OmniConfig.audio_tokens`)
VIDEO_TOKENS = ("frames", "difference")  # how a clip's frames become Thinker tokens (`OmniConfig.video_tokens`)
SENTENCE_END = re.compile(r"[.?!]\s*$")  # where a streamed answer is cut into spoken chunks


class ContextError(ValueError):
    """A prompt whose media and text do not fit the Thinker's context."""


class SpeechError(ValueError):
    """A request to speak that has nothing to speak."""


# ----------------------------------------------------------------------------------------------
# The model


class OmniModel(nn.Module):
    """Encoders -> projectors -> Thinker -> Talker -> codec -> vocoder, one checkpoint directory."""

    def __init__(self, cfg: OmniConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.thinker = Thinker(cfg.thinker)
        self.audio_frontend = LogMel(cfg.audio)
        self.audio = AuT(cfg.audio)
        self.vision = ViT(cfg.vision)
        if cfg.audio_tokens not in AUDIO_TOKENS:
            raise ConfigError(f"audio_tokens {cfg.audio_tokens!r} is not one of {', '.join(AUDIO_TOKENS)}")
        if cfg.video_tokens not in VIDEO_TOKENS:
            raise ConfigError(f"video_tokens {cfg.video_tokens!r} is not one of {', '.join(VIDEO_TOKENS)}")
        self.audio_proj = Projector(self.audio.merged_dim, cfg.projector_hidden, cfg.thinker.d_model)
        self.vision_proj = Projector(4 * cfg.vision.d_model, cfg.projector_hidden, cfg.thinker.d_model)
        self.visual_words = None
        if cfg.visual_words:
            classes = tuple(len(names) + 1 for names in cfg.visual_words)
            if classes != tuple(cfg.vision.attribute_classes):
                raise ConfigError(f"visual_words name {classes} classes (with 'none'), but the ViT's attribute heads "
                                  f"have {tuple(cfg.vision.attribute_classes)} (vision.attribute_classes)")
            self.visual_words = VisualWords(4 * cfg.vision.d_model, classes, cfg.thinker.d_model)
        self.talker = Talker(cfg.talker, cfg.codec, cfg.thinker.d_model)
        self.codec = Codec(cfg.codec)
        self.vocoder = GriffinLimVocoder(cfg.codec)  # nothing to train: the codec's mel, inverted
        self.image_transform = image_transform(cfg.vision.image_size)

    @property
    def device(self) -> torch.device:
        return self.thinker.tok_emb.weight.device

    # ------------------------------------------------------------------------------------------
    # Loading and encoding media

    def load_media(self, part: dict[str, Any], base_dir: str | Path | None = None) -> Media:
        """Read one chat part from disk into its encoder input (the encoder does not run yet).

        ``raw``: image ``{"pixels": (1, 3, H, W)}``; video ``{"pixels": (n_frames, 3, H, W)}``;
        audio ``{"mel": (frames, n_mels)}``. Missing files and unreadable formats raise the loaders'
        one-line errors (`ImageError`, `AudioError`, `VideoError`).
        """
        kind, path = part.get("type"), part.get("path")
        if kind not in MEDIA_KINDS:
            raise MediaError(f"part type {kind!r} is not a media kind; expected image, audio or video")
        if not path:
            raise MediaError(f"the {kind} part has no 'path'")
        path = Path(base_dir) / path if base_dir is not None else Path(path)
        if kind == "audio":
            wave = load_audio(path, self.cfg.audio.sample_rate, self.cfg.audio.max_seconds)
            mel = self.audio_frontend(wave)
            if self.cfg.audio_tokens == "words":
                return self.heard_words(mel, path.name)
            frames = int(conv_output_lengths(torch.tensor(mel.shape[0])))
            return Media(kind, (frames + 1) // 2, path.name, raw={"mel": mel})
        if kind == "image":
            pixels, times = self.image_transform(load_image(path))[None], []
        else:
            clip = read_video(path, n_frames=self.cfg.video_frames)
            pixels, times = self.image_transform(clip.frames), clip.timestamps.tolist()
        gh, gw = self.vision.patch_grid(pixels.shape[-2], pixels.shape[-1])
        grid = ((gh + 1) // 2, (gw + 1) // 2)  # merge_2x2 pads an odd side
        return Media(kind, pixels.shape[0] * grid[0] * grid[1], path.name, grid, times, raw={"pixels": pixels})

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images or frames ``(n, 3, H, W)`` -> merged patches ``(n, mh * mw, 4 * d_vision)``."""
        grid = self.vision.patch_grid(pixels.shape[-2], pixels.shape[-1])
        patches = self.vision(pixels.to(self.device))[:, 1:]  # drop CLS: the Thinker reads the patches
        return merge_2x2(patches, grid)[0]

    @torch.no_grad()
    def word_spans(self, mel: torch.Tensor) -> list[tuple[int, int]]:
        """The 25 Hz frame spans of the words the AuT's CTC head hears in one clip's log-mel ``(frames, n_mels)``."""
        return self._hear(mel)[1]

    @torch.no_grad()
    def _hear(self, mel: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """One AuT pass over a log-mel ``(frames, n_mels)``: its hidden states ``(T, d_audio)`` and word spans."""
        hidden, _ = self.audio(mel[None].to(self.device))
        labels = self.audio.ctc_head(hidden[0]).argmax(-1).tolist()
        return hidden[0], word_spans(labels, space=1 + self.cfg.audio.ctc_vocab.index(" "))

    def heard_words(self, mel: torch.Tensor, name: str) -> Media:
        """An audio part as one token per heard word. The spans must be known before the chat is laid
        out, so the AuT runs here; when no gradient can reach the AuT (frozen, or under no_grad) the
        same pass also gives the tokens, and `encode` has nothing left to do."""
        hidden, spans = self._hear(mel)
        item = Media("audio", len(spans), name, raw={"mel": mel, "spans": spans})
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.audio.parameters())):
            item.tokens = pool_words(hidden, spans)
        return item

    def encode_mels(self, mels: list[torch.Tensor], spans: list[list[tuple[int, int]]] | None = None) -> list[torch.Tensor]:
        """Log-mels ``(frames_i, n_mels)`` -> per clip 12.5 Hz tokens ``(n_tokens_i, 2 * d_audio)``, or with
        ``spans`` (`word_spans` per clip) one token per word, ``(n_words_i, 2 * d_audio)``."""
        lengths = torch.tensor([m.shape[0] for m in mels], device=self.device)
        padded = nn.utils.rnn.pad_sequence(mels, batch_first=True).to(self.device)
        hidden, out_lengths = self.audio(padded, lengths)
        if spans is not None:
            return [pool_words(hidden[i], clip_spans) for i, clip_spans in enumerate(spans)]
        merged, merged_lengths = merge_pairs(hidden, out_lengths)
        return [merged[i, : int(n)] for i, n in enumerate(merged_lengths)]

    def encode(self, media: Sequence[Media]) -> Sequence[Media]:
        """Run the encoders on every item still holding ``raw`` input, batched per encoder."""
        todo = [m for m in media if m.tokens is None]
        seen = [m for m in todo if m.kind != "audio"]
        if seen:
            merged = self.encode_pixels(torch.cat([m.raw["pixels"] for m in seen]))
            for item, chunk in zip(seen, merged.split([m.raw["pixels"].shape[0] for m in seen])):
                item.tokens = chunk.reshape(-1, chunk.shape[-1])
                if item.kind == "video" and self.cfg.video_tokens == "difference":
                    item.tokens = frame_differences(item.tokens, chunk.shape[0])
        heard = [m for m in todo if m.kind == "audio"]
        if heard:
            spans = [m.raw["spans"] for m in heard] if self.cfg.audio_tokens == "words" else None
            for item, tokens in zip(heard, self.encode_mels([m.raw["mel"] for m in heard], spans)):
                item.tokens = tokens
        for item in todo:
            if item.tokens.shape[0] != item.n_tokens:
                raise MediaError(f"{item.kind} {item.name} gave {item.tokens.shape[0]} tokens, expected {item.n_tokens}")
        return media

    # ------------------------------------------------------------------------------------------
    # Embedding a batch

    def embed(self, input_ids: torch.Tensor, media_tokens: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Token embeddings ``(batch, seq, d_model)`` with every placeholder copy replaced.

        ``media_tokens[kind]`` holds the merged encoder tokens ``(n, d_in)`` of all media of that
        kind in the batch, in row-major order of the placeholders (row by row, left to right).
        """
        embeds = self.thinker.embed(input_ids)
        projectors = {"image": self.vision_proj, "video": self.vision_proj, "audio": self.audio_proj}
        for kind, token_id in placeholder_ids(self.tokenizer_or_fail()).items():
            where = input_ids == token_id
            count = int(where.sum())
            tokens = media_tokens.get(kind)
            have = 0 if tokens is None else int(tokens.shape[0])
            if count != have:
                raise MediaError(f"{count} {kind} placeholder tokens but {have} {kind} tokens to fill them")
            if count:
                tokens = tokens.to(embeds.device)
                projected = projectors[kind](tokens)
                if kind != "audio" and self.visual_words is not None:
                    projected = projected + self.visual_words(tokens)
                projected = projected.to(embeds.dtype)
                embeds = embeds.masked_scatter(where.unsqueeze(-1), projected)
        return embeds

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                media_tokens: dict[str, torch.Tensor | None]):
        """Thinker output (logits, hidden, aux_loss) over an expanded multimodal batch."""
        return self.thinker(inputs_embeds=self.embed(input_ids, media_tokens),
                            attention_mask=attention_mask, position_ids=position_ids)

    def loss(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             targets: torch.Tensor, media_tokens: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Mean next-token CE on the positions whose (shifted) target is not -100."""
        return self.thinker.loss(None, targets, attention_mask, inputs_embeds=self.embed(input_ids, media_tokens),
                                 position_ids=position_ids)

    def tokenizer_or_fail(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this OmniModel has no tokenizer; pass one or load a checkpoint that has one")
        return self.tokenizer

    # ------------------------------------------------------------------------------------------
    # Prompts

    def prepare(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 0,
                base_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Media]]:
        """Encode a chat for generation: expanded ids ``(seq,)``, positions ``(3, seq)``, its media.

        Raises `ContextError` listing how many tokens each part takes when the prompt and
        ``max_new_tokens`` do not fit ``thinker.max_seq_len`` (nothing is ever cut silently).
        """
        tokenizer = self.tokenizer_or_fail()
        ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=True)
        media = list(self.encode([self.load_media(part, base_dir) for part in media_parts(messages)]))
        expanded, _, positions = expand_sequence(ids, mask, media, tokenizer)
        limit = self.cfg.thinker.max_seq_len
        if len(expanded) + max_new_tokens > limit:
            text_tokens = len(ids) - len(media)
            parts = [f"text {text_tokens}"] + [
                f"{m.kind} {m.name} {m.n_tokens}" + (f" ({len(m.timestamps)} frames)" if m.kind == "video" else "")
                for m in media]
            raise ContextError(
                f"prompt needs {len(expanded)} tokens + {max_new_tokens} new = {len(expanded) + max_new_tokens}, "
                f"more than the context of {limit} (max_seq_len): {', '.join(parts)}; "
                f"use shorter audio, fewer frames or media, or fewer new tokens")
        return torch.tensor(expanded), positions, media

    @staticmethod
    def group_media(media: Sequence[Media]) -> dict[str, torch.Tensor | None]:
        """Concatenate media tokens per kind, in order (the layout `embed` expects)."""
        grouped: dict[str, torch.Tensor | None] = {}
        for kind in MEDIA_KINDS:
            tokens = [m.tokens for m in media if m.kind == kind]
            grouped[kind] = torch.cat(tokens) if tokens else None
        return grouped

    # ------------------------------------------------------------------------------------------
    # Generation

    def prompt(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 0,
               base_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A chat as the Thinker's prompt: embeddings ``(seq, d_model)`` with the media scattered in,
        and positions ``(3, seq)``, on the model's device."""
        ids, positions, media = self.prepare(messages, max_new_tokens, base_dir)
        embeds = self.embed(ids[None].to(self.device), self.group_media(media))[0]
        return embeds, positions.to(self.device)

    @torch.no_grad()
    def answer_batch(self, chats: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int = 32,
                     base_dir: str | Path | None = None, batch_size: int = 32) -> list[str]:
        """Greedy answers to many chats at once (left-padded batches through `Thinker.generate`)."""
        tokenizer = self.tokenizer_or_fail()
        was_training = self.training
        self.eval()
        prompts = [self.prompt(messages, max_new_tokens, base_dir) for messages in chats]
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: prompts[i][0].shape[0])
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            embeds, mask = pad([prompts[i][0] for i in rows], side="left")
            positions, _ = pad([prompts[i][1].t() for i in rows], side="left")  # (batch, seq, 3)
            new = self.thinker.generate(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=positions.permute(2, 0, 1), max_new_tokens=max_new_tokens)
            for i, tokens in zip(rows, new):
                answers[i] = tokenizer.decode(tokens).removeprefix(" ")  # the space `encode_chat` puts before a message
        self.train(was_training)
        return answers

    @torch.no_grad()
    def generate_ids(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 64,
                     sampling: SamplingConfig = GREEDY, generator: torch.Generator | None = None,
                     base_dir: str | Path | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(token_id, hidden)`` for each new token, stopping at ``<|im_end|>``/``<|eos|>``.

        ``hidden`` ``(d_model,)`` is the Thinker's state *at* that token (the state the Talker
        reads). The engine yields each token with the state it was predicted from, and the state at
        a token is the one the next token is predicted from, so each token waits one step for it;
        hence one step more than ``max_new_tokens``.
        """
        embeds, positions = self.prompt(messages, max_new_tokens, base_dir)
        steps = self.thinker.generate_steps(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                            max_new_tokens=max_new_tokens + 1, sampling=sampling, generator=generator)
        previous = None
        for token, hidden in steps:
            if previous is not None:
                yield previous, hidden[0]
            previous = int(token[0])
            if previous in (EOS_ID, IM_END_ID):
                return

    def chat(self, messages: Sequence[dict[str, Any]], speak: bool = False, stream: bool = False,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, base_dir: str | Path | None = None):
        """Answer a chat.

        Returns the answer text, or ``(text, waveform)`` with ``speak=True`` (waveform ``(samples,)``
        float32 at 16 kHz; an empty answer raises `SpeechError`, as there is nothing to speak). With
        ``stream=True`` returns an iterator instead: it yields ``str`` pieces as tokens are generated
        and, with ``speak=True``, a waveform chunk ``torch.Tensor`` as soon as each sentence is
        complete. The joined pieces equal the non-streamed text.
        """
        sampling = SamplingConfig(temperature, top_k, top_p)
        events = self._stream(messages, speak, max_new_tokens, sampling, seed, base_dir)
        if stream:
            return events
        pieces, chunks = [], []
        for event in events:
            (pieces if isinstance(event, str) else chunks).append(event)
        text = "".join(pieces)
        if not speak:
            return text
        if not chunks:
            raise SpeechError(f"the answer {text!r} is empty, so there is nothing to speak; "
                              f"a trained model (`make demo`) answers in words")
        return text, torch.cat(chunks)

    def _stream(self, messages, speak: bool, max_new_tokens: int, sampling: SamplingConfig, seed: int | None,
                base_dir) -> Iterator[str | torch.Tensor]:
        tokenizer = self.tokenizer_or_fail()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            ids: list[int] = []
            hiddens: list[torch.Tensor] = []
            sentence_start, emitted = 0, ""
            for token, hidden in self.generate_ids(messages, max_new_tokens, sampling, generator, base_dir):
                ids.append(token)
                hiddens.append(hidden)
                text = tokenizer.decode(ids).removeprefix(" ")  # the space `encode_chat` puts before a message
                # Hold back an incomplete UTF-8 character until its last byte arrives.
                if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
                if speak and SENTENCE_END.search(tokenizer.decode(ids[sentence_start:])):
                    yield self.speak_tokens(ids[sentence_start:], torch.stack(hiddens[sentence_start:]), generator=generator)
                    sentence_start = len(ids)
            text = tokenizer.decode(ids).removeprefix(" ")
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
            if speak and tokenizer.decode(ids[sentence_start:]).strip():
                yield self.speak_tokens(ids[sentence_start:], torch.stack(hiddens[sentence_start:]), generator=generator)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------
    # Speech

    def talker_conditioning(self, hiddens: Sequence[torch.Tensor], ids: Sequence[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad per-answer Thinker states ``(n_i, d_model)`` and token ids ``(n_i,)`` for the Talker.

        Returns hidden states and the Thinker's token embeddings ``(batch, longest, d_model)`` and a
        mask ``(batch, longest)``. Both are detached: the Talker learns to read the Thinker, it
        does not change it.
        """
        hidden, mask = pad([h.detach().to(self.device) for h in hiddens], side="left")
        embeds, _ = pad([self.thinker.embed(i.to(self.device)).detach() for i in ids], side="left")
        return hidden, embeds, mask

    def talker_loss(self, hiddens: Sequence[torch.Tensor], ids: Sequence[torch.Tensor],
                    codes: Sequence[torch.Tensor], durations: Sequence[torch.Tensor]) -> torch.Tensor:
        """The Talker's loss speaking each answer: its states ``(n_i, d_model)``, ids ``(n_i,)``,
        codes ``(n_q, frames_i)`` and frames per token ``(n_i,)`` (see `muomni.align`)."""
        hidden, embeds, mask = self.talker_conditioning(hiddens, ids)
        inputs, targets = self.talker.make_batch([c.cpu() for c in codes])
        frames, _ = pad([d.to(self.device) for d in durations], 0, side="left")  # left-padded like the text
        texts = [self.tokenizer_or_fail().decode(i.tolist()) for i in ids]
        loss, _ = self.talker.loss(hidden, embeds, mask, inputs.to(self.device), targets.to(self.device), frames,
                                   texts=texts)
        return loss

    @torch.no_grad()
    def speak_tokens(self, ids: Sequence[int], hidden: torch.Tensor, sampling: SamplingConfig | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Speak answer tokens from their Thinker states ``(n, d_model)``: waveform ``(samples,)`` at 16 kHz.

        ``sampling`` defaults to ``talker.sampling`` in the config. Tokens that decode to nothing but
        white space raise `SpeechError`: there is nothing to speak.
        """
        text = self.tokenizer_or_fail().decode(list(ids))
        if not text.strip():
            raise SpeechError(f"nothing to speak: the answer {text!r} holds no words")
        cond_hidden, embeds, mask = self.talker_conditioning([hidden], [torch.tensor(list(ids))])
        codes = self.talker.generate(cond_hidden, embeds, mask, sampling=sampling, generator=generator)[0]
        mel = self.codec.decode(codes[None].to(self.device))  # (1, n_mels, frames)
        # An untrained codec can decode to any value; real speech mels lie within [LOG_FLOOR, ~e^6],
        # and exp() of anything far outside would overflow the vocoder's least-squares step.
        mel = mel.clamp(math.log(LOG_FLOOR), MAX_LOG_MEL)
        return self.vocoder(mel)[0].float().cpu()

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save(self, path: str | Path) -> Path:
        """Write the whole model (weights, config, tokenizer) as one checkpoint directory."""
        return save_checkpoint(path, self, self.cfg, self.tokenizer, extra={"kind": "omni"})

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> OmniModel:
        """Read a directory written by `save` (or a run directory holding ``best/``/``last/``)."""
        path = resolve(path)
        state, config = load_checkpoint(path)
        kind = config.pop("kind", "omni")
        if kind not in ("omni", "sft"):
            raise ValueError(f"{path} holds a '{kind}' checkpoint, not a whole model; "
                             f"use the sft run (runs/<preset>/sft) or a directory written by OmniModel.save")
        tokenizer = Tokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        model = cls(from_dict(OmniConfig, config), tokenizer)
        model.load_state_dict(state)
        return model.to(map_location).eval()
