"""Waveform perturbations: SNR, determinism, lengths, JSON specs and the errors of bad specs."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from muomni.data import perturb as P


def tone_speech(seconds: float = 1.2, seed: int = 0) -> np.ndarray:
    """A speech-like float32 waveform: a buzzing, warbling tone with pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * P.SAMPLE_RATE)) / P.SAMPLE_RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 3 * t)
    wave = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / P.SAMPLE_RATE) / k for k in range(1, 8))
    wave *= (np.sin(2 * np.pi * 2.5 * t) > -0.3) + 0.01 * rng.standard_normal(len(t))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def spec(**changes) -> dict:
    """A perturbation that does nothing until ``changes`` switch effects on."""
    base = {"kind": "perturb", "seed": 5, "speed": 1.0, "rt60_s": None, "noise": None, "snr_db": None,
            "hum_hz": None, "talkers": None, "band_hz": None, "gain_db": 0.0}
    return base | changes


BABBLE = [tone_speech(0.7, seed=k) for k in range(1, 5)]


@pytest.mark.parametrize("kind", P.NOISES)
@pytest.mark.parametrize("snr_db", [5.0, 17.5, 30.0])
def test_added_noise_has_the_asked_snr(kind, snr_db):
    wave = tone_speech()
    extra = {"hum_hz": 60} if kind == "hum" else {"talkers": 3} if kind == "babble" else {}
    out = P.apply_perturbation(wave, spec(noise=kind, snr_db=snr_db, **extra), BABBLE)
    noise = out.astype(np.float64) - wave
    measured = 10 * math.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(noise**2))
    assert abs(measured - snr_db) < 0.5


def test_noise_colours_fall_off_as_named():
    n = 2**15
    rng = np.random.default_rng(0)
    slopes = {}
    for name, exponent in (("white", 0), ("pink", 1), ("brown", 2)):
        power = np.abs(np.fft.rfft(P.coloured_noise(n, exponent, rng))) ** 2
        freqs = np.fft.rfftfreq(n, 1 / P.SAMPLE_RATE)
        low, high = power[(freqs > 100) & (freqs < 200)].mean(), power[(freqs > 1600) & (freqs < 3200)].mean()
        slopes[name] = 10 * math.log10(low / high) / 4  # dB per octave (200 -> 3200 Hz is 4 octaves)
    assert abs(slopes["white"]) < 1 and 2 < slopes["pink"] < 4 and 5 < slopes["brown"] < 7


def test_a_spec_gives_the_same_wave_every_time_and_a_new_seed_another():
    wave = tone_speech()
    rng = random.Random(3)
    for _ in range(20):
        s = P.sample_perturbation(rng, P.TRAIN_NOISES)
        again = json.loads(json.dumps(s))  # specs live in JSONL manifests
        a, b = P.apply_perturbation(wave, s, BABBLE), P.apply_perturbation(wave, again, BABBLE)
        assert a.dtype == np.float32 and np.array_equal(a, b)
        assert np.abs(a).max() <= 1.0
    noisy = spec(noise="white", snr_db=10.0)
    assert not np.array_equal(P.apply_perturbation(wave, noisy), P.apply_perturbation(wave, noisy | {"seed": 6}))


def test_sampling_is_deterministic_and_keeps_to_the_given_noises():
    assert P.sample_perturbation(random.Random(1)) == P.sample_perturbation(random.Random(1))
    rng = random.Random(0)
    specs = [P.sample_perturbation(rng, P.WILD_NOISES) for _ in range(50)]
    assert {s["noise"] for s in specs} == set(P.WILD_NOISES)
    for s in specs:
        P.check_perturbation(s)
    quiet = [P.sample_perturbation(rng, ("white",), strength=0.0) for _ in range(20)]
    assert all(s["snr_db"] == 30.0 and s["speed"] == 1.0 and s["rt60_s"] is None for s in quiet)
    assert all(s["noise"] is None for s in (P.sample_perturbation(rng, ()) for _ in range(5)))


