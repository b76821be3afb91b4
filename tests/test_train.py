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


def test_refuses_to_write_over_another_run(tiny_config):
    train(tiny_config())
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny_config())
    train(tiny_config("train.overwrite=true"))  # explicit consent


def metric_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_gradient_accumulation_2x4_matches_8x1(tiny_config, reduction):
    # The micro-batches hold different numbers of target tokens: the token mean must count the whole step's.
    a = train(tiny_config("train.batch_size=4", "train.grad_accum=2", "train.max_steps=2",
                          f"train.loss_reduction={reduction}", out="accum"))
    b = train(tiny_config("train.batch_size=8", "train.grad_accum=1", "train.max_steps=2",
                          f"train.loss_reduction={reduction}", out="batch"))
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)


def test_the_two_loss_reductions_differ_by_hand():
    """token: Σ token losses / #tokens; sample: mean over samples of each sample's token mean."""
    from types import SimpleNamespace

    from mmtune.losses import compute_losses

    logits = torch.zeros(2, 4, 3)  # uniform over 3 tokens: every target token costs log 3
    logits[0, 0, 1] = 5.0  # sample 0's first target is easy
    labels = torch.tensor([[-100, 1, 2, 0], [-100, 2, -100, -100]])  # 3 target tokens, then 1
    model = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    ctx = SimpleNamespace(model=model)
    batch = {"labels": labels, "input_ids": labels}
    easy = -torch.log_softmax(logits[0, 0], -1)[1]
    log3 = torch.log(torch.tensor(3.0))
    token = compute_losses(ctx, [], batch, "token")[0]["ce"]
    sample = compute_losses(ctx, [], batch, "sample")[0]["ce"]
    torch.testing.assert_close(token, (easy + 3 * log3) / 4)
    torch.testing.assert_close(sample, ((easy + 2 * log3) / 3 + log3) / 2)


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    full = train(tiny_config("train.max_steps=6", "train.save_every=3", out="full"))
    checkpoint = full / "checkpoints" / "step-000003"
    assert checkpoint.is_dir()
    resumed = train(tiny_config("train.max_steps=6", f"train.resume_from={checkpoint}", out="resumed"))
    wf, wr = final_weights(full), final_weights(resumed)
    for name in wf:
        assert torch.equal(wf[name], wr[name]), name
    assert losses(resumed) == losses(full)[3:]


def test_resume_latest_in_the_same_folder(tiny_config):
    import shutil

    run = train(tiny_config("train.max_steps=4", "train.save_every=2", out="same"))
    before, rows = final_weights(run), metric_rows(run)
    shutil.rmtree(run / "final")  # as if killed after the step-2 checkpoint, with steps 3-4 logged
    (run / "train_summary.json").unlink()
    train(tiny_config("train.max_steps=4", "train.resume_from=latest", out="same"))
    after = final_weights(run)
    for name in before:
        assert torch.equal(before[name], after[name])
    assert metric_rows(run) == rows  # redone steps replace their rows: no duplicates


