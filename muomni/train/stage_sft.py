"""Stage E: multimodal supervised fine-tuning of the whole model (the "SFT" of Qwen2.5-Omni).

The pieces trained alone in stages A–D are joined in one `OmniModel` and taught to answer chats:

- data: the world's chat mixture (``chat/train.jsonl``: text, image, spoken and video questions,
  captions, transcription, "say it aloud"), plus question chats built from the world's other
  *train* manifests (every image question, every clip question, every askable spoken question
  and a transcription of every utterance) so each skill sees enough examples;
- loss: next-token cross-entropy on the assistant's tokens only (the mask of `encode_chat`);
- frozen: the AuT, the ViT and the codec. Their outputs are cached per media file, so each image,
  clip and recording is encoded once. ``--set sft_train_encoders=true`` unfreezes the AuT and ViT
  (no cache; slower);
- trained: both projectors and the Thinker, and the Talker on the Thinker's states of spoken answers
  (rows with ``speak: true``; the Thinker's states are detached, so speech does not pull on text);
- each row's media stay with that row's text: a batch is a list of rows, never a shuffle of parts.

``evaluate`` answers the held-out chats greedily and scores exact answers per kind (image, spoken
and video questions, text questions, the text of spoken answers), captions, and transcription CER.

Usage: ``muomni train --stage sft --preset tiny`` then ``muomni eval --stage sft``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from muomni.align import align_tokens
from muomni.audio import LogMel, cer, load_audio
from muomni.checkpoint import CheckpointError, load_checkpoint
from muomni.config import OmniConfig, TrainConfig, from_dict
from muomni.data.index import JsonlIndex
from muomni.data.language import COLOURS, PLACE_PHRASES, SHAPES, SIZES, as_sentence, story_chats
from muomni.data.realdata import LJSPEECH_VOICE
from muomni.data.sources import parse_sources, shares
from muomni.data.world import HELD_OUT
from muomni.omni import Media, OmniModel, expand_sequence, media_parts, shift_targets
from muomni.thinker import IGNORE_INDEX
from muomni.tokenizer import Tokenizer
from muomni.train.spoken_words import fit_audio_projector, spoken_word_pairs
from muomni.train.stages import StageError, manifest, resolve_configs, run_stage, stage_checkpoint

STAGE = "sft"
TALKER_WEIGHT = 0.5  # weight of the Talker's code loss next to the Thinker's text loss
EVAL_MAX_NEW_TOKENS = 40  # longest evaluated answer (captions and transcripts are the longest)
SHORT_ANSWER_TOKENS = 8  # questions are answered in a word or two: no need to generate further
LONG_KINDS = ("caption", "transcribe")  # the chat kinds whose answers are sentences
PROBE_PER_KIND = 48  # validation questions per kind asked at each validation for the learning curve

TRAIN_DEFAULTS = {
    # Muon for the Thinker's and the Talker's blocks (after a stage A on Muon too): `test` image questions
    # 57 % instead of 47 %, spoken 54 instead of 41, text 78 instead of 65 in the same 800 steps (study/10).
    "tiny": TrainConfig(steps=800, batch_size=32, lr=1e-3, min_lr_ratio=0.1, warmup_steps=40,
                        weight_decay=0.01, optimizer="muon", eval_every=300, eval_batches=2, save_every=300,
                        log_every=10),
    "base": TrainConfig(steps=6000, batch_size=64, lr=5e-4, min_lr_ratio=0.1, warmup_steps=300,
                        weight_decay=0.01, optimizer="muon", eval_every=500, eval_batches=8, save_every=500,
                        log_every=20),
}

# Share of each chat kind in the training rows. Drawn uniformly, the world's rows would be 80%
# image and spoken questions (a dozen per picture) and 2% video questions, too few to learn motion.
# A picture's rows carry several questions each (`sft_questions_per_chat`), so image rows can be fewer
# and motion, which is learnt late, gets more.
MIXTURE = {"image_qa": 0.22, "spoken_qa": 0.18, "video_qa": 0.26, "text_qa": 0.18, "transcribe": 0.06,
           "caption": 0.05, "speak": 0.05}

# Which pieces each earlier stage provides: (run directory under runs_dir, OmniModel attribute, config field).
PARTS = (("thinker", "thinker", "thinker"), ("audio", "audio", "audio"), ("vision", "vision", "vision"),
         ("speech/codec", "codec", "codec"), ("speech/talker", "talker", "talker"))


# ----------------------------------------------------------------------------------------------
# Assembling the model from the earlier stages


def _component_config(config: dict[str, Any], field: str) -> dict[str, Any] | None:
    """A component's config from a stage's config.json: a whole OmniConfig, or just that part."""
    if isinstance(config.get(field), dict):
        return config[field]
    names = {f.name for f in dataclasses.fields(type(getattr(OmniConfig(), field)))}
    part = {k: v for k, v in config.items() if k != "kind"}
    return part if part and set(part) <= names else None


def load_part(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """Load ``module``'s weights from a stage state dict, whatever prefix that stage gave them."""
    wanted = list(module.state_dict())
    probe = max(wanted, key=len)  # the longest name is the least ambiguous to look for
    prefixes = Counter(key[: len(key) - len(probe)] for key in state
                       if key.endswith(probe) and (len(key) == len(probe) or key[-len(probe) - 1] == "."))
    for prefix, _ in prefixes.most_common():
        if all(prefix + name in state for name in wanted):
            try:
                module.load_state_dict({name: state[prefix + name] for name in wanted})
            except RuntimeError as error:
                raise StageError(f"the {what} weights in {source} do not fit this config "
                                 f"({str(error).splitlines()[1].strip()})") from None
            return
    if prefixes:  # the part is there but incomplete: a checkpoint from an older version of the code
        prefix = prefixes.most_common(1)[0][0]
        missing = [name for name in wanted if prefix + name not in state]
        raise StageError(f"the {what} weights in {source} lack {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; retrain that stage with this version")
    raise StageError(f"{source} holds no {what} weights (looked for '{probe}')")


