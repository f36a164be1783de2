"""Text to speech with eSpeak NG, offline: the voices of the world.

eSpeak NG is a formant synthesiser (Klatt-style): small, fast and the same on every machine. The
`espeakng-loader` package ships the shared library and its data, and we call its C API through
`ctypes` (no subprocess, no network):

    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)   -> the library's sample rate (22050 Hz)
    espeak_SetVoiceByName("en-us+f3")                   language + voice variant
    espeak_SetParameter(espeakRATE / espeakPITCH, ...)  words per minute, pitch 0-99
    espeak_Synth(text, ...)                             int16 chunks arrive in a callback

`synthesize(text, voice, rate, pitch)` returns a float32 waveform `(samples,)` at 16 kHz mono,
resampled with torchaudio's band-limited sinc resampler and trimmed of long silences.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # every waveform of the world is 16 kHz mono

# voices: an English accent plus a voice variant (formants, breathiness, pitch range)
TRAIN_VOICES = (
    "en-us+m1", "en-us+m3", "en-us+f1", "en-us+f3", "en+m2", "en+f2", "en-gb-x-rp+m5", "en-gb-x-rp+f4",
)
HELD_OUT_VOICES = ("en-us+m4", "en+f5")  # voices heard only in the `comp` split
RATES = (145, 195)  # words per minute, sampled uniformly
PITCHES = (30, 70)  # eSpeak pitch 0-99, sampled uniformly
# the assistant always speaks with one voice, so the Talker learns a single speaker
ASSISTANT = {"voice": "en-us+f3", "rate": 165, "pitch": 50}

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechError(ValueError):
    """eSpeak NG could not be loaded or could not speak a text."""


class _Espeak:
    """The loaded library: one per process (eSpeak keeps global state, hence the lock)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
            self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
            data_path = str(espeakng_loader.get_data_path()).encode()
        except (ImportError, OSError) as error:
            raise SpeechError(f"cannot load eSpeak NG from espeakng-loader ({error}); pip install espeakng-loader") from None
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.rate <= 0:
            raise SpeechError(f"espeak_Initialize failed with the data at {data_path.decode()}")
        self.chunks: list[np.ndarray] = []
        self.callback = _CALLBACK(self._collect)  # kept on self: ctypes must not free it
        self.lib.espeak_SetSynthCallback(self.callback)
        self.lock = threading.Lock()
        import torchaudio

        # the sinc kernel is computed once here instead of on every call
        self.resampler = torchaudio.transforms.Resample(self.rate, SAMPLE_RATE)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SpeechError(f"eSpeak NG has no voice '{voice}'; try e.g. 'en-us' or 'en-us+f3'")
            self.lib.espeak_SetParameter(_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self.chunks = []
            data = text.encode()
            self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            chunks, self.chunks = self.chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)


_engine: _Espeak | None = None


def _get_engine() -> _Espeak:
    global _engine
    if _engine is None:
        _engine = _Espeak()
    return _engine


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
    engine = _get_engine()
    raw = engine.speak(text, voice, rate, pitch)
    if len(raw) == 0:
        raise SpeechError(f"eSpeak NG produced no audio for '{text}' with voice '{voice}'")
    with torch.no_grad():
        wave = engine.resampler(torch.from_numpy(raw.astype(np.float32) / 32768.0)).numpy()
    return trim_silence(np.clip(wave, -1.0, 1.0).astype(np.float32))


def write_wav(path: str | Path, wave: np.ndarray) -> None:
    """Write a 16 kHz mono waveform as 16-bit PCM WAV."""
    import soundfile as sf

    sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")
