"""Forced alignment: characters to frames, tokens to durations."""

import pytest
import torch

from muomni.align import (durations_from_starts, emission_frames, proportional_durations, spelled_tokens,
                          token_durations)
from muomni.audio import encode_text
from muomni.data.language import normalize_transcript

VOCAB = " abcdefghijklmnopqrstuvwxyz'"


def peaky(labels: list[int], vocab_size: int = len(VOCAB) + 1) -> torch.Tensor:
    """CTC log-probabilities ``(frames, vocab)`` that are sure of one label per frame."""
    logits = torch.full((len(labels), vocab_size), -10.0)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 10.0
    return logits.log_softmax(-1)


@pytest.mark.parametrize("tokens", [["What", "'s", " up", "?"], [" Hello", ",", "  wor", "ld", "!", ""],
                                    ["A", " big", " red", " circle", "."], ["...", "x"]])
def test_spelled_tokens_normalise_like_the_aut_transcripts(tokens):
    text, owners = spelled_tokens(tokens, VOCAB)
    assert text == normalize_transcript("".join(tokens))
    assert len(owners) == len(text)
    for char, owner in zip(text, owners):
        assert (owner == -1) == (char == " ")
        if owner >= 0:
            assert char in tokens[owner].lower()


def test_emission_frames_mark_where_each_character_starts():
    a, b = encode_text("ab", VOCAB)
    ids = [a, b, b, a]  # the two b's need a blank between them
    path = [0, a, a, 0, b, 0, b, b, a]
    assert emission_frames(peaky(path), ids) == [1, 4, 6, 8]


def test_durations_from_starts_cover_every_frame_once():
    assert durations_from_starts([3, 2, 5, 9], 8).tolist() == [2, 3, 3, 0]  # first at 0, never past 8
    assert durations_from_starts([0, 4, 2, 6], 8).tolist() == [4, 0, 2, 2]  # never back
    assert int(durations_from_starts([0, 4, 4], 10).sum()) == 10


def test_token_durations_start_tokens_at_their_first_letter_and_give_pauses_to_punctuation():
    # "ab c" emitted at 25 Hz frames 2, 4, 6 (space), 10; code frames are twice as long.
    a, b, space, c = encode_text("ab c", VOCAB)
    path = [0, 0, a, 0, b, 0, space, 0, 0, 0, c, 0]
    durations = token_durations(peaky(path), ["ab", ",", " c", ""], 6, VOCAB)
    # starts in code frames: "ab" 0, "," right after b (frame 5 -> 2.5, up to 3), " c" at c (10 -> 5),
    # "" right after c (11 -> 5.5, up to 6: the end)
    assert durations.tolist() == [3, 2, 1, 0]


def test_proportional_durations_follow_the_letters():
    assert proportional_durations(["ab", " abcd", "."], 12, VOCAB).tolist() == [4, 8, 0]
    assert proportional_durations(["!", "?"], 5, VOCAB).tolist() == [2, 3]  # no letters: evenly


def test_an_utterance_too_short_for_its_text_is_spread_by_letters():
    durations = token_durations(peaky([0, 1, 0]), ["abc", " def"], 4, VOCAB)
    assert durations.tolist() == proportional_durations(["abc", " def"], 4, VOCAB).tolist()
