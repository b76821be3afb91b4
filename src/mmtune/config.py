"""Typed run configuration: dataclasses, YAML files and ``key=value`` overrides.

An unknown key or a value of the wrong type is an error that names the key and lists the valid
ones — a typo in a config must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


class UnknownKeys(ConfigError):
    """Every unknown key of a config at once (one line each), so a converted config is fixed in one pass."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        what = "unknown keys" if all(line.startswith("unknown key") for line in lines) else "problems"
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} {what}:\n  " + "\n  ".join(lines))


def _check(ok: bool, message: str) -> None:
    """Range checks of the config sections; written ``not (x > 0)``-style by callers so NaN fails too."""
    if not ok:
        raise ValueError(message)


DTYPES = ("fp32", "bf16", "fp16")
# How a task is scored (mmtune.metrics): CIDEr, the VQA accuracy over 10 annotators, a choice's letter, exact match
METRICS = ("cider", "vqa", "mc", "exact")
TINY_ARCHITECTURES = ("llava", "qwen2_vl", "idefics3", "qwen3_vl", "gemma3", "internvl", "llava_onevision")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face checkpoint folder
    tiny: str | None = None  # or build a tiny random model of this architecture (TINY_ARCHITECTURES)
    tiny_hidden_size: int = 64  # tiny model: hidden size of the language model
    tiny_layers: int = 4  # tiny model: number of language-model blocks
    tiny_image_size: int = 32  # tiny model: input image side in pixels
    tiny_patch_size: int = 8  # tiny model: the vision tower's patch side in pixels
    tiny_vision_hidden_size: int = 32  # tiny model: hidden size of the vision tower
    tiny_vision_layers: int = 2  # tiny model: number of vision-tower blocks
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (weights as loaded)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)
    quantization: str | None = None  # 4bit | 8bit: frozen weights stored by bitsandbytes (QLoRA: needs method lora)
    # Variable-resolution processors (Qwen2-VL, Qwen2.5-VL): the image-token budget (one token per 28×28 pixels after
    # merging), the usual cure for out-of-memory on those models; saved into final/'s processor.
    min_pixels: int | None = None  # each image resized to at least this many pixels (null: the processor's own)
    max_pixels: int | None = None  # each image resized to at most this many pixels (null: the processor's own)

    def __post_init__(self):
        _check(self.tiny is None or self.tiny in TINY_ARCHITECTURES,
               f"model.tiny={self.tiny!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
        _check(not (self.tiny and self.path), f"model.path={self.path!r} and model.tiny={self.tiny!r} are both set: "
               "a run starts from a checkpoint folder or from a tiny random model, not both")
        _check(self.dtype in DTYPES, f"model.dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        _check(self.quantization in (None, "4bit", "8bit"),
               f"model.quantization={self.quantization!r}; choose 4bit, 8bit or null")
        _check(not (self.quantization and self.tiny), "model.quantization loads a checkpoint folder (model.path), "
               "not model.tiny")
        for key in ("min_pixels", "max_pixels"):
            _check(getattr(self, key) is None or getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be ≥ 1")
        _check(not (self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels),
               f"model.min_pixels={self.min_pixels} is above model.max_pixels={self.max_pixels}")
        tiny_keys = ("tiny_hidden_size", "tiny_layers", "tiny_image_size", "tiny_patch_size",
                     "tiny_vision_hidden_size", "tiny_vision_layers")
        for key in tiny_keys:
            _check(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be ≥ 1")
        shaped = [f"model.{key}={getattr(self, key)}" for key in tiny_keys
                  if not self.tiny and getattr(self, key) != getattr(ModelConfig, key)]
        _check(not shaped, f"{', '.join(shaped)}: the tiny model's shape, but model.tiny is not set (a checkpoint "
               "in model.path has its own shape)")


@dataclass
class ScopeConfig:
    """What trains (the papers' setup): vision frozen, projector + last N LLM blocks, two learning rates."""

    train_projector: bool = True  # train the vision-to-language connector
    last_n_blocks: int = 2  # train the last N language-model blocks (the papers: 2)
    lr_blocks: float = 2e-4  # learning rate of the LLM blocks (the papers, LLaVA: 2e-4)
    lr_projector: float = 2e-5  # learning rate of the projector (the papers, LLaVA: 2e-5)
    full: bool = False  # train every parameter (pre-training a model from scratch, e.g. the demo's base)
    layers: str | int | None = None  # LLM blocks to train by index, e.g. "28-31" or "0-3,30,31" (replaces last_n_blocks)
    modules: list[str] = field(default_factory=list)  # only these parts of those blocks: attention | mlp | norm | submodule names (q_proj, ...); empty: whole blocks
    train_vision: bool = False  # also train the vision tower (ms-swift's freeze_vit: false)
    lr_vision: float | None = None  # the vision tower's learning rate (null: lr_projector; ms-swift's vit_lr)

    def __post_init__(self):
        _check(self.last_n_blocks >= 0, f"scope.last_n_blocks={self.last_n_blocks} must be ≥ 0")
        for key in ("lr_blocks", "lr_projector"):
            _check(getattr(self, key) > 0, f"scope.{key}={getattr(self, key)} must be > 0")
        _check(self.lr_vision is None or self.lr_vision > 0, f"scope.lr_vision={self.lr_vision} must be > 0")
        if self.layers is not None:
            self.layers = str(self.layers)
            _check(bool(self.layers.strip()), "scope.layers is empty: name blocks like 28-31, or leave it null for "
                   "scope.last_n_blocks")
        _check(not (self.full and (self.layers is not None or self.modules or self.train_vision)),
               "scope.full trains every parameter: scope.layers / scope.modules / scope.train_vision would not be "
               "read; drop them, or scope.full")
        _check(self.lr_vision is None or self.train_vision or self.full,
               f"scope.lr_vision={self.lr_vision} is the vision tower's rate, but scope.train_vision is false (the "
               "tower is frozen); set scope.train_vision: true, or drop lr_vision")


@dataclass
class TaskSpec:
    path: str  # a task file (JSONL records or conversations), a HF dataset / Parquet, dataset:<name> (data.registry) or synthetic:<family>
    n: int | None = None  # draw this many records at random with data.seed (None: all)
    weight: float = 1.0  # each drawn record appears `weight` times per epoch (fractions drawn at random)
    columns: dict = field(default_factory=dict)  # HF dataset / Parquet source: record field → column, e.g. {prompt: question}
    defaults: dict = field(default_factory=dict)  # HF dataset / Parquet source: values of fields it lacks, e.g. {task: okvqa, kind: open}
    split: str | None = None  # HF dataset saved as a DatasetDict: the split to read
    probability: float | None = None  # sampled mixture: the chance each training slot is drawn from this task (set on every task, or none)
    metric: str | None = None  # evaluation: how this task is scored (cider | vqa | mc | exact); null: the records' own, else inferred

    def __fspath__(self) -> str:  # eval.downstream held paths before it held specs: Path(spec) still works
        return self.path

    def __post_init__(self):
        _check(bool(self.path.strip()), "a task's path is empty")
        _check(self.metric is None or self.metric in METRICS,
               f"task {self.path}: metric={self.metric!r}; choose one of {', '.join(METRICS)}")
        _check(self.n is None or self.n >= 1, f"task {self.path}: n={self.n} must be ≥ 1 (or null: all records)")
        _check(self.weight > 0, f"task {self.path}: weight={self.weight} must be > 0")
        _check(self.probability is None or self.probability > 0,
               f"task {self.path}: probability={self.probability} must be > 0 (or null)")


@dataclass
class SyntheticConfig:
    """The generated world used by ``synthetic:<family>`` task paths."""

    dir: str | None = None  # default: <output_dir>/synthetic
    seed: int = 0  # the world's seed (images and records)
    n_train: int = 1000  # training images
    n_test: int = 200  # test images
    image_size: int = 48  # image side in pixels
    version: int = 2  # 2: the demo's world; 3: one partly wrong caption per training image (docs/results.md)
    caption_errors: str = "prior"  # v3's training captions: prior (image words wrong, towards a language prior) | words (any word wrong, at random) | varied (all true, a random subset of the scene, Flickr-like)

    def __post_init__(self):
        for key, least in (("n_train", 1), ("n_test", 1), ("image_size", 8)):
            _check(getattr(self, key) >= least, f"data.synthetic.{key}={getattr(self, key)} must be ≥ {least}")
        _check(self.version in (2, 3), f"data.synthetic.version={self.version}: choose 2 or 3")
        _check(self.caption_errors in ("prior", "words", "varied"),
               f"data.synthetic.caption_errors={self.caption_errors!r}: choose prior, words or varied")


@dataclass
class DataConfig:
    tasks: list[TaskSpec] = field(default_factory=list)  # training tasks: {path, n, weight} or a path
    max_length: int = 2048  # longest prompt + answer in tokens (image tokens included); longer is an error
    skip_bad_records: bool = False  # skip bad records and count them in train_summary.json instead of stopping
    num_workers: int = 0  # DataLoader worker processes
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    temperature: float | None = None  # sampled mixture: each slot's task drawn with p ∝ size^(1/T) (1: by size; large: uniform)
    resample_each_epoch: bool = False  # draw each task's n records afresh every epoch (not once per run)
    replay: list[TaskSpec] = field(default_factory=list)  # general (replay) data mixed into every batch, e.g. the base's instruction data
    replay_share: float = 0.0  # the share of every batch taken from data.replay (e.g. 0.25: 4 of 16)
    registry: str | None = None  # a dataset registry (LLaMA-Factory dataset_info.json style): tasks then name dataset:<name>
    seed: int | None = 0  # which records each task's n draws (and their repeats): the same for every train.seed; null: train.seed's (before data.seed)
    group_by_length: bool = False  # batches of records of similar length (the Trainer's group_by_length): less padding, an order still random per epoch
    padding_free: bool = False  # the model sees each batch's records concatenated without padding, attention inside each record (TRL's padding_free)

    def __post_init__(self):
        _check(self.max_length >= 1, f"data.max_length={self.max_length} must be ≥ 1")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be ≥ 0")
        given = [t.probability is not None for t in self.tasks]
        _check(all(given) or not any(given), "data.tasks: a probability is set on some tasks but not on all; set it "
               "on every task (they are normalised to sum to 1) or on none")
        _check(not (any(given) and self.temperature is not None),
               "data.temperature and tasks' probabilities both set: choose one way to weigh the tasks")
        _check(self.temperature is None or self.temperature > 0, f"data.temperature={self.temperature} must be > 0")
        weighted = [t.path for t in self.tasks if t.weight != 1.0]
        _check(not (weighted and (any(given) or self.temperature is not None)),
               f"data.tasks: weight set on {', '.join(weighted)} together with "
               f"{'probabilities' if any(given) else 'data.temperature'}, which decide each task's share of the "
               "slots (a weight would only lengthen the epoch); choose one way to weigh the tasks")
        _check(0 <= self.replay_share < 1, f"data.replay_share={self.replay_share} must be in [0, 1)")
        _check(bool(self.replay) == (self.replay_share > 0), "data.replay and data.replay_share go together: name "
               "the replay sources and the share of every batch they fill")
        _check(not (self.group_by_length and self.sampled), "data.group_by_length works on the fixed mixture: the "
               "sampled one (probabilities, temperature, replay, resample_each_epoch) composes each batch itself")
        for i, spec in enumerate(self.replay):
            _check(spec.weight == 1.0 and spec.probability is None, f"data.replay.{i} ({spec.path}): weight and "
                   "probability are not read for a replay source — data.replay_share sets its share of every batch "
                   "and n how many of its records it draws")

    def draw_seed(self, train_seed: int) -> int:
        """The seed of which records each task draws: ``data.seed``, or the training seed where it is null (how every
        run before ``data.seed`` drew — the Hugging Face Trainer's ``data_seed`` keeps the two apart too)."""
        return train_seed if self.seed is None else self.seed

    @property
    def sampled(self) -> bool:
        """Whether epochs are drawn by the sampled mixture (``mmtune.data.mixture``) instead of the fixed one."""
        return any(t.probability is not None for t in self.tasks) or self.temperature is not None or \
            bool(self.replay) or self.resample_each_epoch


OPTIMIZERS = ("adamw", "sgd", "adafactor")
TRACKERS = ("tensorboard", "wandb", "mlflow")
# train.scheduler → transformers' schedule (each with the linear warm-up of train.warmup_ratio)
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
LOSS_REDUCTIONS = ("token", "sample")


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"  # the run's folder (final/, checkpoints/, metrics.jsonl, eval/, report/)
    seed: int = 0  # seeds data order, initialisation of new weights and the methods' randomness
    epochs: float = 1.0  # passes over the task mixture (fractions allowed)
    max_steps: int | None = None  # if set, overrides epochs
    batch_size: int = 16  # per device, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float | None = None  # one learning rate for every trainable tensor (replaces scope.lr_blocks / lr_projector)
    optimizer: str = "adamw"  # adamw (the papers) | sgd (momentum 0.9) | adafactor (transformers' Adafactor)
    scheduler: str = "cosine"  # after the warm-up: cosine (the papers) | linear | constant
    weight_decay: float = 0.0  # AdamW weight decay (the papers: 0)
    warmup_ratio: float = 0.03  # linear warm-up share of the steps, then the scheduler's decay
    max_grad_norm: float | None = 1.0  # clip the gradient norm (null: no clipping)
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU); a low-precision model.dtype autocasts anyway
    fp32_masters: bool = True  # with model.dtype bf16 | fp16: train fp32 copies of what trains (mmtune.precision)
    loss_reduction: str = "token"  # token: mean over target tokens (Hugging Face, SPIDER) | sample: NRCA's code
    target_logits: bool = True  # the model's head only where a loss reads it (the target positions: logits_to_keep); false: at every position
    log_every: int = 1  # optimizer steps between rows of metrics.jsonl
    save_every: int | None = None  # optimizer steps between checkpoints (None: only at the end)
    keep_checkpoints: int | None = None  # keep the newest N periodic checkpoints (None: all)
    resume_from: str | None = None  # a checkpoint folder or "latest"
    overwrite: bool = False  # allow replacing an existing run in output_dir
    progress: bool = True  # progress bars
    best_metric: str | None = None  # keep <run>/best: highest S | G | H | S/base | G/base | H/base | S/adj | G/adj | H/adj | S/head | H/head | <task>, or lowest val_loss | val_loss/<task>, of the evaluations during training
    early_stopping_patience: int | None = None  # stop after this many evaluations during training without a new best
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGINT"])  # finish the step, checkpoint, exit 75 (mmtune.preemption); SIGINT = Ctrl-C (twice: abort now); e.g. add SIGUSR1
    ddp_timeout: int = 600  # seconds a process waits for the others in a collective before the run stops (the Trainer's name)
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # trackers (Accelerate): tensorboard | wandb | mlflow; [] for none

    def __post_init__(self):
        _check(bool(self.output_dir.strip()), "train.output_dir is empty: name the run's folder")
        _check(self.epochs > 0, f"train.epochs={self.epochs} must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, f"train.max_steps={self.max_steps} must be ≥ 1 (or null)")
        for key in ("batch_size", "grad_accum", "log_every"):
            _check(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)} must be ≥ 1")
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be ≥ 0")
        _check(self.learning_rate is None or self.learning_rate > 0,
               f"train.learning_rate={self.learning_rate} must be > 0 (or null: scope.lr_blocks / lr_projector)")
        _check(self.optimizer in OPTIMIZERS, f"train.optimizer={self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        _check(self.scheduler in SCHEDULERS, f"train.scheduler={self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        _check(0 <= self.warmup_ratio <= 1, f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"train.max_grad_norm={self.max_grad_norm} must be > 0 (or null: no clipping)")
        _check(self.loss_reduction in LOSS_REDUCTIONS,
               f"train.loss_reduction={self.loss_reduction!r}; choose one of {', '.join(LOSS_REDUCTIONS)}")
        _check(self.mixed_precision in MIXED_PRECISIONS,
               f"train.mixed_precision={self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISIONS)}")
        for key in ("save_every", "keep_checkpoints"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"train.{key}={value} must be ≥ 1 (or null)")
        _check(self.keep_checkpoints is None or self.save_every is not None,
               f"train.keep_checkpoints={self.keep_checkpoints} keeps the newest periodic checkpoints, but "
               "train.save_every is null (none are written): set train.save_every")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               f"train.early_stopping_patience={self.early_stopping_patience} must be ≥ 1 (or null)")
        _check(self.early_stopping_patience is None or self.best_metric is not None,
               "train.early_stopping_patience needs train.best_metric (what must stop improving)")
        for name in self.preempt_signals:
            _check(name in PREEMPT_SIGNALS, f"train.preempt_signals: {name!r}; choose from {', '.join(PREEMPT_SIGNALS)}")
        _check(self.ddp_timeout >= 10, f"train.ddp_timeout={self.ddp_timeout} must be ≥ 10 seconds")
        for tracker in self.report_to:
            _check(tracker in TRACKERS, f"train.report_to: {tracker!r}; choose from {', '.join(TRACKERS)}")
        _check(self.resume_from is None or bool(self.resume_from.strip()),
               "train.resume_from is empty: use 'latest', a checkpoint folder, or null")


@dataclass
class EvalConfig:
    downstream: list[TaskSpec] = field(default_factory=list)  # specialization tasks: as data.tasks ({path, metric, n}, a path, dataset:<name>, synthetic:<family>)
    heldout: list[TaskSpec] = field(default_factory=list)  # generalization tasks (the same specs)
    batch_size: int = 16  # generation batch size
    max_new_tokens: int = 128  # longest generated answer (the papers: 128)
    limit: int | None = None  # at most this many records per task
    before: bool = True  # also evaluate the base model before training
    every_steps: int | None = None  # also evaluate every N optimizer steps, on eval.during_limit records per task
    during_limit: int = 50  # records per task for the evaluations during training (a fixed subset: the first N)
    # greedy answers keep the most likely word even when confidence has drifted to wrong ones; sampled ones show it
    sample_temperature: float | None = None  # also score open-response (CIDEr) tasks on answers sampled at this T
    sample_seed: int = 0  # the seed of eval.sample_temperature's draws (every evaluation draws the same numbers)
    overfit_reference_step: int | None = None  # the report's overfitting test compares this step (fixed in advance, e.g. the end of epoch 1) with the end; null: the largest fall over all steps

    def __post_init__(self):
        for side in ("downstream", "heldout"):
            for i, spec in enumerate(getattr(self, side)):
                _check(spec.weight == 1.0 and spec.probability is None, f"eval.{side}.{i} ({spec.path}): weight and "
                       "probability are training settings, not read for an evaluation task (n draws its records)")
        for key in ("batch_size", "max_new_tokens", "during_limit"):
            _check(getattr(self, key) >= 1, f"eval.{key}={getattr(self, key)} must be ≥ 1")
        _check(self.limit is None or self.limit >= 1, f"eval.limit={self.limit} must be ≥ 1 (or null: all)")
        _check(self.overfit_reference_step is None or self.overfit_reference_step >= 1,
               f"eval.overfit_reference_step={self.overfit_reference_step} must be ≥ 1 (or null)")
        _check(self.every_steps is None or self.every_steps >= 1,
               f"eval.every_steps={self.every_steps} must be ≥ 1 (or null: only before and after training)")
        _check(self.sample_temperature is None or self.sample_temperature > 0,
               f"eval.sample_temperature={self.sample_temperature} must be > 0 (or null: greedy only)")
        _check(self.sample_seed == 0 or self.sample_temperature is not None,
               f"eval.sample_seed={self.sample_seed} seeds sampled answers, but eval.sample_temperature is null "
               "(greedy only): set a temperature, or drop the seed")
        _check(self.overfit_reference_step is None or self.every_steps is not None,
               "eval.overfit_reference_step names a step of the evaluations during training, but eval.every_steps "
               "is null (none are made): set eval.every_steps")


@dataclass
class MethodSection:
    """``name``: one method or several joined by ``+`` (applied in order); other keys: per-method options."""

    name: str = "vanilla"  # one method or several joined by '+', e.g. nrca+spider
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        parts = [n.strip() for n in self.name.split("+")]
        _check(all(parts), f"method.name={self.name!r}: each '+'-joined part must name a method (e.g. 'nrca+spider')")

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.name.split("+")]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodSection = field(default_factory=MethodSection)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _check(not self.model.quantization or "lora" in self.method.names,
               f"model.quantization={self.model.quantization}: quantized weights can't be fine-tuned themselves; "
               "train LoRA adapters beside them (method.name=lora, i.e. QLoRA)")
        _check(self.train.best_metric is None or bool(self.eval.every_steps),
               "train.best_metric compares the evaluations during training: set eval.every_steps too")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is TaskSpec:
            value = {"path": value}
        if not isinstance(value, dict):
            if tp is ModelConfig and isinstance(value, str):  # ms-swift's `model: Qwen/Qwen2-VL-2B-Instruct`
                raise ConfigError(f"{key}: {value!r} — model is a section here: model.path: <a local checkpoint "
                                  "folder> (mmtune downloads nothing)")
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-4" as a string
        except ValueError:
            pass
    if tp is str and value is False and key.endswith("mixed_precision"):
        return "no"  # YAML 1.1 reads the accelerate-style `mixed_precision: no` as false
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: {value!r} is not of type {_type_name(tp)}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys are errors that list the valid ones."""
    if cls is MethodSection:
        data = dict(data)
        name = data.pop("name", "vanilla")
        if not isinstance(name, str):
            raise ConfigError(f"{prefix}.name: expected a string like 'nrca' or 'nrca+spider', got {name!r}")
        for method, options in data.items():
            if not isinstance(options, dict):
                raise ConfigError(f"{prefix}.{method}: expected a mapping of {method}'s options, got {options!r}")
        try:
            return MethodSection(name=name, options=data)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}." if prefix else ""
    problems = [_unknown_key_line(where + key, key, names, prefix) for key in data if key not in names]
    kwargs = {}
    for key, value in data.items():
        if key in names:
            try:
                kwargs[key] = _coerce(value, hints[key], where + key)
            except UnknownKeys as error:  # a section below has unknown keys too: report them all together
                problems += error.lines
            except ConfigError as error:  # a wrong value: reported with the unknown keys
                problems.append(str(error))
    if problems:
        raise UnknownKeys(problems)
    try:
        return cls(**kwargs)
    except ValueError as error:
        if all(hasattr(error, a) for a in ("key", "value", "rule")):  # a method option out of its declared range
            raise ConfigError(f"{prefix}.{error.key}={error.value!r} {error.rule}" if prefix else str(error)) from None
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def _unknown_key_line(full: str, key: str, names: list[str], prefix: str) -> str:
    """``unknown key train.lr (did you mean …?)``: another toolkit's name gets its mmtune key; a key with no hint
    lists the valid keys of its section."""
    hint = suggest(key, names)
    return f"unknown key {full}{hint}" + ("" if key in FOREIGN_KEYS else
                                          f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")


def flat_config(data, prefix: str = "") -> dict:
    """A nested config dict as ``{"train.seed": 0, ...}``."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat_config(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def to_dict(config) -> dict:
    if isinstance(config, MethodSection):
        return {"name": config.name, **config.options}
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    return config


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})") from None
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):  # data.tasks.0.path=…: a list item by its index
            index = _list_index(node, part, key, ".".join(parts[:depth]))
            if last:
                node[index] = value
            elif isinstance(node[index], str):  # a task given as its path: becomes {path: …} to take the key
                node[index] = {"path": node[index]}
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is not a section or a list")


