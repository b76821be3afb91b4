"""The extension point: a method is a small typed config plus one class with no-op hooks.

The training loop (``mmtune.train``, one step in ``mmtune.step``) and the Trainer integration call these hooks and
never name a method. A method overrides only what it needs:

* ``prepare_model``   before the optimizer exists (LoRA wraps the model here);
* ``setup``           after model and optimizer exist (snapshot W0, build masks);
* ``extra_losses``    named loss terms added to the cross-entropy, each one logged;
* ``token_loss``      (loss-level remedies: DFT, EAFT, ASFT) each target token's loss in place of ``−log p``;
* ``balance_task_losses``  (loss balancing) each task's mean loss in → the loss that replaces the cross-entropy;
* ``build_step``      (methods that change the step) form the step's gradient from its micro-batches with the
  building blocks of ``mmtune.step.Step``: per-task gradients (PCGrad, CAGrad), a second gradient at moved
  weights (SAM), both (task-based SAM), or the plain backward plus a look at the batches (FAMO);
* ``before_optimizer_step``  gradients final (accumulated, all-reduced, clipped), weights not yet updated;
* ``after_optimizer_step``   weights updated: restore / re-allocate entries here (zeroing gradients is
  not enough: AdamW's momentum and weight decay still move "frozen" entries);
* ``on_train_end``    post-training weight surgery (grafting, DARE, WiSE-FT, LoRA merge);
* ``state_dict`` / ``load_state_dict``  saved with every checkpoint, so a resumed run is the same run (name the
  attributes in ``persistent`` and both are written for you).

What a method can run on is derived from what it declares: the hooks it overrides (a host that can't run one
refuses the method up front, naming the hook: ``refusal``), ``sets_gradients`` (its ``build_step`` reads or writes
``param.grad``, which DeepSpeed keeps in its own buffers) and ``supports_sharding``.
All randomness comes from ``ctx.generator`` (seeded by the run), so a run is reproducible.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmtune.engine import (  # noqa: F401 — also public here: methods import the tensor helpers from this module
    DTensor,
    Engine,
    is_fsdp,
    laid_out_as,
    local_shard,
    partitioned,
    sharded,
    shards_parameters,
    sum_over_shards,
    whole,
)

if TYPE_CHECKING:
    from mmtune.data.collate import TrainCollator


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters (``method.<name>.<key>`` in a run config). What each option may be is
    declared once — ``ranges`` (``"≥ 0"``, ``"> 0"``, ``"≥ 1"``, ``"[0, 1]"``, ``"[0, 1)"``, ``"(0, 1]"``) and
    ``choices`` (the allowed values) — and checked on construction, with one message form naming the key
    (``method.nrca.lam=-1.0 must be ≥ 0``)."""

    ranges: ClassVar[dict[str, str]] = {}
    choices: ClassVar[dict[str, tuple]] = {}

    def __post_init__(self):
        for key, allowed in self.ranges.items():
            if not within(getattr(self, key), allowed):
                raise OutOfRange(key, getattr(self, key), f"must be {'' if allowed[0] in '≥>' else 'in '}{allowed}")
        for key, allowed in self.choices.items():
            if getattr(self, key) not in allowed:
                raise OutOfRange(key, getattr(self, key), f"— choose one of {', '.join(map(str, allowed))}")


class OutOfRange(ValueError):
    """A method option outside what its config declares; ``mmtune.config.from_dict`` names it ``method.<name>.<key>``."""

    def __init__(self, key: str, value, rule: str):
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"{key}={value!r} {rule}")


def within(value, allowed: str) -> bool:
    """Whether ``value`` is in ``allowed``: ``"≥ a"``, ``"> a"``, or an interval ``"[a, b]"`` / ``"[a, b)"`` /
    ``"(a, b]"`` / ``"(a, b)"`` (NaN is in none)."""
    if allowed.startswith(("≥", ">")):
        bound = float(allowed[1:])
        return value >= bound if allowed[0] == "≥" else value > bound
    low, high = (float(x) for x in allowed[1:-1].split(","))
    above = value >= low if allowed[0] == "[" else value > low
    below = value <= high if allowed[-1] == "]" else value < high
    return bool(above and below)


