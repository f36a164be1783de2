"""Audio in: loading, log-mel features, SpecAugment, the AuT encoder and CTC speech recognition.

The pipeline, with the tensor shapes at each step (``cfg`` is an `AudioConfig`):

1. `load_audio` / `prepare_waveform`: any WAV/FLAC (soundfile) or other format (torchcodec/FFmpeg)
   -> mono float32 ``(samples,)`` at ``cfg.sample_rate``. Bad input raises `AudioError` with one
   line naming the problem; multi-channel audio is averaged to mono, other sample rates are
   resampled, and float samples beyond ±1 are scaled back into range (documented conversions).
2. `LogMel`: waveform -> log-mel ``(frames, n_mels)`` at 100 frames/s (25 ms window, 10 ms hop),
   built on ``torchaudio.transforms.MelSpectrogram``, normalised per utterance or globally.
3. `spec_augment` (training only): random time and frequency masks (Park et al., 2019).
4. `AuT`: two stride-2 convolutions (100 Hz -> 25 Hz), a bidirectional transformer with rotary
   positions and padding masks, RMSNorm -> hidden ``(batch, frames_25hz, d_model)``. A linear CTC
   head (Graves et al., 2006) predicts characters at 25 Hz; characters arrive at about 14 per
   second, so 25 Hz leaves room for the blanks CTC needs between repeated letters.
5. `merge_pairs`: adjacent 25 Hz frames concatenated -> ``(batch, frames_12_5hz, 2 * d_model)``,
   the audio tokens the Thinker reads (as Qwen2-Audio/Qwen2.5-Omni pool the encoder output by 2).
6. `ctc_greedy_decode`, `cer`, `wer`: best-path decoding and error rates by edit distance.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from muomni.config import AudioConfig
from muomni.data.language import normalize_transcript  # noqa: F401  transcripts into the CTC alphabet, before encode_text
from muomni.layers import RotaryEmbedding, Transformer

SILENCE_PEAK = 1e-3  # a peak below -60 dBFS holds no usable speech
FULL_SCALE = 0.999  # samples at or beyond this magnitude count as clipped
MAX_CLIPPED_FRACTION = 0.01  # more clipped samples than this and the recording is distorted
MIN_SAMPLE_RATE = 4000  # below this the speech band is gone; resampling cannot bring it back
MAX_CHANNELS = 8  # more "channels" than this almost always means a (samples, channels) mix-up


class AudioError(ValueError):
    """Audio that μOmni cannot use, explained in one line."""


# ----------------------------------------------------------------------------------------------
# Loading


def load_audio(path: str | Path, sample_rate: int = 16000, max_seconds: float = 30.0) -> torch.Tensor:
    """Read an audio file as mono float32 ``(samples,)`` at ``sample_rate``.

    WAV, FLAC and OGG go through soundfile (libsndfile); anything else (MP3, M4A, ...) through
    torchcodec, which needs FFmpeg. See `prepare_waveform` for the checks and conversions.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path} does not exist")
    if not path.is_file():
        raise AudioError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path.name} is empty (0 bytes); expected speech at {sample_rate // 1000} kHz")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
        wave = torch.from_numpy(np.ascontiguousarray(data.T))
    except (soundfile.LibsndfileError, RuntimeError) as sf_error:
        wave, rate = _decode_with_ffmpeg(path, sf_error)
    return prepare_waveform(wave, rate, path.name, sample_rate, max_seconds)


def _decode_with_ffmpeg(path: Path, sf_error: Exception) -> tuple[torch.Tensor, int]:
    """Formats libsndfile does not know, through torchcodec; one clear error if that fails too."""
    try:
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(str(path)).get_all_samples()
        return samples.data.float(), int(samples.sample_rate)
    except Exception:  # torchcodec raises RuntimeError/ValueError, or ImportError without FFmpeg
        reason = str(sf_error).splitlines()[0].rsplit(": ", 1)[-1].strip()
        raise AudioError(f"{path.name} is not audio that soundfile or FFmpeg can decode ({reason})") from None


def prepare_waveform(wave: torch.Tensor | np.ndarray, rate: int, name: str = "waveform",
                     sample_rate: int = 16000, max_seconds: float = 30.0) -> torch.Tensor:
    """Check and convert a waveform ``(samples,)`` or ``(channels, samples)`` to mono ``(samples,)``.

    Errors (`AudioError`): empty, non-finite, silent (peak below -60 dBFS), hard-clipped (over 1% of
    samples at full scale), too short for one 25 ms window, longer than ``max_seconds``, a sample
    rate below 4 kHz, or a shape that is not a waveform.
    Conversions: channels are averaged to mono; float samples beyond ±1 are divided by the peak;
    any other sample rate is resampled to ``sample_rate`` (``torchaudio.functional.resample``).
    """
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        raise AudioError(f"{name} has integer samples ({wave.dtype}); convert to float in [-1, 1]")
    wave = wave.float()
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise AudioError(f"{name} has shape {tuple(wave.shape)}; expected (samples,) or (channels, samples)")
    if wave.shape[0] > MAX_CHANNELS:
        raise AudioError(f"{name} has {wave.shape[0]} channels; expected (channels, samples) with at most "
                         f"{MAX_CHANNELS} channels (transpose a (samples, channels) array)")
    if wave.shape[1] == 0:
        raise AudioError(f"{name} is empty (0 samples); expected speech at {sample_rate // 1000} kHz")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"{name} has sample rate {rate} Hz; speech needs at least {MIN_SAMPLE_RATE} Hz "
                         f"(it is resampled to {sample_rate} Hz)")
    if not torch.isfinite(wave).all():
        raise AudioError(f"{name} contains NaN or infinite samples")
    seconds = wave.shape[1] / rate
    if seconds > max_seconds:
        raise AudioError(f"{name} is too long ({seconds:.1f} s); the limit is {max_seconds:g} s, "
                         "so split it into shorter pieces")
    mono = wave.mean(dim=0)
    peak = float(mono.abs().max())
    if peak < SILENCE_PEAK:
        level = 20 * math.log10(peak) if peak > 0 else -math.inf
        raise AudioError(f"{name} is silent (peak {level:.0f} dBFS); expected speech")
    if peak > 1.0:
        mono = mono / peak  # float files may exceed full scale without clipping: rescale, keep shape
    clipped = float((mono.abs() >= FULL_SCALE).float().mean())
    if clipped > MAX_CLIPPED_FRACTION:
        raise AudioError(f"{name} is clipped ({clipped:.1%} of samples at full scale); "
                         "record it again at a lower gain")
    if rate != sample_rate:
        mono = torchaudio.functional.resample(mono, rate, sample_rate)
    window = round(sample_rate * 0.025)
    if mono.numel() < window:
        raise AudioError(f"{name} is too short ({mono.numel() / sample_rate * 1000:.0f} ms); "
                         f"need at least one 25 ms window")
    return mono.contiguous()


