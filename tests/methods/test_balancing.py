"""Uncertainty weighting and FAMO: the published formulas on hand-computed cases, and the loop's balancing hook
(one task: both are the plain loss, so they train exactly as vanilla with ``loss_reduction=sample``)."""

import json
import math

import pytest
import torch

from helpers import final_weights, losses
from mmtune.methods.balancing import famo_logit_gradient, famo_loss, uncertainty_weighted_loss
from mmtune.train import train


def test_uncertainty_weighting_by_hand():
    task_losses = torch.tensor([2.0, 0.5])
    log_vars = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    loss = uncertainty_weighted_loss(task_losses, log_vars)
    # e^0·2 + 0 + e^{-ln 2}·0.5 + ½ ln 2
    assert float(loss) == pytest.approx(2.0 + 0.25 + 0.5 * math.log(2.0))
    loss.backward()
    # d/ds = -e^{-s}·L + ½: [-2 + ½, -¼ + ½]
    assert log_vars.grad.tolist() == pytest.approx([-1.5, 0.25])


def test_famo_loss_weighs_each_task_by_its_inverse_loss():
    task_losses = torch.tensor([1.0, 4.0], requires_grad=True)
    loss = famo_loss(task_losses, torch.zeros(2), floor=0.0)
    # z = (½, ½), c = ½/1 + ½/4 = 0.625; loss = ½·ln 4 / 0.625
    assert float(loss) == pytest.approx(0.5 * math.log(4.0) / 0.625)
    loss.backward()
    # ∂/∂L_i = z_i / (c·L_i): 0.8 and 0.2 (they sum to 1)
    assert task_losses.grad.tolist() == pytest.approx([0.8, 0.2])


def test_famo_logit_gradient_by_hand():
    # z = (½, ½): J = [[¼, -¼], [-¼, ¼]]; task 0's log loss fell by 1, task 1's not at all: Jᵀδ = (¼, -¼)
    grad = famo_logit_gradient(torch.zeros(2), torch.tensor([math.e, 1.0]), torch.tensor([1.0, 1.0]), floor=0.0)
    assert grad.tolist() == pytest.approx([0.25, -0.25])  # a descent step moves weight to task 1


ONE_TASK = ["data.tasks=[{path: 'synthetic:detailed_caption', n: 16}]", "train.loss_reduction=sample",
            "train.max_steps=3", "train.optimizer=sgd", "train.max_grad_norm=null"]  # SGD: the loss's scale shows


@pytest.mark.parametrize("name", ["uncertainty", "famo"])
def test_one_task_is_the_plain_loss(tiny_config, name):
    """With one task, uncertainty weighting (its weight not learned: lr = 0) is e^0·L = L, and FAMO's gradient
    coefficient z/(c·L) is 1: both train exactly as vanilla (sample-mean loss), which checks the loop's hook: the
    balanced loss replaces the cross-entropy and nothing else changes."""
    vanilla = train(tiny_config(*ONE_TASK, out="vanilla"))
    balanced = train(tiny_config(f"method.name={name}", f"method.{name}.lr=0", *ONE_TASK, out=name))
    assert losses(balanced, "ce") == pytest.approx(losses(vanilla, "ce"), rel=1e-6)
    one, two = final_weights(vanilla), final_weights(balanced)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7, msg=key)


def test_uncertainty_learns_a_weight_per_task_and_reports_it(tiny_config):
    run = train(tiny_config("method.name=uncertainty", "train.max_steps=4"))
    report = json.loads((run / "uncertainty_task_weights.json").read_text())
    assert set(report["tasks"]) == {"detailed_caption", "count_mc"}
    assert all(v != 0.0 for v in report["log_variances"].values())  # s moved from its start at 0
    # logged: the plain cross-entropy, and what balancing adds to it
    ce, extra, total = losses(run, "ce"), losses(run, "uncertainty"), losses(run)
    assert total == pytest.approx([a + b for a, b in zip(ce, extra, strict=True)])


def test_famo_moves_weight_between_tasks(tiny_config):
    run = train(tiny_config("method.name=famo", "train.max_steps=4"))
    weights = json.loads((run / "famo_task_weights.json").read_text())["tasks"]
    # the file rounds each weight to 6 decimals: their sum is 1 within half a unit of that per task
    assert sum(weights.values()) == pytest.approx(1.0, rel=0, abs=len(weights) * 5e-7 + 1e-12)
    assert weights["count_mc"] != pytest.approx(0.5, abs=1e-6)  # the logits took steps


@pytest.mark.parametrize("names, message", [
    ("uncertainty+famo", "only one method may balance"),
    ("pcgrad+famo", "not tested together"),
    ("sam+uncertainty", "not tested together"),
    ("pcgrad+sam", "not tested together"),
])
def test_builders_of_the_step_do_not_stack(tiny_config, names, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(f"method.name={names}"))


def test_the_trainer_integration_refuses_what_only_the_loop_can_do():
    from mmtune.integrations.hf_trainer import MethodTrainer
    from mmtune.methods import FAMO, PCGrad, TaskSAM

    for method in (FAMO(), PCGrad(), TaskSAM()):
        with pytest.raises(ValueError, match="mmtune's own training loop"):
            MethodTrainer(model=None, methods=[method])
