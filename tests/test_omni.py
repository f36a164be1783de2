"""OmniModel: placeholder expansion, positions, loss mask, chats in every modality, streaming, context."""

from __future__ import annotations

import pytest
import torch

from muomni.omni import ContextError, Media, OmniModel, SpeechError, expand_sequence, shift_targets
from muomni.thinker import IGNORE_INDEX
from omni_fixtures import small_model, small_tokenizer, write_media


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return small_model(tokenizer)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_media(tmp_path_factory.mktemp("media"))


def chat_with_everything(media, question="what colour is the circle?"):
    return [{"role": "user", "content": [
        {"type": "image", "path": str(media["image"])},
        {"type": "text", "text": "look."},
        {"type": "audio", "path": str(media["audio"])},
        {"type": "video", "path": str(media["video"])},
        {"type": "text", "text": question}]}]


def test_placeholders_expand_to_the_right_tokens_at_the_right_places(tokenizer):
    image = Media("image", 4, grid=(2, 2), tokens=torch.zeros(4, 8))
    audio = Media("audio", 3, tokens=torch.zeros(3, 8))
    video = Media("video", 8, grid=(2, 2), timestamps=[0.0, 0.5], tokens=torch.zeros(8, 8))
    messages = [{"role": "user", "content": [{"type": "image", "path": "a"}, {"type": "text", "text": "hi"},
                                             {"type": "audio", "path": "b"}, {"type": "video", "path": "c"}]},
                {"role": "assistant", "content": "red."}]
    ids, mask = tokenizer.encode_chat(messages)
    out_ids, out_mask, positions = expand_sequence(ids, mask, [image, audio, video], tokenizer)

    assert len(out_ids) == len(ids) - 3 + 4 + 3 + 8
    first_image = ids.index(tokenizer.image_id)
    assert out_ids[first_image:first_image + 4] == [tokenizer.image_id] * 4
    assert out_ids.count(tokenizer.audio_id) == 3 and out_ids.count(tokenizer.video_id) == 8
    # the text between placeholders is unchanged and in order
    assert [t for t in out_ids if t not in (5, 6, 7)] == [t for t in ids if t not in (5, 6, 7)]
    assert not any(m for t, m in zip(out_ids, out_mask) if t in (5, 6, 7))

    # text before the image counts 0, 1, 2, ... equally in time, height and width
    assert positions[:, :first_image].tolist() == [list(range(first_image))] * 3
    p = first_image
    # the image: one time, a 2x2 grid of heights and widths
    assert positions[:, p:p + 4].tolist() == [[p] * 4, [p, p, p + 1, p + 1], [p, p + 1, p, p + 1]]
    assert positions[0, p + 4] == p + 2  # text resumes after the largest image position
    audio_at = out_ids.index(tokenizer.audio_id)
    start = int(positions[0, audio_at])
    assert positions[:, audio_at:audio_at + 3].tolist() == [[start, start + 2, start + 4]] * 3
    video_at = out_ids.index(tokenizer.video_id)
    v0 = int(positions[0, video_at])
    assert v0 == start + 5
    # frame two sits 0.5 s = 12.5 -> 12 ticks later at 25 ticks per second; same grid
    assert positions[0, video_at + 4:video_at + 8].tolist() == [v0 + 12] * 4
    assert positions[1:, video_at + 4:video_at + 8].tolist() == positions[1:, video_at:video_at + 4].tolist()
    assert int(positions[0, video_at + 8]) == v0 + 13


