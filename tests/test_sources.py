"""Stage E on real data: chats built from converted real manifests, and a `--data` of several weighted sources."""

from __future__ import annotations

from collections import Counter

import pytest

from muomni.cli import main as cli
from muomni.data import realdata as R
from muomni.data.sources import DataSource, SourceError, parse_sources, shares
from muomni.train.stage_sft import source_chats
from realdata_fixtures import coco_tree, ljspeech_tree


def test_sources_parse_with_weights_and_errors_name_the_entry(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert parse_sources(f"{tmp_path / 'a'},{tmp_path / 'b'}=0.5") == [DataSource(tmp_path / "a", 1.0),
                                                                       DataSource(tmp_path / "b", 0.5)]
    with pytest.raises(SourceError, match="weight must be a positive number"):
        parse_sources(f"{tmp_path / 'a'}=lots")
    with pytest.raises(SourceError, match="weight must be a positive number"):
        parse_sources(f"{tmp_path / 'a'}=0")
    with pytest.raises(SourceError, match="'.*missing' is not a directory"):
        parse_sources(f"{tmp_path / 'a'},{tmp_path / 'missing'}")
    with pytest.raises(SourceError, match="empty entry"):
        parse_sources(f"{tmp_path / 'a'},")


def test_shares_follow_the_weights_and_sum_to_the_total():
    sources = [DataSource("a", 1.0), DataSource("b", 0.5), DataSource("c", 0.5)]
    assert shares(sources, 8) == [4, 2, 2]
    assert sum(shares(sources, 7)) == 7 and shares([DataSource("a")], 5) == [5]


def test_real_manifests_become_caption_transcription_and_spoken_answer_chats(tmp_path):
    R.convert_coco(coco_tree(tmp_path / "coco_src", images=20), tmp_path / "coco", log=lambda _: None)
    R.convert_ljspeech(ljspeech_tree(tmp_path / "lj_src"), tmp_path / "lj", log=lambda _: None)
    coco, lj = source_chats(tmp_path / "coco"), source_chats(tmp_path / "lj")
    train_images = len((tmp_path / "coco" / "images" / "train.jsonl").read_text().splitlines())
    assert Counter(row["kind"] for row in coco) == {"caption": train_images}
    caption = coco[0]["messages"]
    assert caption[0]["content"][1]["text"] == "describe the image." and caption[1]["content"].startswith("A photo")
    assert (tmp_path / "coco" / "chat" / caption[0]["content"][0]["path"]).is_file()  # absolute paths
    kinds = Counter(row["kind"] for row in lj)
    assert kinds["speak"] == kinds["transcribe"] > 0
    spoken = next(row for row in lj if row["kind"] == "speak")
    assert spoken["speak"] and spoken["answer_audio"].endswith(".wav")
    assert spoken["messages"][0]["content"][0]["text"] == f"say this aloud: {spoken['messages'][1]['content']}"


def test_only_stage_sft_mixes_several_sources(tmp_path, capsys):
    assert cli(["train", "--stage", "audio", "--data", f"{tmp_path},{tmp_path}=2", "--out", str(tmp_path)]) == 1
    assert "only stage sft mixes several" in capsys.readouterr().err
