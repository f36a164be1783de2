"""The Talker: an autoregressive transformer that speaks, one codec frame at a time.

Like Qwen2.5-Omni's Talker (Xu et al., 2025), it reads what the Thinker means to say: the Thinker's
final hidden states for the response text plus the text's token embeddings, concatenated and
projected into the Talker's width, form a prefix. After the prefix the Talker predicts codec codes.

Each code step also reads the token being spoken at its frame: that token's prefix vector plus
learned embeddings of how many of its frames have passed and how many are left. In training the
token durations come from forced alignment of the real speech (`muomni.align`); when speaking, a
duration head predicts them from the prefix. Told where it is, the Talker does not have to find its
place in the text by attention alone, which a small Talker trained on a few thousand sentences does
badly: it starts a sentence right and then drifts into frequent phrases. (FastSpeech, Ren et al.,
2019, expands text by predicted durations in the same way, for a model without autoregression.)

An optional voice token leads the prefix: the training speech has several voices, and naming the
voice lets the Talker learn what words sound like from all of them while speaking in one.

Several codebooks per frame use MusicGen's delay pattern (Copet et al., 2023): codebook q is shifted
q steps later, so at each step one head per codebook predicts its code and the finer codebooks
already see the coarser codes of the same frame. A frame of ``eos`` codes ends the speech; codes
the pattern leaves empty are ``pad`` and are neither predicted nor sampled.

While training, a spelling head reads the characters of the spoken text back out of the Talker's
states with CTC (Graves et al., 2006), as an ASR model would: having to spell the text from its own
states is a second push to follow it in order.

Shapes: conditioning ``(batch, text_len, cond_dim)`` twice (hidden states, text embeddings) with a
mask ``(batch, text_len)``; durations ``(batch, text_len)`` in code frames (0 on padding); codes
``(batch, n_codebooks, frames)``; logits ``(batch, n_codebooks, steps, codebook_size + 3)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from muomni.audio import ctc_loss, encode_text, normalize_transcript
from muomni.config import CodecConfig, SamplingConfig, TalkerConfig
from muomni.constants import IGNORE_INDEX
from muomni.engine import Rules, decode
from muomni.layers import KVCache, RotaryEmbedding, Transformer, text_positions


class TalkerError(ValueError):
    """Input the Talker cannot work with."""


def delay_codes(codes: torch.Tensor, pad: int, eos: int) -> torch.Tensor:
    """Codes ``(n_q, frames)`` -> delayed ``(n_q, frames + n_q)`` with an end-of-speech frame.

    Row q holds ``pad`` for its first q steps, then the frames, then ``eos``, then ``pad``::

        c00 c01 eos pad pad
        pad c10 c11 eos pad
        pad pad c20 c21 eos
    """
    n_q, frames = codes.shape
    out = torch.full((n_q, frames + n_q), pad, dtype=torch.long, device=codes.device)
    for q in range(n_q):
        out[q, q : q + frames] = codes[q]
        out[q, q + frames] = eos
    return out


def undelay_codes(delayed: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of `delay_codes`: ``(n_q, steps)`` -> the first ``frames`` frames ``(n_q, frames)``."""
    return torch.stack([delayed[q, q : q + frames] for q in range(delayed.shape[0])])


def spelling(text: str, chars: str) -> torch.Tensor:
    """CTC targets ``(n,)`` of ``text`` as the AuT spells transcripts: normalised (lowercase a-z,
    apostrophe, single spaces), then 1 + the index of each character in ``chars`` (0 is the blank)."""
    return torch.tensor(encode_text(normalize_transcript(text), chars), dtype=torch.long)


