"""Checkpoints: bit-exact round trip, clear errors, atomic replacement, resolve()."""

import json

import pytest
import torch

from muomni import checkpoint
from muomni.checkpoint import CheckpointError, load_checkpoint, resolve, save_checkpoint
from muomni.config import ThinkerConfig, from_dict
from muomni.thinker import Thinker
from muomni.tokenizer import Tokenizer

CFG = ThinkerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    tie_embeddings=True, mrope_section=(4, 2, 2))


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Thinker(CFG)
    tokenizer = Tokenizer.train(["a tiny corpus for a tiny tokenizer."] * 5, vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", model, CFG, tokenizer=tokenizer, extra={"kind": "thinker"})
    state, config = load_checkpoint(tmp_path / "ckpt")

    assert config["kind"] == "thinker"
    loaded = Thinker(from_dict(ThinkerConfig, {k: v for k, v in config.items() if k != "kind"}))
    loaded.load_state_dict(state)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.head.weight is loaded.tok_emb.weight  # the tie survives
    assert Tokenizer.load(tmp_path / "ckpt").vocab_size == tokenizer.vocab_size


def test_odd_tensors_round_trip(tmp_path):
    base = torch.randn(4, 6)
    state = {"bf16": torch.randn(3, 3).to(torch.bfloat16), "int": torch.arange(5),
             "transposed": base.t(), "slice": base[1:3], "empty": torch.zeros(0, 2), "shared": base,
             "also_shared": base}
    save_checkpoint(tmp_path / "c", state, {"name": "odd"})
    loaded, config = load_checkpoint(tmp_path / "c")
    assert config == {"name": "odd"} and loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_truncated_weights_give_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.randn(100, 100)}, {})
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_checkpoint(tmp_path / "c")
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "c")


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, {})
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "c")


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, {"version": 1})

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", {"w": torch.zeros(3)}, {"version": 2})
    state, config = load_checkpoint(tmp_path / "c")
    assert torch.equal(state["w"], torch.ones(3)) and config == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary directory left behind


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, {"version": 1})
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(3)}, {"version": 2})
    state, config = load_checkpoint(tmp_path / "c")
    assert torch.equal(state["w"], torch.zeros(3)) and config == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_loading_never_unpickles(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, {})
    assert json.loads((tmp_path / "c" / "config.json").read_text()) == {}
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "c")


def test_resolve(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve(tmp_path)
    save_checkpoint(tmp_path / "last", {"w": torch.ones(1)}, {})
    assert resolve(tmp_path) == tmp_path / "last"
    save_checkpoint(tmp_path / "best", {"w": torch.ones(1)}, {})
    assert resolve(tmp_path) == tmp_path / "best"
    assert resolve(tmp_path / "last") == tmp_path / "last"