def assemble(runs_dir: Path, cfg: OmniConfig) -> tuple[OmniModel, list[str]]:
    """An `OmniModel` with the weights of stages A–D from ``runs_dir``; also notes on what was missing.

    Each component takes its config from the checkpoint that trained it, so overrides given to
    an earlier stage carry over. The thinker stage is required (it owns the tokenizer); a missing
    audio, vision or speech stage leaves that part at its random initialisation, and says so.
    """
    notes: list[str] = []
    found: dict[str, tuple[dict, dict, Path]] = {}
    for stage in dict.fromkeys(stage for stage, _, _ in PARTS):
        try:
            path = stage_checkpoint(runs_dir, stage)
        except (StageError, CheckpointError) as error:
            if stage == "thinker":
                raise StageError(f"stage sft needs the thinker stage (its tokenizer): {error}") from None
            notes.append(f"stage '{stage}' not found ({error}); its part starts from random weights")
            continue
        state, config = load_checkpoint(path)
        found[stage] = (state, config, path)
    changes = {}
    for stage, _, field in PARTS:
        if stage in found and (part := _component_config(found[stage][1], field)) is not None:
            changes[field] = from_dict(type(getattr(cfg, field)), part, field)
    cfg = dataclasses.replace(cfg, **changes)
    thinker_dir = found["thinker"][2]
    if not (thinker_dir / "tokenizer.json").is_file():
        raise StageError(f"{thinker_dir} has no tokenizer.json; retrain the thinker stage")
    model = OmniModel(cfg, Tokenizer.load(thinker_dir / "tokenizer.json"))
    for stage, attribute, _ in PARTS:
        if stage in found:
            load_part(getattr(model, attribute), found[stage][0], attribute, found[stage][2])
    if model.visual_words is not None:
        if "vision" in found:
            load_part(model.visual_words.heads, found["vision"][0], "attribute heads", found["vision"][2])
        model.visual_words.init_words(lambda head, cls: word_embedding(model, cfg.visual_words[head][cls - 1]))
    return model, notes


