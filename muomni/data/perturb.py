"""Waveform perturbations for domain randomisation: noise, gain, telephone band, room reverb, speed.

A recogniser trained only on clean synthetic speech fails on a learner's microphone. Randomising what
should not matter to the transcript (Tobin et al., 2017, for images; noise, reverberation and speed
perturbation for speech: Ko et al., 2015 and 2017) teaches it to ignore those factors. Every
perturbation is a plain JSON-able dict, so a manifest can store exactly what was done to a file:

    {"kind": "clean"}                       the waveform unchanged
    {"kind": "perturb",
     "seed": 7,                             seeds every random draw below
     "speed": 1.05,                         tempo and pitch factor, 0.9-1.1 (resampling; 1: none)
     "rt60_s": 0.3,                         synthetic room reverb time, 0.1-0.5 s (null: none)
     "noise": "pink",                       additive noise kind (null: none), at
     "snr_db": 12.0,                        a signal-to-noise ratio of 5-30 dB
     "hum_hz": 50,                          mains frequency, 50 or 60 (noise "hum" only)
     "talkers": 3,                          babble waves summed, 2-4 (noise "babble" only)
     "band_hz": [300, 3400],                telephone-like band-pass (null: full band)
     "gain_db": -6.0}                       level change, -20 to +6 dB, then limited to a peak of 0.98

The effects run in that order: the talker (speed), the room (reverb, noise), the channel (band,
gain). `sample_perturbation` draws a spec from a `random.Random`; `apply_perturbation` is a pure
function of the waveform, the spec and the babble waves. Waveforms are float32 ``(samples,)`` at
16 kHz mono in and out; only speed changes the length, to ``ceil(samples / speed)``.

Noise kinds: white, pink (1/f), brown (1/f^2), babble (other utterances, which the caller supplies)
and hum (50/60 Hz mains with harmonics). Brown noise is held out of training (`WILD_NOISES`): a
low rumble steeper than any training colour, so the `wild` split measures whether robustness to
noise transfers rather than whether one noise was memorised. Hum stays in training because a
laptop's microphone so often picks it up.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000  # every waveform is 16 kHz mono
TRAIN_NOISES = ("white", "pink", "babble", "hum")
WILD_NOISES = ("brown",)  # heard only in the `wild` split
NOISES = TRAIN_NOISES + WILD_NOISES

SNR_DB = (5.0, 30.0)  # signal-to-noise ratio of additive noise
PEAK = 0.98  # the loudest a perturbed waveform gets
GAIN_DB = (-20.0, 6.0)  # level change
RT60_S = (0.1, 0.5)  # reverb time: 60 dB of decay
SPEED = (0.9, 1.1)  # tempo and pitch factor
TALKERS = (2, 4)  # babble: how many other utterances are summed
HUM_HZ = (50, 60)  # mains frequencies
LOW_CUT_HZ = (200, 400)  # telephone band: the lower edge is drawn from here
HIGH_CUT_HZ = (3000, 4000)  # and the upper edge from here

_FIELDS = ("kind", "seed", "speed", "rt60_s", "noise", "snr_db", "hum_hz", "talkers", "band_hz", "gain_db")


def sample_perturbation(rng: random.Random, noise_kinds: tuple[str, ...] = TRAIN_NOISES,
                        strength: float = 1.0) -> dict:
    """A random perturbation spec with noise from ``noise_kinds`` (empty: no noise).

    ``strength`` in [0, 1] scales how hard it is: at 1 the SNR spans 5-30 dB, reverb comes in 40% of
    specs, a telephone band in 30% and a speed change in half; at 0 only a 30 dB noise remains.
    """
    unknown = [kind for kind in noise_kinds if kind not in NOISES]
    if unknown:
        raise ValueError(f"unknown noise kind {unknown[0]!r}; expected one of {', '.join(NOISES)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength is {strength}; expected 0 to 1")
    s = strength
    spec = {"kind": "perturb", "seed": rng.randrange(2**31), "speed": 1.0, "rt60_s": None, "noise": None,
            "snr_db": None, "hum_hz": None, "talkers": None, "band_hz": None,
            "gain_db": round(rng.uniform(GAIN_DB[0] * s, GAIN_DB[1] * s), 1)}
    if rng.random() < 0.5 * s:
        spec["speed"] = round(rng.uniform(1 - (1 - SPEED[0]) * s, 1 + (SPEED[1] - 1) * s), 2)
    if rng.random() < 0.4 * s:
        spec["rt60_s"] = round(rng.uniform(RT60_S[0], RT60_S[0] + (RT60_S[1] - RT60_S[0]) * s), 2)
    if noise_kinds:
        spec["noise"] = rng.choice(noise_kinds)
        spec["snr_db"] = round(rng.uniform(SNR_DB[1] - (SNR_DB[1] - SNR_DB[0]) * s, SNR_DB[1]), 1)
        if spec["noise"] == "hum":
            spec["hum_hz"] = rng.choice(HUM_HZ)
        if spec["noise"] == "babble":
            spec["talkers"] = rng.randint(*TALKERS)
    if rng.random() < 0.3 * s:
        spec["band_hz"] = [rng.randint(*LOW_CUT_HZ), rng.randint(*HIGH_CUT_HZ)]
    return spec


def check_perturbation(spec: dict) -> None:
    """Raise a one-line ValueError naming the first field of ``spec`` that is missing or out of range."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("clean", "perturb"):
        raise ValueError(f"perturbation field 'kind' is {spec.get('kind') if isinstance(spec, dict) else spec!r}; "
                         "expected 'clean' or 'perturb'")
    if spec["kind"] == "clean":
        return
    for key in _FIELDS:
        if key not in spec:
            raise ValueError(f"perturbation field {key!r} is missing (use null for an effect that is off)")
    extra = sorted(set(spec) - set(_FIELDS))
    if extra:
        raise ValueError(f"perturbation field {extra[0]!r} is unknown; expected {', '.join(_FIELDS)}")

    def within(key: str, bounds: tuple, unit: str, optional: bool = False) -> None:
        value = spec[key]
        if value is None and optional:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"perturbation field {key!r} is {value!r}; expected {bounds[0]}-{bounds[1]}{unit}")

    if not isinstance(spec["seed"], int) or spec["seed"] < 0:
        raise ValueError(f"perturbation field 'seed' is {spec['seed']!r}; expected an integer >= 0")
    within("speed", SPEED, "")
    within("rt60_s", RT60_S, " s", optional=True)
    within("gain_db", GAIN_DB, " dB")
    noise = spec["noise"]
    if noise is not None and noise not in NOISES:
        raise ValueError(f"perturbation field 'noise' is {noise!r}; expected null or one of {', '.join(NOISES)}")
    within("snr_db", SNR_DB, " dB", optional=noise is None)
    if noise == "hum" and spec["hum_hz"] not in HUM_HZ:
        raise ValueError(f"perturbation field 'hum_hz' is {spec['hum_hz']!r}; expected 50 or 60")
    if noise == "babble":
        within("talkers", TALKERS, " waves")
    band = spec["band_hz"]
    if band is not None and not (isinstance(band, (list, tuple)) and len(band) == 2
                                 and 0 < band[0] < band[1] < SAMPLE_RATE / 2):
        raise ValueError(f"perturbation field 'band_hz' is {band!r}; expected null or [low, high] below 8000 Hz")


