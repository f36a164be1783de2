"""Stage A: pretrain the Thinker (and its tokenizer) on plain text.

The recipe of GPT-2 (Radford et al., 2019) at toy scale: learn a byte-level BPE on the training
documents, concatenate the tokenised documents with ``<|eos|>`` between them, cut the stream into
rows of ``seq_len + 1`` tokens ("packing": no compute is spent on padding), and minimise next-token
cross-entropy. Only the last row is padded; its padded targets are ``-100`` and ignored. Padding sits
at the end of the row, so causal attention never lets a real token see it and no attention mask is
needed. Documents in one row may attend to each other across ``<|eos|>``; the model learns that
``<|eos|>`` starts something new.

Data: ``<data>/text/{train,val,test}.jsonl`` (``{"text": ...}`` per line), plus TinyStories converted
to the same format in ``<data>/../tinystories/text/`` when it is there. With ``thinker.chat_share`` a
share of the world's stories is written as the chats stage E will show, template and all (off by
default: it did not make stage E answer more, study/10). Evaluation reports held-out perplexity next
to a unigram model on the same tokenizer: the gap is what context buys. It also reports `reading`:
exact answers to the world's held-out text questions about a scene told in words, asked as text and
as chats.

Batches: ``input_ids`` and ``targets``, both ``(batch, seq_len)``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from muomni.checkpoint import load_checkpoint, resolve
from muomni.config import ThinkerConfig, TrainConfig, from_dict
from muomni.data.index import JsonlIndex
from muomni.data.language import story_chats
from muomni.thinker import Thinker
from muomni.tokenizer import Tokenizer
from muomni.train.stages import resolve_configs, run_stage, stage_checkpoint
from muomni.train.trainer import pick_device

TRAIN_DEFAULTS = {
    # ~3 minutes on one idle CPU core (the demo trains it beside the longer audio stage): 900 steps x 16
    # rows x 128 tokens = 1.8M tokens. 100 steps already reach a low perplexity, but answering the
    # questions in the text needs the longer run. Muon reads held-out questions at 53 % where AdamW
    # reads 35 % after the same 900 steps (muomni/train/muon.py, study/05).
    "tiny": TrainConfig(steps=900, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, weight_decay=0.1,
                        optimizer="muon", eval_every=250, eval_batches=4, save_every=250, log_every=10),
    # one 12 GB GPU: 5000 steps x 32 rows x 512 tokens = 82M tokens
    "base": TrainConfig(steps=5000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=200, weight_decay=0.1,
                        optimizer="muon", eval_every=500, eval_batches=20, save_every=500, log_every=20,
                        num_workers=2),
}
TOKENIZER_DOCS = 200_000  # the tokenizer learns its merges from at most this many documents


def text_files(data_dir: Path, split: str) -> list[Path]:
    """The text manifests of ``split``: the world's, and TinyStories' when it is present."""
    files = [path for path in (data_dir / "text" / f"{split}.jsonl", data_dir.parent / "tinystories" / "text" / f"{split}.jsonl")
             if path.is_file()]
    if not files:
        raise FileNotFoundError(f"no text corpus: {data_dir / 'text' / f'{split}.jsonl'} does not exist; "
                                f"build the world with `muomni data world --out {data_dir}`")
    return files


def read_texts(files: list[Path]) -> list[str]:
    return [record["text"] for path in files for record in JsonlIndex(path, required=("text",), cache=False)]


def pack(texts: list[str], tokenizer: Tokenizer, seq_len: int, chunk: int = 10_000,
         chat_share: float = 0.0) -> torch.Tensor:
    """Documents -> ``(rows, seq_len + 1)`` int64 token rows: ``doc <|eos|> doc <|eos|> ...`` cut into
    rows; the tail of the last row is ``<|pad|>``.

    ``chat_share``: that share of the documents, spread evenly, is written as the chats stage E will
    show (`language.story_chats` through `Tokenizer.encode_chat`, one ``<|eos|>`` after each chat) when
    it asks questions; the rest, and documents without a question, stay plain text.
    """
    pieces = []
    for start in range(0, len(texts), chunk):  # int32 chunks keep big corpora (TinyStories) compact
        for index, ids in enumerate(tokenizer.encode_batch(texts[start:start + chunk]), start):
            as_chat = int((index + 1) * chat_share) > int(index * chat_share)  # every 1/share-th document
            chats = story_chats(texts[index]) if as_chat else []
            documents = [tokenizer.encode_chat(chat)[0] for chat in chats] or [ids]
            pieces += [np.asarray(document + [tokenizer.eos_id], dtype=np.int32) for document in documents]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    width = seq_len + 1
    rows = -(-len(stream) // width)
    padded = np.full(rows * width, tokenizer.pad_id, dtype=np.int32)
    padded[:len(stream)] = stream
    return torch.from_numpy(padded.reshape(rows, width)).long()


class PackedText(Dataset):
    """Rows of packed tokens as ``{"input_ids": (seq_len,), "targets": (seq_len,)}``; pad targets are -100."""

    def __init__(self, rows: torch.Tensor, pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        targets = row[1:].clone()
        # A pad after the final <|eos|> is not text; the <|eos|> itself is, so it stays a target.
        targets[row[1:] == self.pad_id] = -100
        return {"input_ids": row[:-1], "targets": targets}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def lm_loss(model: Thinker, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy; ``tokens`` (real targets) feeds the tokens/s meter."""
    loss = model.loss(batch["input_ids"], batch["targets"])
    return loss, {"tokens": float((batch["targets"] != -100).sum())}


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Train the tokenizer (or reuse it when resuming) and the Thinker into ``runs_dir/thinker``."""
    omni, train_cfg = resolve_configs(preset, TRAIN_DEFAULTS, overrides)
    cfg = omni.thinker
    if train_cfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"train.seq_len {train_cfg.seq_len} exceeds thinker.max_seq_len {cfg.max_seq_len}")
    files = text_files(data_dir, "train")
    # The world's stories ask and answer in whole sentences, so some can be written as chats
    # (`ThinkerConfig.chat_share`); other corpora (TinyStories) stay plain text.
    world_file = data_dir / "text" / "train.jsonl"
    world = read_texts([path for path in files if path == world_file])
    others = read_texts([path for path in files if path != world_file])
    texts = world + others
    if resume:
        tokenizer = Tokenizer.load(runs_dir / "thinker" / "last")
    else:
        # A corpus without capitals (the world's) gives a tokenizer that lowercases what it reads, so a
        # question typed "What colour is the star?" reaches the Thinker as the words it learnt.
        sample = texts[:TOKENIZER_DOCS]
        tokenizer = Tokenizer.train(sample, cfg.vocab_size, normalize=not any(text != text.lower() for text in sample))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but thinker.vocab_size is {cfg.vocab_size}")
    rows = torch.cat([pack(world, tokenizer, train_cfg.seq_len, chat_share=cfg.chat_share),
                      pack(others, tokenizer, train_cfg.seq_len)])
    train_data = PackedText(rows, tokenizer.pad_id)
    val_data = PackedText(pack(read_texts(text_files(data_dir, "val")), tokenizer, train_cfg.seq_len), tokenizer.pad_id)

    torch.manual_seed(train_cfg.seed)
    model = Thinker(cfg)
    run_dir = run_stage("thinker", runs_dir, model, cfg, train_cfg, train_data, collate, lm_loss,
                        val_data=val_data, tokenizer=tokenizer, resume=resume, preset=preset)
    if int(os.environ.get("RANK", "0")) == 0:  # a greedy sample from the saved model: a new document
        trained, _ = load_thinker(resolve(run_dir))
        sample = trained.generate(torch.tensor([[tokenizer.eos_id]]), max_new_tokens=40)[0]
        print(f"thinker sample: {tokenizer.decode(sample)}")
    return run_dir


def load_thinker(checkpoint_dir: Path) -> tuple[Thinker, Tokenizer]:
    """A Thinker and its tokenizer from a checkpoint directory (e.g. ``stage_checkpoint(runs, "thinker")``)."""
    weights, config = load_checkpoint(checkpoint_dir)
    config.pop("kind", None)
    model = Thinker(from_dict(ThinkerConfig, config))
    model.load_state_dict(weights)
    return model.eval(), Tokenizer.load(checkpoint_dir)


@torch.no_grad()
def perplexities(model: Thinker, tokenizer: Tokenizer, train_texts: list[str], test_texts: list[str],
                 seq_len: int, batch_size: int = 16) -> dict[str, float]:
    """Held-out perplexity of ``model`` and of an add-one unigram model fitted on ``train_texts``,
    both over the same target tokens of the packed ``test_texts``."""
    rows = pack(test_texts, tokenizer, seq_len)
    test = PackedText(rows, tokenizer.pad_id)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(test), batch_size):
        batch = collate([test[i] for i in range(start, min(start + batch_size, len(test)))])
        batch = {key: value.to(model.head.weight.device) for key, value in batch.items()}
        tokens = int((batch["targets"] != -100).sum())
        total_nll += model.loss(batch["input_ids"], batch["targets"]).item() * tokens
        total_tokens += tokens

    counts = Counter(i for ids in tokenizer.encode_batch(train_texts) for i in ids + [tokenizer.eos_id])
    denominator = sum(counts.values()) + model.cfg.vocab_size
    targets = torch.cat([test[i]["targets"] for i in range(len(test))])
    targets = targets[targets != -100].tolist()
    unigram_nll = -sum(math.log((counts[t] + 1) / denominator) for t in targets)
    return {"perplexity": math.exp(total_nll / total_tokens),
            "unigram_perplexity": math.exp(unigram_nll / len(targets)), "tokens": total_tokens}


@torch.no_grad()
def reading(model: Thinker, tokenizer: Tokenizer, questions: list[dict], batch_size: int = 64,
            chat: bool = False) -> dict[str, float]:
    """Exact answers to text questions about a scene told in words, as the text itself continues.

    ``questions``: ``{"question": "<caption> <question>", "answer": "...", "kind": ...}``. The
    Thinker continues each question greedily; its answer is what it writes up to the first full
    stop. Returns ``{"reading_acc", "n_reading", "reading_by_question.<kind>"}``: can it already
    look things up in what it has read, before stage E teaches it to chat? With ``chat`` the question
    is a user turn of the chat template and the answer the assistant's (keys ``reading_chat...``).
    """
    name = "reading_chat" if chat else "reading"
    right, count = Counter(), Counter()
    device = model.head.weight.device
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        ids = [tokenizer.encode_chat([{"role": "user", "content": q["question"]}], add_generation_prompt=True)[0]
               if chat else tokenizer.encode(q["question"]) for q in batch]
        width = max(map(len, ids))
        padded = torch.tensor([[tokenizer.pad_id] * (width - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        written = model.generate(padded.to(device), attention_mask=mask.to(device), max_new_tokens=8)
        for question, new in zip(batch, written):
            count[question["kind"]] += 1
            right[question["kind"]] += tokenizer.decode(new).split(".")[0].strip() == question["answer"]
    return {f"{name}_acc": sum(right.values()) / max(1, sum(count.values())), f"n_{name}": sum(count.values()),
            **{f"{name}_by_question.{kind}": right[kind] / count[kind] for kind in sorted(count)}}


def reading_questions(data_dir: Path, split: str) -> list[dict]:
    """The text questions about a scene in the world's ``split`` chats (facts left out: they need no reading)."""
    path = data_dir / "chat" / f"{split}.jsonl"
    if not path.is_file():
        return []
    return [{"question": row["messages"][0]["content"], "answer": row["messages"][1]["content"].rstrip("."),
             "kind": row["question_kind"]}
            for row in JsonlIndex(path) if row["kind"] == "text_qa" and row["question_kind"] != "fact"]


def evaluate(runs_dir: Path, data_dir: Path) -> dict:
    """Held-out (``test``) perplexity of the trained Thinker and of a unigram baseline, and its
    `reading` of the world's text questions on every held-out split that has them, asked as text and
    as chats."""
    checkpoint = stage_checkpoint(runs_dir, "thinker")
    model, tokenizer = load_thinker(checkpoint)
    model.to(pick_device())
    seq_len = json.loads((runs_dir / "thinker" / "run.json").read_text())["train"]["seq_len"]
    results = {"test": perplexities(model, tokenizer, read_texts(text_files(data_dir, "train")),
                                    read_texts(text_files(data_dir, "test")), seq_len)}
    for split in ("test", "comp", "wild"):
        if questions := reading_questions(data_dir, split):
            for chat in (False, True):
                results.setdefault(split, {}).update(reading(model, tokenizer, questions, chat=chat))
    return results
