from pathlib import Path

import pytest

from mmtune.config import ConfigError, RunConfig, TaskSpec, load_config, save_config
from mmtune.methods.base import build_methods

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    build_methods(config.method)  # method names and options are valid too


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", ["train.seed=3", "scope.lr_blocks=1e-3",
                                                      "method.name=vanilla", "train.max_grad_norm=null"])
    assert config.train.seed == 3
    assert config.scope.lr_blocks == pytest.approx(1e-3)
    assert config.train.max_grad_norm is None
    assert isinstance(config.data.tasks[0], TaskSpec)


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.lr.*valid keys of train: output_dir, seed"):
        load_config(ROOT / "configs/tiny.yaml", ["train.lr=0.1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.batch_size: 'eight' is not of type int"):
        load_config(ROOT / "configs/tiny.yaml", ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match="is not of type int"):
        load_config(ROOT / "configs/tiny.yaml", ["train.seed=true"])


def test_unknown_method_lists_registered_ones():
    config = load_config(ROOT / "configs/tiny.yaml", ["method.name=nope"])
    with pytest.raises(ConfigError, match="unknown method 'nope'; registered methods: .*vanilla"):
        build_methods(config.method)


def test_options_for_unused_method_are_an_error():
    config = load_config(ROOT / "configs/tiny.yaml", ["method.other.x=1"])
    with pytest.raises(ConfigError, match="method.other"):
        build_methods(config.method)


def test_round_trip(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", ["train.seed=7"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_config_keys_lists_every_key_with_a_meaning(capsys):
    from mmtune.cli import main
    from mmtune.config import describe_keys

    rows = describe_keys()
    assert all(meaning for *_, meaning in rows), [r[0] for r in rows if not r[3]]  # a new key needs its comment
    assert {"train.loss_reduction", "data.synthetic.seed", "method.name", "eval.limit"} <= {r[0] for r in rows}
    assert main(["config", "keys"]) == 0
    assert "train.loss_reduction" in capsys.readouterr().out


def test_config_show_resolves_overrides_and_suggests_keys(capsys):
    import yaml

    from mmtune.cli import main

    assert main(["config", "show", str(ROOT / "configs/tiny.yaml"), "train.seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["seed"] == 7 and shown["train"]["loss_reduction"] == "token"
    assert main(["config", "show", str(ROOT / "configs/tiny.yaml"), "train.sed=7"]) == 2
    assert "unknown key train.sed (did you mean seed?)" in capsys.readouterr().err