# ----------------------------------------------------------------------------------------------
# Log-mel frontend


class LogMel(nn.Module):
    """Waveform ``(samples,)`` or ``(batch, samples)`` -> log-mel ``(..., frames, n_mels)``.

    Power spectrogram (Hann window of ``win_ms``, hop ``hop_ms``, centred frames, so
    ``frames = samples // hop + 1``) -> HTK mel filterbank -> log10, floored 8 decades (80 dB)
    below the loudest bin as in Whisper. Then either per-utterance normalisation (each mel bin to
    zero mean and unit variance over the utterance's frames: removes the loudness and the spectral
    tilt of voice and microphone) or Whisper's fixed global scaling ``(x + 4) / 4``.
    Rows of a batch must be unpadded waveforms of equal length; use `batch_features` otherwise.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.normalize not in ("utterance", "global"):
            raise ValueError(f"unknown normalize '{cfg.normalize}'; expected 'utterance' or 'global'")
        self.normalize = cfg.normalize
        self.win_length = round(cfg.sample_rate * cfg.win_ms / 1000)
        self.hop_length = round(cfg.sample_rate * cfg.hop_ms / 1000)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=self.win_length, win_length=self.win_length,
            hop_length=self.hop_length, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="reflect")

    def num_frames(self, samples: torch.Tensor | int) -> torch.Tensor | int:
        """Frames produced from ``samples`` samples (centred STFT)."""
        return samples // self.hop_length + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.mel(wave.float()).transpose(-1, -2)  # (..., frames, n_mels)
        log_mel = mel.clamp(min=1e-10).log10()
        floor = log_mel.amax(dim=(-1, -2), keepdim=True) - 8.0
        log_mel = torch.maximum(log_mel, floor)
        if self.normalize == "global":
            return (log_mel + 4.0) / 4.0
        mean = log_mel.mean(dim=-2, keepdim=True)
        std = log_mel.std(dim=-2, keepdim=True, unbiased=False)
        return (log_mel - mean) / (std + 1e-5)


def batch_features(frontend: LogMel, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels of waveforms of any lengths: ``(batch, max_frames, n_mels)`` zero-padded, and lengths.

    Each waveform is processed alone, so padding never leaks into the features.
    """
    feats = [frontend(wave) for wave in waves]
    lengths = torch.tensor([f.shape[0] for f in feats])
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


