"""PCGrad and CAGrad: the published math on hand-computed cases, and the loop's per-task gradients (they sum to the
vanilla gradient, so CAGrad with c = 0 is vanilla exactly)."""

import pytest
import torch

from helpers import final_weights, losses
from mmtune.methods.multitask import cagrad, pcgrad
from mmtune.train import train


def test_pcgrad_by_hand():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1·g2 = -1 < 0: g1' = g1 + ½ g2 = [.5, .5]; g2' = g2 + g1 = [0, 1]; sum [.5, 1.5]
    assert pcgrad(grads, [[1], [0]]).tolist() == [0.5, 1.5]
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert pcgrad(agreeing, [[1], [0]]).tolist() == [2.0, 1.0]  # no conflict: the plain sum


def _projected_one_vector_at_a_time(grads, order):
    """PCGrad as published: each task's gradient projected, as a vector, off every conflicting one in turn."""
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in order[i]:
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot / grads[j].pow(2).sum() * grads[j]
    return projected.sum(0)


def test_pcgrad_on_the_gram_matrix_is_the_vector_projection():
    """The rule runs on [g_i·g_j] only (what shards share); on random conflicting gradients of 4 tasks it gives the
    vector projections' result, in every projection order drawn."""
    from mmtune.methods.multitask import random_order

    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    grads[1] = -0.7 * grads[0] + 0.3 * grads[1]  # a sure conflict
    for _ in range(5):
        order = random_order(4, generator)
        expected = _projected_one_vector_at_a_time(grads, order)
        assert not torch.allclose(expected, grads.sum(0))  # the projections did something
        torch.testing.assert_close(pcgrad(grads, order), expected, rtol=1e-10, atol=1e-12)


def test_cagrad_by_hand():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # symmetric: w = (½, ½), g_w = (½, ½), λ = c; (g0 + c·g_w)/(1 + c²) = ½(1 + c)/(1 + c²) per entry
    assert cagrad(grads, 0.5).tolist() == pytest.approx([0.6, 0.6], abs=1e-4)
    assert cagrad(grads, 0.0).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)  # c = 0: the mean


def test_cagrad_at_zero_is_vanilla(tiny_config):
    """The per-task gradients of the loop sum to the vanilla gradient: CAGrad (c = 0) trains exactly as vanilla."""
    for reduction in ("token", "sample"):
        vanilla = train(tiny_config(f"train.loss_reduction={reduction}", "train.max_steps=3", "train.grad_accum=2",
                                    "train.batch_size=2", out=f"vanilla-{reduction}"))
        cag = train(tiny_config("method.name=cagrad", "method.cagrad.c=0", f"train.loss_reduction={reduction}",
                                "train.max_steps=3", "train.grad_accum=2", "train.batch_size=2", out=f"cag-{reduction}"))
        assert losses(cag) == pytest.approx(losses(vanilla), rel=1e-5)
        one, two = final_weights(vanilla), final_weights(cag)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_pcgrad_changes_the_update_and_composes_with_a_loss_method(tiny_config):
    run = train(tiny_config("method.name=pcgrad+l2_reg", "method.l2_reg.lam=1.0", "train.max_steps=3", out="pc"))
    vanilla = train(tiny_config("method.name=l2_reg", "method.l2_reg.lam=1.0", "train.max_steps=3", out="van"))
    assert losses(run)[0] == losses(vanilla)[0]  # the same weights at step 1: the same loss
    assert losses(run)[1:] != losses(vanilla)[1:]  # pcgrad's step is not vanilla's
    assert losses(run, "l2_reg")[1] > 0  # the other method's term is computed under pcgrad (its gradient: test_step_contract)


def test_two_gradient_combiners_are_refused(tiny_config):
    with pytest.raises(ValueError, match="only one method may combine"):
        train(tiny_config("method.name=pcgrad+cagrad"))


def test_sam_perturbation_by_hand():
    from mmtune.methods.sam import sam_perturbation

    eps = sam_perturbation([torch.tensor([3.0]), torch.tensor([0.0, 4.0])], rho=0.5)  # ‖g‖ = 5
    assert [e.tolist() for e in eps] == [pytest.approx([0.3]), pytest.approx([0.0, 0.4])]
    assert [e.tolist() for e in sam_perturbation([torch.zeros(2)], 0.5)] == [[0.0, 0.0]]


