"""The contract every method passes (design.md): one parametrized table over all registered methods."""

import pytest
import torch

from helpers import base_weights, final_weights, losses, trainable_names
from mmtune.methods import METHODS
from mmtune.train import load_base, train

# Settings that make each method do something visible in 4 tiny steps.
ACTIVE = {
    "half_ft": ["method.half_ft.round_steps=2"],
    "l2_reg": ["method.l2_reg.lam=1.0"],
    "l1_reg": ["method.l1_reg.lam=0.01"],
}
# The null setting of each method that has one (``null_options``, declared by the method), which must reproduce vanilla.
NULL = {name: [f"method.{name}.{key}={value}" for key, value in cls.null_options.items()]
        for name, cls in sorted(METHODS.items()) if cls.null_options is not None}
COMBINATIONS = ["nrca+spider", "nrca+random_mask", "lora+nrca"]
ALL = sorted(METHODS) + COMBINATIONS


def _settings(name):
    return [s for part in name.split("+") for s in ACTIVE.get(part, [])]


def test_null_settings_are_options_of_their_methods():
    import dataclasses

    for name, cls in METHODS.items():
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        assert set(cls.null_options or {}) <= fields, f"{name}: null_options names options its config lacks"
    # the ones the papers' baselines and the multi-task methods must have (a method losing its null fails here)
    assert {"nrca", "l2_reg", "l1_reg", "random_mask", "magnitude_mask", "grafting", "dare", "wise_ft", "half_ft",
            "cagrad", "sam", "task_sam"} <= set(NULL)


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    """Each method's 4-step run with checkpoints every 2 steps, trained once for the tests below that read it."""
    from conftest import TINY_CONFIG
    from mmtune.config import load_config

    root, done = tmp_path_factory.mktemp("contract"), {}

    def run(name: str):
        if name not in done:
            config = load_config(TINY_CONFIG, [
                f"data.synthetic.dir={world}", f"train.output_dir={root / name}", "train.progress=false",
                "data.tasks=[{path: 'synthetic:detailed_caption', n: 16}, {path: 'synthetic:count_mc', n: 16}]",
                "train.batch_size=4", "train.max_steps=4", "train.warmup_ratio=0.0", "eval.downstream=[]",
                "eval.heldout=[]", "train.save_every=2", f"method.name={name}", *_settings(name)])
            done[name] = (config, train(config))
        return done[name]

    return run


@pytest.mark.parametrize("name", ALL)
def test_frozen_parameters_bit_identical_and_trainable_ones_change(full_run, name):
    config, run = full_run(name)
    base, final = base_weights(config), final_weights(run)
    trainable = trainable_names(base)
    for key in base:
        if key not in trainable:
            assert torch.equal(base[key], final[key]), f"{name} moved frozen {key}"
    assert any(not torch.equal(base[k], final[k]) for k in trainable), f"{name} changed nothing"


@pytest.mark.parametrize("name", sorted(NULL))
def test_null_setting_reproduces_vanilla(tiny_config, full_run, name):
    vanilla = final_weights(full_run("vanilla")[1])
    null = final_weights(train(tiny_config(f"method.name={name}", *NULL[name], out="null")))
    for key in vanilla:
        if METHODS[name]().builds_step:  # the same gradient, summed task by task: equal up to float rounding, which
            # Adam's division by √v amplifies where a gradient is ~0 (seen: one element of 4,096 off by 1.6e-7);
            # 1e-6 is 0.1% of how far 4 steps at lr 2e-4 can move an element
            torch.testing.assert_close(null[key], vanilla[key], rtol=1e-5, atol=1e-6, msg=f"{name} differs at {key}")
        else:
            assert torch.equal(vanilla[key], null[key]), f"{name} at its null setting differs from vanilla at {key}"


@pytest.mark.parametrize("name", ALL)
def test_resume_equals_uninterrupted(tiny_config, full_run, name):
    settings = [f"method.name={name}", *_settings(name), "train.max_steps=4"]
    full = full_run(name)[1]
    resumed = train(tiny_config(*settings, f"train.resume_from={full / 'checkpoints' / 'step-000002'}", out="resumed"))
    wf, wr = final_weights(full), final_weights(resumed)
    for key in wf:
        assert torch.equal(wf[key], wr[key]), f"{name}: resumed run differs at {key}"
    assert losses(resumed) == losses(full)[2:]


def test_lora_can_keep_its_adapter_unmerged_and_peft_loads_it(tiny_config):
    """method.lora.merge=false: <run>/adapter (adapters + the trained projector) loads with peft onto the base
    and equals final/ (the merged model)."""
    from peft import PeftModel

    config = tiny_config("method.name=lora", "method.lora.merge=false", "train.max_steps=3", "scope.lr_blocks=0.01")
    run = train(config)
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "final" / "config.json").exists()
    base, _ = load_base(config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, run / "adapter").merge_and_unload()
    final = final_weights(run)
    changed = 0
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, final[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(weight, before[name])
    assert changed > 0  # the adapter did carry the training (projector included)
    assert any("multi_modal_projector" in n and not torch.equal(final[n], before[n]) for n in final)


def test_qlora_trains_adapters_beside_4bit_weights(tiny_config, tmp_path):
    """model.quantization=4bit + lora (QLoRA) through bitsandbytes, on this CPU: frozen weights stored in 4 bits,
    adapters and the projector train, the run finishes and keeps its adapter."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from mmtune.data.synthetic import vocabulary
    from mmtune.models.load import load_model
    from mmtune.models.tiny import save_tiny

    folder = save_tiny(tmp_path / "base", "llava", words=vocabulary())
    model, _ = load_model(folder, quantization="4bit")
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)  # trained fully: kept
    run = train(tiny_config("model.tiny=null", f"model.path={folder}", "model.quantization=4bit", "method.name=lora",
                            "method.lora.merge=false", "train.max_steps=2", "scope.lr_blocks=0.01"))
    from safetensors.torch import load_file

    assert len(losses(run)) == 2
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "final" / "config.json").exists()
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(float(w.abs().sum()) > 0 for n, w in adapter.items() if "lora_B" in n)  # B starts at 0: it trained


@pytest.mark.parametrize("overrides, message", [
    (["method.name=vanilla"], "train LoRA adapters beside them"),
    (["model.quantization=2bit", "method.name=lora"], "choose 4bit, 8bit or null"),
])
def test_quantization_is_refused_where_it_cannot_work(tiny_config, tmp_path, overrides, message):
    from mmtune.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config("model.tiny=null", f"model.path={tmp_path}", "model.quantization=4bit", *overrides)


def test_qlora_without_bitsandbytes_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from mmtune.data.synthetic import vocabulary
    from mmtune.models.load import load_model
    from mmtune.models.tiny import save_tiny

    folder = save_tiny(tmp_path / "base", "llava", words=vocabulary())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="needs bitsandbytes: pip install bitsandbytes"):
        load_model(folder, quantization="4bit")