def test_loss_mask_covers_only_assistant_tokens(tokenizer):
    image = Media("image", 4, grid=(2, 2), tokens=torch.zeros(4, 8))
    messages = [{"role": "system", "content": "be brief."},
                {"role": "user", "content": [{"type": "image", "path": "a"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": "red."}]
    ids, mask = tokenizer.encode_chat(messages)
    out_ids, out_mask, _ = expand_sequence(ids, mask, [image], tokenizer)
    targets = shift_targets(out_ids, out_mask)
    learned = [t for t in targets if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " red."  # a message reads as inside a sentence: with its space
    assert learned[-1] == tokenizer.im_end_id
    assert tokenizer.im_end_id in learned and sum(out_mask) == len(learned)


def test_projected_media_land_on_their_placeholders(model, media):
    messages = chat_with_everything(media)
    ids, _, items = model.prepare(messages)
    with torch.no_grad():
        embeds = model.embed(ids[None], model.group_media(items))[0]
        image = items[0]
        at = (ids == model.tokenizer.image_id).nonzero().flatten()
        torch.testing.assert_close(embeds[at], model.vision_proj(image.tokens))
        text_at = (ids == model.tokenizer.im_start_id).nonzero().flatten()
        torch.testing.assert_close(embeds[text_at], model.thinker.embed(ids[text_at]))


@pytest.mark.parametrize("kind", ["text", "image", "audio", "video", "all"])
def test_chat_with_each_modality_runs_end_to_end(model, media, kind):
    if kind == "text":
        messages = [{"role": "user", "content": "what colour is the circle?"}]
    elif kind == "all":
        messages = chat_with_everything(media)
    else:
        messages = [{"role": "user", "content": [{"type": kind, "path": str(media[kind])},
                                                 {"type": "text", "text": "what is it?"}]}]
    text = model.chat(messages, max_new_tokens=6, temperature=1.0, seed=0)
    assert isinstance(text, str)
    text, wave = model.chat(messages, speak=True, max_new_tokens=4, temperature=1.0, seed=0)
    assert wave.dim() == 1 and wave.dtype == torch.float32 and torch.isfinite(wave).all()


def test_streaming_yields_the_same_text_as_one_answer(model, media):
    messages = chat_with_everything(media)
    whole = model.chat(messages, max_new_tokens=12, temperature=1.0, seed=3)
    pieces = list(model.chat(messages, stream=True, max_new_tokens=12, temperature=1.0, seed=3))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == whole and len(whole) > 0


def test_streaming_speech_arrives_in_chunks_with_the_text(model, media):
    messages = chat_with_everything(media)
    events = list(model.chat(messages, speak=True, stream=True, max_new_tokens=8, temperature=1.0, seed=1))
    text = "".join(e for e in events if isinstance(e, str))
    assert text == model.chat(messages, max_new_tokens=8, temperature=1.0, seed=1)
    assert any(isinstance(e, torch.Tensor) for e in events)


def test_each_token_comes_with_the_thinker_state_at_it(model):
    messages = [{"role": "user", "content": "what colour is the circle?"}]
    tokens, states = zip(*model.generate_ids(messages, max_new_tokens=6))
    embeds, positions = model.prompt(messages)
    new = torch.tensor(tokens)
    with torch.no_grad():
        full = model.thinker(inputs_embeds=torch.cat([embeds, model.thinker.embed(new)])[None],
                             position_ids=torch.cat([positions, (positions.max() + 1 + torch.arange(len(new))).expand(3, -1)], 1)[:, None])
    torch.testing.assert_close(torch.stack(states), full.hidden[0, -len(new):])


def test_speaking_nothing_is_a_clear_error(model):
    blank = model.tokenizer.encode("  \n")
    with pytest.raises(SpeechError, match="nothing to speak"):
        model.speak_tokens(blank, torch.zeros(len(blank), model.cfg.thinker.d_model))


def test_context_overflow_names_each_part(tokenizer, media):
    model = small_model(tokenizer, overrides=("thinker.max_seq_len=64", "video_frames=8"))
    with pytest.raises(ContextError) as error:
        model.chat(chat_with_everything(media), max_new_tokens=8)
    message = str(error.value)
    assert "max_seq_len" in message and "64" in message
    for part in ("text", "image scene.png 4", "audio question.wav", "video clip.gif 32 (8 frames)"):
        assert part in message


def test_save_and_load_give_the_same_answers(model, media, tmp_path):
    messages = chat_with_everything(media)
    model.save(tmp_path / "omni")
    loaded = OmniModel.load(tmp_path / "omni")
    assert loaded.chat(messages, max_new_tokens=6, temperature=1.0, seed=5) == \
        model.chat(messages, max_new_tokens=6, temperature=1.0, seed=5)


def test_batched_answers_match_single_answers(model, media):
    chats = [chat_with_everything(media), [{"role": "user", "content": "what colour is the circle?"}]]
    assert model.answer_batch(chats, max_new_tokens=5) == [model.chat(c, max_new_tokens=5) for c in chats]


@pytest.mark.parametrize("train_encoders", [False, True])
def test_sft_loss_trains_encoders_only_when_asked(tokenizer, media, train_encoders):
    from muomni.train import stage_sft

    model = small_model(tokenizer)
    rows = [{"messages": chat_with_everything(media) + [{"role": "assistant", "content": "red."}]},
            {"messages": [{"role": "user", "content": "what colour?"}, {"role": "assistant", "content": "blue."}]}]
    stage_sft.freeze(model, train_encoders)
    data = stage_sft.ChatSamples(rows, media["image"].parent, model, cache=not train_encoders)
    loss, metrics = stage_sft.loss_fn(model, stage_sft.collate([data[0], data[1]]))
    loss.backward()
    # answer tokens plus each closing <|im_end|> are the only targets
    assert metrics["answer_tokens"] == len(tokenizer.encode(" red.")) + len(tokenizer.encode(" blue.")) + 2
    assert model.vision_proj.up.weight.grad is not None and model.thinker.tok_emb.weight.grad is not None
    assert (next(model.vision.patch_embed.parameters()).grad is not None) == train_encoders
    assert (model.audio.conv1.weight.grad is not None) == train_encoders
    assert model.codec.encoder[0].weight.grad is None


def test_a_pictures_questions_become_turns_of_one_chat(tmp_path):
    import json

    from muomni.train.stage_sft import extra_chats

    qa = [{"question": f"question {i}?", "answer": f"answer{i}", "kind": "colour"} for i in range(5)]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "train.jsonl").write_text(json.dumps({"image": "png/1.png", "qa": qa}) + "\n")
    chats = extra_chats(tmp_path, per_chat=2)
    assert [len(chat["messages"]) for chat in chats] == [4, 4, 2]  # 2 + 2 + 1 questions, a turn each
    first = chats[0]["messages"]
    assert first[0]["content"][0] == {"type": "image", "path": "../images/png/1.png"}  # the picture once
    assert all(part["type"] == "text" for m in first[1:] if m["role"] == "user" for part in m["content"])
    asked = {m["content"][-1]["text"]: chat["messages"][k + 1]["content"]
             for chat in chats for k, m in enumerate(chat["messages"]) if m["role"] == "user"}
    assert asked == {f"question {i}?": f"answer{i}." for i in range(5)}  # each question once, its own answer
    assert [len(chat["messages"]) for chat in extra_chats(tmp_path)] == [2] * 5


def test_the_sft_mixture_follows_its_shares_and_repeats_rare_kinds():
    from collections import Counter

    from muomni.train.stage_sft import mix

    rows = [{"kind": "common", "i": i} for i in range(1000)] + [{"kind": "rare", "i": i} for i in range(10)]
    mixed = mix(rows, {"common": 0.5, "rare": 0.5, "absent": 0.3}, total=200, seed=0)
    assert Counter(row["kind"] for row in mixed) == {"common": 100, "rare": 100}
    assert Counter(row["i"] for row in mixed if row["kind"] == "rare") == {i: 10 for i in range(10)}  # each rare row 10 times
    assert mixed == mix(rows, {"common": 0.5, "rare": 0.5, "absent": 0.3}, total=200, seed=0)
    assert [row["kind"] for row in mix(rows, {"common": 0.9, "rare": 0.1}, total=4, seed=0)] == ["common"] * 4


def test_a_part_missing_weights_names_them():
    import torch.nn as nn

    from muomni.train.stage_sft import load_part
    from muomni.train.stages import StageError

    old = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    new = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))  # grew a layer since
    state = {f"talker.{k}": v for k, v in old.state_dict().items()}
    with pytest.raises(StageError, match=r"lack 2\.weight, 2\.bias; retrain"):
        load_part(new, state, "talker", "runs/speech")
    load_part(old, state, "talker", "runs/speech")  # complete: loads


def test_scores_count_each_chat_kind_and_each_image_question_kind():
    from muomni.train.stage_sft import score

    def row(kind, answer, question_kind=None):
        chat = {"kind": kind, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}
        return {**chat, "question_kind": question_kind} if question_kind else chat

    rows = [row("image_qa", "red.", "colour"), row("image_qa", "top left.", "position"),
            row("image_qa", "bottom.", "position"), row("video_qa", "left.", "motion"),
            row("transcribe", "a red star.")]
    metrics = score(rows, ["Red", "top left.", "top.", "right.", "a red star."])
    assert metrics["image_qa_acc"] == pytest.approx(2 / 3) and metrics["n_image_qa"] == 3
    assert metrics["image_qa_by_question"] == {"colour": 1.0, "position": 0.5}
    assert metrics["video_qa_acc"] == 0.0 and metrics["transcribe_cer"] == 0.0
    assert "image_qa_by_question" not in score(rows[3:], ["left.", "a red star."])


def test_captions_are_scored_by_the_facts_they_get_right():
    from muomni.train.stage_sft import caption_facts

    truth = "a big red circle at the top left and a small blue star on the right."
    assert caption_facts(truth, truth) == 1.0
    assert caption_facts(truth, "a big red circle at the top left.") == 0.5  # one object of two, all four facts
    assert caption_facts(truth, "a small red circle at the top left and a small blue star on the right.") == 7 / 8
    invented = "a big red circle at the top left and a small blue star on the right and a big green square."
    assert caption_facts(truth, invented) == 8 / 12  # an object that is not there costs
    assert caption_facts(truth, "") == 0.0


WORLD_WORDS = ('visual_words=[["red","green","blue","yellow","purple","orange"],["circle","square","triangle","star"],'
               '["big","small"],["top left","top","top right","left","middle","right","bottom left","bottom","bottom right"]]')


def test_visual_words_give_image_tokens_the_words_their_heads_read(tokenizer, media):
    from muomni.config import ConfigError

    assert small_model(tokenizer).visual_words is None  # off unless named
    model = small_model(tokenizer, overrides=(WORLD_WORDS,))
    words = model.visual_words
    assert [head.out_features for head in words.heads] == list(model.cfg.vision.attribute_classes)
    target = torch.randn(model.cfg.thinker.d_model)
    words.init_words(lambda head, cls: target * (head + cls))
    assert torch.equal(words.words[1][2], target * 3) and torch.equal(words.words[0][0], torch.zeros_like(target))
    merged = torch.randn(5, 4 * model.cfg.vision.d_model)
    expected = sum(head(merged).softmax(-1) @ table for head, table in zip(words.heads, words.words))
    torch.testing.assert_close(words(merged), expected)
    # an image token is its projection plus its words
    ids = torch.tensor([[tokenizer.image_id] * 5])
    embeds = model.embed(ids, {"image": merged})
    torch.testing.assert_close(embeds[0], model.vision_proj(merged) + words(merged))
    with pytest.raises(ConfigError, match="attribute heads"):
        small_model(tokenizer, overrides=(WORLD_WORDS, "vision.attribute_classes=[7,5]"))


def test_words_give_one_audio_token_per_word_the_ctc_head_hears(tokenizer, media):
    from muomni.audio import pool_words, word_spans
    from muomni.config import ConfigError

    # blank 0, space 1: "ab c" with blanks inside and around the words
    assert word_spans([0, 2, 0, 3, 1, 0, 4, 4, 0], space=1) == [(1, 4), (6, 8)]
    assert word_spans([0, 1, 0], space=1) == [(0, 3)]  # nothing heard: one token over the clip
    hidden = torch.randn(9, 4)
    pooled = pool_words(hidden, [(1, 4), (6, 8)])
    torch.testing.assert_close(pooled[1], torch.cat([hidden[6:8].mean(0), hidden[6:8].amax(0)]))

    model = small_model(tokenizer, overrides=('audio_tokens="words"',)).eval()
    item = model.load_media({"type": "audio", "path": str(media["audio"])})
    assert item.n_tokens == len(item.raw["spans"]) == len(model.word_spans(item.raw["mel"]))
    model.encode([item])
    hidden, _ = model.audio(item.raw["mel"][None])
    torch.testing.assert_close(item.tokens, pool_words(hidden[0], item.raw["spans"]))
    with pytest.raises(ConfigError, match="audio_tokens 'letters'"):
        small_model(tokenizer, overrides=('audio_tokens="letters"',))


def test_difference_video_tokens_keep_the_first_frame_and_subtract_each_later_one(tokenizer, media):
    from muomni.config import ConfigError

    part = {"type": "video", "path": str(media["video"])}
    tokens = {}
    for way in ("frames", "difference"):
        model = small_model(tokenizer, overrides=(f'video_tokens="{way}"',))  # same seed: same weights
        item = model.load_media(part)
        tokens[way] = model.encode([item])[0].tokens.reshape(len(item.timestamps), -1, item.tokens.shape[-1])
    frames, difference = tokens["frames"], tokens["difference"]
    assert frames.shape[0] == 3 and not torch.allclose(frames[1], frames[0])  # the clip moves
    torch.testing.assert_close(difference[0], frames[0])
    torch.testing.assert_close(difference[1:], frames[1:] - frames[:-1])
    with pytest.raises(ConfigError, match="video_tokens 'tubelets'"):
        small_model(tokenizer, overrides=('video_tokens="tubelets"',))


def test_the_audio_projector_learns_to_put_spoken_words_on_written_ones(tokenizer, media):
    from muomni.train.spoken_words import fit_audio_projector, spoken_word_pairs

    model = small_model(tokenizer, overrides=('audio_tokens="words"',))
    heard = model.load_media({"type": "audio", "path": str(media["audio"])}).n_tokens
    words = ["red", "circle", "big", "left", "star"]
    rows = [{"audio": str(media["audio"]), "text": " ".join(words[i % 5] for i in range(heard))},
            {"audio": str(media["audio"]), "text": " ".join(["red"] * (heard + 1))}]  # counts differ: skipped
    table = {word: torch.randn(model.cfg.thinker.d_model) for word in words}
    tokens, targets, used = spoken_word_pairs(model, rows, media["audio"].parent, table.__getitem__)
    assert used == 1 and tokens.shape == (heard, model.audio.merged_dim) and targets.shape == (heard, model.cfg.thinker.d_model)
    before = torch.nn.functional.mse_loss(model.audio_proj(tokens), targets).item()
    after = fit_audio_projector(model, tokens, targets, steps=60)
    assert after < before / 2
