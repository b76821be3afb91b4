
from pathlib import Path

import pytest

from mmtune.config import ConfigError, RunConfig, TaskSpec, load_config, save_config
from mmtune.methods.base import build_methods
from mmtune.train import train

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
    with pytest.raises(ConfigError, match=r"unknown key train\.bogus.*valid keys of train: output_dir, seed"):
        load_config(ROOT / "configs/tiny.yaml", ["train.bogus=0.1"])


# The flat keys of the three toolkits' common training YAMLs (LLaMA-Factory's examples/train_lora/*_sft.yaml and
# train_full, ms-swift's sft command-line / YAML, TRL's SFTConfig / ScriptArguments): each must get a hint.
LLAMA_FACTORY = ["model_name_or_path", "image_max_pixels", "video_max_pixels", "trust_remote_code", "stage",
                 "do_train", "finetuning_type", "lora_rank", "lora_target", "freeze_vision_tower",
                 "freeze_multi_modal_projector", "freeze_language_model", "dataset", "template", "cutoff_len",
                 "max_samples", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
                 "output_dir", "logging_steps", "save_steps", "plot_loss", "overwrite_output_dir", "save_only_model",
                 "report_to", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                 "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "bf16", "ddp_timeout",
                 "resume_from_checkpoint", "val_size", "per_device_eval_batch_size", "eval_strategy", "eval_steps",
                 "deepspeed", "quantization_bit", "dataset_dir", "use_dft_loss", "freeze_trainable_layers",
                 "freeze_trainable_modules"]
MS_SWIFT = ["model", "model_type", "train_type", "torch_dtype", "num_train_epochs", "per_device_train_batch_size",
            "learning_rate", "lora_rank", "lora_alpha", "target_modules", "gradient_accumulation_steps", "eval_steps",
            "save_steps", "save_total_limit", "logging_steps", "max_length", "output_dir", "warmup_ratio",
            "dataloader_num_workers", "freeze_vit", "freeze_aligner", "freeze_llm", "vit_lr", "aligner_lr", "system",
            "attn_impl", "max_pixels", "split_dataset_ratio", "deepspeed", "dataset_num_proc", "packing", "seed"]
TRL = ["model_name_or_path", "dataset_name", "dataset_text_field", "learning_rate", "num_train_epochs",
       "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "logging_steps",
       "eval_strategy", "eval_steps", "output_dir", "push_to_hub", "bf16", "use_peft", "lora_r", "lora_alpha",
       "lora_target_modules", "max_length", "max_seq_length", "packing", "seed", "weight_decay", "max_grad_norm",
       "optim", "warmup_steps", "save_strategy", "save_total_limit", "load_best_model_at_end",
       "metric_for_best_model", "torch_dtype", "attn_implementation", "remove_unused_columns", "max_steps",
       "lr_scheduler_type", "report_to", "run_name", "data_seed", "fsdp", "fsdp_config"]


