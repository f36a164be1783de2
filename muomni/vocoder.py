"""Vocoders: log-mel ``(batch, n_mels, frames)`` -> waveform ``(batch, frames * hop_length)``.

- `GriffinLimVocoder` (the default, nothing to train): undo the mel filterbank by least squares
  (torchaudio ``InverseMelScale``), then recover a phase for the magnitude spectrogram by Griffin &
  Lim's (1984) alternating projections with Perraudin et al.'s (2013) momentum (torchaudio
  ``GriffinLim``). Lossy (80 mel bins keep the formants, not the harmonics), but intelligible.
- `HiFiGAN` (Kong et al., 2020), small: a generator of transposed convolutions whose strides
  multiply to ``hop_length``, each followed by dilated residual blocks; trained against a
  multi-period and a multi-scale discriminator with least-squares adversarial, feature-matching
  and mel losses (`VocoderGAN`, used by ``muomni train --stage vocoder``).

Frame rates agree end to end: ``frames`` mel frames give exactly ``frames * hop_length`` samples,
and one code frame is ``frames_per_code`` mel frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torch.func import functional_call

from muomni.codec import LOG_FLOOR, MelFrontend
from muomni.config import CodecConfig


class VocoderError(ValueError):
    """Input a vocoder cannot turn into sound."""


def samples_for_codes(code_frames: int, cfg: CodecConfig) -> int:
    """How many waveform samples ``code_frames`` codec frames become: frames x frames_per_code x hop."""
    return code_frames * cfg.frames_per_code * cfg.hop_length


class GriffinLimVocoder(nn.Module):
    """Log-mel -> linear magnitude (least squares) -> Griffin-Lim phase recovery -> waveform."""

    def __init__(self, cfg: CodecConfig, n_iter: int = 32, momentum: float = 0.99):
        super().__init__()
        self.cfg, self.n_iter, self.momentum = cfg, n_iter, momentum
        # "gelsd" (SVD) solves the least squares even when some mel filters are empty, as the
        # lowest of 80 HTK filters over 201 bins are; it runs on the CPU.
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, driver="gelsd")
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def magnitude(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(batch, n_mels, frames)`` -> linear magnitude ``(batch, n_fft // 2 + 1, frames)``."""
        return self.inverse_mel.cpu()(log_mel.float().cpu().exp()).to(log_mel.device)

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
        """Waveform ``(batch, frames * hop_length)``; ``seed`` fixes the random initial phase."""
        if log_mel.dim() != 3 or log_mel.shape[1] != self.cfg.n_mels:
            raise VocoderError(f"expected log-mel (batch, {self.cfg.n_mels}, frames), got {tuple(log_mel.shape)}")
        frames = log_mel.shape[-1]
        spec = self.magnitude(log_mel)
        # A centred STFT of frames * hop samples has frames + 1 frames (the front end drops the last):
        # repeat the last one so istft yields exactly frames * hop samples.
        spec = torch.cat([spec, spec[..., -1:]], dim=-1)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            wav = torchaudio.functional.griffinlim(
                spec, self.window, self.cfg.n_fft, self.cfg.hop_length, self.cfg.n_fft, power=1.0,
                n_iter=self.n_iter, momentum=self.momentum, length=frames * self.cfg.hop_length, rand_init=True)
        return wav

    @torch.no_grad()
    def vocode_each(self, log_mels: list[torch.Tensor], seed: int | None = 0,
                    batch_size: int = 16) -> list[torch.Tensor]:
        """Log-mels ``(n_mels, frames_i)`` of any lengths -> waveforms ``(frames_i * hop_length,)``.

        Mels of like length go through one batched call, padded with silence and cut back after
        (on two CPU cores the speech stage's evaluation took 64 s instead of 83 s).
        """
        order = sorted(range(len(log_mels)), key=lambda i: log_mels[i].shape[-1])
        waves: list[torch.Tensor] = [torch.empty(0)] * len(log_mels)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            longest = max(log_mels[i].shape[-1] for i in chunk)
            batch = torch.full((len(chunk), self.cfg.n_mels, longest), math.log(LOG_FLOOR))
            for row, i in enumerate(chunk):
                batch[row, :, :log_mels[i].shape[-1]] = log_mels[i]
            out = self(batch, seed=seed)
            for row, i in enumerate(chunk):
                waves[i] = out[row, :log_mels[i].shape[-1] * self.cfg.hop_length]
        return waves


# ----------------------------------------------------------------------------------------------
# HiFi-GAN


def _upsample_rates(hop: int) -> list[int]:
    """Split ``hop`` into small factors, largest first (160 -> [8, 5, 4])."""
    rates, rest = [], hop
    for factor in (8, 5, 4, 3, 2):
        while rest % factor == 0 and rest > 1:
            rates.append(factor)
            rest //= factor
    if rest != 1:
        raise VocoderError(f"hop_length {hop} must factor into 2, 3, 4, 5 and 8 for HiFi-GAN upsampling")
    return sorted(rates, reverse=True)