def frame_tokens(durations: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each code step is in the text, from durations ``(batch, text_len)``.

    Returns, each ``(batch, steps)``: the text column spoken at frame s, how many frames of that
    token came before s, and how many are left counting s (0 once the speech is over; later steps
    stay on the last column). Tokens of 0 frames are skipped.
    """
    ends = durations.cumsum(dim=-1)  # (batch, text_len)
    step = torch.arange(steps, device=durations.device).expand(durations.shape[0], -1).contiguous()
    token = torch.searchsorted(ends, step, right=True).clamp(max=durations.shape[1] - 1)
    end = ends.gather(1, token)
    start = end - durations.gather(1, token)
    return token, step - start, (end - step).clamp(min=0)


class DurationPredictor(nn.Module):
    """Projected text ``(batch, text_len, d)`` and its mask -> log(1 + frames) per token ``(batch, text_len)``.

    Two width-3 convolutions, because a token's length depends on its neighbours (the end of a
    sentence is slower), then a linear read-out. Padding is zeroed before each convolution.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.conv1 = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.out = nn.Linear(d_model, 1)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[:, None, :].to(text.dtype)  # (batch, 1, text_len)
        h = F.gelu(self.conv1(text.transpose(1, 2) * keep)) * keep
        h = F.gelu(self.conv2(h)) * keep
        return self.out(h.transpose(1, 2)).squeeze(-1)