@dataclass
class TrainContext:
    """What hooks may read or use: the model (as trained, possibly DDP-wrapped) and its trainable tensors."""

    model: nn.Module  # call this for forward passes (it may be wrapped by DDP / FSDP)
    unwrapped: nn.Module  # the plain model
    trainable: dict[str, nn.Parameter]  # name → parameter, the tensors being fine-tuned
    generator: torch.Generator  # the method's seeded randomness (saved in checkpoints)
    accelerator: Any = None
    engine: Engine | None = None  # where the weights live (mmtune.engine); None: the accelerator's (Engine.of)
    optimizer: Any = None
    step: int = 0  # optimizer steps done so far
    total_steps: int = 0
    final_model: nn.Module | None = None  # what gets saved at the end (on_train_end may replace it)
    tasks: list[str] = field(default_factory=list)  # the training records' tasks, sorted (per-task methods index them)
    output_dir: Path | None = None  # the run's folder (for methods that write files of their own, e.g. an adapter)
    # The training batches (on the device, in the run's order), for methods that estimate something from the data
    # before training (EWC's Fisher information): ``for batch in ctx.batches()``. None where the host has no loader.
    batches: Callable[[], Iterable[dict]] | None = None
    # The training records (what each task is scored by: GRPO's rewards), and the collator that turns records into a
    # batch (for methods that build batches of their own); None where the host has none.
    records: list | None = None
    collator: TrainCollator | None = None

    def __post_init__(self):
        if self.engine is None:
            self.engine = Engine.of(self.accelerator)


