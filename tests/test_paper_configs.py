"""configs/papers/: one run config per experiment of the two papers, each loaded, checked against the shared recipe
of the spec, and dry-run here with the model swapped for a tiny one and each data set for a synthetic task of the
same kind (open-response or multiple choice)."""

from pathlib import Path

import pytest

from mmtune.config import load_config
from mmtune.train import train

PAPERS = Path(__file__).resolve().parents[1] / "configs" / "papers"
CONFIGS = sorted(PAPERS.glob("*.yaml"))
CAPTIONS, CHOICES = ("flickr30k", "coco"), ("scienceqa", "iconqa")


def test_one_config_per_experiment():
    names = {p.stem for p in CONFIGS}
    assert names == {f"{m}_llava15_{mix}" for m in ("nrca", "spider")
                     for mix in ("flickr30k_scienceqa", "coco_iconqa", "four_tasks")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_follows_the_shared_recipe(path):
    config = load_config(path)
    assert config.method.name == path.stem.split("_")[0]
    scope, train_ = config.scope, config.train
    assert (scope.train_projector, scope.last_n_blocks, scope.full) == (True, 2, False)
    assert (scope.lr_blocks, scope.lr_projector) == (2e-4, 2e-5)
    assert (train_.weight_decay, train_.warmup_ratio, train_.mixed_precision) == (0.0, 0.03, "bf16")
    assert train_.batch_size * train_.grad_accum * 8 == 16  # the papers' 16 per step on 8 GPUs
    assert train_.epochs in (3, 5) and config.data.max_length == 2048 and config.model.gradient_checkpointing
    assert train_.loss_reduction == {"nrca": "sample", "spider": "token"}[config.method.name]
    assert all(t.n == 10000 for t in config.data.tasks)
    assert len(config.eval.heldout) == 4 and config.eval.max_new_tokens == 128
    if config.method.name == "nrca":
        assert config.method.options["nrca"] == {"lam": 2.0, "delta": 0.5, "open_rule": "tokens"}
    sets = [Path(t.path).stem.removesuffix("_train") for t in config.data.tasks]
    assert any(s in CAPTIONS for s in sets) and any(s in CHOICES for s in sets)


def _synthetic(path: str) -> str:
    name = Path(path).stem.split("_")[0]
    return "synthetic:detailed_caption" if name in CAPTIONS else "synthetic:count_mc" if name in CHOICES \
        else "synthetic:color_vqa"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_dry_runs_with_a_tiny_model(path, world, tmp_path):
    config = load_config(path)
    tasks = ", ".join(f"{{path: '{_synthetic(t.path)}', n: 8}}" for t in config.data.tasks)
    run = train(load_config(path, [
        "model.path=", "model.tiny=llava", "model.dtype=fp32", "train.mixed_precision=no",
        f"data.tasks=[{tasks}]", f"data.synthetic.dir={world}", "data.synthetic.n_train=128", "data.synthetic.n_test=32",
        "data.synthetic.image_size=32", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2", "train.progress=false", "train.save_every=null",
        f"eval.downstream=[{', '.join(repr(_synthetic(p.path)) for p in config.eval.downstream)}]",
        f"eval.heldout=[{', '.join(repr(_synthetic(p.path)) for p in config.eval.heldout)}]",
        "eval.limit=2", "eval.max_new_tokens=4", "eval.before=false"]))
    assert (run / "final" / "config.json").exists() and (run / "eval" / "final" / "scores.json").exists()
