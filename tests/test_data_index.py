"""Byte-offset indexes, manifest datasets, packing, the epoch shuffler and padding."""

from __future__ import annotations

import json
import os

import pytest
import torch

from muomni.data.collate import collate_dicts, pad
from muomni.data.datasets import EpochShuffler, ManifestDataset, asr_pair, chat
from muomni.data.index import CsvIndex, JsonlIndex, LineIndex, ManifestError


def write(path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_jsonl_index_reads_lines_and_skips_blanks(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, '{"a": 1}\n\n{"a": 2, "t": "é"}\n   \n{"a": 3}')  # blank lines, no final newline
    index = JsonlIndex(path)
    assert len(index) == 3
    assert [index[i]["a"] for i in range(3)] == [1, 2, 3] and index[1]["t"] == "é" and index[-1]["a"] == 3
    assert [index.line_number(i) for i in range(3)] == [1, 3, 5]
    assert (tmp_path / "m.jsonl.idx").exists()
    with pytest.raises(IndexError):
        index[3]


def test_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write(path, '{"audio": "a.wav", "text": "hi"}\n{"audio": "b.wav"}\n{"audio": \n[1, 2]\n')
    index = JsonlIndex(path, required=("audio", "text"))
    assert index[0]["text"] == "hi"
    with pytest.raises(ManifestError, match=r"bad.jsonl line 2: missing field 'text'"):
        index[1]
    with pytest.raises(ManifestError, match=r"bad.jsonl line 3: bad JSON"):
        index[2]
    with pytest.raises(ManifestError, match=r"bad.jsonl line 4: expected a JSON object"):
        index[3]
    with pytest.raises(ManifestError, match="no such file"):
        JsonlIndex(tmp_path / "nope.jsonl")


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, '{"a": 1}\n{"a": 2}\n')
    assert len(JsonlIndex(path)) == 2
    idx = tmp_path / "m.jsonl.idx"
    stamp = idx.stat().st_mtime_ns
    assert len(JsonlIndex(path)) == 2 and idx.stat().st_mtime_ns == stamp  # reused, not rewritten
    with open(path, "a") as f:
        f.write('{"a": 30}\n')
    index = JsonlIndex(path)
    assert len(index) == 3 and index[2]["a"] == 30
    # same size, new content and mtime: offsets change, the cache must notice
    write(path, '{"a": 9}\n\n{"a":22}\n{"a":33}\n')
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    index = JsonlIndex(path)
    assert [index[i]["a"] for i in range(len(index))] == [9, 22, 33]


def test_a_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, '{"a": 1}\n')
    JsonlIndex(path)
    write(tmp_path / "m.jsonl.idx", "garbage")
    assert JsonlIndex(path)[0] == {"a": 1}


def test_line_and_csv_indexes(tmp_path):
    text = tmp_path / "t.txt"
    write(text, "one story\ntwo story\n")
    assert list(LineIndex(text)) == ["one story", "two story"]
    meta = tmp_path / "metadata.csv"
    write(meta, "LJ001-0001|Printing, in the only sense|printing in the only sense\nLJ001-0002|In 1850|in eighteen fifty\n")
    rows = CsvIndex(meta, delimiter="|", fieldnames=("id", "text", "normalized"))
    assert len(rows) == 2 and rows[1]["normalized"] == "in eighteen fifty"
    csv_path = tmp_path / "captions.txt"
    write(csv_path, 'image,caption\na.jpg,"A dog, running."\nb.jpg\n')
    rows = CsvIndex(csv_path)
    assert rows.fieldnames == ["image", "caption"] and rows[0]["caption"] == "A dog, running."
    with pytest.raises(ManifestError, match="captions.txt line 3: expected 2 fields"):
        rows[1]


def test_manifest_dataset_checks_media(tmp_path):
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "a.wav").write_bytes(b"RIFF....")
    (tmp_path / "wav" / "empty.wav").write_bytes(b"")
    path = tmp_path / "speech.jsonl"
    lines = [{"audio": "wav/a.wav", "text": "hi"}, {"audio": "wav/empty.wav", "text": "hi"},
             {"audio": "wav/a.wav", "text": ""}]
    write(path, "\n".join(json.dumps(r) for r in lines) + "\n")
    dataset = ManifestDataset(path, asr_pair)
    assert dataset[0] == {"audio": tmp_path / "wav" / "a.wav", "text": "hi"}
    with pytest.raises(ManifestError, match=r"speech.jsonl line 2: audio file wav/empty.wav is empty"):
        dataset[1]
    with pytest.raises(ManifestError, match=r"speech.jsonl line 3: field 'text' must be a non-empty string"):
        dataset[2]
    assert ManifestDataset(path)[2] == lines[2]  # no transform: the raw record


def test_chat_transform_resolves_parts(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"png")
    (tmp_path / "chat").mkdir()
    record = {"id": "c1", "kind": "image_qa", "speak": False, "messages": [
        {"role": "user", "content": [{"type": "image", "path": "../images/x.png"}, {"type": "text", "text": "q?"}]},
        {"role": "assistant", "content": "a."}]}
    bad = {**record, "messages": [{"role": "robot", "content": "hi"}]}
    write(tmp_path / "chat" / "c.jsonl", json.dumps(record) + "\n" + json.dumps(bad) + "\n")
    dataset = ManifestDataset(tmp_path / "chat" / "c.jsonl", chat)
    assert dataset[0]["messages"][0]["content"][0]["path"] == str(tmp_path / "images" / "x.png")
    with pytest.raises(ManifestError, match="c.jsonl line 2: bad message"):
        dataset[1]


def test_epoch_shuffler_is_deterministic_and_resumable():
    a, b = EpochShuffler(10, seed=7), EpochShuffler(10, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    order = list(a)
    assert order == list(b) and sorted(order) == list(range(10))
    b.set_epoch(4)
    assert list(b) != order
    a.set_epoch(3, start=6)
    assert list(a) == order[6:] and len(a) == 4
    shards = [EpochShuffler(10, seed=7, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(3)
    assert {len(s) for s in shards} == {4} and set().union(*map(set, shards)) == set(range(10))
    assert list(EpochShuffler(4, shuffle=False)) == [0, 1, 2, 3]


def test_pad_right_and_left():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    padded, mask = pad(seqs, value=0)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    padded, mask = pad(seqs, value=-1, side="left")
    assert padded.tolist() == [[1, 2, 3], [-1, -1, 4]] and mask.tolist() == [[True] * 3, [False, False, True]]
    features = [torch.ones(2, 5), torch.ones(4, 5)]
    padded, mask = pad(features)
    assert padded.shape == (2, 4, 5) and mask.sum().item() == 6
    with pytest.raises(ValueError, match="trailing shapes"):
        pad([torch.ones(2, 5), torch.ones(2, 4)])


def test_collate_dicts_stacks_pads_and_lists():
    batch = [{"ids": torch.tensor([1, 2]), "x": torch.ones(3), "name": "a"},
             {"ids": torch.tensor([5]), "x": torch.zeros(3), "name": "b"}]
    out = collate_dicts(batch, pad_values={"ids": -100})
    assert out["ids"].tolist() == [[1, 2], [5, -100]] and out["ids_mask"].tolist() == [[True, True], [True, False]]
    assert out["x"].shape == (2, 3) and out["name"] == ["a", "b"]
