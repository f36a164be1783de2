"""Forced alignment: which text token is being spoken at each code frame.

The Talker speaks a sentence frame by frame. Told only the whole text up front, a small Talker loses
its place after the first words. Told which token each frame belongs to, it keeps it: speaking becomes
"say this token for d frames, then the next". Training needs those durations for real speech, and the
AuT of stage B can give them. Its CTC head scores every 25 Hz frame against every character; the one
frame-by-frame path that spells exactly the known transcript and scores best (the Viterbi path,
torchaudio's `forced_align`) says at which frame each character is emitted.

A token starts at the frame where its first letter is emitted; a token without letters (punctuation,
the empty end of an answer) starts right after the previous letter, so pauses go to it. The starts, in
12.5 Hz code frames, cut the utterance into one span per token: the durations sum to its frames.

Shapes: CTC log-probabilities ``(frames, 1 + len(vocab))``; durations ``(tokens,)`` in code frames.
"""

from __future__ import annotations

import math

import torch
import torchaudio

from muomni.audio import AuT, LogMel, batch_features, encode_text


def spelled_tokens(token_texts: list[str], vocab: str) -> tuple[str, list[int]]:
    """The transcript of the joined tokens as the AuT spells it, and per character the token it
    comes from (-1 for spaces).

    The same normalisation as `muomni.data.language.normalize_transcript` (lowercase; characters
    outside ``vocab`` become spaces; single spaces, none at the ends), done character by character
    to keep each letter's token.
    """
    chars: list[str] = []
    owners: list[int] = []
    for token, text in enumerate(token_texts):
        for char in text.lower():
            if char in vocab and char != " ":
                chars.append(char)
                owners.append(token)
            elif chars and chars[-1] != " ":
                chars.append(" ")
                owners.append(-1)
    if chars and chars[-1] == " ":
        chars.pop()
        owners.pop()
    return "".join(chars), owners


def emission_frames(log_probs: torch.Tensor, targets: list[int]) -> list[int]:
    """The frame at which each target character is first emitted on the forced-alignment path.

    log_probs ``(frames, vocab)`` with the blank at 0; targets: character ids (``len(targets)``
    plus the number of repeated neighbours must not exceed ``frames``).
    """
    path, _ = torchaudio.functional.forced_align(log_probs[None].float(), torch.tensor([targets], dtype=torch.int32),
                                                 blank=0)
    path = path[0].tolist()
    # CTC needs a blank between two equal characters, so a new character starts wherever the path
    # enters a non-blank label.
    return [t for t, label in enumerate(path) if label != 0 and (t == 0 or path[t - 1] != label)]


def durations_from_starts(starts: list[int], frames: int) -> torch.Tensor:
    """Token start frames -> durations ``(tokens,)`` summing to ``frames``: the first token starts
    at 0, starts never go back and never pass the end."""
    starts_t = torch.tensor(starts, dtype=torch.long).clamp(0, frames)
    starts_t[0] = 0
    starts_t = starts_t.cummax(dim=0).values
    return torch.diff(starts_t, append=torch.tensor([frames]))


def proportional_durations(token_texts: list[str], frames: int, vocab: str) -> torch.Tensor:
    """Durations ``(tokens,)`` in proportion to each token's letters, summing to ``frames``.

    What a sentence gets without an aligner: right on average, wrong by a frame or more within it.
    """
    _, owners = spelled_tokens(token_texts, vocab)
    letters = torch.bincount(torch.tensor([o for o in owners if o >= 0], dtype=torch.long),
                             minlength=len(token_texts)).float()
    if letters.sum() == 0:
        letters = torch.ones(len(token_texts))
    ends = (letters.cumsum(0) / letters.sum() * frames).round().long()
    return torch.diff(ends, prepend=torch.tensor([0]))


def token_durations(log_probs: torch.Tensor, token_texts: list[str], frames: int, vocab: str) -> torch.Tensor:
    """Durations ``(tokens,)`` in code frames for one utterance from its CTC log-probabilities
    ``(aut_frames, 1 + len(vocab))``; ``frames`` code frames cover the same audio.

    Falls back to `proportional_durations` when the transcript cannot be aligned (no letters, or
    more characters than the audio has frames).
    """
    text, owners = spelled_tokens(token_texts, vocab)
    targets = encode_text(text, vocab)
    repeats = sum(a == b for a, b in zip(targets, targets[1:]))
    if not targets or len(targets) + repeats > log_probs.shape[0]:
        return proportional_durations(token_texts, frames, vocab)
    emitted = emission_frames(log_probs, targets)
    scale = frames / log_probs.shape[0]  # AuT frames -> code frames
    starts, after_last_letter = [], 0
    for token in range(len(token_texts)):
        own = [frame for frame, owner in zip(emitted, owners) if owner == token]
        if own:
            starts.append(int(own[0] * scale))
            after_last_letter = math.ceil((own[-1] + 1) * scale)  # a token keeps the frame of its last letter
        else:
            starts.append(after_last_letter)
    return durations_from_starts(starts, frames)


@torch.no_grad()
def align_tokens(aut: AuT, frontend: LogMel, waves: list[torch.Tensor], token_texts: list[list[str]],
                 frames: list[int], batch_size: int = 32) -> list[torch.Tensor]:
    """Durations ``(tokens_i,)`` per utterance: 16 kHz waveforms, each one's token strings and its
    number of code frames, aligned with the AuT's CTC head."""
    device = next(aut.parameters()).device
    was_training = aut.training
    aut.eval()  # no dropout: the same audio always aligns the same way
    out = []
    for start in range(0, len(waves), batch_size):
        mels, lengths = batch_features(frontend, [w.cpu() for w in waves[start : start + batch_size]])
        logits, out_lengths = aut.ctc_logits(mels.to(device), lengths.to(device))
        log_probs = logits.float().log_softmax(-1).cpu()
        for row, length in enumerate(out_lengths.tolist()):
            i = start + row
            out.append(token_durations(log_probs[row, :length], token_texts[i], frames[i], aut.cfg.ctc_vocab))
    aut.train(was_training)
    return out