def spec_augment(mels: torch.Tensor, lengths: torch.Tensor, cfg: AudioConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment masks on normalised log-mels ``(batch, frames, n_mels)`` -> same shape.

    ``spec_time_masks`` bands of up to ``spec_time_width`` frames (inside each row's real length)
    and ``spec_freq_masks`` bands of up to ``spec_freq_width`` mel bins are set to 0, the mean of
    normalised features. Masks are drawn per utterance; a new tensor is returned.
    """
    batch, frames, n_mels = mels.shape
    keep = torch.ones(batch, frames, n_mels, dtype=torch.bool, device=mels.device)
    lengths = lengths.to(mels.device)
    for axis, count, width, size in ((1, cfg.spec_time_masks, cfg.spec_time_width, lengths),
                                     (2, cfg.spec_freq_masks, cfg.spec_freq_width, torch.full_like(lengths, n_mels))):
        positions = torch.arange(mels.shape[axis], device=mels.device)
        for _ in range(count):
            w = torch.randint(0, width + 1, (batch,), generator=generator).to(mels.device)
            w = torch.minimum(w, size // 5 if axis == 1 else size)  # never hide most of a short utterance
            start = (torch.rand(batch, generator=generator).to(mels.device) * (size - w + 1)).long()
            band = (positions[None] >= start[:, None]) & (positions[None] < (start + w)[:, None])
            keep &= ~(band[:, :, None] if axis == 1 else band[:, None, :])
    return mels * keep


# ----------------------------------------------------------------------------------------------
# The AuT encoder


def conv_output_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after the two stride-2 convolutions (kernel 3, padding 1): ``ceil(ceil(L / 2) / 2)``."""
    for _ in range(2):
        lengths = (lengths + 1) // 2
    return lengths


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(batch, max_len)`` boolean mask, True on the first ``lengths[i]`` positions of row i."""
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]


class AuT(nn.Module):
    """Audio Transformer: log-mel ``(batch, frames, n_mels)`` at 100 Hz -> ``(batch, frames / 4, d_model)``.

    Conv1d(n_mels -> C, k3 s2) -> GELU -> Conv1d(C -> C, k3 s2) -> GELU -> Linear(C -> d_model)
    -> bidirectional `Transformer` with rotary positions and key-padding masks -> final RMSNorm.
    Padded frames are zeroed after every convolution, so a padded batch gives each row exactly
    what that row gives alone. ``ctc_head`` maps each 25 Hz frame to ``1 + len(ctc_vocab)`` logits
    (index 0 is the CTC blank).
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.causal:
            raise ValueError("the AuT encoder is bidirectional; set audio.causal to false")
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.conv_channels, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.conv_channels, cfg.conv_channels, kernel_size=3, stride=2, padding=1)
        self.proj = nn.Linear(cfg.conv_channels, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.encoder = Transformer(cfg)
        self.ctc_head = nn.Linear(cfg.d_model, len(cfg.ctc_vocab) + 1)

    @property
    def merged_dim(self) -> int:
        """Width of the 12.5 Hz tokens from `merge_pairs`: two 25 Hz frames side by side."""
        return 2 * self.cfg.d_model

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mels ``(batch, frames, n_mels)``, lengths ``(batch,)`` -> hidden ``(batch, T, d_model)``, lengths ``(batch,)``.

        ``T = ceil(frames / 4)``; rows beyond their length are padding (zeros after the convs,
        ignored by attention, arbitrary after the final norm).
        """
        batch, frames, n_mels = mels.shape
        if n_mels != self.cfg.n_mels:
            raise AudioError(f"features have {n_mels} mel bins; this AuT expects {self.cfg.n_mels}")
        if frames == 0:
            raise AudioError("features have 0 frames; expected at least one 10 ms frame")
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=mels.device)
        lengths = lengths.to(mels.device).long()
        x = mels.transpose(1, 2)  # (batch, n_mels, frames): convolutions slide over time
        x = x * length_mask(lengths, frames)[:, None, :].to(x.dtype)
        for conv in (self.conv1, self.conv2):
            x = F.gelu(conv(x))
            lengths = (lengths + 1) // 2
            x = x * length_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
        x = self.proj(x.transpose(1, 2))  # (batch, T, d_model)
        positions = torch.arange(x.shape[1], device=x.device).expand(batch, -1)
        mask = length_mask(lengths, x.shape[1])
        hidden = self.encoder(x, self.rope(positions), None if bool(mask.all()) else mask)
        return hidden, lengths

    def ctc_logits(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC logits ``(batch, T, 1 + len(ctc_vocab))`` at 25 Hz and their lengths ``(batch,)``."""
        hidden, lengths = self(mels, lengths)
        return self.ctc_head(hidden), lengths

    def ctc_loss(self, mels: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                 target_lengths: torch.Tensor) -> torch.Tensor:
        """Mean CTC loss of padded character targets ``(batch, max_chars)`` (see `ctc_loss`)."""
        return ctc_loss(*self.ctc_logits(mels, lengths), targets, target_lengths)


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC loss of logits ``(batch, T, vocab)``, averaged per target character, then over the batch.

    Utterances too fast for their frames (more characters plus repeats than 25 Hz frames)
    contribute zero instead of infinity (``zero_infinity``).
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, batch, vocab) for F.ctc_loss
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True)