def fit_spoken_words(model: OmniModel, data_dir: Path, steps: int, seed: int) -> None:
    """Fit the audio projector on the spoken words of ``data_dir/speech/train.jsonl`` (`spoken_words`)."""
    path = data_dir / "speech" / "train.jsonl"
    if not path.is_file():
        print(f"sft: no {path}; the audio projector starts untrained")
        return
    rows = list(JsonlIndex(path, required=("audio", "text")))
    tokens, targets, used = spoken_word_pairs(model, rows, path.parent, lambda word: word_embedding(model, word))
    if not used:
        print("sft: no recording's heard words matched its transcript; the audio projector starts untrained")
        return
    loss = fit_audio_projector(model, tokens, targets, steps, seed)
    print(f"sft: audio projector fitted to {len(tokens)} spoken words of {used} of {len(rows)} recordings "
          f"in {steps} steps (mean squared error {loss:.3g})")


def word_embedding(model: OmniModel, word: str) -> torch.Tensor:
    """The Thinker's input embedding of ``word`` as it appears inside a sentence (after a space),
    averaged over its tokens: ``(d_model,)``."""
    ids = model.tokenizer_or_fail().encode(" " + word)
    return model.thinker.tok_emb.weight[ids].mean(0)


def freeze(model: OmniModel, train_encoders: bool) -> None:
    """Encoders and codec frozen (unless ``train_encoders``); projectors, Thinker and Talker trained."""
    for module in (model.audio, model.vision, model.codec):
        module.requires_grad_(False)
    if model.visual_words is not None:  # the ViT's attribute heads belong to the frozen encoder
        model.visual_words.heads.requires_grad_(False)
    if train_encoders:
        model.audio.requires_grad_(True)
        model.vision.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# Data


