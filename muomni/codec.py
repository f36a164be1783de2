"""The speech codec: log-mel frames -> conv encoder -> residual vector quantisation -> conv decoder.

The Talker cannot predict waveforms or mel frames directly as tokens, so speech is first turned into
a few discrete codes per 80 ms. The idea is SoundStream's (Zeghidour et al., 2021) and EnCodec's
(Défossez et al., 2022), on log-mel frames instead of samples so that it trains in minutes:

- `MelFrontend`: waveform ``(batch, samples)`` -> log-mel ``(batch, n_mels, frames)`` with exactly
  ``samples // hop_length`` frames, so code rate x frames_per_code = mel rate = sample_rate / hop.
- `Codec.encode`: mel frames in groups of ``frames_per_code`` -> conv encoder -> latents
  ``(batch, codebook_dim, code_frames)`` -> `ResidualVQ` -> codes ``(batch, n_codebooks, code_frames)``.
- `ResidualVQ`: each `VectorQuantizer` quantises what the previous ones left over. Codebooks start
  from k-means on the first batch, follow the encoder by exponential moving averages (van den Oord
  et al., 2017), and restart entries nobody uses from random batch vectors (dead-code restart).
  Gradients pass the quantiser straight through; a commitment loss keeps the encoder near its codes;
  quantiser dropout trains with a random number of codebooks so that fewer still decode.
- `Codec.decode`: codes -> sum of code vectors -> conv decoder -> log-mel ``(batch, n_mels, frames)``.

Utilisation of a codebook is the entropy of its usage divided by log K: 1.0 means every entry is
used equally often, 0.0 means one entry does all the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from muomni.config import CodecConfig

LOG_FLOOR = 1e-5  # amplitude floor before the log: log-mel of silence is log(1e-5) = -11.5


class CodecError(ValueError):
    """Input the codec cannot work with."""


# ----------------------------------------------------------------------------------------------
# Log-mel frontend


class MelFrontend(nn.Module):
    """Waveform ``(batch, samples)`` -> log-magnitude mel ``(batch, n_mels, samples // hop_length)``.

    Magnitude (power 1) mels with the HTK mel scale, the same settings the Griffin-Lim vocoder
    inverts. The last centred STFT frame is dropped so that frames x hop = samples exactly.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.hop_length = cfg.hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.n_fft, hop_length=cfg.hop_length,
            n_mels=cfg.n_mels, power=1.0, center=True)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] < self.hop_length:
            raise CodecError(f"waveform has {wav.shape[-1]} samples; need at least one hop ({self.hop_length})")
        frames = wav.shape[-1] // self.hop_length
        return self.mel(wav.float())[..., :frames].clamp(min=LOG_FLOOR).log()


# ----------------------------------------------------------------------------------------------
# Vector quantisation


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain k-means (Lloyd) on vectors ``(n, dim)``; returns centroids ``(k, dim)``.

    Starts from k random vectors (with replacement if n < k); an empty cluster keeps its centroid.
    """
    start = torch.randint(0, x.shape[0], (k,), generator=generator, device=x.device) if x.shape[0] < k \
        else torch.randperm(x.shape[0], generator=generator, device=x.device)[:k]
    centroids = x[start].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def utilisation(codes: torch.Tensor, codebook_size: int) -> float:
    """Entropy of the code histogram over log K: 1 = all codes used equally, 0 = one code."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(entropy / math.log(codebook_size))