def _list_index(items: list, part: str, key: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(f"override {key}: {where} is a list; index it by position ({where}.0 … "
                          f"{where}.{len(items) - 1})") from None
    if not items:
        raise ConfigError(f"override {key}: {where} is empty; set the whole list ({where}=[…])")
    if not -len(items) <= index < len(items):
        raise ConfigError(f"override {key}: {where} has {len(items)} items ({where}.0 … {where}.{len(items) - 1}); "
                          f"to add one, set the whole list ({where}=[…])")
    return index


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for override in overrides:
        apply_override(data, override)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as error:
        # Name the override when the faulty key came from the command line, not the file.
        message = str(error)
        culprit = next((o for o in reversed(overrides) if _mentions(message, o.split("=", 1)[0].strip())), None)
        where = f"override {culprit!r}" if culprit else str(path or "config")
        raise ConfigError(f"{where}: {message}") from None


def _mentions(message: str, key: str) -> bool:
    """Whether an error message is about ``key`` ("unknown key train.lr", "train.lr: …", "train: train.lr=0 …")."""
    return re.search(rf"(^|[\s:]){re.escape(key)}(\b|$)", message) is not None


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe_keys() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every config key, read from the dataclasses themselves (the meaning
    is the field's trailing comment in this file), so the listing can't drift from the code."""
    import inspect
    import re

    rows: list[tuple[str, str, str, str]] = []

    def walk(cls, prefix: str) -> None:
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else \
                (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append((key, _type_name(tp), repr(default), comments.get(f.name, "")))

    walk(RunConfig, "")
    rows = [r for r in rows if r[0] != "method.options"]  # written method.<name>.<option>, below
    rows.append(("method.<name>.<option>", "per method", "see `mmtune ls methods`",
                 "options of the methods named in method.name"))
    return rows


# Other toolkits' names (LLaMA-Factory, ms-swift, TRL / transformers) → mmtune's: the hint an unknown key gets.
FOREIGN_KEYS = {
    "freeze_vit": "scope.train_vision (ms-swift's freeze_vit: false is scope.train_vision: true)",
    "freeze_vision_tower": "scope.train_vision (LLaMA-Factory's freeze_vision_tower: false is scope.train_vision: true)",
    "freeze_aligner": "scope.train_projector (ms-swift's freeze_aligner: false is scope.train_projector: true)",
    "freeze_multi_modal_projector": "scope.train_projector (LLaMA-Factory's freeze_multi_modal_projector: false is "
                                    "scope.train_projector: true)",
    "freeze_llm": "scope.last_n_blocks: 0 (ms-swift's freeze_llm: true)",
    "freeze_language_model": "scope.last_n_blocks: 0 (LLaMA-Factory's freeze_language_model: true)",
    "freeze_trainable_layers": "scope.last_n_blocks (LLaMA-Factory's positive N) or scope.layers: '0-3' (its "
                               "negative N: the first blocks)",
    "freeze_trainable_modules": "scope.modules (attention, mlp, norm or submodule names like q_proj)",
    "vit_lr": "scope.lr_vision (with scope.train_vision: true)",
    "aligner_lr": "scope.lr_projector",
    "finetuning_type": "method.name: lora (LoRA) or scope.full: true (full)",
    "train_type": "method.name: lora (LoRA) or scope.full: true (full)",
    "lora_rank": "method.lora.r", "lora_alpha": "method.lora.alpha", "lora_dropout": "method.lora.dropout",
    "lora_target": "method.lora.target_modules", "target_modules": "method.lora.target_modules",
    "use_dft_loss": "method.name: dft", "enable_dft_loss": "method.name: dft", "use_asft_loss": "method.name: asft",
    "use_eaft_loss": "method.name: eaft",
    "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.scheduler", "cutoff_len": "data.max_length", "max_length": "data.max_length",
    "dataset": "data.tasks (a list of task files or registry names)", "max_samples": "data.tasks[].n",
    "interleave_probs": "data.tasks[].probability", "mix_strategy": "data.tasks[].probability or data.temperature",
    "dataset_dir": "data.registry (a dataset_info.json-style file)",
    # the flat keys of LLaMA-Factory's, ms-swift's and TRL's training YAMLs (transformers' TrainingArguments)
    "model_name_or_path": "model.path (a local checkpoint folder: mmtune downloads nothing)",
    "model_id": "model.path (a local checkpoint folder: mmtune downloads nothing)",
    "model_type": "nothing: mmtune reads the architecture from model.path's config.json",
    "torch_dtype": "model.dtype (fp32 | bf16 | fp16)", "dtype": "model.dtype (fp32 | bf16 | fp16)",
    "bf16": "model.dtype: bf16 (bf16 weights, fp32 masters: train.fp32_masters) or train.mixed_precision: bf16 "
            "(fp32 weights, bf16 compute — the Trainer's bf16: true)",
    "fp16": "train.mixed_precision: fp16 (on a GPU) or model.dtype: fp16",
    "pure_bf16": "model.dtype: bf16 with train.fp32_masters: false",
    "attn_implementation": "model.attn_implementation", "attn_impl": "model.attn_implementation",
    "flash_attn": "model.attn_implementation: flash_attention_2 (or sdpa)",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "quantization_bit": "model.quantization: 4bit | 8bit (with method.name: lora)",
    "quant_bits": "model.quantization: 4bit | 8bit (with method.name: lora)",
    "load_in_4bit": "model.quantization: 4bit (with method.name: lora)",
    "load_in_8bit": "model.quantization: 8bit (with method.name: lora)",
    "image_max_pixels": "model.max_pixels", "max_pixels": "model.max_pixels",
    "image_min_pixels": "model.min_pixels", "min_pixels": "model.min_pixels",
    "image_resolution": "model.max_pixels (a pixel count: side × side)",
    "video_max_pixels": "nothing: mmtune trains on images (no video)",
    "video_fps": "nothing: mmtune trains on images (no video)",
    "trust_remote_code": "nothing: mmtune loads transformers' own architectures, never a checkpoint's code",
    "template": "nothing: conversations are rendered with the processor's chat template from model.path",
    "system": "a system message in each conversation (data files in messages format)",
    "stage": "nothing: mmtune train is supervised fine-tuning; method.name picks how",
    "rlhf_type": "nothing: mmtune train is supervised fine-tuning; method.name picks how",
    "do_train": "nothing: mmtune train trains (and evaluates eval.downstream / eval.heldout)",
    "do_eval": "eval.every_steps (during training) or mmtune eval", "do_predict": "mmtune eval",
    "use_peft": "method.name: lora", "lora_r": "method.lora.r", "lora_target_modules": "method.lora.target_modules",
    "dataset_name": "data.tasks (a local file or saved Hugging Face dataset: mmtune downloads nothing)",
    "dataset_text_field": "data.tasks[].columns (e.g. {prompt: question, answer: answer})",
    "max_seq_length": "data.max_length", "max_source_length": "data.max_length", "max_target_length": "data.max_length",
    "packing": "data.padding_free (each batch's records concatenated without padding; mmtune does not pack records "
               "of several batches into one)",
    "neat_packing": "data.padding_free (each batch's records concatenated, attention inside each record)",
    "padding_free": "data.padding_free",
    "streaming": "nothing: task files are read whole",
    "overwrite_cache": "nothing: mmtune caches no tokenised data",
    "preprocessing_num_workers": "nothing: records are tokenised as batches are made (data.num_workers)",
    "dataset_num_proc": "nothing: records are tokenised as batches are made (data.num_workers)",
    "dataloader_num_workers": "data.num_workers",
    "remove_unused_columns": "nothing: only a record's known fields are read (unknown ones are an error)",
    "val_size": "eval.downstream (a test file per task: mmtune does not split the training data)",
    "split_dataset_ratio": "eval.downstream (a test file per task: mmtune does not split the training data)",
    "eval_dataset": "eval.downstream / eval.heldout",
    "output_dir": "train.output_dir", "run_name": "train.output_dir (the run is its folder)",
    "logging_dir": "train.output_dir (logs and trackers write there)",
    "overwrite_output_dir": "train.overwrite", "logging_steps": "train.log_every",
    "logging_first_step": "train.log_every (the first step is always logged)",
    "plot_loss": "nothing: mmtune report plots every run (<run>/report)",
    "report_to": "train.report_to (tensorboard | wandb | mlflow, or [])",
    "save_steps": "train.save_every", "save_strategy": "train.save_every (steps; null: only the end)",
    "save_total_limit": "train.keep_checkpoints",
    "save_only_model": "nothing: checkpoints always hold what an exact resume needs; final/ is the model alone",
    "resume_from_checkpoint": "train.resume_from (a checkpoint folder or latest)",
    "ddp_timeout": "train.ddp_timeout (seconds)", "seed": "train.seed (and data.seed: which records each n draws)",
    "lr": "train.learning_rate", "data_seed": "data.seed", "group_by_length": "data.group_by_length", "max_steps": "train.max_steps", "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_ratio (a share of the steps: warmup_steps / total steps)",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optimizer (adamw | sgd | adafactor)",
    "per_device_eval_batch_size": "eval.batch_size",
    "eval_strategy": "eval.every_steps (steps; null: only before and after training)",
    "evaluation_strategy": "eval.every_steps (steps; null: only before and after training)",
    "eval_steps": "eval.every_steps", "max_new_tokens": "eval.max_new_tokens",
    "load_best_model_at_end": "train.best_metric (keeps <run>/best; final/ stays the last step)",
    "metric_for_best_model": "train.best_metric", "early_stopping_patience": "train.early_stopping_patience",
    "deepspeed": "accelerate launch --use_deepspeed --zero_stage N (or --deepspeed_config_file <json>) "
                 "mmtune train …: engines come from the launch, not the config",
    "fsdp": "accelerate launch --use_fsdp --fsdp_version 2 mmtune train …: engines come from the launch",
    "fsdp_config": "accelerate launch --use_fsdp --fsdp_version 2 mmtune train …: engines come from the launch",
    "push_to_hub": "nothing: upload <run>/final yourself (huggingface-cli upload)",
    "hub_model_id": "nothing: upload <run>/final yourself (huggingface-cli upload)",
}


def suggest(key: str, valid: list[str]) -> str:
    """' (did you mean x?)' for a mistyped key or another toolkit's name for an mmtune key, else ''."""
    import difflib

    if key in FOREIGN_KEYS and key not in valid:
        hint = FOREIGN_KEYS[key]
        if hint.startswith("nothing: "):
            return f" ({key} is another toolkit's setting with no mmtune key: {hint[len('nothing: '):]})"
        return f" (did you mean {hint}? {key} is another toolkit's name)"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