def _chat(media: dict[str, Any] | None, question: str, answer: str) -> list[dict[str, Any]]:
    content = ([media] if media else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def question_turns(first: list[dict[str, Any]], answers: list[tuple[list[dict[str, Any]], str]]) -> list[dict[str, Any]]:
    """Messages asking several questions in turn: ``answers`` holds (user content, answer) pairs; the
    first question's content also carries ``first`` (the picture), which later turns refer back to."""
    messages: list[dict[str, Any]] = []
    for turn, (content, answer) in enumerate(answers):
        messages += [{"role": "user", "content": (first if turn == 0 else []) + content},
                     {"role": "assistant", "content": answer}]
    return messages


def extra_chats(data_dir: Path, split: str = "train", per_chat: int = 1) -> list[dict[str, Any]]:
    """Chats built from the manifests of ``split`` (paths relative to ``chat/``): a transcription of
    every utterance, every image and spoken question, the stories' reading questions, the clips'
    motion questions; and for real data (`muomni data real`), which has no questions, a caption chat
    of every image without questions and a spoken answer of every LJSpeech recording (its one voice
    reads the sentence it is asked to say). A picture's questions (and their spoken forms) come
    ``per_chat`` to a chat, one turn each, in a fixed random order; the chat's ``question_kind`` is
    its first question's."""
    rows: list[dict[str, Any]] = []
    images = Path(data_dir) / "images" / f"{split}.jsonl"
    speech = Path(data_dir) / "speech" / f"{split}.jsonl"
    video = Path(data_dir) / "video" / f"{split}.jsonl"
    stories = Path(data_dir) / "text" / f"{split}.jsonl"
    spoken: dict[str, list[dict]] = {}
    if speech.is_file():
        for utt in JsonlIndex(speech):
            part = {"type": "audio", "path": f"../speech/{utt['audio']}"}
            rows.append({"kind": "transcribe", "messages": _chat(part, "transcribe this.", utt.get("sentence", utt["text"]))})
            spoken.setdefault(utt.get("sentence", utt["text"]), []).append(part)
            if utt.get("voice") == LJSPEECH_VOICE:
                rows.append({"kind": "speak", "speak": True, "answer_audio": part["path"],
                             "messages": _chat(None, f"say this aloud: {utt['sentence']}", utt["sentence"])})
    if images.is_file():
        for number, img in enumerate(JsonlIndex(images)):
            picture = {"type": "image", "path": f"../images/{img['image']}"}
            if not img.get("qa") and not img.get("scene") and img.get("captions"):  # real data: captions only
                rows.append({"kind": "caption", "messages": _chat(picture, "describe the image.", img["captions"][0])})
            qas = list(img.get("qa", []))
            random.Random(number).shuffle(qas)
            written, heard = [], []
            for k, qa in enumerate(qas):
                answer = as_sentence(qa["answer"])
                written.append((qa, [{"type": "text", "text": qa["question"]}], answer))
                if voices := spoken.get(qa["question"]):
                    heard.append((qa, [voices[k % len(voices)]], answer))
            for kind, turns in (("image_qa", written), ("spoken_qa", heard)):
                for start in range(0, len(turns), per_chat):
                    group = turns[start:start + per_chat]
                    asks = {"question_kind": group[0][0]["kind"]} if "kind" in group[0][0] else {}
                    rows.append({"kind": kind, **asks, "messages": question_turns(
                        [picture], [(content, answer) for _, content, answer in group])})
    if stories.is_file():  # reading questions in chat form: the Thinker keeps what stage A taught it
        for story in JsonlIndex(stories):
            rows += [{"kind": "text_qa", "messages": messages} for messages in story_chats(story["text"])]
    if video.is_file():
        for clip in JsonlIndex(video):
            part = {"type": "video", "path": f"../video/{clip['video']}"}
            rows.append({"kind": "video_qa", "question_kind": "motion",
                         "messages": _chat(part, clip["question"], as_sentence(clip["answer"]))})
    return rows


def mix(rows: list[dict[str, Any]], shares: dict[str, float], total: int, seed: int) -> list[dict[str, Any]]:
    """``total`` rows drawn kind by kind in proportion to ``shares`` (kinds without a share are left
    out); each kind's rows are shuffled and cycled, so a rare kind repeats and a common one is sampled."""
    generator = torch.Generator().manual_seed(seed)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    present = {kind: share for kind, share in shares.items() if by_kind.get(kind)}
    scale = sum(present.values())
    mixed = []
    for kind, share in present.items():
        pool = by_kind[kind]
        count = round(total * share / scale)
        if count == 0:  # a short run draws no row of a rare kind
            continue
        order = torch.cat([torch.randperm(len(pool), generator=generator)
                           for _ in range(math.ceil(count / len(pool)))])[:count]
        mixed += [pool[i] for i in order.tolist()]
    return mixed


class ChatSamples(Dataset):
    """Chats as expanded token sequences with their media (one row = one chat, media kept with it).

    ``[i]`` -> ``{"ids", "targets", "positions" (3, seq), "media": [Media], "speak": (start, end,
    codes, durations) or None}``. With ``cache`` (frozen encoders) each media file is encoded once and
    reused; otherwise `Media.raw` travels to the loss, where the encoders run with gradients.
    """

    def __init__(self, rows: list[dict[str, Any]], base_dir: Path, model: OmniModel, cache: bool,
                 store: dict | None = None):
        self.rows, self.base_dir, self.model, self.cache = rows, Path(base_dir), model, cache
        self.store = {} if store is None else store  # shared between train and val
        self.aut_frontend = LogMel(model.cfg.audio)

    def __len__(self) -> int:
        return len(self.rows)

    def _media(self, part: dict[str, Any]) -> Media:
        key = (part["type"], str((self.base_dir / part["path"]).resolve()))
        if self.cache and key in self.store:
            return self.store[key]
        item = self.model.load_media(part, self.base_dir)
        if self.cache:
            with torch.no_grad():
                self.model.encode([item])
            item.tokens, item.raw = item.tokens.cpu(), None
            self.store[key] = item
        return item

    def _speech(self, path: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codec codes ``(n_codebooks, code_frames)`` of a spoken answer and its frames per token
        ``(tokens,)`` for the answer's ``token_ids``, force-aligned by the AuT (`muomni.align`)."""
        key = ("speech", str((self.base_dir / path).resolve()))
        if key not in self.store:
            wave = load_audio(self.base_dir / path, self.model.cfg.codec.sample_rate)
            with torch.no_grad():
                mel = self.model.codec.frontend(wave[None].to(self.model.device))
                codes = self.model.codec.encode(mel)[0].cpu()
            token_texts = [self.model.tokenizer_or_fail().decode([t]) for t in token_ids]
            durations = align_tokens(self.model.audio, self.aut_frontend, [wave], [token_texts], [codes.shape[1]])[0]
            self.store[key] = (codes, durations)
        return self.store[key]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        tokenizer = self.model.tokenizer_or_fail()
        ids, mask = tokenizer.encode_chat(row["messages"])
        media = [self._media(part) for part in media_parts(row["messages"])]
        ids, mask, positions = expand_sequence(ids, mask, media, tokenizer)
        speak = None
        if row.get("speak") and row.get("answer_audio"):
            # The spoken text is the last assistant turn's content, without its closing <|im_end|>.
            end = max(t for t, m in enumerate(mask) if m)
            start = end
            while start > 0 and mask[start - 1]:
                start -= 1
            speak = (start, end, *self._speech(row["answer_audio"], ids[start:end]))
        return {"ids": ids, "targets": shift_targets(ids, mask), "positions": positions,
                "media": media, "speak": speak, "id": row.get("id", str(i))}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad a list of samples: ids with 0, targets with -100, positions with 0."""
    longest = max(len(item["ids"]) for item in items)
    batch = len(items)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    targets = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(3, batch, longest, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item["ids"])
        ids[row, :n] = torch.tensor(item["ids"])
        targets[row, :n] = torch.tensor(item["targets"])
        positions[:, row, :n] = item["positions"]
        mask[row, :n] = True
    return {"input_ids": ids, "targets": targets, "position_ids": positions, "attention_mask": mask,
            "media": [m for item in items for m in item["media"]],
            "speak": [item["speak"] for item in items], "ids": [item["id"] for item in items]}


def loss_fn(model: OmniModel, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Text CE on assistant tokens + ``TALKER_WEIGHT`` x the Talker's code CE on spoken answers."""
    media = batch["media"]
    if any(m.tokens is None for m in media):
        media = [dataclasses.replace(m) for m in media]  # encode copies: the dataset's items stay raw
        model.encode(media)
    embeds = model.embed(batch["input_ids"], model.group_media(media))
    hidden, _ = model.thinker.hidden_states(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            position_ids=batch["position_ids"])
    text_loss = model.thinker.head_loss(hidden, batch["targets"])
    loss = text_loss
    metrics = {"text_loss": float(text_loss.detach()),
               "answer_tokens": float((batch["targets"] != IGNORE_INDEX).sum()),
               "tokens": float(batch["attention_mask"].sum())}  # everything the Thinker read, for tokens/s
    spoken = [(row, s) for row, s in enumerate(batch["speak"]) if s is not None]
    if spoken:
        talker_loss = model.talker_loss(
            [hidden[row, start:end].detach() for row, (start, end, _, _) in spoken],
            [batch["input_ids"][row, start:end] for row, (start, end, _, _) in spoken],
            [codes.to(hidden.device) for _, (_, _, codes, _) in spoken],
            [durations for _, (_, _, _, durations) in spoken])
        loss = loss + TALKER_WEIGHT * talker_loss
        metrics["talker_loss"] = float(talker_loss.detach())
    return loss, metrics


def chat_rows(data_dir: Path, split: str) -> list[dict[str, Any]]:
    return list(JsonlIndex(manifest(data_dir, "chat", split)))


def source_chats(data_dir: Path, per_chat: int = 1) -> list[dict[str, Any]]:
    """The training chats of one data directory: its chat manifest (the world has one) and
    `extra_chats` (``per_chat`` questions to a picture), with every media path made absolute, so rows
    of several directories mix."""
    chat_dir = Path(data_dir) / "chat"
    rows = chat_rows(data_dir, "train") if (chat_dir / "train.jsonl").is_file() else []
    rows += extra_chats(data_dir, per_chat=per_chat)
    if not rows:
        raise StageError(f"{data_dir} holds no chats and no manifests to build them from (chat/, images/, "
                         "speech/, video/ or text/ train.jsonl)")

    def anchored(part: Any) -> Any:
        if isinstance(part, dict) and "path" in part:
            return {**part, "path": str((chat_dir / part["path"]).resolve())}
        return part

    return [{**row, "messages": [{**m, "content": [anchored(p) for p in m["content"]]}
                                 if isinstance(m["content"], list) else m for m in row["messages"]],
             **({"answer_audio": str((chat_dir / row["answer_audio"]).resolve())} if row.get("answer_audio") else {})}
            for row in rows]


# ----------------------------------------------------------------------------------------------
# Train and evaluate


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Fine-tune the assembled model on the chats of ``data_dir`` into ``runs_dir/sft``.

    ``data_dir`` may list several directories with weights (`muomni.data.sources`): each gives its
    share of the rows, mixed by `MIXTURE` within it; the first gives the validation chats and probes.
    """
    sources = parse_sources(str(data_dir))
    data_dir = sources[0].path
    cfg, train_cfg = resolve_configs(preset, TRAIN_DEFAULTS, overrides)
    torch.manual_seed(train_cfg.seed)
    model, notes = assemble(Path(runs_dir), cfg)
    for note in notes:
        print(f"sft: {note}")
    freeze(model, model.cfg.sft_train_encoders)
    if model.cfg.audio_tokens == "words" and model.cfg.sft_word_fit_steps:
        fit_spoken_words(model, Path(data_dir), model.cfg.sft_word_fit_steps, train_cfg.seed)
    chat_dir = Path(data_dir) / "chat"
    store: dict = {}
    cache = not model.cfg.sft_train_encoders
    rows_seen = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum
    per_chat = model.cfg.sft_questions_per_chat
    train_rows = [row for source, count in zip(sources, shares(sources, rows_seen))
                  for row in mix(source_chats(source.path, per_chat), MIXTURE, count, train_cfg.seed)]
    train_data = ChatSamples(train_rows, chat_dir, model, cache, store)
    val_data = ChatSamples(chat_rows(data_dir, "val"), chat_dir, model, cache, store) \
        if (chat_dir / "val.jsonl").is_file() else None
    return run_stage(STAGE, Path(runs_dir), model, model.cfg, train_cfg, train_data, collate, loss_fn,
                     val_data=val_data, tokenizer=model.tokenizer, resume=resume, preset=preset,
                     probe=learning_probe(data_dir))


def normalize_answer(text: str) -> str:
    """Lowercase, words only: 'Red.' and 'red' are the same answer."""
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def is_video_caption(row: dict[str, Any]) -> bool:
    """A "describe the video" row (its answer is a sentence), not a one- or two-word motion question."""
    return row["kind"] == "video_qa" and len(normalize_answer(row["messages"][-1]["content"]).split()) > 2


CAPTION_OBJECT = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
                            rf"(?: ({'|'.join(PLACE_PHRASES.values())}))?")


def caption_facts(reference: str, answer: str) -> float:
    """What a caption gets right, from 0 to 1: the colour, shape, size and place of each object,
    matched object by object (each reference object with the answer's object that shares most of
    them), over four facts per object of the longer of the two lists (so an invented object costs)."""
    said = [m.groups() for m in CAPTION_OBJECT.finditer(normalize_answer(answer))]
    truth = [m.groups() for m in CAPTION_OBJECT.finditer(normalize_answer(reference))]
    if not truth:
        return float(not said)
    right = sum(max((sum(a == b for a, b in zip(obj, guess)) for guess in said), default=0) for obj in truth)
    return right / (4 * max(len(truth), len(said)))


def score(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """Accuracy per chat kind with its count (``n_<kind>``), transcription CER, the share of caption
    facts right (`caption_facts`), and for every question kind that says what it asks the accuracy
    per question kind (``image_qa_by_question``: colour, position, ...)."""
    right: Counter = Counter()
    total: Counter = Counter()
    by_question: dict[str, Counter] = {}  # chat kind -> question kind -> right / total
    references, hypotheses, facts = [], [], []
    for row, answer in zip(rows, answers):
        reference = row["messages"][-1]["content"]
        kind = "video_caption" if is_video_caption(row) else row["kind"]
        if kind == "transcribe":
            references.append(normalize_answer(reference))
            hypotheses.append(normalize_answer(answer))
            continue
        if kind == "caption":
            facts.append(caption_facts(reference, answer))
        correct = normalize_answer(answer) == normalize_answer(reference)
        total[kind] += 1
        right[kind] += correct
        if "question_kind" in row and kind != "video_qa":
            counts = by_question.setdefault(kind, Counter())
            counts[row["question_kind"]] += 1
            counts[row["question_kind"] + "/right"] += correct
    metrics: dict[str, Any] = {f"{kind}_acc": right[kind] / total[kind] for kind in sorted(total)}
    for kind, counts in sorted(by_question.items()):
        metrics[f"{kind}_by_question"] = {question: counts[question + "/right"] / counts[question]
                                         for question in sorted(counts) if not question.endswith("/right")}
    metrics.update({f"n_{kind}": float(total[kind]) for kind in sorted(total)})
    if facts:
        metrics["caption_facts"] = sum(facts) / len(facts)
    if references:
        metrics["transcribe_cer"] = cer(references, hypotheses)
        metrics["n_transcribe"] = float(len(references))
    return metrics


def answer_rows(model: OmniModel, rows: list[dict[str, Any]], chat_dir: Path) -> list[str]:
    """Greedy answers to ``rows`` (each without its last assistant turn): questions get
    `SHORT_ANSWER_TOKENS`, captions and transcripts `EVAL_MAX_NEW_TOKENS`."""
    answers = [""] * len(rows)
    for long in (False, True):
        picked = [i for i, row in enumerate(rows) if (row["kind"] in LONG_KINDS or is_video_caption(row)) == long]
        if picked:
            said = model.answer_batch([rows[i]["messages"][:-1] for i in picked],
                                      EVAL_MAX_NEW_TOKENS if long else SHORT_ANSWER_TOKENS, chat_dir, batch_size=64)
            for i, answer in zip(picked, said):
                answers[i] = answer
    return answers


def evaluate_model(model: OmniModel, data_dir: Path, splits: tuple[str, ...] = HELD_OUT,
                   limit: int | None = None) -> dict[str, dict[str, float]]:
    """Answer every held-out chat of ``splits`` (the last assistant turn removed) and `score` them."""
    results = {}
    chat_dir = Path(data_dir) / "chat"
    for split in splits:
        if not (chat_dir / f"{split}.jsonl").is_file():
            continue
        rows = chat_rows(data_dir, split)[:limit]
        results[split] = score(rows, answer_rows(model, rows, chat_dir))
    return results


def learning_probe(data_dir: Path) -> Any:
    """The learning curve's probe: exact-answer accuracy on `PROBE_PER_KIND` validation questions of
    each kind (image, spoken, video, text), built from the world's val manifests. None without them."""
    rows: list[dict[str, Any]] = []
    if (Path(data_dir) / "images" / "val.jsonl").is_file():
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in extra_chats(data_dir, "val"):
            by_kind.setdefault(row["kind"], []).append(row)
        for kind in ("image_qa", "spoken_qa", "video_qa", "text_qa"):
            rows += by_kind.get(kind, [])[::max(1, len(by_kind.get(kind, [])) // PROBE_PER_KIND)][:PROBE_PER_KIND]
    if not rows:
        return None
    chat_dir = Path(data_dir) / "chat"

    def probe(model: OmniModel) -> dict[str, float]:
        metrics = score(rows, answer_rows(model, rows, chat_dir))
        return {key: value for key, value in metrics.items() if key.endswith("_acc")}

    return probe


def evaluate(runs_dir: Path, data_dir: Path) -> dict:
    """QA accuracy per modality on the ``test`` and ``comp`` chats of the trained ``runs_dir/sft``."""
    try:
        model = OmniModel.load(stage_checkpoint(Path(runs_dir), STAGE))
    except CheckpointError as error:
        raise StageError(f"cannot evaluate stage sft: {error}") from None
    return evaluate_model(model, Path(data_dir))