def apply_perturbation(wave: np.ndarray, spec: dict, babble: list[np.ndarray] | None = None) -> np.ndarray:
    """Perturb a float32 waveform ``(samples,)`` -> float32 ``(ceil(samples / speed),)`` in [-1, 1].

    ``babble`` holds at least ``spec["talkers"]`` other utterances (any lengths) when the noise is
    babble; they are looped to the waveform's length. The result depends only on the arguments.
    """
    check_perturbation(spec)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or len(wave) == 0:
        raise ValueError(f"wave has shape {wave.shape}; expected a non-empty mono waveform (samples,)")
    if spec["kind"] == "clean":
        return wave.copy()
    # one generator per effect, so switching one effect off leaves the others' draws unchanged
    rngs = [np.random.default_rng([spec["seed"], k]) for k in range(3)]
    x = wave.astype(np.float64)
    if spec["speed"] != 1.0:
        x = change_speed(x, spec["speed"])
    if spec["rt60_s"] is not None:
        x = reverberate(x, spec["rt60_s"], rngs[0])
    if spec["noise"] is not None:
        noise = make_noise(spec, len(x), rngs[1], babble)
        power = np.mean(x**2)
        x = x + noise * np.sqrt(power / 10 ** (spec["snr_db"] / 10))  # noise has unit power
    if spec["band_hz"] is not None:
        x = band_limit(x, *spec["band_hz"])
    x = x * 10 ** (spec["gain_db"] / 20)
    # A recorder's limiter, not hard clipping: a louder take keeps its shape (a clipped one is refused
    # by `load_audio` as distorted).
    peak = np.abs(x).max()
    return (x * min(1.0, PEAK / peak) if peak > 0 else x).astype(np.float32)