# Every hook a method may override, in the order a run calls them.
HOOKS = ("prepare_model", "setup", "extra_losses", "token_loss", "balance_task_losses", "build_step",
         "before_optimizer_step", "after_optimizer_step", "on_train_end", "state_dict", "load_state_dict")


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Tested with parameters sharded over processes (FSDP2): DTensor parameters, per-process state
    # (tests/methods/test_methods_sharded.py). A method that is not refuses to start under FSDP instead of doing
    # something wrong there, saying why in ``sharding_refusal`` (one sentence, "it …"). DeepSpeed ZeRO-3 hands the
    # hooks whole tensors and refuses by its own rule (``mmtune.engines.zero3_refusal``).
    supports_sharding: ClassVar[bool] = False
    sharding_refusal: ClassVar[str] = ""
    # A loss term (``extra_losses``, ``token_loss``) reads the trainable weights themselves (a distance to W0, a
    # forward at W0): DeepSpeed ZeRO-3, which leaves each parameter an empty partition outside its gather, refuses it
    # — unless the term depends on the weights alone and is written as ``weight_penalty`` (L1/L2).
    reads_weights_in_loss: ClassVar[bool] = False
    # ``build_step`` reads or writes ``param.grad`` itself between backward passes (SAM's second gradient): DeepSpeed
    # keeps gradients in its own partitioned buffers, so it refuses such a method. A step built only from ``Step``'s
    # flat-vector blocks (``task_gradients``, ``weigh_task_gradients``, ``set_gradient``, ``moved_by``) does not set
    # this: under DeepSpeed ZeRO-1/2 those take autograd's gradients and hand the result to the engine's step, under
    # ZeRO-3 they work on each process's slices of the engine's partitioned gradients.
    sets_gradients: ClassVar[bool] = False
    # Why DeepSpeed ZeRO-3 can't run the method (one sentence, "it …"), where its own code is the reason (checked with
    # the loss-term rule in ``mmtune.engines.zero3_refusal``); empty: no such reason.
    partitioned_refusal: ClassVar[str] = ""
    # Attributes saved with every checkpoint and restored on resume (the default state_dict / load_state_dict).
    persistent: ClassVar[tuple[str, ...]] = ()
    # The options at which the method is vanilla (its strength at zero: ``{"lam": 0}``), or None where it has none;
    # the contract tests train with them and compare with vanilla (tests/methods/test_contract.py).
    null_options: ClassVar[dict[str, Any] | None] = None
    # Forward passes per micro-batch whose activations the backward keeps, beyond the plain one (NRCA's noised view):
    # what ``mmtune estimate`` multiplies the activations by.
    extra_forwards: ClassVar[int] = 0
    # Its batches must carry their records and images (``batch["samples"]``): it builds batches of its own (GRPO).
    reads_samples: ClassVar[bool] = False
    # Deprecated: the flags that shaped the step before ``build_step``; a subclass setting them still
    # works (its step is built from combine_task_gradients / task_perturbation / perturb / restore) with a warning.
    per_task_gradients: ClassVar[bool] = False
    second_pass: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if (cls.__dict__.get("per_task_gradients") or cls.__dict__.get("second_pass")) \
                and "build_step" not in cls.__dict__:
            warnings.warn(f"{cls.__name__}: the per_task_gradients / second_pass flags are deprecated; override "
                          "build_step(step) instead (see mmtune.methods.sam, mmtune.methods.multitask)",
                          DeprecationWarning, stacklevel=2)
            cls.build_step = _flag_built_step
            cls.sets_gradients = True

    def overrides(self, hook: str) -> bool:
        """Whether this method's class replaces the base ``hook`` (what a host must be able to run)."""
        return getattr(type(self), hook) is not getattr(Method, hook)

    @property
    def builds_step(self) -> bool:
        return self.overrides("build_step")

    @property
    def balances_task_losses(self) -> bool:
        return self.overrides("balance_task_losses")

    @property
    def replaces_token_loss(self) -> bool:
        return self.overrides("token_loss")

    @property
    def builds_own_step(self) -> bool:
        """Whether the method forms the step's gradient or loss itself (a step of its own, or loss balancing)."""
        return self.builds_step or self.balances_task_losses

    @property
    def rows_per_record(self) -> int:
        """Rows a training batch holds per record, at most (GRPO: its G sampled answers): what ``mmtune estimate``
        multiplies the activations by."""
        return 1

    def prepare_model(self, model: nn.Module, layout) -> nn.Module:
        return model

    def setup(self, ctx: TrainContext) -> None:
        pass

    def extra_losses(self, ctx: TrainContext, batch: dict, outputs, sample_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms added to the cross-entropy; by default the method's ``weight_penalty``, where it has one,
        named ``weight_penalty_term`` — but not under DeepSpeed ZeRO-3, whose step adds it itself."""
        if not self.overrides("weight_penalty") or partitioned(ctx.trainable):
            return {}
        penalty = self.weight_penalty(ctx)
        return {} if penalty is None else {self.weight_penalty_term: penalty}

    def weight_penalty(self, ctx: TrainContext) -> torch.Tensor | None:
        """A loss term that depends on the trainable weights alone (``ctx.trainable``: a distance to W0), or None.
        The default ``extra_losses`` adds it unless ``partitioned(ctx.trainable)``: under DeepSpeed ZeRO-3 the step
        adds its gradient once per optimizer step on the full fp32 masters instead (``mmtune.engines.deepspeed_step``),
        where the forward pass would read empty partitions — logged under ``weight_penalty_term`` either way."""
        return None

    @property
    def weight_penalty_term(self) -> str:
        """The logged name of ``weight_penalty``'s term (the method's name unless it logs the term as another)."""
        return self.name

    def token_loss(self, ctx: TrainContext, batch: dict, outputs, log_probs: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor | None:
        """Each target token's loss ``[N]`` in place of ``−log_probs`` (``log_probs``: the target tokens' log
        probabilities, with gradient; ``index``: each token's row), reduced like the cross-entropy; None keeps the
        plain cross-entropy."""
        return None

    def balance_task_losses(self, ctx: TrainContext, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not balance task losses")

    def build_step(self, step) -> None:
        """Form the step's gradient from ``step.micro`` (a ``mmtune.step.Step``); the default is the plain one."""
        step.backward()

    # Building blocks the built-in step builders use (and the deprecated flags' step): not called by any host.
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
        """The ``persistent`` attributes that exist: tensors and containers as they are, sets as sorted lists,
        objects with a ``state_dict`` (an optimizer) as theirs."""
        state = {}
        for key in self.persistent:
            if hasattr(self, key):
                value = getattr(self, key)
                state[key] = value.state_dict() if hasattr(value, "state_dict") else \
                    sorted(value) if isinstance(value, set) else \
                    value.detach() if isinstance(value, torch.Tensor) else value
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved; tensors are copied (into the existing tensor when it is a learned
        leaf, so an optimizer holding it keeps working)."""
        for key, value in state.items():
            current = getattr(self, key, None)
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(value)
            elif isinstance(current, torch.Tensor) and current.requires_grad:
                with torch.no_grad():
                    current.copy_(value)
            elif isinstance(current, set):
                setattr(self, key, set(value))
            else:
                setattr(self, key, _cloned(value))


def _cloned(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _flag_built_step(method: Method, step) -> None:
    """The step the deprecated flags described: per-task gradients combined (and, with ``second_pass``, each
    task's gradient again at its ``task_perturbation``), or a second gradient between ``perturb`` and ``restore``."""
    ctx = step.ctx
    if method.per_task_gradients:
        step.combine_task_gradients(lambda grads, moved: method.combine_task_gradients(ctx, grads, moved),
                                    (lambda grad: method.task_perturbation(ctx, grad)) if method.second_pass else None)
        return
    step.backward()
    method.perturb(ctx)
    step.zero_grad()
    step.backward(log=False)
    method.restore(ctx)


# What each host runs, beyond the hooks every host runs. A host refuses a method that overrides any other hook.
ALWAYS = {"prepare_model", "setup", "extra_losses", "token_loss", "before_optimizer_step", "after_optimizer_step", "on_train_end",
          "state_dict", "load_state_dict"}


# The hosts of the 0.x string form of ``refusal``, as engines (deprecated: pass an Engine).
LEGACY_HOSTS = {"loop": "single", "deepspeed": "zero2", "sharded": "fsdp2"}


def refusal(methods: list[Method], host: Engine | str, engine: Engine | None = None) -> str | None:
    """The one compatibility rule: why ``host`` can't run ``methods`` (one sentence naming the method and the reason), or
    None. ``host``: an ``Engine`` (mmtune's own training loop on it: ``mmtune train``, ``mmtune estimate``), or
    ``"trainer"`` (a Hugging Face Trainer, with its ``engine`` when it is known). Derived from what a method declares:

    * a Trainer runs the hooks in ``ALWAYS`` only (its step is its own);
    * DeepSpeed keeps gradients in its own buffers: a ``build_step`` that sets ``param.grad`` itself is refused;
    * ZeRO-3 leaves each weight an empty partition: a loss term reading the weights (``reads_weights_in_loss``) runs
      only as a ``weight_penalty`` (in mmtune's loop, which adds it on the masters; never in a Trainer), and a method
      may declare its own reason (``partitioned_refusal``); in a Trainer, a model change merged at the end
      (``prepare_model``: LoRA) is refused too;
    * FSDP2's DTensor shards: only methods tested there (``supports_sharding``)."""
    if isinstance(host, str) and host in LEGACY_HOSTS:
        warnings.warn(f'refusal(methods, "{host}") is deprecated: pass an Engine (mmtune.engine.Engine('
                      f'"{LEGACY_HOSTS[host]}"))', DeprecationWarning, stacklevel=2)
        host = Engine(LEGACY_HOSTS[host])
    trainer = host == "trainer"
    engine = (engine or Engine()) if trainer else host
    if not isinstance(engine, Engine):
        raise TypeError(f"refusal: host must be an Engine or 'trainer', not {host!r}")
    for method in methods:
        if trainer and (extra := [h for h in HOOKS if h not in ALWAYS and method.overrides(h)]):
            return (f"{method.name} overrides {', '.join(extra)}, which a Hugging Face Trainer's step can't run "
                    "(it builds the step from per-task losses or gradients, or a second gradient): train it in "
                    "mmtune's own training loop (mmtune train)")
        if engine.deepspeed and method.builds_step and method.sets_gradients:
            return (f"{method.name}: builds the step's gradient itself (its build_step reads and sets param.grad: per "
                    "task, or a second pass), which DeepSpeed's engine keeps in its own buffers; use DDP or one "
                    "process")
        if engine.kind == "zero3":
            if method.partitioned_refusal:
                return (f"{method.name} can't run under DeepSpeed ZeRO-3: {method.partitioned_refusal}; use ZeRO-2 or "
                        "FSDP2")
            if method.reads_weights_in_loss and trainer:
                return (f"{method.name}: the loss term reads the trainable weights, which DeepSpeed ZeRO-3 leaves as "
                        "empty partitions in a Hugging Face Trainer's step; train with mmtune train (which runs L1/L2 "
                        "under ZeRO-3) or use ZeRO-2")
            if method.reads_weights_in_loss and not method.overrides("weight_penalty"):
                return (f"{method.name} can't run under DeepSpeed ZeRO-3: its loss term reads the trainable weights in "
                        "the forward pass, where ZeRO-3 leaves each parameter an empty partition; use ZeRO-2 or FSDP2")
            if trainer and method.overrides("prepare_model"):
                return (f"{method.name}: merging the adapters into ZeRO-3's partitioned weights at the end is done and "
                        "tested in mmtune train only; train with it, or use ZeRO-2 in a Trainer")
        if engine.fsdp and not method.supports_sharding:
            ready = ", ".join(n for n, cls in sorted(METHODS.items()) if cls.supports_sharding)
            why = method.sharding_refusal or "it is not tested with parameters sharded over processes"
            return (f"{method.name} can't run with parameters sharded over processes (FSDP): {why}. "
                    f"Use DDP or DeepSpeed ZeRO-2 for it; sharded runs take {ready}.")
    return None


METHODS: dict[str, type[Method]] = {}


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
    methods = [METHODS[n](from_dict(METHODS[n].config_class, section.options.get(n, {}), f"method.{n}")) for n in names]
    check_method_combination(methods)
    return methods


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

    persistent = ("pretrained",)

    def setup(self, ctx: TrainContext) -> None:
        self.pretrained = snapshot(ctx.trainable)

    def merge(self, pretrained: torch.Tensor, finetuned: torch.Tensor, ctx: TrainContext) -> torch.Tensor | None:
        return None  # no post-training step

    @torch.no_grad()
    def on_train_end(self, ctx: TrainContext) -> None:
        if type(self).merge is PretrainedSnapshotMethod.merge:
            return
        for name, param in ctx.trainable.items():
            # On shards: the merge of the whole tensors (equal on every process: the same W, W0 and generator), of
            # which each process keeps its piece — a top-k or a random draw as on one process.
            merged = self.merge(whole(self.pretrained[name]), whole(param), ctx)
            if merged is not None:
                param.copy_(laid_out_as(merged, param))


def check_method_combination(methods: list[Method]) -> None:
    """At most one method builds the step (``build_step``) or balances the tasks' losses: stacked, most combinations
    are not defined (whose second pass sees whose task gradients?) and none is tested."""
    balancers = [m.name for m in methods if m.balances_task_losses]
    if len(balancers) > 1:
        raise ValueError(f"{' + '.join(balancers)}: only one method may balance the tasks' losses")
    reweighting = [m.name for m in methods if m.replaces_token_loss]
    if len(reweighting) > 1:
        raise ValueError(f"{' + '.join(reweighting)}: only one method may replace the tokens' loss (each defines the "
                         "whole per-token loss); choose one")
    builders = [m.name for m in methods if m.builds_own_step]
    # (a method that builds its step around its own token loss, GRPO, combines with itself)
    foreign = [name for name in builders if name not in reweighting]
    if reweighting and foreign:
        raise ValueError(f"{reweighting[0]} + {foreign[0]}: {foreign[0]} forms the step from the tasks' plain "
                         f"cross-entropy, which would drop {reweighting[0]}'s token loss; they are not combined")
    if len(builders) > 1:
        raise ValueError(f"{' + '.join(builders)}: only one method may combine the tasks' gradients, take a second "
                         "gradient or balance the losses — they are not tested together; choose one of them (loss "
                         "terms like l2_reg or nrca combine with any)")
