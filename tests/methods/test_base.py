"""The extension point (mmtune.methods.base): what a method can run on is derived from what it declares, and the
0.1 step flags keep working with a deprecation."""

import pytest
import torch

from helpers import assembled, move_off_pretrained, nth_micro, step_gradient
from mmtune.engine import Engine
from mmtune.methods import FAMO, METHODS, NRCA, SAM, CAGrad, L2Reg, Lora, Method, Spider, TaskSAM
from mmtune.methods.base import refusal
from mmtune.methods.multitask import cagrad
from mmtune.methods.sam import sam_perturbation


def test_refusals_follow_the_hooks_and_declarations():
    assert refusal([NRCA(), Spider(), Lora(), L2Reg()], "trainer") is None
    assert "famo overrides balance_task_losses, build_step" in refusal([FAMO()], "trainer")
    assert "sam overrides build_step" in refusal([SAM()], "trainer")
    assert refusal([FAMO()], Engine("zero2")) is None  # its step is the plain backward: DeepSpeed runs it
    assert refusal([SAM()], Engine("zero2")) is None  # under DeepSpeed its step is built on Step's flat gradients
    assert refusal([Spider()], Engine("fsdp2")) is None
    assert refusal([L2Reg()], Engine("fsdp2")) is None  # tested on FSDP2 shards (test_methods_sharded.py)
    assert refusal([SAM()], Engine("fsdp2")) is None  # its norm and move are DTensor operations on shards
    assert refusal([TaskSAM()], Engine("fsdp2")) is None  # written on Gram matrices
    assert refusal([METHODS["ewc"]()], Engine("fsdp2")) is None  # its Fisher one record at a time through FSDP
    assert refusal([METHODS["asft"]()], Engine("fsdp2")) is None  # W0 written into the shards for its base forward

    class Untested(Method):
        name = "untested"

    assert "untested can't run with parameters sharded over processes (FSDP): it is not tested" in \
        refusal([Untested()], Engine("fsdp2"))

    class OwnStep(Method):
        name = "own_step"

        def build_step(self, step):
            step.backward()

    assert "own_step overrides build_step" in refusal([OwnStep()], "trainer")
    assert refusal([OwnStep()], Engine("zero2")) is None  # declares no gradient surgery (sets_gradients = False)

    class WritesGrad(OwnStep):
        name = "writes_grad"
        sets_gradients = True  # its build_step reads or writes param.grad itself

    assert refusal([WritesGrad()], Engine("zero2")).startswith("writes_grad: builds the step's gradient itself")


def test_the_one_compatibility_rule_takes_every_host():
    """refusal(methods, host) is the one place that decides (issue 39): the host is an Engine (mmtune's own loop on it)
    or the Trainer, with the Trainer's engine when known; the 0.x strings still work, with a deprecation."""
    reads = type("ReadsWeights", (Method,), {"name": "reads", "reads_weights_in_loss": True})
    assert refusal([L2Reg()], Engine("zero3")) is None  # its penalty is added on ZeRO-3's masters by mmtune's step
    assert "reads can't run under DeepSpeed ZeRO-3" in refusal([reads()], Engine("zero3"))
    assert refusal([reads()], Engine("zero2")) is None and refusal([reads()], Engine("ddp", 2)) is None
    assert "l2_reg: the loss term reads the trainable weights" in refusal([L2Reg()], "trainer", Engine("zero3"))
    assert "lora: merging the adapters" in refusal([Lora()], "trainer", Engine("zero3"))
    assert refusal([Lora(), L2Reg()], "trainer", Engine("zero2")) is None
    for legacy, engine in (("deepspeed", "zero2"), ("sharded", "fsdp2"), ("loop", "single")):
        with pytest.warns(DeprecationWarning, match=f'refusal\\(methods, "{legacy}"\\) is deprecated'):
            old = refusal([FAMO(), reads()], legacy)
        assert old == refusal([FAMO(), reads()], Engine(engine))
    with pytest.raises(TypeError, match="host must be an Engine or 'trainer'"):
        refusal([FAMO()], "fsdp")


