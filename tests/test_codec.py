"""The speech codec: residual VQ, EMA codebooks, dead-code restart, quantiser dropout, frame counts."""

import math

import pytest
import torch

from muomni.codec import Codec, CodecError, MelFrontend, ResidualVQ, VectorQuantizer, kmeans, utilisation
from muomni.config import CodecConfig


def small_cfg(**kw) -> CodecConfig:
    base = dict(n_mels=16, n_fft=128, hop_length=32, hidden=32, n_codebooks=4, codebook_size=16, codebook_dim=8)
    base.update(kw)
    return CodecConfig(**base)


def test_error_falls_as_codebooks_are_added():
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    rvq = ResidualVQ(small_cfg(quantizer_dropout=0.0))
    rvq.train()
    rvq(x)  # first batch: k-means initialisation of every level on its residual
    rvq.eval()
    errors = [float((rvq(x, n_q=n).quantized - x).pow(2).mean()) for n in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0]


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(3, 50, 2)).reshape(-1, 2)
    found = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(1))
    nearest = torch.cdist(centres, found).min(dim=1).values
    assert bool((nearest < 0.2).all()), found


def hand_made_vq(codebook, counts, decay=0.5, threshold=0.0) -> VectorQuantizer:
    vq = VectorQuantizer(len(codebook), 2, decay=decay, dead_threshold=threshold, eps=0.0)
    vq.codebook.copy_(torch.tensor(codebook))
    vq.ema_count.copy_(torch.tensor(counts))
    vq.ema_sum.copy_(vq.codebook * vq.ema_count[:, None])
    vq.initialised.fill_(True)
    return vq


def test_ema_update_moves_codes_to_the_mean_of_their_vectors():
    vq = hand_made_vq([[0.0, 0.0], [10.0, 10.0]], [1.0, 1.0])
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])
    codes = vq.encode(x)
    assert codes.tolist() == [0, 0, 1]
    vq.ema_update(x, codes)
    # count: 0.5 * 1 + 0.5 * [2, 1];  sum: 0.5 * [0, 10] + 0.5 * [1 + 3, 9]
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(vq.codebook, torch.tensor([[2.0 / 1.5] * 2, [9.5, 9.5]]))


def test_dead_code_restart_moves_unused_codes_onto_the_data():
    vq = hand_made_vq([[0.0, 0.0], [100.0, 100.0], [1.0, 1.0]], [3.0, 0.5, 2.0], threshold=1.0)
    x = torch.tensor([[5.0, 5.0], [6.0, 6.0]])
    assert vq.restart_dead(x) == 1
    assert any(torch.equal(vq.codebook[1], row) for row in x)  # the dead code now sits on a batch vector
    torch.testing.assert_close(vq.codebook[[0, 2]], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # live ones stay
    assert float(vq.ema_count[1]) == 1.0


def test_training_forward_revives_a_code_that_data_never_reaches():
    vq = hand_made_vq([[0.0, 0.0], [100.0, 100.0]], [1.0, 1.0], decay=0.5, threshold=0.8)
    vq.train()
    x = torch.randn(64, 2) * 0.1
    _, codes = vq(x)
    assert set(codes.tolist()) == {0}
    assert float(vq.codebook[1].abs().max()) < 1.0  # restarted inside the data


def test_utilisation_is_entropy_over_log_k():
    assert utilisation(torch.arange(16), 16) == pytest.approx(1.0)
    assert utilisation(torch.zeros(100, dtype=torch.long), 16) == pytest.approx(0.0)
    half = torch.arange(8).repeat(4)
    assert utilisation(half, 16) == pytest.approx(math.log(8) / math.log(16))


def test_quantiser_dropout_trains_with_fewer_codebooks_and_they_decode():
    torch.manual_seed(0)
    cfg = small_cfg(quantizer_dropout=1.0)
    codec = Codec(cfg).train()
    mel = torch.randn(2, cfg.n_mels, 40) - 5
    used = {codec(mel).codes.shape[1] for _ in range(30)}
    assert used == {1, 2, 3, 4}
    codec.eval()
    codes = codec.encode(mel)
    assert codes.shape == (2, 4, 5)
    for n in range(1, 5):
        decoded = codec.decode(codes[:, :n])
        assert decoded.shape == (2, cfg.n_mels, 40)
        torch.testing.assert_close(decoded, codec(mel, n_q=n).mel)


def test_codec_loss_trains_and_masks_padding():
    torch.manual_seed(0)
    cfg = small_cfg(quantizer_dropout=0.0)
    codec = Codec(cfg)
    mel = torch.randn(4, cfg.n_mels, 24) - 5
    opt = torch.optim.Adam(codec.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, metrics = codec.loss(mel, torch.tensor([24, 24, 16, 8]))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first
    # the reconstruction term counts only each row's real frames
    codec.eval()
    out = codec(mel[3:])
    expected = (out.mel - mel[3:])[..., :8].detach()
    _, metrics = codec.loss(mel[3:], torch.tensor([8]))
    assert metrics["recon_l1"] == pytest.approx(float(expected.abs().mean()), rel=1e-5)


def test_frame_counts():
    cfg = small_cfg()
    frontend = MelFrontend(cfg)
    wave = torch.randn(1, 32 * 37)
    assert frontend(wave).shape == (1, cfg.n_mels, 37)
    assert Codec(cfg).eval().encode(frontend(wave)).shape == (1, 4, 5)  # ceil(37 / 8)
    with pytest.raises(CodecError, match="expected mel"):
        Codec(cfg).encode(torch.randn(1, 3, 8))


def test_quantiser_learns_in_fp32_under_bf16_autocast():
    # On a GPU the Trainer runs the codec under bf16 autocast; the codebook statistics must stay fp32.
    vq = VectorQuantizer(8, 4, dead_threshold=10.0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, codes = vq(torch.randn(32, 4).to(torch.bfloat16))
    assert quantized.dtype == vq.codebook.dtype == vq.ema_sum.dtype == torch.float32 and codes.shape == (32,)