def test_sam_steps_with_the_gradient_at_the_perturbed_weights(tiny_config):
    """ρ = 0 recomputes the same gradient at the same weights: vanilla exactly (so the second pass, the perturb /
    restore pair and the step from the original weights add nothing of their own); ρ > 0 changes the update."""
    common = ["train.max_steps=1", "train.optimizer=sgd", "train.max_grad_norm=null", "train.warmup_ratio=0",
              "scope.lr_blocks=0.1", "scope.lr_projector=0.1"]
    sam = final_weights(train(tiny_config("method.name=sam", "method.sam.rho=0.5", *common, out="sam")))
    plain = final_weights(train(tiny_config(*common, out="plain")))
    moved = [k for k in sam if not torch.equal(sam[k], plain[k])]
    assert moved  # the second gradient differs from the first
    zero = final_weights(train(tiny_config("method.name=sam", "method.sam.rho=0", *common, out="zero")))
    assert all(torch.equal(zero[k], plain[k]) for k in plain)  # ρ = 0: the same gradient twice, vanilla exactly


def test_task_sam_combines_loss_and_flatness_parts_separately():
    from mmtune.methods import TaskSAM, TaskSAMConfig
    from mmtune.methods.base import TrainContext

    ctx = TrainContext(model=None, unwrapped=None, trainable={}, generator=torch.Generator().manual_seed(0))
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    perturbed = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])  # h = [[0, 1], [0, 0]]
    # pcgrad({g}) = [.5, 1.5] (see above); pcgrad({h}) = [0, 1] (h_2 = 0 conflicts with nothing)
    combined = TaskSAM(TaskSAMConfig(combine="pcgrad")).combine_task_gradients(ctx, grads, perturbed)
    assert combined.tolist() == [0.5, 2.5]
    summed = TaskSAM(TaskSAMConfig(combine="sum")).combine_task_gradients(ctx, grads, perturbed)
    assert summed.tolist() == perturbed.sum(0).tolist()  # no surgery: the sum of the perturbed gradients
    with pytest.raises(ValueError, match="choose one of pcgrad, cagrad, sum"):
        TaskSAMConfig(combine="mgda")


def test_task_sam_with_one_task_is_sam(tiny_config):
    """One task: its perturbation is SAM's (ρ·g/‖g‖ of the whole gradient), its gradient at W + ε is SAM's, and
    surgery over one task is the identity — so the per-task second pass must reproduce plain SAM."""
    common = ["data.tasks=[{path: 'synthetic:count_mc', n: 16}]", "train.max_steps=2", "train.optimizer=sgd",
              "train.max_grad_norm=null", "scope.lr_blocks=0.1", "scope.lr_projector=0.1"]
    sam = final_weights(train(tiny_config("method.name=sam", "method.sam.rho=0.5", *common, out="sam")))
    task = final_weights(train(tiny_config("method.name=task_sam", "method.task_sam.rho=0.5", *common, out="task")))
    plain = final_weights(train(tiny_config(*common, out="plain")))
    assert any(not torch.equal(sam[k], plain[k]) for k in plain)
    for key in sam:
        torch.testing.assert_close(task[key], sam[key], rtol=1e-5, atol=1e-6, msg=key)


def test_task_sam_perturbs_each_task_on_its_own(tiny_config):
    """Two tasks, no surgery: the step is Σ_i ∇share_i(W + ε_i) — not SAM's Σ_i ∇share_i(W + ε) with one shared ε."""
    common = ["train.max_steps=1", "train.optimizer=sgd", "train.max_grad_norm=null", "scope.lr_blocks=0.1",
              "scope.lr_projector=0.1"]
    sam = final_weights(train(tiny_config("method.name=sam", "method.sam.rho=0.5", *common, out="sam")))
    task = final_weights(train(tiny_config("method.name=task_sam", "method.task_sam.rho=0.5",
                                           "method.task_sam.combine=sum", *common, out="task")))
    assert any(not torch.allclose(task[k], sam[k], rtol=1e-4, atol=1e-6) for k in sam)