class Talker(nn.Module):
    """Thinker states -> codec codes. ``cond_dim`` is the Thinker's ``d_model``."""

    def __init__(self, cfg: TalkerConfig, codec_cfg: CodecConfig, cond_dim: int):
        super().__init__()
        if not cfg.causal:
            raise TalkerError("the Talker generates left to right; set talker.causal = true")
        self.cfg, self.n_q = cfg, codec_cfg.n_codebooks
        k = codec_cfg.codebook_size
        self.pad_id, self.bos_id, self.eos_id = k, k + 1, k + 2
        self.vocab = k + 3
        # Hidden states say what to mean, embeddings which tokens: both go in, as in Qwen2.5-Omni.
        self.cond_proj = nn.Sequential(nn.Linear(2 * cond_dim, cfg.d_model), nn.GELU(),
                                       nn.Linear(cfg.d_model, cfg.d_model))
        self.voice_embed = nn.Embedding(len(cfg.voices), cfg.d_model) if cfg.voices else None
        self.code_embed = nn.ModuleList(nn.Embedding(self.vocab, cfg.d_model) for _ in range(self.n_q))
        self.duration = DurationPredictor(cfg.d_model)
        self.since_embed = nn.Embedding(cfg.max_span + 1, cfg.d_model)  # frames of the token already spoken
        self.left_embed = nn.Embedding(cfg.max_span + 1, cfg.d_model)  # frames left, 0 = speech is over
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.transformer = Transformer(cfg)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, self.vocab, bias=False) for _ in range(self.n_q))
        # Training only: ``spell_slots`` character logits (blank + spell_chars) per code step.
        self.spell = nn.Linear(cfg.d_model, cfg.spell_slots * (len(cfg.spell_chars) + 1)) if cfg.spell_weight > 0 else None

    # ------------------------------------------------------------------------------------------
    # Batches

    def make_batch(self, codes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes per utterance ``(n_q, frames_i)`` -> (inputs, targets) each ``(batch, n_q, steps)``.

        Inputs are the delayed codes shifted right behind a ``bos`` step; targets are the delayed
        codes with ``pad`` (nothing to predict) and batch padding set to -100 (ignored).
        """
        delayed = [delay_codes(c, self.pad_id, self.eos_id) for c in codes]
        steps = max(d.shape[1] for d in delayed)
        inputs = torch.full((len(codes), self.n_q, steps), self.pad_id, dtype=torch.long)
        targets = torch.full((len(codes), self.n_q, steps), IGNORE_INDEX, dtype=torch.long)
        for i, d in enumerate(delayed):
            n = d.shape[1]
            inputs[i, :, 0] = self.bos_id
            inputs[i, :, 1:n] = d[:, :-1]
            targets[i, :, :n] = d.masked_fill(d == self.pad_id, IGNORE_INDEX)
        return inputs, targets

    # ------------------------------------------------------------------------------------------
    # Forward

    def voice_id(self, voice: str | None) -> int:
        """Index of a voice name (None: the default, first voice)."""
        if voice is None or not self.cfg.voices:
            return 0
        if voice not in self.cfg.voices:
            raise TalkerError(f"unknown voice '{voice}'; this Talker speaks {', '.join(self.cfg.voices)}")
        return self.cfg.voices.index(voice)

    def condition(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor,
                  voices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thinker hidden states and text embeddings ``(batch, text_len, cond_dim)`` with their mask ->
        prefix ``(batch, prefix_len, d_model)``, its mask, and the log-durations the duration head
        predicts ``(batch, text_len)``. The prefix is the voice token (ids ``(batch,)``, default 0)
        then the projected text; the voice also goes into the durations (voices differ in pace)."""
        if hidden.shape != text_embeds.shape:
            raise TalkerError(f"hidden {tuple(hidden.shape)} and text embeddings {tuple(text_embeds.shape)} must match")
        text, mask = self.cond_proj(torch.cat([hidden, text_embeds], dim=-1)), cond_mask.bool()
        if self.voice_embed is None:
            return text, mask, self.duration(text, mask)
        if voices is None:
            voices = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        voice = self.voice_embed(voices)[:, None]  # (batch, 1, d_model)
        prefix = torch.cat([voice, text], dim=1)
        return prefix, torch.cat([mask.new_ones(hidden.shape[0], 1), mask], dim=1), self.duration(text + voice, mask)

    def frame_inputs(self, prefix: torch.Tensor, durations: torch.Tensor, steps: int) -> torch.Tensor:
        """What each code step adds to its input ``(batch, steps, d_model)``: the prefix vector of the
        token spoken at its frame plus the since/left embeddings (see `frame_tokens`)."""
        token, since, left = frame_tokens(durations, steps)
        column = token + (prefix.shape[1] - durations.shape[1])  # the text is the end of the prefix
        spoken = prefix.gather(1, column[..., None].expand(-1, -1, prefix.shape[-1]))
        span = self.cfg.max_span
        return spoken + self.since_embed(since.clamp(max=span)) + self.left_embed(left.clamp(max=span))

    def predict_durations(self, log_durations: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """The duration head's log(1 + frames) ``(batch, text_len)`` -> whole frames, 0 on padding,
        and at least one frame per row."""
        frames = log_durations.float().expm1().round().clamp(min=0).long() * cond_mask.long()
        frames[:, -1] += (frames.sum(dim=-1) == 0).long()  # the text is left-padded: -1 is a real token
        return frames

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(batch, n_q, steps)`` -> summed code embeddings ``(batch, steps, d_model)``."""
        return sum(embed(codes[:, q]) for q, embed in enumerate(self.code_embed))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(h) for head in self.heads], dim=1)  # (batch, n_q, steps, vocab)

    def states(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor,
               inputs: torch.Tensor, durations: torch.Tensor, voices: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced final states ``(batch, steps, d_model)`` at the code steps ``(batch, n_q, steps)``
        spoken with the given durations, and the duration head's log-durations ``(batch, text_len)``.

        The prefix may be left-padded (``cond_mask`` False); code steps are right-padded.
        """
        prefix, mask, log_durations = self.condition(hidden, text_embeds, cond_mask, voices)
        steps = inputs.shape[2]
        x = torch.cat([prefix, self.embed_codes(inputs) + self.frame_inputs(prefix, durations, steps)], dim=1)
        mask = torch.cat([mask, mask.new_ones(inputs.shape[0], steps)], 1)
        h = self.transformer(x, self.rope(text_positions(mask)), None if bool(mask.all()) else mask)
        return h[:, prefix.shape[1]:], log_durations

    def forward(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor,
                inputs: torch.Tensor, durations: torch.Tensor, voices: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(batch, n_q, steps, vocab)`` for inputs ``(batch, n_q, steps)``."""
        return self._logits(self.states(hidden, text_embeds, cond_mask, inputs, durations, voices)[0])

    def spell_loss(self, states: torch.Tensor, targets: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CTC of ``texts`` against the spelling head on ``states`` ``(batch, steps, d_model)``; each row
        reads its speech steps (those with a target, up to and including the end-of-speech step)."""
        batch, steps, _ = states.shape
        slots = self.cfg.spell_slots
        logits = self.spell(states).view(batch, steps * slots, len(self.cfg.spell_chars) + 1)
        spoken = (targets != IGNORE_INDEX).any(dim=1).sum(dim=-1) * slots  # (batch,)
        letters = [spelling(text, self.cfg.spell_chars) for text in texts]
        lengths = torch.tensor([len(x) for x in letters], device=states.device)
        return ctc_loss(logits, spoken, torch.cat(letters).to(states.device), lengths)

    def loss(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor,
             inputs: torch.Tensor, targets: torch.Tensor, durations: torch.Tensor,
             voices: torch.Tensor | None = None, texts: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over all predicted codes + ``duration_weight`` x the duration head's
        squared error in log(1 + frames) (+ ``spell_weight`` x the spelling CTC when the spoken
        ``texts`` are given), plus per-codebook accuracy."""
        states, log_durations = self.states(hidden, text_embeds, cond_mask, inputs, durations, voices)
        logits = self._logits(states)
        code_loss = F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        real = cond_mask.bool()
        duration_loss = F.mse_loss(log_durations[real].float(), durations[real].float().log1p())
        loss = code_loss + self.cfg.duration_weight * duration_loss
        metrics: dict[str, float] = {"tokens": float((targets != IGNORE_INDEX).sum()), "code_loss": float(code_loss.detach()),
                                     "duration_loss": float(duration_loss.detach())}
        if texts is not None and self.spell is not None:
            spell = self.spell_loss(states, targets, texts)
            metrics["spell_loss"] = float(spell.detach())
            loss = loss + self.cfg.spell_weight * spell
        with torch.no_grad():
            for q in range(self.n_q):
                valid = targets[:, q] != IGNORE_INDEX
                hit = (logits[:, q].argmax(-1) == targets[:, q]) & valid
                metrics[f"acc{q}"] = float(hit.sum() / valid.sum().clamp(min=1))
        return loss, metrics

    # ------------------------------------------------------------------------------------------
    # Generation with a KV cache

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        p = next(self.parameters())
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, p.dtype, p.device)

    def prefill(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor,
                cache: KVCache, steps: int, voices: torch.Tensor | None = None,
                durations: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prefix and the ``bos`` step of speech that may last ``steps`` steps, with the
        given durations or else the duration head's.

        Returns the logits of step 0 ``(batch, n_q, vocab)``, the position of that step ``(batch,)``
        and the frame inputs of all ``steps`` steps ``(batch, steps, d_model)`` for `step`.
        """
        batch = hidden.shape[0]
        bos = torch.full((batch, self.n_q, 1), self.bos_id, dtype=torch.long, device=hidden.device)
        prefix, mask, log_durations = self.condition(hidden, text_embeds, cond_mask, voices)
        if durations is None:
            durations = self.predict_durations(log_durations, cond_mask.bool())
        frame_inputs = self.frame_inputs(prefix, durations, steps)
        x = torch.cat([prefix, self.embed_codes(bos) + frame_inputs[:, :1]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = text_positions(mask)
        cache.append_mask(mask, x.shape[1])
        h = self.transformer(x, self.rope(positions), cache=cache)
        return self._logits(h[:, -1:])[:, :, 0], positions[:, -1], frame_inputs

    def step(self, codes: torch.Tensor, frame_input: torch.Tensor, positions: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """One decoding step: codes ``(batch, n_q)`` plus the step's frame input ``(batch, d_model)``
        at ``positions`` ``(batch,)`` -> logits ``(batch, n_q, vocab)``."""
        cache.append_mask(None, 1)
        x = self.embed_codes(codes[:, :, None]) + frame_input[:, None]
        h = self.transformer(x, self.rope(positions[:, None]), cache=cache)
        return self._logits(h)[:, :, 0]

    @torch.no_grad()
    def generate(self, hidden: torch.Tensor, text_embeds: torch.Tensor, cond_mask: torch.Tensor | None = None,
                 max_frames: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None, min_frames: int = 1,
                 voices: torch.Tensor | None = None, durations: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Speak: codes ``(n_q, frames_i)`` per row, stopping at each row's end-of-speech frame.

        Codebook 0 decides when speech ends (it may sample ``eos`` once ``min_frames`` are out); the
        other codebooks follow the delay pattern, so a row is finished ``n_q - 1`` steps after its
        ``eos``. Rows that never stop end at ``max_frames`` (default ``cfg.max_frames``). ``sampling``
        defaults to ``cfg.sampling``; ``voices`` ``(batch,)`` picks each row's voice (default: the
        first, the assistant's); ``durations`` ``(batch, text_len)`` fix the frames per token
        (default: the duration head's). The loop is `muomni.engine.decode` with `SpeechRules`.
        """
        batch, device = hidden.shape[0], hidden.device
        if cond_mask is None:
            cond_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
        max_frames = max_frames or self.cfg.max_frames
        total = max_frames + self.n_q
        cache = self.new_cache(batch, hidden.shape[1] + 2 + total)
        # one frame input more than steps: the last step still feeds its codes back in
        logits, pos, frame_inputs = self.prefill(hidden, text_embeds, cond_mask, cache, total + 1, voices, durations)
        fed = 0  # steps fed back so far

        def step(codes: torch.Tensor) -> tuple[torch.Tensor, None]:
            nonlocal fed, pos
            fed, pos = fed + 1, pos + 1
            return self.step(codes, frame_inputs[:, fed], pos, cache), None

        rules = SpeechRules(self, batch, device, min_frames, max_frames)
        steps = [codes for codes, _ in decode(step, logits, None, total, sampling or self.cfg.sampling, generator, rules)]
        delayed = torch.stack(steps, dim=2)  # (batch, n_q, steps)
        return [undelay_codes(delayed[b], int(rules.end[b])) for b in range(batch)]


class SpeechRules(Rules):
    """The Talker's rules for the decode loop: only real codes may be sampled, and end-of-speech only
    on codebook 0 once ``min_frames`` are out; the delay pattern then fixes some entries (pad before a
    codebook starts and after it ends, eos on each codebook's copy of the end frame), and a row is
    finished ``n_q - 1`` steps after its end frame. A row that has not ended by ``max_frames`` ends there.
    """

    def __init__(self, talker: Talker, batch: int, device: torch.device, min_frames: int, max_frames: int):
        super().__init__(pad_id=talker.pad_id)
        self.eos_id, self.n_q = talker.eos_id, talker.n_q
        self.min_frames, self.max_frames = min_frames, max_frames
        self.end = torch.full((batch, 1), -1, dtype=torch.long, device=device)  # end frame per row, -1 until known

    def allow(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        allowed = logits.float().clone()  # (batch, n_q, vocab)
        eos_logit = allowed[:, 0, self.eos_id].clone()
        allowed[:, :, self.pad_id:] = float("-inf")  # real codes only ...
        if step >= self.min_frames:
            allowed[:, 0, self.eos_id] = eos_logit  # ... and eos on codebook 0
        return allowed

    def settle(self, ids: torch.Tensor, step: int, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stops = (self.end < 0) & ((ids[:, :1] == self.eos_id) | (step >= self.max_frames))
        self.end = torch.where(stops, step, self.end)
        frame = step - torch.arange(self.n_q, device=ids.device)[None]  # (1, n_q): the frame each codebook is at
        ended = self.end >= 0
        ids = torch.where(frame < 0, self.pad_id, ids)
        ids = torch.where(ended & (frame == self.end), self.eos_id, ids)
        ids = torch.where(ended & (frame > self.end), self.pad_id, ids)
        return ids, (ended & (step >= self.end + self.n_q - 1)).squeeze(1)