def test_skip_bad_records_counts_them_in_the_summary(tiny_config, tmp_path, world):
    lines = (world / "count_mc_train.jsonl").read_text().splitlines()[:12]
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(world / row["image"])
    rows[3]["image"] = "missing.png"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    with pytest.raises(Exception, match="bad.jsonl:4: image not found"):
        train(tiny_config(f"data.tasks=[{{path: '{bad}'}}]", out="strict"))
    run = train(tiny_config(f"data.tasks=[{{path: '{bad}'}}]", "data.skip_bad_records=true", out="lenient"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["skipped_records"] == 2 and summary["records"] == 11


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


def test_gradient_checkpointing_and_bf16_autocast_train(tiny_config):
    run = train(tiny_config("model.gradient_checkpointing=true", "train.mixed_precision=bf16", "train.max_steps=2"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


def test_bad_method_option_fails_before_any_work(tiny_config, tmp_path):
    from mmtune.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key method.nrca.lambda"):
        train(tiny_config("method.name=nrca", "method.nrca.lambda=2", out="typo"))
    assert not (tmp_path / "typo" / "synthetic").exists()


def test_sharded_engine_bookkeeping(tiny_config, monkeypatch):
    """What the loop does differently when an engine shards parameters (FSDP2 / ZeRO-3), exercised in one
    process: Accelerate enables FSDP on accelerators only, so CI can't shard the whole loop (SPIDER's own
    sharded math runs on real FSDP2 shards in tests/methods/test_spider_sharded.py)."""
    monkeypatch.setattr("mmtune.train.shards_parameters", lambda accelerator: True)
    monkeypatch.setattr("mmtune.methods.base.shards_parameters", lambda accelerator: True)
    with pytest.raises(ValueError, match="l2_reg: not tested with parameters sharded"):
        train(tiny_config("method.name=l2_reg", out="refused"))
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
    # FSDP1 flat parameters / ZeRO-3 partitions are plain tensors: SPIDER can't find the rest of each tensor.
    monkeypatch.setattr("mmtune.train.shards_parameters", lambda accelerator: True)
    monkeypatch.setattr("mmtune.methods.spider.shards_parameters", lambda accelerator: True)
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


def test_logs_without_progress_bars_get_status_lines_and_a_closing_summary(tiny_config, capsys):
    run = train(tiny_config("train.max_steps=4"))  # tiny_config sets train.progress=false
    out = capsys.readouterr().out
    assert "step 4/4 (100%)  loss" in out and "s left" in out
    assert f"final model  {run / 'final'}" in out and f"metrics      {run / 'metrics.jsonl'}" in out


def test_evaluation_during_training_logs_the_trade_off_by_step(tiny_config):
    run = train(tiny_config("train.max_steps=4", "eval.every_steps=2", "eval.during_limit=3", "eval.limit=3",
                            "eval.max_new_tokens=3", "eval.downstream=['synthetic:count_mc']",
                            "eval.heldout=['synthetic:color_vqa']"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"S", "G", "H", "S/base", "G/base", "tasks"} <= evals[0]["eval"].keys()
    assert (run / "eval" / "during" / "base" / "scores.json").is_file()
    assert json.loads((run / "eval" / "during" / "step-000004" / "scores.json").read_text())["tasks"]["count_mc"]["n"] == 3
    assert (run / "report" / "s_g_over_steps.png").is_file()


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


def test_best_checkpoint_and_early_stopping(tiny_config):
    """train.best_metric keeps the best evaluation's model in best/; early stopping ends the run after `patience`
    evaluations without a new best, and says so."""
    evaluate = ["eval.every_steps=1", "eval.during_limit=2", "eval.limit=2", "eval.max_new_tokens=2",
                "eval.downstream=['synthetic:count_mc']", "eval.heldout=['synthetic:color_vqa']"]
    # A learning rate of ~0 changes nothing: the first evaluation stays the best and the run stops after 2 more.
    run = train(tiny_config(*evaluate, "train.best_metric=H", "train.early_stopping_patience=2", "train.max_steps=8",
                            "scope.lr_blocks=1e-12", "scope.lr_projector=1e-12"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["best"]["step"] == 1 and summary["best"]["stopped_early"]
    assert (run / "best" / "config.json").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["best"]["value"] == max(r["eval"]["H"] for r in rows if "eval" in r)
    with pytest.raises(ConfigError, match="set eval.every_steps"):
        tiny_config("train.best_metric=H")
    with pytest.raises(ConfigError, match="needs train.best_metric"):
        tiny_config("train.early_stopping_patience=2")


def test_best_by_validation_loss_keeps_the_lowest(tiny_config):
    """train.best_metric=val_loss (lower is better, the Trainer's eval_loss): each evaluation row carries every task's
    validation loss; best.json keeps the lowest mean, and val_loss/<task> selects one task's."""
    evaluate = ["eval.every_steps=1", "eval.during_limit=2", "eval.limit=2", "eval.max_new_tokens=2",
                "eval.downstream=['synthetic:count_mc']", "eval.heldout=['synthetic:color_vqa']", "train.max_steps=4"]
    for metric in ("val_loss", "val_loss/count_mc"):
        run = train(tiny_config(*evaluate, f"train.best_metric={metric}", "scope.lr_blocks=0.01", out=metric))
        rows = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "eval" in json.loads(line)]
        assert all(set(r["val_loss"]) == {"count_mc", "color_vqa"} for r in rows)
        values = [sum(r["val_loss"].values()) / 2 if metric == "val_loss" else r["val_loss"]["count_mc"] for r in rows]
        best = json.loads((run / "best.json").read_text())
        assert best["value"] == pytest.approx(min(values)) and len(set(values)) > 1
        assert (run / "best" / "config.json").exists()


def test_best_state_without_a_comparable_value_says_so(tmp_path):
    """A first evaluation whose value is NaN is no best (nothing is saved) and the state still describes itself."""
    from mmtune.best import BestState, update_best

    for metric in ("H", "val_loss"):
        state, root = BestState(metric), tmp_path / metric.replace("/", "_")
        root.mkdir()
        summary = {"H": float("nan"), "val_loss": {"a": float("nan")}}
        assert not update_best(state, summary, 1, lambda folder: folder.mkdir(), root)
        assert state.describe() == "none yet" and not (root / "best").exists()
        better = {"H": 50.0, "val_loss": {"a": 0.5}}
        assert update_best(state, better, 2, lambda folder: folder.mkdir(), root)
        assert state.describe() == ("50.00 at step 2" if metric == "H" else "0.50 at step 2")


def test_best_metric_must_be_in_the_evaluation(tiny_config):
    with pytest.raises(ValueError, match="train.best_metric='Q' is not in the evaluation; choose one of S, G, H"):
        train(tiny_config("eval.every_steps=1", "eval.during_limit=2", "eval.limit=2", "eval.max_new_tokens=2",
                          "eval.downstream=['synthetic:count_mc']", "eval.heldout=['synthetic:color_vqa']",
                          "train.best_metric=Q", "train.max_steps=2"))
