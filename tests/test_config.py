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


@pytest.mark.parametrize("override, named", [
    ("train.lr=3", "override 'train.lr=3': unknown key train.lr"),
    ("train.batch_size=0", "override 'train.batch_size=0'"),
    ("train.epochs=abc", "override 'train.epochs=abc'"),
    ("scope.lr_blocks=-1", "override 'scope.lr_blocks=-1'"),
])
def test_an_override_error_names_the_override_not_the_file(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert str(error.value).startswith(named) and "tiny.yaml" not in str(error.value)


def test_a_file_error_still_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train: train.batch_size=0"):
        load_config(path, ["train.epochs=2"])


def test_accelerate_style_mixed_precision_no_is_not_a_boolean(tmp_path):
    path = tmp_path / "mp.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(ROOT / "configs/tiny.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