def merge_pairs(hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """25 Hz frames ``(batch, T, d)`` -> 12.5 Hz tokens ``(batch, ceil(T / 2), 2 * d)`` and lengths.

    Frames 2i and 2i+1 are concatenated; an odd last frame is paired with zeros. Everything past a
    row's length is zeroed, so padding never leaks into a real token.
    """
    batch, frames, dim = hidden.shape
    hidden = hidden * length_mask(lengths.to(hidden.device), frames)[..., None].to(hidden.dtype)
    if frames % 2:
        hidden = F.pad(hidden, (0, 0, 0, 1))
    return hidden.reshape(batch, -1, 2 * dim), (lengths + 1) // 2


def word_spans(labels: list[int], space: int) -> list[tuple[int, int]]:
    """The words a greedy CTC path hears: frame spans ``[start, end)`` from a word's first letter to
    its last, split where the path says ``space`` (blanks, label 0, inside a word belong to it).

    A path with no letter at all (silence, noise) gives one span over every frame, so a clip always
    gives at least one token.
    """
    spans, start, end = [], None, 0
    for t, label in enumerate(labels):
        if label == space and start is not None:
            spans.append((start, end))
            start = None
        elif label not in (0, space):
            start = t if start is None else start
            end = t + 1
    if start is not None:
        spans.append((start, end))
    return spans or [(0, len(labels))]


def pool_words(hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """One token per word: the mean and the max of its frames side by side.

    hidden ``(T, d)`` at 25 Hz, spans from `word_spans` -> ``(n_words, 2 * d)``, the width of
    `merge_pairs`' tokens, so the same projector reads either.
    """
    return torch.stack([torch.cat([hidden[a:b].mean(0), hidden[a:b].amax(0)]) for a, b in spans])


# ----------------------------------------------------------------------------------------------
# Transcripts, decoding and error rates


def encode_text(text: str, vocab: str) -> list[int]:
    """Characters -> CTC target ids (``vocab[i]`` is id ``i + 1``; 0 is the blank)."""
    index = {char: i + 1 for i, char in enumerate(vocab)}
    unknown = sorted({char for char in text if char not in index})
    if unknown:
        raise AudioError(f"transcript {text[:40]!r} has characters {''.join(unknown)!r} outside the CTC "
                         "vocabulary; run normalize_transcript first")
    return [index[char] for char in text]


def ctc_greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None, vocab: str) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks. logits ``(batch, T, 1 + len(vocab))``."""
    best = logits.argmax(-1).cpu()  # (batch, T)
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1])
    texts = []
    for row, length in zip(best, lengths.tolist()):
        path = torch.unique_consecutive(row[:length])
        texts.append("".join(vocab[i - 1] for i in path.tolist() if i != 0))
    return texts


def cer(references: list[str], hypotheses: list[str]) -> float:
    """Character error rate: total edit distance / total reference characters."""
    return _error_rate([list(r) for r in references], [list(h) for h in hypotheses])


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate: total word-level edit distance / total reference words."""
    return _error_rate([r.split() for r in references], [h.split() for h in hypotheses])


def _error_rate(references: list[list[str]], hypotheses: list[list[str]]) -> float:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = sum(torchaudio.functional.edit_distance(r, h) for r, h in zip(references, hypotheses))
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("references are empty; error rates need at least one reference unit")
    return errors / total


@torch.no_grad()
def transcribe(model: AuT, frontend: LogMel, waves: list[torch.Tensor]) -> list[str]:
    """Greedy CTC transcripts of mono 16 kHz waveforms (any lengths)."""
    device = next(model.parameters()).device
    mels, lengths = batch_features(frontend, [w.cpu() for w in waves])
    logits, out_lengths = model.ctc_logits(mels.to(device), lengths.to(device))
    return ctc_greedy_decode(logits, out_lengths, model.cfg.ctc_vocab)
