"""EWC: the Fisher is per record (not the square of a batch gradient), normalised, and weighs the pull to W0."""

import pytest
import torch

from helpers import assembled
from mmtune.data.collate import KEEP, model_inputs, subset_batch
from mmtune.losses import sample_cross_entropy
from mmtune.methods.ewc import diagonal_fisher, ewc_penalty, normalized


def test_penalty_and_normalisation_by_hand():
    fisher = normalized({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0])})
    torch.testing.assert_close(fisher["a"], torch.tensor([1.0, 3.0]))  # mean over all 4 entries is 1
    trainable = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0, 5.0])}
    pretrained = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0, 0.0])}
    # (1·1² + 3·2² + 0 + 0) / 4 entries: b moves freely, a's second entry is held three times as hard
    assert ewc_penalty(trainable, pretrained, fisher).item() == pytest.approx(13 / 4)
    assert normalized({"a": torch.zeros(2)})["a"].sum() == 0


def test_fisher_is_the_mean_of_per_record_squared_gradients(tiny_config):
    with assembled(tiny_config("method.name=ewc", "method.ewc.samples=3")) as run:
        ctx, batch = run.ctx, next(iter(run.loader))
        fisher = diagonal_fisher(ctx, [batch], samples=3)
        params = dict(ctx.trainable)
        expected = {name: torch.zeros_like(p) for name, p in params.items()}
        for row in range(3):
            one = subset_batch(batch, torch.tensor([row]))
            loss = sample_cross_entropy(run.model(**model_inputs(one)).logits, one["labels"], one.get(KEEP)).sum()
            for name, grad in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                expected[name] += grad.pow(2) / 3
        for name in params:
            torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-12)
        # not the square of the batch's mean gradient (what a cheaper estimate would give)
        loss = sample_cross_entropy(run.model(**model_inputs(subset_batch(batch, torch.arange(3)))).logits,
                                    batch["labels"][:3], batch.get(KEEP)).mean()
        squared = {n: g.pow(2) for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)}
        assert sum(float((fisher[n] - squared[n]).abs().sum()) for n in params) > 1e-3 * sum(
            float(fisher[n].sum()) for n in params)
        assert run.methods[0].fisher.keys() == params.keys()  # setup estimated it, normalised
        total = sum(float(v.sum()) for v in run.methods[0].fisher.values())
        assert total / sum(v.numel() for v in params.values()) == pytest.approx(1.0, rel=1e-4)
