"""Tokenizer: lossless Unicode, atomic special tokens, a stable chat template, assistant-only loss mask."""

import json
import random

import pytest

from muomni.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

CORPUS = [
    "the red circle is left of the blue square.",
    "what colour is the small triangle? it is green.",
    "a big yellow star moves up and then stops.",
    "how many circles are there? there are three circles.",
] * 50

CHAT = [
    {"role": "system", "content": "you answer briefly."},
    {"role": "user", "content": [{"type": "image", "path": "scene.png"}, {"type": "text", "text": "what is red?"}]},
    {"role": "assistant", "content": "the circle is red."},
    {"role": "user", "content": [{"type": "audio", "path": "q.wav"}, {"type": "video", "path": "c.mp4"}]},
    {"role": "assistant", "content": "it moves up."},
]

GOLDEN_CHAT = (  # message text reads as inside a sentence: each word with its leading space
    "<|im_start|>system\n you answer briefly.<|im_end|>\n"
    "<|im_start|>user\n<|image|> what is red?<|im_end|>\n"
    "<|im_start|>assistant\n the circle is red.<|im_end|>\n"
    "<|im_start|>user\n<|audio|><|video|><|im_end|>\n"
    "<|im_start|>assistant\n it moves up.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320)


UNICODE = [
    "",
    "plain ascii, with punctuation!?",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "中文 日本語 한국어",
    "combining e\u0301 a\u0308 and precomposed é ä",
    "rtl עברית العربية",
    "  leading and trailing spaces  \t\n\r\n",
    "\x00 control \x1b[0m chars \u200b zero width",
]


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_a_normalising_tokenizer_reads_capitals_and_extra_spaces_as_its_corpus_wrote_them(tmp_path):
    lowercase = Tokenizer.train(CORPUS, vocab_size=320, normalize=True)
    lowercase.save(tmp_path)
    for tokenizer in (lowercase, Tokenizer.load(tmp_path)):  # the rule travels in tokenizer.json
        assert tokenizer.encode("What  Colour is the STAR?") == tokenizer.encode("what colour is the star?")
        assert tokenizer.decode(tokenizer.encode("The  Red Circle")) == "the red circle"
        assert tokenizer.encode_chat(CHAT) == Tokenizer.train(CORPUS, vocab_size=320).encode_chat(CHAT)
    plain = Tokenizer.train(CORPUS, vocab_size=320)
    assert plain.encode("What") != plain.encode("what")


def test_stage_a_normalises_only_a_corpus_without_capitals(tmp_path):
    from muomni.train.stage_thinker import train

    for text, normalised in (("a red star. what colour is the star? red.", True),
                             ("A red star. What colour is the star? Red.", False)):
        data = tmp_path / ("lower" if normalised else "mixed")
        (data / "text").mkdir(parents=True)
        for split in ("train", "val"):
            (data / "text" / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
        settings = ["train.steps=1", "train.batch_size=1", "train.seq_len=8", "train.eval_every=0",
                    "train.save_every=1", "thinker.vocab_size=300"]
        run = train("tiny", data, data / "runs", settings, resume=False)
        tokenizer = Tokenizer.load(run / "last")
        assert (tokenizer.encode("Red") == tokenizer.encode("red")) == normalised


def test_random_unicode_round_trip(tok):
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                                       rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(1, 30)))
        assert tok.decode(tok.encode(text)) == text


def test_merges_compress_the_training_language(tok):
    text = "the red circle is left of the blue square."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_special_tokens_have_fixed_ids(tok):
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(token) == expected
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id,
            tok.image_id, tok.audio_id, tok.video_id) == tuple(range(8))


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_tokens_are_atomic(tok, token):
    assert tok.encode(token, allow_special=True) == [SPECIAL_TOKENS.index(token)]
    assert tok.decode([SPECIAL_TOKENS.index(token)], skip_special=False) == token
    assert tok.decode([SPECIAL_TOKENS.index(token)]) == ""


def test_special_strings_in_raw_text_stay_text(tok):
    text = "say <|im_end|> now"
    ids = tok.encode(text)
    assert min(ids) >= len(SPECIAL_TOKENS)  # user text can never close a turn
    assert tok.decode(ids) == text
    assert tok.encode(text, allow_special=True).count(tok.im_end_id) == 1


def test_chat_template_is_stable(tok):
    ids, mask = tok.encode_chat(CHAT)
    assert tok.decode(ids, skip_special=False) == GOLDEN_CHAT
    assert len(ids) == len(mask)
    assert ids.count(tok.image_id) == ids.count(tok.audio_id) == ids.count(tok.video_id) == 1


def test_loss_mask_covers_exactly_assistant_content_and_its_end(tok):
    ids, mask = tok.encode_chat(CHAT)
    learned = [i for i, keep in zip(ids, mask) if keep]
    assert tok.decode(learned, skip_special=False) == " the circle is red.<|im_end|> it moves up.<|im_end|>"
    spans = [ids[i:j] for i, j in _runs(mask)]
    assert [tok.decode(span, skip_special=False) for span in spans] == [" the circle is red.<|im_end|>",
                                                                         " it moves up.<|im_end|>"]


def test_an_answer_starts_with_the_token_that_names_its_word_in_a_sentence(tok):
    ids, mask = tok.encode_chat([{"role": "user", "content": "is the circle red?"},
                                 {"role": "assistant", "content": "red."}])
    answer = [i for i, keep in zip(ids, mask) if keep]
    word = tok.encode(" red")
    question = ids[:ids.index(tok.im_end_id)]
    assert answer[:len(word)] == word
    assert any(question[k:k + len(word)] == word for k in range(len(question)))


def _runs(mask):
    start = None
    for i, keep in enumerate([*mask, False]):
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            yield start, i
            start = None


def test_generation_prompt_is_a_prefix_of_the_answered_chat(tok):
    prompt, prompt_mask = tok.encode_chat(CHAT[:-1], add_generation_prompt=True)
    full, _ = tok.encode_chat(CHAT)
    assert full[:len(prompt)] == prompt
    assert not any(prompt_mask[-3:]) and prompt[-1:] != [tok.im_end_id]
    assert tok.decode(prompt, skip_special=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": [{"type": "smell", "path": "x"}]}], "'smell'"),
    ([{"role": "user", "content": 3}], "string or a list"),
])
def test_bad_messages_are_named(tok, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tok.encode_chat(messages)


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)  # a directory holding tokenizer.json works too
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_chat(CHAT) == tok.encode_chat(CHAT)
    assert loaded.encode("<|im_end|>") == tok.encode("<|im_end|>")


def test_training_is_deterministic(tok):
    assert Tokenizer.train(CORPUS, vocab_size=320).encode_chat(CHAT) == tok.encode_chat(CHAT)


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="at least 264"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