@pytest.mark.parametrize("toolkit, keys", [("LLaMA-Factory", LLAMA_FACTORY), ("ms-swift", MS_SWIFT), ("TRL", TRL)])
def test_another_toolkits_config_gets_every_key_answered_at_once(tmp_path, toolkit, keys):
    """A whole foreign YAML: one error listing every key, each with its mmtune key (or why there is none)."""
    import yaml

    path = tmp_path / "theirs.yaml"
    path.write_text(yaml.safe_dump({key: "Qwen/Qwen2-VL-2B-Instruct" if key == "model" else 1 for key in keys}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    unknown = [key for key in keys if key != "model"]
    assert lines[0] == f"{path}: {len(keys)} {'problems' if 'model' in keys else 'unknown keys'}:"
    for key in unknown:
        line = next(line for line in lines if line.strip().startswith(f"unknown key {key} "))
        assert "did you mean" in line or "no mmtune key" in line, line
        assert "valid keys" not in line, line
    if "model" in keys:  # ms-swift's model id: model is a section here
        assert any("model is a section here: model.path" in line for line in lines)


def test_every_unknown_key_is_reported_at_once_across_sections():
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs/tiny.yaml", ["train.bogus=1", "eval.nope=2", "scope.freeze_vit=false"])
    message = str(caught.value)
    assert "3 unknown keys" in message
    assert all(f"unknown key {key}" in message for key in ("train.bogus", "eval.nope", "scope.freeze_vit"))


def test_an_override_indexes_a_list():
    """data.tasks.0.path=…: a list item by position (a task given as a path becomes {path: …} to take a key)."""
    config = load_config(ROOT / "configs/tiny.yaml", ["data.tasks.0.n=7", "data.tasks.1=synthetic:color_vqa",
                                                      "data.tasks.-1.weight=2"])
    assert config.data.tasks[0].n == 7 and config.data.tasks[1].path == "synthetic:color_vqa"
    assert config.data.tasks[-1].weight == 2
    with pytest.raises(ConfigError, match=r"data.tasks has \d+ items \(data.tasks.0 … data.tasks.\d+\)"):
        load_config(ROOT / "configs/tiny.yaml", ["data.tasks.9.n=1"])
    with pytest.raises(ConfigError, match="data.tasks is a list; index it by position"):
        load_config(ROOT / "configs/tiny.yaml", ["data.tasks.first.n=1"])


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


BAD_VALUES = [
    ("scope.lr_blocks=-1e-4", "scope.lr_blocks=-0.0001 must be > 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be > 0"),
    ("train.epochs=0", "train.epochs=0.0 must be > 0"),
    ("train.epochs=-1", "train.epochs=-1.0 must be > 0"),
    ("train.max_steps=-5", "train.max_steps=-5 must be ≥ 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be ≥ 1"),
    ("method.name=+", "each '+'-joined part must name a method"),
    ("method.name=nrca++spider", "each '+'-joined part must name a method"),
    ("train.warmup_ratio=5", "train.warmup_ratio=5.0 must be in \\[0, 1\\]"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be ≥ 0"),
    ("train.output_dir=''", "train.output_dir is empty"),
    ("train.grad_accum=0", "train.grad_accum=0 must be ≥ 1"),
    ("train.log_every=0", "train.log_every=0 must be ≥ 1"),
    ("train.batch_size=0", "train.batch_size=0 must be ≥ 1"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8'"),
    ("model.path=/models/x", "model.path='/models/x' and model.tiny='llava' are both set"),
    ("model.dtype=fp64", "model.dtype='fp64'"),
    ("data.max_length=0", "data.max_length=0 must be ≥ 1"),
    ("eval.limit=0", "eval.limit=0 must be ≥ 1"),
    ("train.lr=.nan", "unknown key train.lr"),
    ("scope.lr_blocks=.nan", "scope.lr_blocks=nan must be > 0"),
    ("data.tasks=[{path: x, n: 0}]", "n=0 must be ≥ 1"),
    ("data.tasks=[{path: x, weight: -1}]", "weight=-1.0 must be > 0"),
    ("train.seed=!!python/object:os.system x", "not valid YAML"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_config_values_are_refused_naming_the_key(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("'+'", "'\\+'")):
        tiny_config(override)


@pytest.mark.parametrize("override,message", [
    ("method.nrca.lam=-1", "method.nrca.lam=-1.0 must be ≥ 0"),  # one form: the key named in full (issue 39)
    ("method.nrca.lam=.nan", "lam=nan must be ≥ 0"),
    ("method.l2_reg.lam=-1", "lam=-1.0 must be ≥ 0"),
    ("method.lora.r=0", "r=0 must be ≥ 1"),
    ("method.wise_ft.alpha=2", "alpha=2.0 must be in"),
    ("method.grafting.keep_ratio=1.5", "keep_ratio=1.5 must be in"),
])
def test_bad_method_options_are_refused_before_any_work(tiny_config, override, message):
    name = override.split(".")[1]
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(f"method.name={name}", override, out="never"))


def test_fp16_on_cpu_is_refused(tiny_config):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train(tiny_config("train.mixed_precision=fp16"))


@pytest.mark.parametrize("overrides, message", [
    (["model.tiny=null", "model.path=/m", "model.tiny_layers=6"], "model.tiny_layers=6: the tiny model's shape, but "
     "model.tiny is not set"),
    (["scope.full=true", "scope.modules=[attention]"], "scope.full trains every parameter"),
    (["scope.lr_vision=1e-5"], "scope.train_vision is false"),
    (["data.tasks=[{path: a.jsonl, weight: 2, probability: 0.5}, {path: b.jsonl, probability: 0.5}]"],
     "weight set on a.jsonl together with probabilities"),
    (["data.temperature=2", "data.tasks=[{path: a.jsonl, weight: 2}]"], "together with data.temperature"),
    (["eval.sample_seed=3"], "eval.sample_temperature is null"),
    (["eval.overfit_reference_step=10"], "eval.every_steps is null"),
    (["train.keep_checkpoints=2"], "train.save_every is null"),
])
def test_settings_that_would_not_be_read_are_refused(overrides, message):
    """The audit of issue 36: a key mmtune would read and not honour (a silent default) is an error naming it."""
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_the_quickstart_fine_tunes_the_shipped_pretrained_base():
    """The README's first training command starts from the pre-trained base (not a random model whose scores are
    noise), on the world that base was trained on (version 2, its image size)."""
    import json

    from mmtune.demo import SHIPPED_BASE

    config = load_config(ROOT / "configs/quickstart.yaml")
    assert (ROOT / config.model.path).resolve() == SHIPPED_BASE.resolve() and config.model.tiny is None
    vision = json.loads((SHIPPED_BASE / "config.json").read_text())["vision_config"]
    assert config.data.synthetic.image_size == vision["image_size"] and config.data.synthetic.version == 2
    assert config.eval.downstream and config.eval.heldout
    readme = (ROOT / "README.md").read_text()
    training = readme[readme.index("## Training"):]
    assert training.index("configs/quickstart.yaml") < training.index("configs/tiny.yaml")
