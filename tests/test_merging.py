"""Model merging: each rule against a hand-computed case, and streaming folder merges against a direct in-memory
computation (3 runs, sharded output, loadable with from_pretrained)."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmtune.data.synthetic import vocabulary
from mmtune.merging import (
    MergeRecipe,
    breadcrumb_mask,
    dare,
    merge_folders,
    merge_state_dicts,
    task_arithmetic,
    ties,
    trim_top,
)
from mmtune.models.tiny import save_tiny


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0])
    out = task_arithmetic(base, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, -2.0])], lam=0.5)
    assert out.tolist() == [2.0, 1.0]


def test_ties_by_hand():
    deltas = [torch.tensor([3.0, -1.0, 0.5, 0.0]), torch.tensor([-2.0, -2.0, 1.0, 0.0]),
              torch.tensor([1.0, 4.0, -0.2, 0.0])]
    assert trim_top(deltas[0], 0.5).tolist() == [3.0, -1.0, 0.0, 0.0]
    # trimmed: [3,-1,0,0], [-2,-2,0,0], [1,4,0,0]; elected signs (+,+,0,0); disjoint means: (3+1)/2, 4
    assert ties(torch.zeros(4), deltas, lam=1.0, density=0.5).tolist() == [2.0, 4.0, 0.0, 0.0]


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    delta = torch.tensor([0.1, 5.0, 1.0, 2.0, 0.2, 3.0, 0.05, 4.0, 0.3, 0.4])
    kept = delta[breadcrumb_mask(delta, beta=0.1, gamma=0.5)]
    assert sorted(kept.tolist()) == [1.0, 2.0, 3.0, 4.0]


def test_dare_drops_and_rescales():
    generator = torch.Generator().manual_seed(0)
    delta = torch.ones(10000)
    out = dare(delta, 0.9, generator)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 10.0)) and 800 < kept.numel() < 1200
    assert out.mean().item() == pytest.approx(1.0, abs=0.1)  # unbiased in expectation


def _models(tmp_path, count=3):
    """A tiny base and `count` "fine-tuned" copies: the base plus a different random change each."""
    base = save_tiny(tmp_path / "base", "llava", words=vocabulary())
    folders = []
    for index in range(count):
        model = AutoModelForImageTextToText.from_pretrained(base)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        folder = tmp_path / f"run{index}" / "final"
        model.save_pretrained(folder)
        folders.append(folder)
    return base, folders


def _files(folder):
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("recipe", [MergeRecipe("task_arithmetic", lam=0.4), MergeRecipe("ties", density=0.2),
                                    MergeRecipe("breadcrumbs", lam=0.4), MergeRecipe("ties", dare_p=0.5, seed=3)],
                         ids=["task_arithmetic", "ties", "breadcrumbs", "dare+ties"])
def test_streamed_merge_of_three_runs_equals_the_direct_computation(tmp_path, recipe):
    base, runs = _models(tmp_path)
    out = merge_folders(base, runs, tmp_path / "merged", recipe, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    # the direct computation, on the tensors as the files store them (DARE's mask is seeded by the stored name)
    expected = merge_state_dicts(_files(base), [_files(r) for r in runs], recipe)
    merged = _files(out)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    AutoModelForImageTextToText.from_pretrained(out)  # a model folder transformers loads
    assert json.loads((out / "merge_recipe.json").read_text())["rule"] == recipe.rule
    assert not (tmp_path / "merged.partial").exists()


def test_models_of_another_architecture_are_refused(tmp_path):
    base, runs = _models(tmp_path, 1)
    other = save_tiny(tmp_path / "other", "llava", words=vocabulary(), num_layers=3)
    with pytest.raises(ValueError, match="hold different tensors"):
        merge_folders(base, [runs[0], other], tmp_path / "merged", MergeRecipe())


@pytest.mark.parametrize("options, message", [({"rule": "mean"}, "merge rule"), ({"density": 1.5}, "density"),
                                              ({"dare_p": 1.0}, "dare_p"), ({"beta": 0.5, "gamma": 0.5}, "drops")])
def test_recipe_checks(options, message):
    with pytest.raises(ValueError, match=message):
        MergeRecipe(**options)


def test_merge_command(tmp_path, capsys):
    from mmtune.cli import main

    base, runs = _models(tmp_path)
    args = ["merge", *(str(r.parent) for r in runs), "--rule", "ties", "--base", str(base), "--out",
            str(tmp_path / "ties"), "--density", "0.5", "--dare-p", "0.3"]
    assert main(args) == 0
    expected = merge_state_dicts(_files(base), [_files(r) for r in runs], MergeRecipe("ties", density=0.5, dare_p=0.3))
    merged = _files(tmp_path / "ties")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never silently overwrites
    assert main(["merge", str(runs[0].parent), str(runs[1].parent), "--alpha", "0.5"]) == 2
    assert "need --rule" in capsys.readouterr().err
