"""The training engine: exact resume, DDP equivalence, NaN stop, grad accumulation, run-dir layout."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from muomni.checkpoint import load_checkpoint
from muomni.config import ConfigError, TrainConfig, TransformerConfig
from muomni.layers import Transformer
from muomni.train.stages import resolve_configs
from muomni.train.trainer import Trainer, TrainError, lr_at, param_groups
from ports import free_port

VOCAB, SEQ = 32, 12


class ToyLM(nn.Module):
    """A two-block causal LM; dropout makes the run depend on the RNG state."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, dropout=dropout)
        self.emb = nn.Embedding(VOCAB, 16)
        self.body = Transformer(cfg)
        self.head = nn.Linear(16, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


class ToyData(torch.utils.data.Dataset):
    """Counting sequences; with ``augment`` the start is shifted by a draw from the global RNG."""

    def __init__(self, augment: bool = True):
        self.augment = augment

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i + (int(torch.randint(0, 3, ())) if self.augment else 0)
        return {"ids": (torch.arange(SEQ + 1) + start) % VOCAB}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {"ids": torch.stack([item["ids"] for item in items])}


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    ids = batch["ids"]
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return loss, {"tokens": float(ids[:, 1:].numel())}


def config(**changes) -> TrainConfig:
    base = dict(steps=6, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, eval_every=3, eval_batches=2,
                save_every=3, log_every=1, device="cpu", seed=1)
    return TrainConfig(**{**base, **changes})


def make_trainer(out, cfg, loss_fn=lm_loss, seed=0, dropout=0.1) -> Trainer:
    """Random (dropout, augmentation) by default; ``dropout=0`` makes the run deterministic."""
    torch.manual_seed(seed)
    data = ToyData(augment=dropout > 0)
    return Trainer(ToyLM(dropout), cfg, out, data, collate, loss_fn, val_data=data,
                   run_config={"model": {"d_model": 16}}, checkpoint_extra={"kind": "toy"})


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3) and lr_at(55, cfg) == pytest.approx(0.55)
    decay, no_decay = param_groups(ToyLM(), 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 5  # 2 x 2 block norms + final norm


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_is_bit_identical_and_writes_the_run_layout(tmp_path, optimizer):
    full = make_trainer(tmp_path / "full", config(optimizer=optimizer))
    final = full.fit()
    run = tmp_path / "full"
    for name in ("best", "last"):
        assert {"model.safetensors", "config.json"} <= {p.name for p in (run / name).iterdir()}
    assert (run / "last" / "trainer_state.pt").exists() and not (run / "best" / "trainer_state.pt").exists()
    assert (run / "loss.png").stat().st_size > 0
    info = json.loads((run / "run.json").read_text())
    assert info["finished"] and info["train"]["steps"] == 6 and info["model"] == {"d_model": 16}
    assert json.loads((run / "last" / "config.json").read_text()) == {"d_model": 16, "kind": "toy"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert final["step"] == 6 and math.isfinite(final["val_loss"])

    calls = {"n": 0}

    def dies_in_step_five(model, batch):
        calls["n"] += model.training  # count training micro-batches only (validation also calls)
        if calls["n"] == 2 * 4 + 1:  # first micro-batch of step 5: the last save was at step 3
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "killed", config(optimizer=optimizer), dies_in_step_five).fit()
    # A fresh process: different init and RNG state, everything must come from the checkpoint.
    torch.manual_seed(123)
    resumed = make_trainer(tmp_path / "killed", config(optimizer=optimizer), seed=99)
    resumed.fit(resume=True)
    a, b = weights(run / "last"), weights(tmp_path / "killed" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    untimed = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in lines]
    assert untimed == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]
    with pytest.raises(TrainError, match="cannot resume"):
        make_trainer(tmp_path / "nothing", config()).fit(resume=True)


def test_a_probe_draws_the_learning_curve_against_training_minutes(tmp_path):
    seen = []

    def probe(model: nn.Module) -> dict[str, float]:
        seen.append(model.training)
        return {"count_acc": 0.25 * len(seen)}

    torch.manual_seed(0)
    trainer = Trainer(ToyLM(0.0), config(), tmp_path / "run", ToyData(False), collate, lm_loss, val_data=ToyData(False),
                      probe=probe)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["split"] == "probe"]
    assert [(r["step"], r["count_acc"]) for r in probes] == [(3, 0.25), (6, 0.5)]  # at each validation
    assert 0 <= probes[0]["train_minutes"] < probes[1]["train_minutes"]  # minutes of optimiser steps
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0