def test_the_engine_is_named_once_from_the_accelerator():
    from types import SimpleNamespace

    def accelerator(distributed: str, processes: int = 1, stage: int | None = None):
        plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
        return SimpleNamespace(distributed_type=f"DistributedType.{distributed}", num_processes=processes,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    assert Engine.of(None) == Engine() == Engine("single", 1)
    assert Engine.of(accelerator("MULTI_CPU", 2)) == Engine("ddp", 2)
    assert Engine.of(accelerator("FSDP", 2)).tensors == "sliced"
    zero3 = Engine.of(accelerator("DEEPSPEED", 2, stage=3))
    assert (zero3.kind, zero3.zero_stage, zero3.deepspeed, zero3.shards_parameters, zero3.tensors) == \
        ("zero3", 3, True, True, "partitioned")
    zero2 = Engine.of(accelerator("DEEPSPEED", 2, stage=2))
    assert zero2.deepspeed and not zero2.shards_parameters and zero2.tensors == "whole"
    with pytest.raises(ValueError, match="engine 'zero9'"):
        Engine("zero9")


def _legacy(base: type, **attributes) -> type:
    with pytest.warns(DeprecationWarning, match="per_task_gradients / second_pass flags are deprecated"):
        return type(f"Legacy{base.__name__}", (base,), attributes)


@torch.no_grad()
def _sam_perturb(self, ctx):
    params = [p for p in ctx.trainable.values() if p.grad is not None]
    self.moved = [(param, param.detach().clone()) for param in params]
    for param, epsilon in zip(params, sam_perturbation([p.grad for p in params], self.config.rho), strict=True):
        param.add_(epsilon)


@torch.no_grad()
def _sam_restore(self, ctx):
    for param, original in self.moved:
        param.copy_(original)


@pytest.mark.parametrize("name", ["cagrad", "sam"])
def test_the_deprecated_step_flags_still_build_the_same_step(tiny_config, name):
    if name == "cagrad":
        legacy = _legacy(Method, name="cagrad", per_task_gradients=True,
                         combine_task_gradients=lambda self, ctx, grads, perturbed=None: cagrad(grads * len(grads)))
    else:
        # SAM's rule as the deprecated API's users wrote it (perturb / restore on param.grad), its build_step
        # replaced by the flag's
        legacy = _legacy(SAM, second_pass=True, perturb=_sam_perturb, restore=_sam_restore)
    assert legacy.sets_gradients
    with assembled(tiny_config(f"method.name={name}")) as run:
        move_off_pretrained(run)
        weights = {n: p.detach().clone() for n, p in run.ctx.trainable.items()}
        current = step_gradient(run, nth_micro(run))
        with torch.no_grad():  # SAM's W + ε − ε rounds: start the other step from the very same weights
            for n, p in run.ctx.trainable.items():
                p.copy_(weights[n])
        run.methods = [legacy(run.methods[0].config) if name == "sam" else legacy()]
        old = step_gradient(run, nth_micro(run))
    for key in current:
        torch.testing.assert_close(old[key], current[key], rtol=1e-5, atol=1e-8, msg=key)
    assert any(float(g.abs().sum()) > 0 for g in current.values())


def test_cagrad_is_not_the_plain_gradient_so_the_comparison_above_can_fail(tiny_config):
    with assembled(tiny_config("method.name=cagrad")) as run:
        move_off_pretrained(run)
        combined = step_gradient(run, nth_micro(run))
        run.methods = [Method()]
        plain = step_gradient(run, nth_micro(run))
    assert any(not torch.allclose(combined[k], plain[k]) for k in plain)


def test_persistent_state_round_trips_through_a_checkpoint_file(tmp_path):
    from mmtune.methods import HalfFT

    method = HalfFT()
    method.pretrained, method.frozen = {"w": torch.ones(2)}, {"b", "a"}
    torch.save({"half_ft": method.state_dict()}, tmp_path / "state.pt")
    restored = HalfFT()
    restored.frozen = set()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["half_ft"])
    assert restored.frozen == {"a", "b"} and torch.equal(restored.pretrained["w"], torch.ones(2))
    restored.pretrained["w"].add_(1)  # a copy: the saved state is not changed through it
    assert torch.equal(method.pretrained["w"], torch.ones(2))
    assert CAGrad().state_dict() == {}


def test_every_numeric_method_option_declares_its_range_and_is_held_to_it():
    """Issue 39: a method's options are checked from one declaration (MethodConfig.ranges / choices), with one message
    form naming the key — for every registered method, every int or float option, a value just outside its range."""
    import dataclasses
    import typing

    from mmtune.config import ConfigError, from_dict

    outside = {"≥ 0": -1, "> 0": 0, "≥ 1": 0, "≥ 2": 1, "[0, 1]": 1.5, "[0, 1)": 1.0, "(0, 1]": 0.0}
    checked = 0
    for name, cls in sorted(METHODS.items()):
        config = cls.config_class
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            if hints[field.name] not in (int, float):
                continue
            assert field.name in config.ranges, f"method.{name}.{field.name} declares no range"
            allowed = config.ranges[field.name]
            value = hints[field.name](outside[allowed])  # as the config coerces it
            with pytest.raises(ConfigError, match=rf"^method\.{name}\.{field.name}={value!r} must be "):
                from_dict(config, {field.name: value}, f"method.{name}")
            from_dict(config, {field.name: field.default}, f"method.{name}")  # the default is inside
            checked += 1
        for key in config.choices:
            with pytest.raises(ConfigError, match=rf"^method\.{name}\.{key}='nope' — choose one of"):
                from_dict(config, {key: "nope"}, f"method.{name}")
    assert checked >= 25
