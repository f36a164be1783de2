"""The world's voices: every listed voice speaks, and held-out voices never reach training."""

from __future__ import annotations

import numpy as np
import pytest

from muomni.data import speech as T


@pytest.mark.parametrize("voice", T.TRAIN_VOICES + T.WILD_VOICES)
def test_every_voice_speaks(voice):
    wave = T.synthesize("red", voice, T.RATES[1], T.PITCHES[0])
    assert wave.dtype == np.float32 and 0.1 < len(wave) / T.SAMPLE_RATE < 1.5
    assert np.sqrt(np.mean(wave**2)) > 0.005, f"{voice} is nearly silent"


def test_the_assistant_and_comp_voices_speak():
    for voice in (T.ASSISTANT["voice"], *T.HELD_OUT_VOICES):
        assert len(T.synthesize("yes", voice, 165, 50)) > 0


def test_held_out_voices_never_occur_in_training():
    train = set(T.TRAIN_VOICES)
    assert not train & set(T.WILD_VOICES) and not train & set(T.HELD_OUT_VOICES)
    assert set(T.HELD_OUT_VOICES) <= set(T.WILD_VOICES)
    assert not set(T.TRAIN_ACCENTS) & set(T.WILD_ACCENTS) and not set(T.TRAIN_VARIANTS) & set(T.WILD_VARIANTS)
    assert T.ASSISTANT["voice"] in train  # the Talker's one voice is an ordinary training voice
    heard = {voice.split("+")[0] for voice in T.WILD_VOICES} | {voice.split("+")[1] for voice in T.WILD_VOICES}
    assert set(T.WILD_ACCENTS) | set(T.WILD_VARIANTS) <= heard


def test_an_unknown_variant_is_an_error_not_the_plain_accent():
    with pytest.raises(T.SpeechError, match="no voice variant 'nonexistent'"):
        T.synthesize("hello.", "en-us+nonexistent", 170, 50)