def test_nan_loss_stops_naming_step_and_batch_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def explodes_at_step_four(model, batch):
        calls["n"] += model.training
        loss, metrics = lm_loss(model, batch)
        return (loss * math.nan if calls["n"] == 3 * 2 + 2 else loss), metrics

    # 40 samples in micro-batches of 4: step 4's second micro-batch is batch 7 of epoch 0.
    with pytest.raises(TrainError, match=r"loss is not finite at step 4 \(epoch 0, batch 7, samples \["):
        make_trainer(tmp_path, config(save_every=2), explodes_at_step_four).fit()
    state = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "last").values())
    assert not json.loads((tmp_path / "run.json").read_text())["finished"]


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    make_trainer(tmp_path / "big", config(batch_size=8, grad_accum=1), dropout=0.0).fit()
    make_trainer(tmp_path / "accum", config(batch_size=4, grad_accum=2), dropout=0.0).fit()
    a, b = weights(tmp_path / "big" / "last"), weights(tmp_path / "accum" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)


def _join_two_process_group(rank: int, port: int) -> None:
    """Set the environment torchrun would give process ``rank`` of two, on one CPU thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    _join_two_process_group(rank, port)
    make_trainer(out, config(batch_size=2, grad_accum=2), dropout=0.0).fit()


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    port = free_port()
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True)
    make_trainer(tmp_path / "single", config(batch_size=4, grad_accum=2), dropout=0.0).fit()
    a, b = weights(tmp_path / "single" / "last"), weights(tmp_path / "ddp" / "last")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("ddp") == pytest.approx(losses("single"), abs=1e-6)
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


class ToyWithBranch(ToyLM):
    """ToyLM with a second head that only some batches use (as stage E's Talker, used by spoken rows)."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.branch = nn.Linear(16, 1)


def branch_on_rank_zero(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = lm_loss(model, batch)
    if os.environ.get("RANK") == "0":  # the other process's batch never reaches the branch
        loss = loss + model.branch(model.emb(batch["ids"])).pow(2).mean()
    return loss, metrics


def _ddp_branch_worker(rank: int, port: int, out: str) -> None:
    _join_two_process_group(rank, port)
    torch.manual_seed(0)
    Trainer(ToyWithBranch(), config(batch_size=2, grad_accum=1), out, ToyData(False), collate,
            branch_on_rank_zero).fit()


def test_ddp_trains_a_part_that_only_one_process_uses(tmp_path):
    port = free_port()
    mp.spawn(_ddp_branch_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    start = ToyWithBranch().branch.weight
    assert not torch.equal(weights(tmp_path / "last")["branch.weight"], start)  # trained, not skipped


def test_unknown_set_key_fails_naming_the_key():
    defaults = {"tiny": TrainConfig(steps=5)}
    omni, train = resolve_configs("tiny", defaults, ["train.lr=0.5", "thinker.n_layers=2"])
    assert train.lr == 0.5 and train.steps == 5 and omni.thinker.n_layers == 2
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
        resolve_configs("tiny", defaults, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match="'thinker.d_modle'"):
        resolve_configs("tiny", defaults, ["thinker.d_modle=64"])
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        resolve_configs("tiny", defaults, ["steps=3"])
    with pytest.raises(ConfigError, match="no training defaults for preset 'base'"):
        resolve_configs("base", defaults, [])


def test_memory_plan_counts_the_thinker_exactly_and_checkpointing_saves_memory():
    from muomni.config import preset
    from muomni.thinker import Thinker
    from muomni.train.memory_plan import stack_activations, stage_parts

    cfg = preset("base")
    with torch.device("meta"):
        assert stage_parts(cfg, "thinker", TrainConfig(batch_size=1))[0].params == Thinker(cfg.thinker).num_parameters()
    full, ckpt = (stack_activations(cfg.thinker, 1000, flag) for flag in (False, True))
    assert 0 < ckpt < full


def test_eval_table_flattens_nested_metrics():
    from muomni.eval import markdown_table

    table = markdown_table({"thinker": {"test": {"perplexity": 3.14159, "by": {"kind": 2}}}})
    assert "| thinker | test | perplexity | 3.142 |" in table and "| thinker | test | by.kind | 2 |" in table


def test_cli_train_with_a_misspelt_key_fails_before_any_work(capsys, tmp_path):
    from muomni.cli import main

    code = main(["train", "--stage", "thinker", "--data", str(tmp_path / "missing"), "--out", str(tmp_path),
                 "--set", "train.lrr=1e-3"])
    assert code == 1 and "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class CharTokenizer:
    pad_id, eos_id = 0, 2

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in text] for text in texts]


def test_stage_a_packing_separates_documents_with_eos_and_masks_padding():
    from muomni.train.stage_thinker import PackedText, pack

    rows = pack(["abc", "defg"], CharTokenizer(), seq_len=4)
    assert rows.tolist() == [[97, 98, 99, 2, 100], [101, 102, 103, 2, 0]]
    data = PackedText(rows, pad_id=0)
    assert data[0]["input_ids"].tolist() == [97, 98, 99, 2] and data[0]["targets"].tolist() == [98, 99, 2, 100]
    # the final <|eos|> stays a target; the padding after it does not
    assert data[1]["input_ids"].tolist() == [101, 102, 103, 2] and data[1]["targets"].tolist() == [102, 103, 2, -100]


def test_stage_a_writes_a_share_of_the_stories_as_the_chats_of_stage_e():
    from muomni.data.language import story_chats
    from muomni.tokenizer import Tokenizer
    from muomni.train.stage_thinker import pack

    stories = ["a red star. what colour is the star? red.", "a blue circle. how many circles are there? one.",
               "five is more than four.", "a big square. is the square big or small? big."]
    tok = Tokenizer.train(stories * 3, vocab_size=300)

    def stream(rows):
        return [i for i in rows.flatten().tolist() if i != tok.pad_id]

    plain = [tok.encode(story) + [tok.eos_id] for story in stories]
    chat = [tok.encode_chat(story_chats(story)[0])[0] + [tok.eos_id] for story in stories if "?" in story]
    assert stream(pack(stories, tok, seq_len=16)) == sum(plain, [])
    # every second story, spread evenly: the second and the fourth, as chats
    assert stream(pack(stories, tok, seq_len=16, chat_share=0.5)) == plain[0] + chat[1] + plain[2] + chat[2]
    # a story without a question stays text
    assert stream(pack(stories, tok, seq_len=16, chat_share=1.0)) == chat[0] + chat[1] + plain[2] + chat[2]


def test_precision_picks_autocast_on_any_device_and_names_unknown_ones():
    from muomni.train.trainer import TrainError, autocast

    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(torch.device("cpu"), "auto"):
        assert not torch.is_autocast_enabled("cpu")  # fp32 off CUDA unless asked
    with pytest.raises(TrainError, match="unknown precision 'fp16'; choose one of auto, bf16, fp32"):
        autocast(torch.device("cpu"), "fp16")


class ScriptedReader(nn.Module):
    """A stand-in Thinker that writes a scripted continuation for each prompt it reads (characters as ids)."""

    def __init__(self, script: dict[str, str]):
        super().__init__()
        self.head = nn.Linear(1, 1)
        self.script = script

    def generate(self, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        prompts = ["".join(map(chr, row[mask.bool()].tolist())) for row, mask in zip(ids, attention_mask)]
        assert all(row[: int((mask == 0).sum())].eq(0).all() for row, mask in zip(ids, attention_mask))  # left padding
        return [[ord(c) for c in self.script[prompt]] for prompt in prompts]


class CharReader:
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self.encode(text), [False] * len(text)


def test_reading_scores_what_the_thinker_writes_up_to_the_first_full_stop():
    from muomni.train.stage_thinker import reading

    questions = [
        {"question": "a red circle at the top. where is the red circle?", "answer": "top", "kind": "position"},
        {"question": "a big star. is the star big or small?", "answer": "big", "kind": "size"},
        {"question": "a small star. is the star big or small?", "answer": "small", "kind": "size"},
    ]
    model = ScriptedReader({questions[0]["question"]: " top. what", questions[1]["question"]: " small. a",
                            questions[2]["question"]: " small."})
    result = reading(model, CharReader(), questions, batch_size=2)
    assert result["n_reading"] == 3 and result["reading_acc"] == pytest.approx(2 / 3)
    assert result["reading_by_question.position"] == 1.0 and result["reading_by_question.size"] == 0.5
    # asked as a chat: the question is a user turn, and the answer follows the assistant's header
    model = ScriptedReader({f"<user>{q['question']}<assistant>": f" {q['answer']}." for q in questions})
    result = reading(model, CharReader(), questions, batch_size=2, chat=True)
    assert result["n_reading_chat"] == 3 and result["reading_chat_acc"] == 1.0 and "reading_acc" not in result
