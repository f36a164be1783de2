"""Audio: the log-mel frontend against a hand-built one, AuT lengths and masks, CTC, error rates, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from muomni.audio import (
    AudioError, AuT, LogMel, batch_features, conv_output_lengths, ctc_greedy_decode, cer, encode_text,
    load_audio, merge_pairs, normalize_transcript, prepare_waveform, spec_augment, wer,
)
from muomni.config import AudioConfig

SR = 16000


def small_config(**changes) -> AudioConfig:
    fields = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_mels=20, conv_channels=24)
    fields.update(changes)
    return AudioConfig(**fields)


def speechlike(seconds: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A gliding harmonic tone with an amplitude envelope: speech-shaped, deterministic."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * torch.sin(2 * math.pi * 1.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    wave = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    return (0.3 * wave * envelope / 2.3 + 0.002 * torch.randn(t.shape, generator=g)).float()


# ----------------------------------------------------------------------------------------------
# Log-mel frontend


def hand_log_mel(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """STFT -> power -> HTK triangles -> log10 -> 80 dB floor -> per-bin standardisation, in NumPy."""
    n_fft, hop = 400, 160
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    stack = np.stack([padded[i * hop: i * hop + n_fft] * window for i in range(frames)])
    power = np.abs(np.fft.rfft(stack, axis=-1)) ** 2  # (frames, n_fft // 2 + 1)

    def hz_to_mel(f):
        return 2595 * np.log10(1 + f / 700)

    def mel_to_hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(SR / 2), cfg.n_mels + 2))
    freqs = np.linspace(0, SR / 2, n_fft // 2 + 1)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fbank = np.maximum(0, np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)))
    log_mel = np.log10(np.maximum(power @ fbank.T, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8)
    return (log_mel - log_mel.mean(0)) / (log_mel.std(0) + 1e-5)


def test_log_mel_matches_hand_built_stft_and_filterbank():
    cfg = small_config(n_mels=40)
    wave = speechlike(0.7)
    ours = LogMel(cfg)(wave)
    assert ours.shape == (0.7 * SR // 160 + 1, 40)
    expected = torch.from_numpy(hand_log_mel(wave.double().numpy(), cfg)).float()
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-3)


def test_log_mel_global_normalisation_is_whisper_scaling():
    cfg = small_config(normalize="global")
    wave = speechlike(0.3)
    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=400, hop_length=160, n_mels=cfg.n_mels)(wave)
    log_mel = mel.clamp(min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8)
    torch.testing.assert_close(LogMel(cfg)(wave), ((log_mel + 4) / 4).T)


def test_batch_features_pads_without_leaking():
    frontend = LogMel(small_config())
    waves = [speechlike(0.3, seed=1), speechlike(0.55, seed=2)]
    mels, lengths = batch_features(frontend, waves)
    assert lengths.tolist() == [frontend.num_frames(len(w)) for w in waves]
    for i, wave in enumerate(waves):
        torch.testing.assert_close(mels[i, : lengths[i]], frontend(wave))
        assert mels[i, lengths[i]:].abs().sum() == 0


def test_spec_augment_masks_inside_each_length():
    cfg = small_config(spec_time_masks=2, spec_time_width=10, spec_freq_masks=2, spec_freq_width=4)
    mels = torch.randn(4, 100, cfg.n_mels)
    lengths = torch.tensor([100, 60, 30, 5])
    mels[torch.arange(100)[None] >= lengths[:, None]] = 0
    out = spec_augment(mels, lengths, cfg, torch.Generator().manual_seed(0))
    assert out.shape == mels.shape
    changed = out != mels
    assert changed.any()
    masked_frames = changed.all(-1).sum(-1)
    assert (masked_frames <= 2 * (lengths // 5)).all()  # time masks never hide most of a row
    assert not changed[1, 60:].any() and not changed[2, 30:].any()
    again = spec_augment(mels, lengths, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)


# ----------------------------------------------------------------------------------------------
# AuT encoder


@pytest.mark.parametrize("length", range(1, 41))
def test_conv_output_length_is_ceil_quarter(length):
    assert conv_output_lengths(torch.tensor([length])).item() == math.ceil(length / 4)


def test_padded_batch_equals_each_item_alone_for_every_length():
    torch.manual_seed(0)
    cfg = small_config()
    model = AuT(cfg).eval()
    items = [torch.randn(length, cfg.n_mels) for length in range(1, 41)]
    lengths = torch.tensor([len(x) for x in items])
    batch = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
    batch = batch + 5.0 * (torch.arange(40)[None, :, None] >= lengths[:, None, None])  # junk padding
    with torch.no_grad():
        hidden, out_lengths = model(batch, lengths)
        assert hidden.shape == (40, 10, cfg.d_model)
        assert out_lengths.tolist() == [math.ceil(n / 4) for n in range(1, 41)]
        for i, item in enumerate(items):
            alone, alone_length = model(item[None])
            assert alone.shape[1] == alone_length.item() == out_lengths[i]
            torch.testing.assert_close(hidden[i, : out_lengths[i]], alone[0], atol=1e-5, rtol=1e-4)


def test_aut_rejects_wrong_mel_bins_and_empty_input():
    model = AuT(small_config())
    with pytest.raises(AudioError, match="mel bins"):
        model(torch.randn(1, 10, 7))
    with pytest.raises(AudioError, match="0 frames"):
        model(torch.randn(1, 0, 20))


def test_merge_pairs_concatenates_neighbours_and_zeroes_padding():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    merged, lengths = merge_pairs(hidden, torch.tensor([5, 2]))
    assert merged.shape == (2, 3, 6) and lengths.tolist() == [3, 1]
    torch.testing.assert_close(merged[0, 1], torch.cat([hidden[0, 2], hidden[0, 3]]))
    torch.testing.assert_close(merged[0, 2], torch.cat([hidden[0, 4], torch.zeros(3)]))
    assert merged[1, 1:].abs().sum() == 0


def test_ctc_loss_falls_when_fitting_two_utterances():
    torch.manual_seed(0)
    cfg = small_config()
    model = AuT(cfg)
    mels = torch.randn(2, 48, cfg.n_mels)
    lengths = torch.tensor([48, 40])
    targets = torch.tensor([encode_text("abc", cfg.ctc_vocab), encode_text("ba", cfg.ctc_vocab) + [0]])
    target_lengths = torch.tensor([3, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = model.ctc_loss(mels, lengths, targets, target_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    logits, out_lengths = model.eval().ctc_logits(mels, lengths)
    assert ctc_greedy_decode(logits, out_lengths, cfg.ctc_vocab) == ["abc", "ba"]


# ----------------------------------------------------------------------------------------------
# Decoding and error rates


def test_ctc_greedy_decode_of_hand_made_emission():
    vocab = " abcdefghijklmnopqrstuvwxyz'"
    h, e, l, o = (vocab.index(c) + 1 for c in "helo")
    path = [0, h, h, e, 0, l, l, 0, l, o, o, 0, 0]  # blank separates the double l
    logits = torch.full((1, len(path) + 2, len(vocab) + 1), -5.0)
    for t, index in enumerate(path):
        logits[0, t, index] = 5.0
    logits[0, len(path):, h] = 5.0  # beyond the length: must be ignored
    assert ctc_greedy_decode(logits, torch.tensor([len(path)]), vocab) == ["hello"]
    assert ctc_greedy_decode(logits, None, vocab) == ["helloh"]


def test_cer_and_wer_on_known_strings():
    assert cer(["kitten"], ["sitting"]) == pytest.approx(3 / 6)
    assert wer(["the cat sat"], ["the cat sat down"]) == pytest.approx(1 / 3)
    assert cer(["abc", "de"], ["abc", "de"]) == 0.0
    assert wer(["a red circle", "two"], ["a red square", ""]) == pytest.approx(2 / 4)
    assert cer(["ab", "cd"], ["", "cd"]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="references"):
        cer(["a"], ["a", "b"])


def test_transcripts_normalise_and_encode():
    vocab = AudioConfig().ctc_vocab
    assert normalize_transcript("A Red  CIRCLE, isn't it?") == "a red circle isn't it"
    assert encode_text("ab c", vocab) == [2, 3, 1, 4]
    with pytest.raises(AudioError, match="outside the CTC vocabulary"):
        encode_text("two 2", vocab)


# ----------------------------------------------------------------------------------------------
# Loading and bad input


def write(path, wave, rate=SR, subtype=None):
    soundfile.write(str(path), np.asarray(wave, dtype=np.float32).T, rate, subtype=subtype)
    return path


def test_loads_wav_and_flac(tmp_path):
    wave = speechlike(0.4)
    for name in ("a.wav", "a.flac"):
        loaded = load_audio(write(tmp_path / name, wave))
        torch.testing.assert_close(loaded, wave, atol=1e-4, rtol=0)


def test_other_formats_go_through_ffmpeg(tmp_path):
    encoders = pytest.importorskip("torchcodec.encoders")
    path = tmp_path / "a.m4a"
    try:
        encoders.AudioEncoder(speechlike(0.5)[None], sample_rate=SR).to_file(str(path))
    except Exception as error:  # no FFmpeg with an AAC encoder on this machine
        pytest.skip(f"cannot encode m4a here: {error}")
    loaded = load_audio(path)
    assert abs(len(loaded) - 0.5 * SR) < 0.1 * SR and loaded.abs().max() > 0.05


def test_multichannel_is_averaged_to_mono(tmp_path):
    left, right = speechlike(0.3, 1), speechlike(0.3, 2)
    loaded = load_audio(write(tmp_path / "stereo.wav", torch.stack([left, right])))
    torch.testing.assert_close(loaded, (left + right) / 2, atol=1e-4, rtol=0)


def test_other_sample_rates_are_resampled(tmp_path):
    wave = speechlike(0.5)
    loaded = load_audio(write(tmp_path / "8k.wav", wave[::2], rate=8000))
    assert loaded.shape == (8000,)
    with pytest.raises(AudioError, match="sample rate 1000 Hz"):
        load_audio(write(tmp_path / "1k.wav", wave[:1000], rate=1000))


def test_float_samples_beyond_full_scale_are_rescaled():
    wave = 3.0 * speechlike(0.3) / speechlike(0.3).abs().max()
    out = prepare_waveform(wave, SR)
    assert out.abs().max() == pytest.approx(1.0)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("zero_bytes", r"empty \(0 bytes\)"),
    ("zero_samples", r"empty \(0 samples\)"),
    ("silent", "silent"),
    ("clipped", "clipped"),
    ("too_long", "too long"),
    ("too_short", "too short"),
    ("not_audio", "not audio"),
    ("directory", "not a file"),
])
def test_bad_files_raise_one_line_audio_errors(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "zero_samples":
        write(path, np.zeros(0))
    elif case == "silent":
        write(path, np.zeros(SR))
    elif case == "clipped":
        write(path, np.clip(10 * speechlike(0.5).numpy(), -1, 1), subtype="PCM_16")
    elif case == "too_long":
        write(path, speechlike(3.0))
    elif case == "too_short":
        write(path, speechlike(0.01))
    elif case == "not_audio":
        path.write_bytes(b"RIFF but then just some text, not a sound at all " * 20)
    elif case == "directory":
        path.mkdir()
    with pytest.raises(AudioError, match=message) as info:
        load_audio(path, max_seconds=2.0)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("wave, message", [
    (torch.full((SR,), float("nan")), "NaN"),
    (torch.zeros(SR, 2), "channels"),
    (torch.zeros(2, 2, SR), "shape"),
    (torch.zeros(SR, dtype=torch.int16), "integer"),
])
def test_bad_tensors_raise_audio_errors(wave, message):
    with pytest.raises(AudioError, match=message):
        prepare_waveform(wave, SR)


# ----------------------------------------------------------------------------------------------
# Stage B end to end, on a handful of synthetic utterances


def write_speech_manifests(root, counts):
    import json

    (root / "speech" / "wav").mkdir(parents=True)
    words = ["red circle", "blue star", "two", "yes", "a big square"]
    k = 0
    for split, n in counts.items():
        with open(root / "speech" / f"{split}.jsonl", "w") as file:
            for i in range(n):
                k += 1
                write(root / "speech" / "wav" / f"{k}.wav", speechlike(0.4 + 0.1 * (i % 5), seed=k))
                file.write(json.dumps({"id": f"u{k}", "audio": f"wav/{k}.wav", "text": words[i % 5]}) + "\n")


def test_stage_audio_trains_and_evaluates(tmp_path):
    import json

    from muomni.train import stage_audio

    write_speech_manifests(tmp_path / "world", {"train": 12, "val": 4, "test": 4, "comp": 3, "wild": 2})
    overrides = ["audio.n_layers=1", "audio.d_model=32", "audio.d_ff=64", "audio.conv_channels=32",
                 "train.steps=4", "train.batch_size=4", "train.eval_every=2", "train.save_every=2", "train.log_every=1"]
    run_dir = stage_audio.train("tiny", tmp_path / "world", tmp_path / "runs", overrides, resume=False)
    assert run_dir == tmp_path / "runs" / "audio"
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "last" / "trainer_state.pt").is_file()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["finished"] and run["model"]["d_model"] == 32
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val and all(0.0 <= record["cer"] for record in val)
    results = stage_audio.evaluate(tmp_path / "runs", tmp_path / "world")
    assert set(results) == {"test", "comp", "wild"}
    assert results["test"]["utterances"] == 4 and results["comp"]["utterances"] == 3
    assert results["wild"]["utterances"] == 2
    assert results["test"]["cer"] >= 0 and results["comp"]["wer"] >= 0


def test_stage_audio_names_the_manifest_line_of_a_bad_file(tmp_path):
    from muomni.data.index import ManifestError
    from muomni.train.stage_audio import SpeechFeatures

    write_speech_manifests(tmp_path, {"train": 3})
    (tmp_path / "speech" / "wav" / "2.wav").write_bytes(b"")
    data = SpeechFeatures(tmp_path / "speech" / "train.jsonl", small_config())
    assert data[0]["mels"].shape[1] == 20
    with pytest.raises(ManifestError, match=r"train.jsonl line 2: 2.wav is empty"):
        data[1]


def test_training_draws_are_augmented_and_evaluation_draws_are_not(tmp_path, monkeypatch):
    from muomni.train import stage_audio

    write_speech_manifests(tmp_path, {"train": 8, "val": 2})
    cfg = small_config(augment_prob=1.0)
    torch.manual_seed(0)
    train = stage_audio.SpeechFeatures(tmp_path / "speech" / "train.jsonl", cfg, augment=1.0)
    first, second = train[3]["mels"], train[3]["mels"]
    assert first.shape[1] == 20 and not torch.equal(first, second)  # a fresh perturbation per draw
    torch.manual_seed(0)
    assert torch.equal(train[3]["mels"], first)  # the trainer's seed decides them
    clean = stage_audio.SpeechFeatures(tmp_path / "speech" / "train.jsonl", cfg)
    assert torch.equal(clean[3]["mels"], clean[3]["mels"])
    assert not torch.equal(clean[3]["mels"], first[: len(clean[3]["mels"])])

    seen = {}
    monkeypatch.setattr(stage_audio, "run_stage", lambda *args, **kwargs: seen.update(train=args[5], val=kwargs["val_data"]))
    stage_audio.train("tiny", tmp_path, tmp_path / "runs", ["audio.augment_prob=0.3"], resume=False)
    assert seen["train"].augment == 0.3 and seen["val"].augment == 0.0


def test_augmentation_can_be_switched_off_and_is_a_probability(tmp_path):
    from muomni.train import stage_audio

    write_speech_manifests(tmp_path, {"train": 3})
    data = stage_audio.SpeechFeatures(tmp_path / "speech" / "train.jsonl", small_config(), augment=0.0)
    assert torch.equal(data[1]["mels"], data[1]["mels"])
    with pytest.raises(ValueError, match="augment is 1.5; expected a probability"):
        stage_audio.SpeechFeatures(tmp_path / "speech" / "train.jsonl", small_config(), augment=1.5)


def test_a_bad_babble_file_names_its_own_line(tmp_path):
    from muomni.data.index import ManifestError
    from muomni.train.stage_audio import SpeechFeatures

    write_speech_manifests(tmp_path, {"train": 2})
    (tmp_path / "speech" / "wav" / "2.wav").write_bytes(b"")
    data = SpeechFeatures(tmp_path / "speech" / "train.jsonl", small_config(), augment=1.0)
    with pytest.raises(ManifestError, match=r"train.jsonl line 2: 2.wav is empty"):
        data.waveform(1)