class VectorQuantizer(nn.Module):
    """One codebook of ``size`` vectors of ``dim``; nearest-neighbour quantisation with EMA updates.

    Buffers: ``codebook`` ``(size, dim)``; ``ema_count`` ``(size,)`` the moving average of how many
    vectors each code received per batch; ``ema_sum`` ``(size, dim)`` the moving average of their sum.
    The codebook is ``ema_sum / ema_count`` (Laplace-smoothed), so it has no gradient of its own.
    """

    def __init__(self, size: int, dim: int, decay: float = 0.99, dead_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.size, self.dim, self.decay, self.dead_threshold, self.eps = size, dim, decay, dead_threshold, eps
        self.register_buffer("codebook", torch.randn(size, dim))
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.tensor(False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``(n, dim)`` -> index of the nearest code ``(n,)``."""
        return torch.cdist(x, self.codebook).argmin(dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` -> code vectors ``(..., dim)``."""
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """k-means initialisation from the vectors ``(n, dim)`` of the first batch.

        The EMA statistics start as if the k-means clusters had been seen once, so a code whose
        cluster came out empty is restarted at once.
        """
        self.codebook.copy_(kmeans(x, self.size))
        counts = torch.bincount(self.encode(x), minlength=self.size).to(x.dtype)
        self.ema_count.copy_(counts)
        self.ema_sum.copy_(self.codebook * counts[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Move each used code towards the mean of the vectors ``(n, dim)`` assigned to it."""
        onehot = F.one_hot(codes, self.size).to(x.dtype)  # (n, size)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ x, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, x: torch.Tensor) -> int:
        """Replace codes whose ``ema_count`` fell below the threshold with random batch vectors.

        A dead code never wins a nearest-neighbour contest, so EMA alone never revives it; moving
        it onto live data gives it a chance. Returns how many codes were restarted.
        """
        dead = self.ema_count < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            picks = x[torch.randint(0, x.shape[0], (n_dead,), device=x.device)]
            self.codebook[dead] = picks
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0
        return n_dead

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors ``(n, dim)`` -> (quantised ``(n, dim)``, codes ``(n,)``); learns in training mode.

        Always in fp32, under autocast too: the codebook is an fp32 buffer, and EMA sums in bf16 would
        lose the small updates they are made of.
        """
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and not bool(self.initialised):
                self.init_from(x.detach())
            codes = self.encode(x.detach())
            quantized = self.decode(codes)
            if self.training:
                self.ema_update(x.detach(), codes)
                self.restart_dead(x.detach())
        return quantized, codes


@dataclass
class RVQOutput:
    quantized: torch.Tensor  # (n, dim) sum of the chosen code vectors, straight-through to the input
    codes: torch.Tensor  # (n, n_used) one index per codebook used
    commitment: torch.Tensor  # () mean squared distance between each residual and its code


class ResidualVQ(nn.Module):
    """A stack of `VectorQuantizer`s, each coding the residual the previous ones left."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.dropout = cfg.quantizer_dropout
        self.layers = nn.ModuleList(
            VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.ema_decay, cfg.dead_code_threshold)
            for _ in range(cfg.n_codebooks))

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> RVQOutput:
        """Vectors ``(n, dim)``; ``n_q`` codebooks (default all, or a random number under dropout)."""
        if n_q is None:
            n_q = len(self.layers)
            if self.training and float(torch.rand(())) < self.dropout:
                n_q = int(torch.randint(1, len(self.layers) + 1, ()))
        residual, total = x, torch.zeros_like(x)
        codes, commitment = [], x.new_zeros(())
        for layer in self.layers[:n_q]:
            quantized, idx = layer(residual)
            commitment = commitment + F.mse_loss(residual, quantized.detach())
            residual = residual - quantized.detach()
            total = total + quantized
            codes.append(idx)
        # Straight-through: the forward pass uses the codes, the backward pass skips the rounding.
        return RVQOutput(x + (total - x).detach(), torch.stack(codes, dim=1), commitment)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(n, n_used)`` (any leading prefix of the codebooks) -> summed vectors ``(n, dim)``."""
        if codes.shape[-1] > len(self.layers):
            raise CodecError(f"got {codes.shape[-1]} codebooks; this codec has {len(self.layers)}")
        return sum(layer.decode(codes[:, i]) for i, layer in enumerate(self.layers[: codes.shape[-1]]))


# ----------------------------------------------------------------------------------------------
# Encoder / decoder


class ResBlock(nn.Module):
    """x + conv(gelu(conv(gelu(x)))) over time, channels unchanged."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


@dataclass
class CodecOutput:
    mel: torch.Tensor  # (batch, n_mels, frames) reconstruction
    codes: torch.Tensor  # (batch, n_used, code_frames)
    commitment: torch.Tensor  # ()


class Codec(nn.Module):
    """Mel frames ``(batch, n_mels, frames)`` <-> codes ``(batch, n_codebooks, frames // frames_per_code)``.

    The encoder folds each group of ``frames_per_code`` mel frames into the channels
    (``n_mels * frames_per_code``), so one code frame sees exactly its 80 ms plus conv context.
    The decoder unfolds back and a small mel-rate convolution smooths the group boundaries.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.frontend = MelFrontend(cfg)
        group, h = cfg.n_mels * cfg.frames_per_code, cfg.hidden
        self.encoder = nn.Sequential(
            nn.Conv1d(group, h, 3, padding=1), ResBlock(h, 1), ResBlock(h, 2), nn.GELU(),
            nn.Conv1d(h, cfg.codebook_dim, 1))
        self.quantizer = ResidualVQ(cfg)
        self.decoder = nn.Sequential(
            nn.Conv1d(cfg.codebook_dim, h, 3, padding=1), ResBlock(h, 1), ResBlock(h, 2), nn.GELU(),
            nn.Conv1d(h, group, 1))
        self.postnet = nn.Conv1d(cfg.n_mels, cfg.n_mels, 5, padding=2)
        # Fixed normalisation of log-mels to roughly zero mean / unit scale (silence is -11.5).
        self.mel_mean, self.mel_scale = -5.0, 3.0

    @property
    def n_codebooks(self) -> int:
        return self.cfg.n_codebooks

    def pad_frames(self, mel: torch.Tensor) -> torch.Tensor:
        """Pad mel ``(batch, n_mels, frames)`` with silence to a multiple of ``frames_per_code``."""
        extra = -mel.shape[-1] % self.cfg.frames_per_code
        return F.pad(mel, (0, extra), value=math.log(LOG_FLOOR)) if extra else mel

    def _latents(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.n_mels:
            raise CodecError(f"expected mel (batch, {self.cfg.n_mels}, frames), got {tuple(mel.shape)}")
        mel = self.pad_frames(mel)
        b, m, t = mel.shape
        fpc = self.cfg.frames_per_code
        grouped = ((mel - self.mel_mean) / self.mel_scale).view(b, m, t // fpc, fpc)
        grouped = grouped.permute(0, 1, 3, 2).reshape(b, m * fpc, t // fpc)
        return self.encoder(grouped)  # (batch, codebook_dim, code_frames)

    def _mel_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        b, _, tc = z.shape
        fpc, m = self.cfg.frames_per_code, self.cfg.n_mels
        mel = self.decoder(z).view(b, m, fpc, tc).permute(0, 1, 3, 2).reshape(b, m, tc * fpc)
        mel = mel + self.postnet(mel)
        return mel * self.mel_scale + self.mel_mean

    def forward(self, mel: torch.Tensor, n_q: int | None = None) -> CodecOutput:
        """Encode, quantise and decode mel ``(batch, n_mels, frames)``; frames padded to whole codes."""
        z = self._latents(mel)
        b, d, tc = z.shape
        out = self.quantizer(z.transpose(1, 2).reshape(b * tc, d), n_q)
        quantized = out.quantized.view(b, tc, d).transpose(1, 2)
        codes = out.codes.view(b, tc, -1).transpose(1, 2)
        return CodecOutput(self._mel_from_latents(quantized), codes, out.commitment)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Mel ``(batch, n_mels, frames)`` -> codes ``(batch, n_q, ceil(frames / frames_per_code))``."""
        z = self._latents(mel)
        b, d, tc = z.shape
        flat = z.transpose(1, 2).reshape(b * tc, d)
        residual, codes = flat, []
        for layer in self.quantizer.layers[: n_q or self.n_codebooks]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            codes.append(idx)
        return torch.stack(codes, dim=1).view(b, tc, -1).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(batch, n_used, code_frames)`` -> log-mel ``(batch, n_mels, code_frames * frames_per_code)``."""
        b, nq, tc = codes.shape
        vectors = self.quantizer.decode(codes.transpose(1, 2).reshape(b * tc, nq))
        return self._mel_from_latents(vectors.view(b, tc, -1).transpose(1, 2))

    def loss(self, mel: torch.Tensor, frames: torch.Tensor | None = None,
             n_q: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Reconstruction (L1 + MSE on log-mel, over real frames) + commitment.

        ``frames`` ``(batch,)`` counts the real mel frames of each row (default: all).
        """
        out = self(mel, n_q)
        target = self.pad_frames(mel)
        mask = torch.ones_like(target[:, :1])
        if frames is not None:
            mask = (torch.arange(target.shape[-1], device=mel.device)[None] < frames[:, None])[:, None].to(mel.dtype)
        denom = mask.sum() * target.shape[1]
        diff = (out.mel - target) * mask
        l1 = diff.abs().sum() / denom
        mse = diff.pow(2).sum() / denom
        loss = l1 + mse + self.cfg.commitment_weight * out.commitment
        metrics = {"recon_l1": float(l1.detach()), "commitment": float(out.commitment.detach()),
                   "n_q": float(out.codes.shape[1]), "tokens": float(mask.sum())}  # mel frames, for the trainer's rate
        return loss, metrics