def test_train_and_wild_noises_are_disjoint():
    assert not set(P.TRAIN_NOISES) & set(P.WILD_NOISES)
    assert set(P.NOISES) == {"white", "pink", "brown", "babble", "hum"}


@pytest.mark.parametrize("speed", [0.9, 0.95, 1.07, 1.1])
def test_speed_changes_the_length_by_the_factor(speed):
    wave = tone_speech()
    out = P.apply_perturbation(wave, spec(speed=speed))
    assert abs(len(out) - len(wave) / speed) <= 1
    # the pitch moves with the tempo: the spectral centroid scales by the factor
    def centroid(x):
        power = np.abs(np.fft.rfft(x)) ** 2
        return (np.fft.rfftfreq(len(x), 1 / P.SAMPLE_RATE) * power).sum() / power.sum()
    assert centroid(out) / centroid(wave) == pytest.approx(speed, rel=0.02)


def test_reverb_band_and_gain():
    wave = tone_speech()
    wet = P.apply_perturbation(wave, spec(rt60_s=0.4))
    assert len(wet) == len(wave) and np.sqrt(np.mean(wet**2)) == pytest.approx(np.sqrt(np.mean(wave**2)), rel=1e-3)
    assert not np.allclose(wet, wave)
    phone = P.apply_perturbation(wave, spec(band_hz=[300, 3400]))
    power = np.abs(np.fft.rfft(phone)) ** 2
    freqs = np.fft.rfftfreq(len(phone), 1 / P.SAMPLE_RATE)
    assert power[freqs > 5000].sum() < 1e-3 * power.sum()
    louder = P.apply_perturbation(wave, spec(gain_db=6.0))
    boosted = wave * 10 ** (6 / 20)
    assert np.allclose(louder, boosted * min(1.0, P.PEAK / np.abs(boosted).max()), atol=1e-6)
    loud = P.apply_perturbation(wave / np.abs(wave).max(), spec(gain_db=6.0))  # would clip: limited instead
    assert np.abs(loud).max() == pytest.approx(P.PEAK) and np.mean(np.abs(loud) >= 0.999) == 0


def test_clean_is_the_wave_unchanged():
    wave = tone_speech()
    out = P.apply_perturbation(wave, {"kind": "clean"})
    assert np.array_equal(out, wave) and out is not wave


@pytest.mark.parametrize("changes, field", [
    ({"kind": "loud"}, "'kind'"),
    ({"noise": "rain", "snr_db": 10.0}, "'noise'"),
    ({"noise": "white", "snr_db": 40.0}, "'snr_db' is 40.0; expected 5.0-30.0 dB"),
    ({"noise": "white"}, "'snr_db'"),
    ({"noise": "hum", "snr_db": 10.0, "hum_hz": 55}, "'hum_hz'"),
    ({"noise": "babble", "snr_db": 10.0, "talkers": 9}, "'talkers'"),
    ({"speed": 1.5}, "'speed'"),
    ({"rt60_s": 2.0}, "'rt60_s'"),
    ({"gain_db": 30}, "'gain_db'"),
    ({"band_hz": [3400, 300]}, "'band_hz'"),
    ({"seed": -1}, "'seed'"),
    ({"echo": 1}, "'echo' is unknown"),
])
def test_a_bad_spec_names_its_field(changes, field):
    with pytest.raises(ValueError, match=field) as error:
        P.apply_perturbation(tone_speech(0.2), spec(**changes), BABBLE)
    assert "\n" not in str(error.value)


def test_missing_fields_and_babble_are_named():
    with pytest.raises(ValueError, match="'gain_db' is missing"):
        P.apply_perturbation(tone_speech(0.2), {k: v for k, v in spec().items() if k != "gain_db"})
    with pytest.raises(ValueError, match="needs 3 babble waves; got 1"):
        P.apply_perturbation(tone_speech(0.2), spec(noise="babble", snr_db=10.0, talkers=3), BABBLE[:1])
    with pytest.raises(ValueError, match="unknown noise kind 'rain'"):
        P.sample_perturbation(random.Random(0), ("rain",))
