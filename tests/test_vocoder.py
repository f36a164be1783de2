"""Vocoders: Griffin-Lim against torchaudio, frame rates from codes to samples, HiFi-GAN shapes."""

import torch
import torchaudio

from muomni.codec import Codec, MelFrontend
from muomni.config import CodecConfig, tiny
from muomni.vocoder import Discriminators, GriffinLimVocoder, HiFiGAN, VocoderGAN, samples_for_codes


def griffin_lim_by_hand(mag: torch.Tensor, n_fft: int, hop: int, n_iter: int, momentum: float,
                        length: int) -> torch.Tensor:
    """Fast Griffin-Lim written out: alternate istft/stft, keep the phase, accelerate by momentum."""
    window = torch.hann_window(n_fft)
    angles = torch.rand(mag.shape, dtype=torch.complex64)  # the same draw torchaudio makes
    previous = torch.zeros(())
    alpha = momentum / (1 + momentum)
    for _ in range(n_iter):
        wave = torch.istft(mag * angles, n_fft, hop, n_fft, window, length=length)
        rebuilt = torch.stft(wave, n_fft, hop, n_fft, window, center=True, pad_mode="reflect", return_complex=True)
        angles = rebuilt - alpha * previous
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    return torch.istft(mag * angles, n_fft, hop, n_fft, window, length=length)


def test_griffin_lim_matches_torchaudio_for_the_same_seed():
    cfg = CodecConfig(n_fft=256, hop_length=64, n_mels=40)
    log_mel = MelFrontend(cfg)(torch.randn(1, 64 * 30) * 0.3)
    ours = GriffinLimVocoder(cfg, n_iter=8)(log_mel, seed=7)

    mag = torchaudio.transforms.InverseMelScale(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate,
                                               driver="gelsd")(log_mel.exp())
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)
    torch.manual_seed(7)
    reference = torchaudio.transforms.GriffinLim(cfg.n_fft, n_iter=8, hop_length=cfg.hop_length, power=1.0,
                                                 length=30 * cfg.hop_length)(mag)
    torch.testing.assert_close(ours, reference)
    torch.manual_seed(7)
    by_hand = griffin_lim_by_hand(mag, cfg.n_fft, cfg.hop_length, 8, 0.99, 30 * cfg.hop_length)
    torch.testing.assert_close(by_hand, reference, atol=1e-4, rtol=1e-3)


def test_seed_fixes_the_output_and_leaves_the_global_rng_alone():
    cfg = CodecConfig(n_fft=256, hop_length=64, n_mels=40)
    log_mel = MelFrontend(cfg)(torch.randn(1, 64 * 20) * 0.3)
    vocoder = GriffinLimVocoder(cfg, n_iter=4)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    a = vocoder(log_mel, seed=1)
    after = torch.rand(3)
    assert torch.equal(before, after)
    assert torch.equal(a, vocoder(log_mel, seed=1))
    assert not torch.equal(a, vocoder(log_mel, seed=2))


def test_frame_rates_agree_from_codes_to_samples():
    cfg = tiny().codec
    assert cfg.sample_rate / (cfg.hop_length * cfg.frames_per_code) == 12.5  # code frames per second
    codec = Codec(cfg).eval()
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_codebooks, 5))
    mel = codec.decode(codes)
    assert mel.shape == (1, cfg.n_mels, 5 * cfg.frames_per_code)
    wave = GriffinLimVocoder(cfg, n_iter=2)(mel)
    assert wave.shape == (1, samples_for_codes(5, cfg)) == (1, 5 * 1280)
    assert MelFrontend(cfg)(wave).shape[-1] == mel.shape[-1]  # and back to the same number of frames
    assert codec.encode(MelFrontend(cfg)(wave)).shape == (1, cfg.n_codebooks, 5)


def test_hifigan_shapes_and_losses():
    cfg = CodecConfig(n_mels=20, vocoder_channels=16)
    generator = HiFiGAN(cfg)
    wave = generator(torch.randn(2, 20, 6) - 5)
    assert wave.shape == (2, 6 * cfg.hop_length) and float(wave.detach().abs().max()) <= 1.0
    logits, features = Discriminators(ch=4)(wave)
    assert len(logits) == len(features) == 8  # 5 periods + 3 scales

    torch.manual_seed(0)
    gan = VocoderGAN(cfg)
    wave = torch.randn(2, 8 * cfg.hop_length) * 0.1
    mel = gan.frontend(wave)
    loss, metrics = gan.loss(mel, wave)
    loss.backward()
    assert set(metrics) == {"d_loss", "adv", "fm", "mel_l1", "tokens"}  # tokens: mel frames, for the rate
    assert all(p.grad is not None for p in gan.generator.parameters())
    assert all(p.grad is not None for p in gan.discriminators.parameters())


def test_generator_terms_do_not_move_the_discriminators():
    torch.manual_seed(0)
    cfg = CodecConfig(n_mels=20, vocoder_channels=16)
    gan = VocoderGAN(cfg)
    wave = torch.randn(1, 8 * cfg.hop_length) * 0.1
    mel = gan.frontend(wave)
    loss, _ = gan.loss(mel, wave)
    together = torch.autograd.grad(loss, list(gan.discriminators.parameters()))
    fake = gan.generator(mel).detach()
    real_logits, _ = gan.discriminators(wave)
    fake_logits, _ = gan.discriminators(fake)
    d_loss = sum(((1 - r) ** 2).mean() + (f ** 2).mean() for r, f in zip(real_logits, fake_logits))
    alone = torch.autograd.grad(d_loss, list(gan.discriminators.parameters()))
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b)


def test_vocode_each_batches_mels_of_any_length_and_cuts_them_back():
    cfg = CodecConfig(n_fft=256, hop_length=64, n_mels=40)
    frontend, vocoder = MelFrontend(cfg), GriffinLimVocoder(cfg, n_iter=16)
    noise = torch.randn(64 * 50, generator=torch.Generator().manual_seed(0))
    sound = noise * torch.sin(torch.arange(64 * 50) * 0.01).abs()  # a swelling hiss, like speech's envelope
    mels = [frontend(sound[None, : 64 * frames])[0] for frames in (30, 50, 40)]
    waves = vocoder.vocode_each(mels, batch_size=2)
    assert [w.shape[0] for w in waves] == [64 * 30, 64 * 50, 64 * 40]
    for mel, wave in zip(mels, waves):  # padding with silence leaves each one's sound as vocoded alone
        alone = vocoder(mel[None])[0]
        batched_error = (frontend(wave[None])[0] - mel).abs().mean()
        alone_error = (frontend(alone[None])[0] - mel).abs().mean()
        assert batched_error < 1.1 * alone_error + 0.01, (batched_error, alone_error)
