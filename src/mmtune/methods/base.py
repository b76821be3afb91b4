"""The extension point: a method is a small typed config plus one class with no-op hooks.

The training loop (``mmtune.train``) calls these hooks and never names a method. A method
overrides only what it needs:

* ``prepare_model``   before the optimizer exists (LoRA wraps the model here);
* ``setup``           after model and optimizer exist (snapshot W0, build masks);
* ``extra_losses``    named loss terms added to the cross-entropy, each one logged;
* ``balance_task_losses``  (loss balancing) each task's mean loss in → the loss that replaces the cross-entropy;
* ``combine_task_gradients``  (multi-task optimisation) the tasks' gradients in → the step's gradient;
* ``perturb`` / ``restore``  (sharpness-aware) move the weights before a second gradient, move them back;
* ``before_optimizer_step``  gradients final (accumulated, all-reduced, clipped), weights not yet updated;
* ``after_optimizer_step``   weights updated: restore / re-allocate entries here (zeroing gradients is
  not enough: AdamW's momentum and weight decay still move "frozen" entries);
* ``on_train_end``    post-training weight surgery (grafting, DARE, WiSE-FT, LoRA merge);
* ``state_dict`` / ``load_state_dict``  saved with every checkpoint, so a resumed run is the same run.

All randomness comes from ``ctx.generator`` (seeded by the run), so a run is reproducible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters (``method.<name>.<key>`` in a run config)."""


