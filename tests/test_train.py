"""The loop's own guarantees (the per-method contract tests live in tests/methods/test_contract.py)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers import base_weights, final_weights, losses
from mmtune.cli import main
from mmtune.config import ConfigError
from mmtune.train import train


def test_tiny_run_writes_a_loadable_model_config_and_metrics(tiny_config, tmp_path):
    config = tiny_config()
    run = train(config)
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    processor = AutoProcessor.from_pretrained(run / "final")
    assert model.config.model_type == "llava" and processor.tokenizer is not None
    assert (run / "config.yaml").exists() and (run / "final" / "mmtune_config.yaml").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "ce", "lr", "grad_norm"} <= rows[0].keys()
















def test_cli_train_and_errors(tiny_config, tmp_path, world, capsys):
    config = tmp_path / "c.yaml"
    from mmtune.config import save_config

    save_config(tiny_config(out="cli"), config)
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "train.bogus=1"]) == 2
    assert "unknown key train.bogus" in capsys.readouterr().err


def test_frozen_parameters_untouched_by_vanilla(tiny_config):
    config = tiny_config()
    run = train(config)
    base, final = base_weights(config), final_weights(run)
    changed = {n for n in base if not torch.equal(base[n], final[n])}
    assert changed and all("multi_modal_projector" in n or ".layers.2." in n or ".layers.3." in n for n in changed)


def test_qwen2_vl_trains_with_nrca_and_spider(tiny_config):
    """The flattened-patch layout of Qwen2-VL goes through NRCA's open-row subset and SPIDER."""
    run = train(tiny_config("model.tiny=qwen2_vl", "method.name=nrca+spider", "train.max_steps=2"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["nrca_gap"] > 0 for r in rows) and all(r["nrca_gap"] >= 0 for r in rows)
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert model.config.model_type == "qwen2_vl"


def test_spider_refuses_lora(tiny_config):
    with pytest.raises(ValueError, match="spider cannot run on LoRA"):
        train(tiny_config("method.name=lora+spider"))


def test_merge_interpolates_a_finished_run(tiny_config, tmp_path):
    config = tiny_config()
    run = train(config)
    base, final = base_weights(config), final_weights(run)
    assert main(["merge", str(run), "--alpha", "0.5"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged-alpha0.5").state_dict()
    for key in base:
        torch.testing.assert_close(merged[key], torch.lerp(base[key], final[key], 0.5))
    assert main(["merge", str(run), "--alpha", "0.5"]) == 2  # never overwrites


def _observed_run(tiny_config, monkeypatch, *overrides: str, out: str) -> dict:
    """Train 2 steps, counting the forwards of the last LLM block's query projection (activation checkpointing runs
    each again in the backward) and recording the dtype it computes in (bf16 under bf16 autocast). The base is
    loaded from a folder, as a user's checkpoint is (from_pretrained returns a model in eval mode)."""
    import mmtune.train as train_module

    seen = {"forwards": 0, "dtypes": set()}
    real = train_module.load_base

    def observed(config):
        model, processor = real(config)
        model.eval()  # as from_pretrained leaves it
        query = model.model.language_model.layers[-1].self_attn.q_proj

        def hook(module, inputs, output):
            seen["forwards"] += 1
            seen["dtypes"].add(output.dtype)

        query.register_forward_hook(hook)
        return model, processor

    monkeypatch.setattr(train_module, "load_base", observed)
    run = train(tiny_config(*overrides, "train.max_steps=2", out=out))
    assert len(losses(run)) == 2
    return {"forwards": seen["forwards"], "dtypes": seen["dtypes"]}


CHECKPOINTED_BF16 = ("model.gradient_checkpointing=true", "train.mixed_precision=bf16")


def test_gradient_checkpointing_and_bf16_autocast_are_really_on(tiny_config, monkeypatch):
    assert _observed_run(tiny_config, monkeypatch, out="plain") == {"forwards": 2, "dtypes": {torch.float32}}
    assert _observed_run(tiny_config, monkeypatch, *CHECKPOINTED_BF16, out="on") == \
        {"forwards": 4, "dtypes": {torch.bfloat16}}  # each block recomputed in the backward, in bf16


def test_mutation_checkpointing_and_autocast_switched_off_are_seen(tiny_config, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", lambda self, *args, **kwargs: None)
    monkeypatch.setattr("mmtune.run.compute_precision", lambda *args: "no")  # the bf16 setting ignored
    assert _observed_run(tiny_config, monkeypatch, *CHECKPOINTED_BF16, out="off") == \
        {"forwards": 2, "dtypes": {torch.float32}}  # what the test above would then see, and fail on


def test_bad_method_option_fails_before_any_work(tiny_config, tmp_path):

    with pytest.raises(ConfigError, match="unknown key method.nrca.lambda"):
        train(tiny_config("method.name=nrca", "method.nrca.lambda=2", out="typo"))
    assert not (tmp_path / "typo" / "synthetic").exists()


def _pretend_fsdp2(monkeypatch) -> None:
    """The run's engine named FSDP2 (Engine.of: the one place an engine is named) in one CPU process."""
    from mmtune.engine import Engine

    monkeypatch.setattr(Engine, "of", classmethod(lambda cls, accelerator: cls("fsdp2")))


def test_sharded_engine_bookkeeping(tiny_config, monkeypatch):
    """What the loop does differently when an engine shards parameters (FSDP2 / ZeRO-3), exercised in one
    process: Accelerate enables FSDP on accelerators only, so CI can't shard the whole loop (SPIDER's own
    sharded math runs on real FSDP2 shards in tests/methods/test_spider_sharded.py)."""
    _pretend_fsdp2(monkeypatch)
    from mmtune.methods.base import METHODS, Method

    class Unsharded(Method):  # every registered method runs on shards; one that does not declare it is refused
        name = "unsharded"
        sharding_refusal = "it keeps whole tensors"

    monkeypatch.setitem(METHODS, "unsharded", Unsharded)
    with pytest.raises(ValueError, match="unsharded can't run with parameters sharded.*it keeps whole tensors"):
        train(tiny_config("method.name=unsharded", out="refused"))
    evaluated = ["eval.downstream=['synthetic:detailed_caption']", "eval.limit=4", "eval.max_new_tokens=4"]
    full = train(tiny_config("train.max_steps=4", "train.save_every=2", *evaluated, out="full"))
    checkpoint = full / "checkpoints" / "step-000002"
    assert (checkpoint / "mmtune_methods_rank0.pt").is_file()  # method state: one file per process
    assert (full / "eval" / "base" / "scores.json").is_file()  # base: evaluated before sharding
    assert (full / "eval" / "final" / "scores.json").is_file()  # final: the saved model, reloaded
    resumed = train(tiny_config("train.max_steps=4", f"train.resume_from={checkpoint}", out="resumed"))
    assert losses(resumed) == losses(full)[2:]
    wf, wr = final_weights(full), final_weights(resumed)
    for name in wf:
        assert torch.equal(wf[name], wr[name]), name


def test_spider_refuses_shards_it_cannot_see(tiny_config, monkeypatch):
    # FSDP1's flat parameters are plain tensors: SPIDER can't find the rest of each tensor.
    _pretend_fsdp2(monkeypatch)
    with pytest.raises(ValueError, match="Use FSDP2"):
        train(tiny_config("method.name=spider", out="refused"))


def test_idefics3_trains_with_nrca_and_spider_and_evaluates(tiny_config):
    """SmolVLM's architecture (Idefics3: pixel-shuffle connector, text_model blocks) end to end: scope, NRCA's
    noisy pass over its image tiles, SPIDER, generation in the evaluation, reload."""
    run = train(tiny_config("model.tiny=idefics3", "method.name=nrca+spider", "train.max_steps=2",
                            "eval.downstream=['synthetic:detailed_caption']", "eval.limit=4",
                            "eval.max_new_tokens=4"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["nrca_gap"] > 0 for r in rows)
    assert (run / "eval" / "final" / "scores.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert model.config.model_type == "idefics3"
    processor = AutoProcessor.from_pretrained(run / "final")
    assert type(processor).__name__ == "Idefics3Processor"


def test_spider_on_bf16_parameters_keeps_w0_in_bf16(tiny_config, tmp_path):
    """Without fp32 masters (train.fp32_masters=false) SPIDER works on the bf16 weights themselves."""
    from mmtune.data.synthetic import vocabulary
    from mmtune.models.tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llava", words=vocabulary())
    run = train(tiny_config("model.tiny=null", f"model.path={base}", "model.dtype=bf16", "train.fp32_masters=false", "method.name=spider",
                            "train.max_steps=2", "train.save_every=1"))
    state = torch.load(run / "checkpoints" / "step-000001" / "mmtune_methods.pt", weights_only=True)["spider"]
    assert all(w0.dtype == torch.bfloat16 for w0 in state["pretrained"].values())  # exact, half the memory
    assert all(g.dtype == torch.float32 for g in state["grad_sum"].values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)






def test_a_bad_model_path_fails_before_any_data_is_generated(tiny_config, tmp_path):
    world = tmp_path / "fresh-world"
    config = tiny_config("model.tiny=null", f"model.path={tmp_path / 'no-such-model'}", f"data.synthetic.dir={world}")
    with pytest.raises(FileNotFoundError, match="no-such-model: not a Hugging Face model folder"):
        train(config)
    assert not world.exists()


def test_one_learning_rate_sets_both_groups(tiny_config):
    one = train(tiny_config("train.learning_rate=0.003", "train.max_steps=3", out="one"))
    two = train(tiny_config("scope.lr_blocks=0.003", "scope.lr_projector=0.003", "train.max_steps=3", out="two"))
    assert losses(one) == losses(two)
    for name, weight in final_weights(one).items():
        torch.testing.assert_close(weight, final_weights(two)[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("scheduler", ["linear", "constant"])
def test_scheduler_choices(tiny_config, scheduler):
    run = train(tiny_config(f"train.scheduler={scheduler}", "train.warmup_ratio=0.25", "train.max_steps=8",
                            "scope.lr_blocks=0.01", out=scheduler))
    lrs = losses(run, "lr")  # the learning rate after each step (the LLM blocks' group)
    assert lrs[0] == pytest.approx(0.005)  # after step 1: half-way through the 2 warm-up steps
    if scheduler == "constant":
        assert lrs[1:] == pytest.approx([0.01] * 7)
    else:
        assert lrs[1:] == pytest.approx([0.01 * (8 - k) / 6 for k in range(2, 9)])


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_optimizer_choices_train(tiny_config, optimizer):
    run = train(tiny_config(f"train.optimizer={optimizer}", "train.max_steps=3", "scope.lr_blocks=0.05",
                            out=optimizer))
    adamw = train(tiny_config("train.max_steps=3", "scope.lr_blocks=0.05", out=f"adamw-{optimizer}"))
    assert all(math.isfinite(v) for v in losses(run)) and losses(run)[0] == losses(adamw)[0]
    assert losses(run)[1:] != losses(adamw)[1:]  # another optimizer moved the weights differently










def test_gathered_weights_of_a_wrapped_model_are_saved_under_the_final_models_names():
    """On a sharding engine final/ is written from the engine's gathered state, which for LoRA is PEFT's wrapper's
    (every key prefixed ``base_model.model.``) while the final model is the unloaded one: saved as they come, the
    weights would not load into final/ (transformers would initialise them at random)."""
    from mmtune.data.synthetic import vocabulary
    from mmtune.methods import METHODS
    from mmtune.models.scope import apply_scope
    from mmtune.models.tiny import build_tiny
    from mmtune.train import keyed_as

    model, _ = build_tiny("llava", words=vocabulary(), seed=0)
    wrapped = METHODS["lora"]().prepare_model(model, apply_scope(model, train_projector=True, last_n_blocks=2))
    final = wrapped.merge_and_unload()
    gathered = wrapped.state_dict()  # what the engine's model gives after on_train_end
    assert not set(gathered) & set(final.state_dict())
    keyed = keyed_as(gathered, final)
    assert set(keyed) == set(final.state_dict())
    assert all(torch.equal(keyed[k], v) for k, v in final.state_dict().items())
    state = final.state_dict()
    assert keyed_as(state, final) is state  # already keyed: as it is
    with pytest.raises(RuntimeError, match="don't name the final model's"):
        keyed_as({"something.else": torch.zeros(1)}, final)


def test_records_an_epoch_leaves_out_are_said(tiny_config, capsys):
    """32 records in batches of 5 with grad_accum 2: 3 steps of 10 records, 2 left out of every epoch — said once."""
    train(tiny_config("train.batch_size=5", "train.grad_accum=2", "train.max_steps=1"))
    out = capsys.readouterr().out
    assert "each epoch trains 3 steps of 10 records: 2 of its 32 records fill no whole step" in out
    train(tiny_config("train.batch_size=4", "train.max_steps=1", out="even"))
    assert "fill no whole step" not in capsys.readouterr().out


def test_an_fsdp_launch_that_accelerate_turns_into_another_engine_is_said(tiny_config, monkeypatch, capsys):
    """`accelerate launch --use_fsdp` on a CPU: Accelerate trains without FSDP and says nothing; mmtune says it."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    train(tiny_config("train.max_steps=1"))
    assert "accelerate launch asked for FSDP, but Accelerate enables FSDP on GPUs only: this run trains with" in \
        capsys.readouterr().out
