"""Config: misspelt keys are named, JSON round-trips, overrides are typed."""

import pytest

from muomni.config import (ConfigError, OmniConfig, ThinkerConfig, TrainConfig, apply_overrides, from_dict,
                           load_json, preset, save_json, to_dict)


def test_misspelt_key_names_the_key():
    with pytest.raises(ConfigError, match="n_layer") as info:
        from_dict(ThinkerConfig, {"n_layer": 2})
    assert "n_layers" in str(info.value)  # the closest known key is suggested


def test_misspelt_nested_key_names_its_path():
    with pytest.raises(ConfigError, match=r"thinker\.d_modle"):
        from_dict(OmniConfig, {"thinker": {"d_modle": 64}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="n_layers"):
        from_dict(ThinkerConfig, {"n_layers": "four"})


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_json_round_trip(tmp_path, name):
    config = preset(name)
    save_json(config, tmp_path / "c.json")
    loaded = load_json(OmniConfig, tmp_path / "c.json")
    assert loaded == config
    assert isinstance(loaded.thinker.mrope_section, tuple)


def test_apply_overrides():
    config = apply_overrides(preset("tiny"), ["thinker.n_layers=2", "thinker.mlp=gelu", "thinker.norm_eps=1",
                                              "vision.image_size=32"])
    assert config.thinker.n_layers == 2 and config.thinker.mlp == "gelu" and config.vision.image_size == 32
    assert isinstance(config.thinker.norm_eps, float)
    assert preset("tiny").thinker.n_layers == 4  # the preset itself is untouched
    train = apply_overrides(TrainConfig(), ["lr=1e-3", "betas=[0.9, 0.99]"])
    assert train.lr == 1e-3 and train.betas == (0.9, 0.99)


@pytest.mark.parametrize("override, message", [
    ("thinker.n_layer=2", "thinker.n_layer"),
    ("thinkr.n_layers=2", "thinkr"),
    ("thinker.n_layers", "key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(OmniConfig(), [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="huge"):
        preset("huge")


def test_to_dict_is_json_ready():
    data = to_dict(preset("tiny"))
    assert data["thinker"]["mrope_section"] == [8, 4, 4]