@dataclass
class TrainContext:
    """What hooks may read or use: the model (as trained, possibly DDP-wrapped) and its trainable tensors."""

    model: nn.Module  # call this for forward passes (it may be wrapped by DDP / FSDP)
    unwrapped: nn.Module  # the plain model
    trainable: dict[str, nn.Parameter]  # name → parameter, the tensors being fine-tuned
    generator: torch.Generator  # the method's seeded randomness (saved in checkpoints)
    accelerator: Any = None
    optimizer: Any = None
    step: int = 0  # optimizer steps done so far
    total_steps: int = 0
    final_model: nn.Module | None = None  # what gets saved at the end (on_train_end may replace it)
    scratch: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # the training records' tasks, sorted (per-task methods index them)
    batches: list[dict] = field(default_factory=list)  # the current step's micro-batches (mmtune's loop sets them)
    output_dir: Path | None = None  # the run's folder (for methods that write files of their own, e.g. an adapter)


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Tested with parameters sharded over processes (FSDP2): DTensor parameters, per-process state. A method
    # that is not refuses to start under FSDP / ZeRO-3 instead of doing something wrong there.
    supports_sharding: ClassVar[bool] = False
    # Multi-task optimisation: the loop backpropagates each task's share of the step's loss separately and hands the
    # flat per-task gradients [T, P] to ``combine_task_gradients``, whose result is the gradient the step uses.
    per_task_gradients: ClassVar[bool] = False
    # Sharpness-aware methods: after the step's backward the loop calls ``perturb`` (move the weights, e.g. up the
    # gradient), recomputes the step's gradient there, calls ``restore``, then steps from the original weights.
    second_pass: ClassVar[bool] = False
    # Both together (task-based SAM): the loop also recomputes each task's gradient at the weights moved by
    # ``task_perturbation`` of that task's gradient, and hands both sets to ``combine_task_gradients``.
    # Loss balancing: the loop hands each task's mean loss in the micro-batch to ``balance_task_losses``; what it
    # returns replaces the cross-entropy in the loss (``ce`` stays logged as is, the difference under the method's name).
    balances_task_losses: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    @property
    def builds_own_step(self) -> bool:
        """Whether the method forms the step's gradient or loss in mmtune's loop (per-task gradients, a second
        gradient, loss balancing) rather than through loss terms and step hooks."""
        return self.per_task_gradients or self.second_pass or self.balances_task_losses

    def prepare_model(self, model: nn.Module, layout) -> nn.Module:
        return model

    def setup(self, ctx: TrainContext) -> None:
        pass

    def extra_losses(self, ctx: TrainContext, batch: dict, outputs, sample_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def balance_task_losses(self, ctx: TrainContext, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} sets balances_task_losses but does not balance")

    def combine_task_gradients(self, ctx: TrainContext, grads: torch.Tensor,
                               perturbed: torch.Tensor | None = None) -> torch.Tensor:
        return grads.sum(0)

    def task_perturbation(self, ctx: TrainContext, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)

    def perturb(self, ctx: TrainContext) -> None:
        pass

    def restore(self, ctx: TrainContext) -> None:
        pass

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        pass

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def shards_parameters(accelerator) -> bool:
    """Whether the engine splits parameters over processes (FSDP, DeepSpeed ZeRO-3): method state that
    follows the parameters is then per process."""
    if accelerator is None:
        return False
    if str(getattr(accelerator, "distributed_type", "")).endswith("FSDP"):
        return True
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def method_state_file(accelerator) -> str:
    """Where methods' state lives in a checkpoint folder: one file, or one per process when parameters (and so
    the state that follows them, like SPIDER's W0 and G) are sharded."""
    if shards_parameters(accelerator):
        return f"mmtune_methods_rank{accelerator.process_index}.pt"
    return "mmtune_methods.pt"


def save_method_states(methods: list[Method], directory: Path, accelerator) -> None:
    """Write the methods' state into a checkpoint folder (call on every process)."""
    if shards_parameters(accelerator) or accelerator is None or accelerator.is_main_process:
        torch.save({m.name: m.state_dict() for m in methods}, Path(directory) / method_state_file(accelerator))


def load_method_states(methods: list[Method], directory: Path, accelerator) -> None:
    """Restore the methods' state from a checkpoint folder written by ``save_method_states``."""
    path = Path(directory) / method_state_file(accelerator)
    if not path.is_file():
        hint = " (a sharded run resumes with the number of processes it was saved with)" \
            if shards_parameters(accelerator) else ""
        raise FileNotFoundError(f"{path} is missing: {directory} holds no mmtune method state{hint}")
    try:  # tensors and plain containers only: a file that needs unpickling is refused, never run
        states = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"{path}: refused to load method state ({type(error).__name__}: {error})") from None
    for method in methods:
        method.load_state_dict(states.get(method.name, {}))


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def build_methods(section) -> list[Method]:
    """Instantiate the methods a run names (``method.name``, ``+``-joined) with their options."""
    import mmtune.methods  # noqa: F401  (registers the built-in methods)
    from mmtune.config import ConfigError, from_dict

    names = section.names or ["vanilla"]
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"method.name={section.name!r} lists a method twice")
    for key in section.options:
        if key not in names:
            raise ConfigError(f"method.{key}: options for a method the run does not use "
                              f"(method.name={section.name!r}); registered methods: {', '.join(sorted(METHODS))}")
    return [METHODS[n](from_dict(METHODS[n].config_class, section.options.get(n, {}), f"method.{n}")) for n in names]


def describe_config(cls: type[Method]) -> str:
    defaults = dataclasses.asdict(cls.config_class())
    return ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "—"


def snapshot(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable tensors: W0, the values fine-tuning starts from."""
    return {name: param.detach().clone() for name, param in trainable.items()}


class PretrainedSnapshotMethod(Method):
    """Base for methods that need W0: snapshots it in ``setup`` and keeps it in checkpoints.

    Post-training weight surgery (grafting, DARE, WiSE-FT) only overrides ``merge``; it is applied to every
    trainable tensor in ``on_train_end``.
    """

    def setup(self, ctx: TrainContext) -> None:
        self.pretrained = snapshot(ctx.trainable)

    def merge(self, pretrained: torch.Tensor, finetuned: torch.Tensor, ctx: TrainContext) -> torch.Tensor | None:
        return None  # no post-training step

    @torch.no_grad()
    def on_train_end(self, ctx: TrainContext) -> None:
        for name, param in ctx.trainable.items():
            merged = self.merge(self.pretrained[name], param, ctx)
            if merged is not None:
                param.copy_(merged)

    def state_dict(self) -> dict:
        return {"pretrained": self.pretrained}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.pretrained = state["pretrained"]