class _DilatedBlock(nn.Module):
    """HiFi-GAN residual block: x + conv(lrelu(conv_dilated(lrelu(x)))) for dilations 1, 3, 5."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=d, dilation=d) for d in (1, 3, 5))
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class HiFiGAN(nn.Module):
    """Generator: log-mel ``(batch, n_mels, frames)`` -> waveform ``(batch, frames * hop_length)`` in [-1, 1]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.vocoder_channels
        self.pre = nn.Conv1d(cfg.n_mels, ch, 7, padding=3)
        self.ups, self.blocks = nn.ModuleList(), nn.ModuleList()
        for r in _upsample_rates(cfg.hop_length):
            # kernel 2r, stride r, padding chosen so the length grows by exactly r.
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, 2 * r, stride=r, padding=r // 2 + r % 2,
                                               output_padding=r % 2))
            ch //= 2
            self.blocks.append(_DilatedBlock(ch))
        self.post = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = self.pre((log_mel - (-5.0)) / 3.0)  # the codec's fixed log-mel normalisation
        for up, block in zip(self.ups, self.blocks):
            x = block(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.post(F.leaky_relu(x, 0.1))).squeeze(1)


def _score(convs: nn.ModuleList, out: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a discriminator's conv stack: ``(batch, scores)`` and every layer's features (for feature matching)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        features.append(x)
    x = out(x)
    features.append(x)
    return x.flatten(1), features


class PeriodDiscriminator(nn.Module):
    """Looks at every ``period``-th sample: the waveform folded to ``(batch, 1, time / period, period)``."""

    def __init__(self, period: int, ch: int = 16):
        super().__init__()
        self.period = period
        chans = [1, ch, 2 * ch, 4 * ch]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)) for a, b in zip(chans, chans[1:]))
        self.convs.append(nn.Conv2d(chans[-1], chans[-1], (5, 1), padding=(2, 0)))
        self.out = nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = F.pad(wav[:, None], (0, -wav.shape[-1] % self.period), mode="reflect")
        return _score(self.convs, self.out, x.view(x.shape[0], 1, -1, self.period))


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convolutions over the waveform at one sampling scale."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv1d(1, ch, 15, padding=7), nn.Conv1d(ch, 2 * ch, 41, 4, padding=20, groups=4),
            nn.Conv1d(2 * ch, 4 * ch, 41, 4, padding=20, groups=4), nn.Conv1d(4 * ch, 4 * ch, 5, padding=2)])
        self.out = nn.Conv1d(4 * ch, 1, 3, padding=1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _score(self.convs, self.out, wav[:, None])


class Discriminators(nn.Module):
    """Multi-period (periods 2, 3, 5, 7, 11) and multi-scale (x1, x2, x4 average-pooled) discriminators."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, ch) for p in (2, 3, 5, 7, 11))
        self.scales = nn.ModuleList(ScaleDiscriminator(ch) for _ in range(3))

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        outs = [d(wav) for d in self.periods]
        for i, d in enumerate(self.scales):
            outs.append(d(wav if i == 0 else F.avg_pool1d(wav[:, None], 2 ** i, 2 ** i).squeeze(1)))
        return [o[0] for o in outs], [o[1] for o in outs]


class VocoderGAN(nn.Module):
    """Generator + discriminators trained with one optimiser.

    `loss` returns discriminator loss + generator loss. The discriminators see the generated audio
    detached, and the generator's adversarial and feature-matching terms run through a detached copy
    of the discriminator weights (``torch.func.functional_call``), so each loss only moves its own
    network even though one optimiser steps both.
    """

    def __init__(self, cfg: CodecConfig, mel_weight: float = 45.0):
        super().__init__()
        self.generator = HiFiGAN(cfg)
        self.discriminators = Discriminators()
        self.frontend = MelFrontend(cfg)
        self.mel_weight = mel_weight

    def loss(self, mel: torch.Tensor, wav: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """mel ``(batch, n_mels, frames)`` and its waveform ``(batch, frames * hop_length)``."""
        fake = self.generator(mel)
        real_logits, _ = self.discriminators(wav)
        fake_logits, _ = self.discriminators(fake.detach())
        d_loss = sum(((1 - r) ** 2).mean() + (f ** 2).mean() for r, f in zip(real_logits, fake_logits))

        frozen = {k: v.detach() for k, v in self.discriminators.named_parameters()}
        g_logits, g_feats = functional_call(self.discriminators, frozen, (fake,))
        with torch.no_grad():
            _, real_feats = functional_call(self.discriminators, frozen, (wav,))
        adv = sum(((1 - g) ** 2).mean() for g in g_logits)
        fm = sum(F.l1_loss(gf, rf) for gfs, rfs in zip(g_feats, real_feats) for gf, rf in zip(gfs, rfs))
        mel_l1 = F.l1_loss(self.frontend(fake), mel)
        g_loss = adv + 2.0 * fm + self.mel_weight * mel_l1
        metrics = {"d_loss": float(d_loss.detach()), "adv": float(adv.detach()), "fm": float(fm.detach()),
                   "mel_l1": float(mel_l1.detach()), "tokens": float(mel.shape[0] * mel.shape[-1])}  # mel frames
        return d_loss + g_loss, metrics
