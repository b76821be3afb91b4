"""The contract at the level of one optimizer step, for every registered method at its defaults — the checks that
see a method switched off (a loss term detached, another method's terms dropped by a step builder). Each check is a
function returning what it found wrong; the mutation tests at the end switch a method off and watch the check fail.
"""

import pytest
import torch

from helpers import assembled, move_off_pretrained, nth_micro, step_gradient
from mmtune.losses import compute_losses
from mmtune.methods import METHODS
from mmtune.step import Step, train_step

# A step builder or a loss balancer, each beside a loss-term method (l2_reg, strong so its gradient is visible).
BUILDERS = sorted(n for n, cls in METHODS.items() if cls().builds_own_step)


def _config(tiny_config, names: str, *overrides: str, out: str):
    return tiny_config(f"method.name={names}", *overrides, out=out)


def term_gradient_problems(run) -> list[str]:
    """Each named loss term a method adds must carry a gradient to what trains (a detached term is a method off)."""
    ctx, micro = run.ctx, nth_micro(run)
    params = list(ctx.trainable.values())
    with run.accelerator.autocast():
        terms, _ = compute_losses(ctx, run.methods, micro[0], run.config.train.loss_reduction)
    problems = []
    for key, value in terms.items():
        if key == "ce":
            continue
        if not value.requires_grad:
            problems.append(f"{key}: no gradient (detached)")
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        if sum(float(g.abs().sum()) for g in grads if g is not None) == 0:
            problems.append(f"{key}: zero gradient on every trainable tensor")
    return problems


def two_steps(tiny_config, names: str, *overrides: str, out: str) -> dict[str, torch.Tensor]:
    """The model after two optimizer steps of ``names`` and their ``on_train_end``."""
    with assembled(_config(tiny_config, names, *overrides, out=out)) as run:
        ctx = run.ctx
        for index in range(2):
            train_step(ctx, run.methods, nth_micro(run, index), run.optimizer, run.scheduler, run.config.train)
        ctx.final_model = ctx.unwrapped
        for method in run.methods:
            method.on_train_end(ctx)
        return {k: v.detach().clone() for k, v in ctx.final_model.state_dict().items()}


def added_term_problems(tiny_config, builder: str) -> list[str]:
    """A step builder must keep the other methods' loss terms: with l2_reg beside it the step's gradient changes,
    by exactly l2_reg's gradient where the builder adds the other terms after combining (all but sam, whose
    second gradient is taken at weights the term also moved)."""
    grads = {}
    for names in (builder, f"{builder}+l2_reg"):
        strong = ["method.l2_reg.lam=10"] if "l2_reg" in names else []
        with assembled(_config(tiny_config, names, *strong, out=names)) as run:
            move_off_pretrained(run)
            grads[names] = step_gradient(run, nth_micro(run))
            if names != builder:
                l2 = next(m for m in run.methods if m.name == "l2_reg")
                penalty = l2.extra_losses(run.ctx, None, None, None)["l2_reg"]
                l2_grads = dict(zip(run.ctx.trainable, torch.autograd.grad(penalty, list(run.ctx.trainable.values())),
                                    strict=True))
    alone, with_term = grads[builder], grads[f"{builder}+l2_reg"]
    difference = {n: with_term[n] - alone[n] for n in alone}
    if all(float(d.abs().sum()) == 0 for d in difference.values()):
        return [f"{builder}: the step's gradient ignores l2_reg's term"]
    if builder == "sam":
        return []
    return [f"{builder}: the step's gradient differs from the one without l2_reg by more than l2_reg's gradient at {n}"
            for n in difference if not torch.allclose(difference[n], l2_grads[n], rtol=1e-4, atol=1e-7)][:1]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_named_loss_term_reaches_what_trains(tiny_config, name):
    with assembled(_config(tiny_config, name, out=name)) as run:
        move_off_pretrained(run)
        assert term_gradient_problems(run) == []


def test_every_method_at_its_defaults_changes_two_steps(tiny_config):
    vanilla = two_steps(tiny_config, "vanilla", out="vanilla")
    same = [name for name in sorted(set(METHODS) - {"vanilla"})
            if all(torch.equal(vanilla[k], w) for k, w in two_steps(tiny_config, name, out=name).items())]
    assert same == [], f"at their defaults these methods trained exactly as vanilla: {same}"


@pytest.mark.parametrize("builder", BUILDERS)
def test_step_builders_keep_the_other_methods_loss_terms(tiny_config, builder):
    assert added_term_problems(tiny_config, builder) == []


# --- mutations: switch a method off, and the checks above must see it ----------------------------------------------

def test_mutation_a_detached_penalty_is_seen(tiny_config, monkeypatch):
    from mmtune.methods.l2_reg import L2Reg

    real = L2Reg.extra_losses
    monkeypatch.setattr(L2Reg, "extra_losses", lambda self, *a: {k: v.detach() for k, v in real(self, *a).items()})
    with assembled(_config(tiny_config, "l2_reg", out="mutant")) as run:
        move_off_pretrained(run)
        assert term_gradient_problems(run) == ["l2_reg: no gradient (detached)"]


@pytest.mark.parametrize("builder", ["pcgrad", "cagrad", "task_sam"])
def test_mutation_a_builder_dropping_the_other_terms_is_seen(tiny_config, monkeypatch, builder):
    real = Step.task_gradients

    def without_other_terms(self, only=None, log=False):
        task_grads, extra = real(self, only, log)
        return task_grads, torch.zeros_like(extra)

    monkeypatch.setattr(Step, "task_gradients", without_other_terms)
    assert added_term_problems(tiny_config, builder) == [f"{builder}: the step's gradient ignores l2_reg's term"]


def test_mutation_a_method_whose_hooks_do_nothing_is_seen(tiny_config, monkeypatch):
    from mmtune.methods.spider import Spider

    monkeypatch.setattr(Spider, "before_optimizer_step", lambda self, ctx: None)
    monkeypatch.setattr(Spider, "after_optimizer_step", lambda self, ctx: None)
    vanilla = two_steps(tiny_config, "vanilla", out="vanilla")
    mutant = two_steps(tiny_config, "spider", out="mutant")
    assert all(torch.equal(vanilla[k], w) for k, w in mutant.items())  # what the defaults test calls "same"
