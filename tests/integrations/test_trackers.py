"""train.report_to: every loss term, lr, grad norm and the evaluations during training reach each tracker
(Accelerate's tracking API), in their offline modes: TensorBoard files, W&B offline, MLflow's file store."""

import json

import pytest

from mmtune.config import ConfigError
from mmtune.train import train

pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def test_every_tracker_gets_losses_lr_and_evaluations(tiny_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train(tiny_config("train.report_to=[tensorboard, wandb, mlflow]", "method.name=l2_reg", "train.max_steps=4",
                            "eval.every_steps=2", "eval.during_limit=2", "eval.max_new_tokens=3",
                            "eval.downstream=['synthetic:count_mc']", "eval.heldout=['synthetic:color_vqa']",
                            "eval.limit=2"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/l2_reg", "train/lr", "train/grad_norm"} <= tags
    assert any(t.startswith("eval/") and t.endswith("H") for t in tags), tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B offline run, syncable later

    mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
    (found,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    history = mlflow.tracking.MlflowClient().get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in rows if "loss" in r])


def test_report_to_names_known_trackers(tiny_config):
    with pytest.raises(ConfigError, match="train.report_to: 'comet'"):
        tiny_config("train.report_to=[comet]")


def test_a_tracker_named_on_purpose_must_be_installed(tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="train.report_to names wandb, which is not installed"):
        train(tiny_config("train.report_to=[wandb]"))
