"""Evaluation during training (mmtune.during_training): rows by step, the best model, early stopping."""

import json

import pytest

from mmtune.config import ConfigError
from mmtune.train import train


def test_evaluation_during_training_logs_the_trade_off_by_step(tiny_config):
    run = train(tiny_config("train.max_steps=4", "eval.every_steps=2", "eval.during_limit=3", "eval.limit=3",
                            "eval.max_new_tokens=3", "eval.downstream=['synthetic:count_mc', 'synthetic:detailed_caption']",
                            "eval.heldout=['synthetic:color_vqa']", "eval.sample_temperature=1.0"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"S", "G", "H", "S/base", "G/base", "tasks", "val_loss", "confidence_gap"} <= evals[0]["eval"].keys()
    # NRCA's diagnostic split where the records name their image words (the synthetic captions), not elsewhere
    # ... and the hallucination rate (greedy and sampled) where the records list what each image holds
    for key in ("confidence_gap_image", "confidence_gap_template", "sampled", "hallucination", "sampled_hallucination"):
        assert set(evals[0]["eval"][key]) == {"detailed_caption"}  # sampled: open-response tasks only
    assert 0 <= evals[0]["eval"]["hallucination"]["detailed_caption"] <= 100
    assert (run / "report" / "tasks_over_steps.png").is_file()
    assert (run / "eval" / "during" / "base" / "scores.json").is_file()
    assert json.loads((run / "eval" / "during" / "step-000004" / "scores.json").read_text())["tasks"]["count_mc"]["n"] == 3
    assert (run / "report" / "s_g_over_steps.png").is_file()


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
    # issue 36 (10): the primary summaries are offered too (H/adj was once refused)
    with pytest.raises(ValueError, match="train.best_metric='Q' is not in the evaluation; choose one of S, G, H, .*"
                                         "G/adj, H/adj, S/head, H/head"):
        train(tiny_config("eval.every_steps=1", "eval.during_limit=2", "eval.limit=2", "eval.max_new_tokens=2",
                          "eval.downstream=['synthetic:count_mc']", "eval.heldout=['synthetic:color_vqa']",
                          "train.best_metric=Q", "train.max_steps=2"))
