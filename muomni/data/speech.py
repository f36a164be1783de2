"""Text to speech with eSpeak NG, offline: the voices of the world.

eSpeak NG is a formant synthesiser (Klatt-style): small, fast and the same on every machine. The
`espeakng-loader` package ships the shared library and its data, and we call its C API through
`ctypes` (no subprocess, no network), loading the library afresh for each utterance so the result
depends only on the arguments:

    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)   -> the library's sample rate (22050 Hz)
    espeak_SetVoiceByName("en-us+f3")                   language + voice variant
    espeak_SetParameter(espeakRATE / espeakPITCH, ...)  words per minute, pitch 0-99
    espeak_Synth(text, ...)                             int16 chunks arrive in a callback

`synthesize(text, voice, rate, pitch)` returns a float32 waveform `(samples,)` at 16 kHz mono,
resampled with torchaudio's band-limited sinc resampler and trimmed of long silences.

The voices vary like real speakers: eight English accents times thirty voice variants, rates of
120-220 words per minute and pitches 20-90. `TRAIN_VOICES` and `WILD_VOICES` are disjoint; the
world adds noise, rooms and channels on top with `muomni.data.perturb`.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # every waveform of the world is 16 kHz mono

# A voice is an English accent (espeak-ng-data/lang/gmw/en*) plus a voice variant (voices/!v: formants,
# breathiness, pitch range, or another synthesiser such as Klatt's). Robotic and novelty variants and
# "en-shaw" (the Shavian alphabet: the same sounds as "en") are left out. Some accents and some
# variants are held out of training entirely, so the `wild` split hears speakers that differ from
# every training speaker in accent, in voice, or in both.
TRAIN_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-029")
WILD_ACCENTS = ("en-us-nyc", "en-gb-x-gbcwmd")  # New York City, West Midlands: never in training
TRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt3", "croak",
                  "whisper", "Annie", "aunty", "david", "ed", "linda", "robert")
WILD_VARIANTS = ("m4", "m8", "f5", "klatt2", "klatt4", "whisperf", "grandma", "quincy", "edward", "michel")
TRAIN_VOICES = tuple(f"{accent}+{variant}" for accent in TRAIN_ACCENTS for variant in TRAIN_VARIANTS)
# every other pairing: a new accent, a new variant, or both
WILD_VOICES = tuple(f"{accent}+{variant}" for accent in TRAIN_ACCENTS + WILD_ACCENTS
                    for variant in TRAIN_VARIANTS + WILD_VARIANTS
                    if accent in WILD_ACCENTS or variant in WILD_VARIANTS)
HELD_OUT_VOICES = ("en-us+m4", "en+f5")  # voices of the `comp` split: two of the wild voices
RATES = (120, 220)  # words per minute, sampled uniformly
PITCHES = (20, 90)  # eSpeak pitch 0-99, sampled uniformly
# the assistant always speaks with one voice, so the Talker learns a single speaker
ASSISTANT = {"voice": "en-us+f3", "rate": 165, "pitch": 50}

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechError(ValueError):
    """eSpeak NG could not be loaded or could not speak a text."""


def _library() -> tuple[str, bytes]:
    try:
        import espeakng_loader
        return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path()).encode()
    except ImportError:
        raise SpeechError("eSpeak NG is missing; pip install espeakng-loader") from None


_LOCK = threading.Lock()  # eSpeak keeps global state: one synthesis at a time per process
_RESAMPLERS: dict[int, object] = {}


def _speak_raw(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """int16 samples at the library's own rate, from a freshly loaded library.

    eSpeak NG carries state from one utterance to the next (noise generators, pitch flutter), so the
    same call gives slightly different audio depending on what was spoken before. Loading the
    library afresh for every utterance (dlopen, initialise, speak, terminate, dlclose: ~15 ms) makes
    `synthesize` a function of its arguments within a process, whatever order it runs in. Across
    processes the samples still differ a little (study/04).
    """
    import _ctypes

    path, data_path = _library()
    variant = voice.partition("+")[2]
    if variant and not (Path(data_path.decode()) / "voices" / "!v" / variant).is_file():
        # eSpeak NG would quietly speak an unknown variant with the plain accent
        raise SpeechError(f"eSpeak NG has no voice variant '{variant}' (in '{voice}'); try e.g. 'en-us+f3'")
    chunks: list[np.ndarray] = []

    def collect(wav, n: int, events) -> int:
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    callback = _CALLBACK(collect)
    with _LOCK:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        except OSError as error:
            raise SpeechError(f"cannot load eSpeak NG from {path}: {error}") from None
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
            if sample_rate <= 0:
                raise SpeechError(f"espeak_Initialize failed with the data at {data_path.decode()}")
            lib.espeak_SetSynthCallback(callback)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SpeechError(f"eSpeak NG has no voice '{voice}'; try e.g. 'en-us' or 'en-us+f3'")
            lib.espeak_SetParameter(_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            data = text.encode()
            lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            lib.espeak_Terminate()
        finally:
            unload = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary")  # POSIX / Windows
            unload(lib._handle)
    raw = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return raw, sample_rate


def trim_silence(wave: np.ndarray, threshold: float = 0.01, keep_s: float = 0.08) -> np.ndarray:
    """Cut leading/trailing samples below `threshold`, keeping `keep_s` seconds of margin."""
    loud = np.flatnonzero(np.abs(wave) > threshold)
    if len(loud) == 0:
        return wave
    keep = int(keep_s * SAMPLE_RATE)
    return wave[max(0, loud[0] - keep): loud[-1] + keep]


def synthesize(text: str, voice: str = "en-us", rate: int = 165, pitch: int = 50) -> np.ndarray:
    """Speak `text`: float32 waveform `(samples,)` in [-1, 1] at 16 kHz mono."""
    import torch

    if not text.strip():
        raise SpeechError("cannot synthesize an empty text")
    raw, rate_in = _speak_raw(text, voice, rate, pitch)
    if len(raw) == 0:
        raise SpeechError(f"eSpeak NG produced no audio for '{text}' with voice '{voice}'")
    if rate_in not in _RESAMPLERS:  # the sinc kernel is computed once, not on every call
        import torchaudio

        _RESAMPLERS[rate_in] = torchaudio.transforms.Resample(rate_in, SAMPLE_RATE)
    with torch.no_grad():
        wave = _RESAMPLERS[rate_in](torch.from_numpy(raw.astype(np.float32) / 32768.0)).numpy()
    return trim_silence(np.clip(wave, -1.0, 1.0).astype(np.float32))


def write_wav(path: str | Path, wave: np.ndarray) -> None:
    """Write a 16 kHz mono waveform as 16-bit PCM WAV."""
    import soundfile as sf

    sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")