def make_noise(spec: dict, n: int, rng: np.random.Generator, babble: list[np.ndarray] | None = None) -> np.ndarray:
    """Unit-power noise ``(n,)`` of the kind ``spec["noise"]``."""
    kind = spec["noise"]
    if kind == "white":
        noise = rng.standard_normal(n)
    elif kind in ("pink", "brown"):
        # a stretch of a long precomputed noise: shaping a fresh one would cost two FFTs every time
        buffer = _noise_buffer(1 if kind == "pink" else 2)
        noise = buffer[(rng.integers(len(buffer)) + np.arange(n)) % len(buffer)]
    elif kind == "hum":
        # mains hum: the fundamental and its first harmonics, each weaker than the last, at random
        # phases (sin(a + p) = sin a cos p + cos a sin p); one second holds whole cycles of 50 and 60 Hz
        sines, cosines = _hum_tables(spec["hum_hz"])
        phases = rng.uniform(0, 2 * np.pi, len(sines))
        weights = 1 / np.arange(1, len(sines) + 1)
        second = (weights * np.cos(phases)) @ sines + (weights * np.sin(phases)) @ cosines
        noise = np.resize(second, n)
    else:
        waves = [np.asarray(w, dtype=np.float64) for w in (babble or []) if len(w) > 0]
        if len(waves) < spec["talkers"]:
            raise ValueError(f"noise 'babble' needs {spec['talkers']} babble waves; got {len(waves)}")
        noise = np.zeros(n)
        for w in waves[: spec["talkers"]]:
            start = rng.integers(len(w))
            noise += _unit_power(w[(start + np.arange(n)) % len(w)])  # looped from a random start
    return _unit_power(noise)


def coloured_noise(n: int, exponent: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise ``(n,)`` whose power falls as ``1 / f**exponent`` (0 white, 1 pink, 2 brown)."""
    if exponent == 0:
        return rng.standard_normal(n)
    size = _fast_len(n)  # shaped at a length the FFT likes, then cut to n
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    spectrum *= np.maximum(freqs, 20.0) ** (-exponent / 2)  # flat below 20 Hz: no endless drift
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, size)[:n]


@lru_cache(maxsize=None)
def _noise_buffer(exponent: int) -> np.ndarray:
    """32.8 s of coloured noise ``(2**19,)``, the same in every process; it loops seamlessly."""
    return coloured_noise(2**19, exponent, np.random.default_rng(exponent))


@lru_cache(maxsize=None)
def _hum_tables(hz: int, harmonics: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of harmonics 1..``harmonics`` of ``hz`` over one second: two ``(harmonics, 16000)``."""
    angles = 2 * np.pi * hz * np.arange(1, harmonics + 1)[:, None] * np.arange(SAMPLE_RATE) / SAMPLE_RATE
    return np.sin(angles), np.cos(angles)


def reverberate(x: np.ndarray, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve ``(samples,)`` with a synthetic room: a direct path plus exponentially decaying noise.

    The tail falls by 60 dB in ``rt60_s`` and carries as much energy as the direct path (a speaker
    a few metres from the microphone). The output keeps the input's length and loudness.
    """
    t = np.arange(1, int(rt60_s * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * np.exp(-3 * np.log(10) * t / rt60_s)
    response = np.concatenate([[1.0], tail / np.sqrt(np.sum(tail**2))])
    size = _fast_len(len(x) + len(response) - 1)
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(response, size), size)[: len(x)]
    return wet * np.sqrt(np.mean(x**2) / max(np.mean(wet**2), 1e-20))


def band_limit(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Zero-phase band-pass of ``(samples,)`` with 4th-order Butterworth magnitude edges (a telephone)."""
    size = _fast_len(len(x) + SAMPLE_RATE // 50)  # 20 ms of zeros keep the filter's ringing off the start
    freqs = np.maximum(np.fft.rfftfreq(size, 1 / SAMPLE_RATE), 1e-3)
    gain = 1 / np.sqrt((1 + (freqs / high_hz) ** 8) * (1 + (low_hz / freqs) ** 8))
    return np.fft.irfft(np.fft.rfft(x, size) * gain, size)[: len(x)]


def change_speed(x: np.ndarray, speed: float) -> np.ndarray:
    """Play ``(samples,)`` ``speed`` times faster -> ``(ceil(samples / speed),)``: tempo and pitch both change.

    Kaldi's speed perturbation: resample from ``speed * 16`` kHz to 16 kHz with torchaudio's
    band-limited sinc resampler (``speed`` to the nearest 0.01, so the polyphase filter stays small).
    """
    import torch
    import torchaudio

    with torch.no_grad():
        return torchaudio.functional.resample(torch.from_numpy(x), round(speed * 100), 100).numpy()


def _fast_len(n: int) -> int:
    """The smallest ``2**a * 3**b * 5**c >= n``: FFTs of such lengths are fast, of large primes slow."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            best = min(best, p35 << (-(-n // p35) - 1).bit_length())
            p35 *= 3
        p5 *= 5
    return best


def _unit_power(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(max(np.mean(x**2), 1e-20))
