"""THE training loop: one file, on Hugging Face Accelerate, calling method hooks; it never names a method.

``train`` reads top to bottom as its phases: open the run (config checked, output folder locked) → data →
model, scope, methods, optimizer → base evaluation → resume (verified checkpoint, same config) → the loop
(for each optimizer step: micro-batches of cross-entropy + methods' extra losses, backward, a finiteness
check, clip, ``before_optimizer_step``, step, ``after_optimizer_step``, log, evaluation, a preemption check —
SIGTERM saves this step and stops, ``mmtune.preemption`` — checkpoint) → ``on_train_end`` → ``final/`` (a Hugging
Face model folder in ``model.dtype``, only with finite weights, written whole or not at all) → final evaluation and
report. Trainable parameters are fp32 masters under a bf16 ``model.dtype`` (``mmtune.precision``); a lost process
of a multi-process run is named (``mmtune.liveness``); a full disk is a clear error (``mmtune.checkpoint``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from mmtune.best import BestState, metric_value, update_best
from mmtune.checkpoint import (
    check_engine_files,
    complete_checkpoints,
    disk_full_error,
    disk_is_full,
    finalize,
    find_checkpoint,
    load_run_state,
    newest_complete,
    partial_dir,
    remove_partials,
    removed_unless_whole,
    save_run_state,
    step_dir_name,
)
from mmtune.config import RunConfig, load_config, save_config, to_dict
from mmtune.data.collate import IGNORE_INDEX, RecordDataset, TrainCollator
from mmtune.data.mixture import build_mixture, mixture_summary
from mmtune.data.records import RecordError
from mmtune.data.synthetic import SYNTHETIC_PREFIX, ensure_world, resolve_task_path, vocabulary
from mmtune.engines import backward, configure_deepspeed, is_deepspeed, on_masters, optimizer_step
from mmtune.errors import NonFiniteError, Preempted, RunInUseError
from mmtune.evaluate import evaluate
from mmtune.liveness import Peers
from mmtune.losses import compute_losses
from mmtune.methods.base import (
    METHODS,
    TrainContext,
    build_methods,
    load_method_states,
    save_method_states,
    shards_parameters,
)
from mmtune.models.load import DTYPES, check_model_folder, load_model, save_processor
from mmtune.models.scope import apply_scope, parameter_groups, scope_summary
from mmtune.models.tiny import build_tiny
from mmtune.precision import compute_precision, describe, keep_fp32_masters, low_precision_dtype, to_saved_dtype
from mmtune.preemption import EvaluationInterrupted, PreemptionWatch, preempted_error
from mmtune.report import to_markdown, write_report

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "final", "final.partial", "checkpoints", "eval", "report",
               "train_summary.json", "tensorboard", "adapter", "wandb", "mlruns", "best", "best.json")
LOCK_FILE = "mmtune.lock"
# Config keys that may differ between a checkpoint and the run resuming it: where things go and how they are
# shown. Everything else changes what is trained, so a resume with a different value is refused.
RESUME_MAY_CHANGE = ("train.output_dir", "train.resume_from", "train.overwrite", "train.progress", "train.log_every",
                     "train.report_to", "train.preempt_signals", "train.ddp_timeout",
                     "train.save_every", "train.keep_checkpoints", "data.num_workers", "data.synthetic.dir", "eval.")


class EpochSampler(Sampler):
    """A fresh permutation per epoch from ``seed + epoch``: the data order is a function of the run only."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "train_summary.json"


@dataclass
class Run:
    """What the phases of one training share; filled phase by phase."""

    config: RunConfig
    accelerator: Accelerator
    paths: RunPaths
    methods: list
    sharded: bool
    lock: int | None = None
    peers: Peers | None = None
    world: Path | None = None
    records: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    processor: object = None
    model: object = None
    optimizer: object = None
    loader: object = None
    scheduler: object = None
    ctx: TrainContext | None = None
    steps_per_epoch: int = 0
    best: BestState | None = None
    stopped_early: bool = False
    preempted: Preempted | None = None  # set when a preemption signal stopped the loop after a checkpoint
    watch: PreemptionWatch | None = None
    task_method: object = None  # the method that combines per-task gradients, if any
    second_pass: list = field(default_factory=list)  # sharpness-aware methods (a second gradient per step)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        self.accelerator.print(message)


def load_base(config: RunConfig):
    """The model a run starts from: a local checkpoint, or a tiny random model (tests, demos)."""
    if config.model.tiny:
        model, processor = build_tiny(config.model.tiny, words=vocabulary(), image_size=config.model.tiny_image_size,
                                      hidden_size=config.model.tiny_hidden_size, num_layers=config.model.tiny_layers,
                                      vision_hidden_size=config.model.tiny_vision_hidden_size,
                                      vision_layers=config.model.tiny_vision_layers,
                                      patch_size=config.model.tiny_patch_size, seed=config.train.seed)
        return model.to(DTYPES[config.model.dtype]), processor
    check_model_source(config)
    return load_model(config.model.path, config.model.dtype, config.model.attn_implementation,
                      config.model.quantization)


def check_model_source(config: RunConfig) -> None:
    """Fail fast when the run names no model, or a folder that is not a model."""
    if config.model.tiny:
        return
    if not config.model.path:
        raise ValueError("set model.path (a local checkpoint folder) or model.tiny (llava | qwen2_vl | idefics3)")
    check_model_folder(config.model.path)


def world_dir(config: RunConfig) -> Path | None:
    paths = [t.path for t in config.data.tasks] + config.eval.downstream + config.eval.heldout
    if not any(p.startswith(SYNTHETIC_PREFIX) for p in paths):
        return None
    synth = config.data.synthetic
    return Path(synth.dir) if synth.dir else Path(config.train.output_dir) / "synthetic"


def lock_output_dir(root: Path) -> int | None:
    """Hold an exclusive lock on ``root`` for the life of this process (released by the OS even on kill -9),
    so two runs can never write into one folder. Returns the lock's file descriptor."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no advisory locks
        return None
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunInUseError(f"{root} is in use by a live run (pid {holder}); wait for it to finish or choose "
                            "another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def prepare_output_dir(config: RunConfig, is_main: bool) -> tuple[RunPaths, int | None]:
    """Create and lock the run folder; refuse one that holds another run unless resuming or told to overwrite."""
    root = Path(config.train.output_dir)
    if not is_main:
        return RunPaths(root), None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"train.output_dir={root}: can't create the run folder ({error.strerror or error})") from None
    if not os.access(root, os.W_OK):
        raise PermissionError(f"train.output_dir={root}: the folder is not writable")
    lock = lock_output_dir(root)
    taken = any((root / m).exists() for m in RUN_MARKERS)
    if taken and not config.train.resume_from:
        if not config.train.overwrite:
            release_lock(lock)
            raise FileExistsError(f"{root} already holds a run; choose another train.output_dir, resume with "
                                  "train.resume_from=latest, or replace it with train.overwrite=true")
        for marker in RUN_MARKERS:
            target = root / marker
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return RunPaths(root), lock


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def available_trackers(names: list[str]) -> list[str]:
    """The trackers of ``train.report_to`` to start. One named on purpose and not installed is an error; the
    default (tensorboard) is skipped quietly when tensorboard is not installed."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing and names != ["tensorboard"]:
        raise ValueError(f"train.report_to names {', '.join(missing)}, which is not installed here: "
                         f"pip install {' '.join(missing)} (or remove it from train.report_to)")
    return [n for n in names if n not in missing]


def start_trackers(run: Run) -> None:
    """Start Accelerate's trackers: tensorboard under <run>/tensorboard, MLflow in <run>/mlruns unless
    MLFLOW_TRACKING_URI says otherwise, W&B as its environment says (WANDB_MODE=offline for no network)."""
    accelerator, root = run.accelerator, run.paths.root
    if not accelerator.log_with:
        return
    names = {str(t).split(".")[-1].lower() for t in accelerator.log_with}
    if "mlflow" in names and run.is_main and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # A file store in the run folder (no server, no database driver needed); recent MLflow wants an opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
    flat = {key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in flat_config(to_dict(run.config)).items()}
    accelerator.init_trackers("mmtune", config=flat, init_kwargs={
        "wandb": {"name": root.name, "dir": str(root)}, "mlflow": {"run_name": root.name}})


def tracker_name(key: str) -> str:
    """``S/base %`` → ``S_base``: names every tracker accepts (MLflow's file store makes "/" a folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def flat_config(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat_config(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def deepspeed_launched() -> bool:
    """Whether ``accelerate launch`` was told to use DeepSpeed (``--use_deepspeed`` or a DeepSpeed config)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def open_run(config: RunConfig) -> Run:
    """Phase 1: the engine, the locked output folder, the methods (a bad name or option fails now)."""
    cuda = torch.cuda.is_available()
    mixed_precision = compute_precision(config.model.dtype, config.train.mixed_precision, config.train.fp32_masters)
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("fp16 needs a CUDA GPU (train.mixed_precision=fp16, or model.dtype=fp16 with fp32 masters, "
                         "which autocasts in fp16); on CPU it would silently do nothing: use bf16")
    # Accelerate keeps one AcceleratorState per process; several runs in one process (the demo, notebooks)
    # may differ in mixed precision, so start each run from a fresh state (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    if deepspeed_launched() and not cuda:
        # Without a GPU, Accelerate picks no communication backend for DeepSpeed and each process would train alone
        # on the whole data set (num_processes 1): name CPU's backend.
        PartialState(backend="gloo", timeout=timedelta(seconds=config.train.ddp_timeout))
    root = Path(config.train.output_dir)
    accelerator = Accelerator(
        # cpu=True would turn a DeepSpeed launch into DDP without a word: only force the CPU otherwise.
        mixed_precision=mixed_precision, cpu=not cuda and not deepspeed_launched(),
        log_with=available_trackers(config.train.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.ddp_timeout))],
    )
    methods = build_methods(config.method)
    check_model_source(config)  # a bad model path fails now, before any data is generated or read
    if config.model.quantization and (accelerator.num_processes > 1 or is_deepspeed(accelerator)):
        raise ValueError("model.quantization (QLoRA) is tested in one process only; launch it without DDP / DeepSpeed")
    sharded = shards_parameters(accelerator)
    unsupported = [m.name for m in methods if not m.supports_sharding]
    if sharded and unsupported:
        ready = ", ".join(n for n, cls in sorted(METHODS.items()) if cls.supports_sharding)
        raise ValueError(f"{' + '.join(unsupported)}: not tested with parameters sharded over processes (FSDP / "
                         f"ZeRO-3); methods that are: {ready}. Use DDP or DeepSpeed ZeRO-2 for the others.")
    configure_deepspeed(accelerator, config, methods)
    paths, lock = prepare_output_dir(config, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    return Run(config, accelerator, paths, methods, sharded, lock, peers=Peers(accelerator, config.train.ddp_timeout))


def load_data(run: Run) -> None:
    """Phase 2: the synthetic world (generated once, by the main process) and the shuffled task mixture."""
    config = run.config
    run.world = world_dir(config)
    if run.world is not None and run.is_main:
        synth = config.data.synthetic
        ensure_world(run.world, synth.seed, synth.n_train, synth.n_test, synth.image_size, config.train.progress)
    run.accelerator.wait_for_everyone()
    if not config.data.tasks:
        raise ValueError("data.tasks is empty: name at least one task file")
    run.records = build_mixture(config.data.tasks, config.train.seed,
                                resolve=lambda p: resolve_task_path(p, run.world, "train"),
                                skip_bad_records=config.data.skip_bad_records, skipped=run.skipped)
    run.say(f"mixture: {len(run.records)} records — {mixture_summary(run.records)}")
    if run.skipped:
        run.say(f"skipped {len(run.skipped)} bad records (data.skip_bad_records=true); first: {run.skipped[0]}")


# train.scheduler → transformers' schedule (each with the linear warm-up of train.warmup_ratio).
SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(config: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``train.optimizer`` over the scope's parameter groups (each group keeps its learning rate)."""
    name = config.train.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9)
    if name == "adafactor":  # with explicit learning rates (not Adafactor's relative step)
        return Adafactor(groups, lr=groups[0]["lr"], scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups)


def build_model(run: Run) -> None:
    """Phase 3: model, scope (what trains), methods' model changes, optimizer, data loader, schedule."""
    config = run.config
    model, run.processor = load_base(config)
    layout = apply_scope(model, config.scope.train_projector, config.scope.last_n_blocks, config.scope.full)
    for method in run.methods:
        model = method.prepare_model(model, layout)
    if config.train.fp32_masters and low_precision_dtype(config.model.dtype) and not is_deepspeed(run.accelerator):
        added = keep_fp32_masters(model)  # DeepSpeed keeps its own masters
        run.say(f"fp32 masters of the trainable parameters: +{added / 2**20:.1f} MiB; frozen weights stay "
                f"{config.model.dtype}, compute under {run.accelerator.mixed_precision} autocast")
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run.say(scope_summary(model, layout))
    optimizer = build_optimizer(config, parameter_groups(
        model, layout, config.train.learning_rate or config.scope.lr_blocks,
        config.train.learning_rate or config.scope.lr_projector, config.train.weight_decay))
    collator = TrainCollator(run.processor, config.data.max_length)
    too_long = find_too_long(run.records, collator)
    if too_long and not config.data.skip_bad_records:
        raise RecordError(too_long[0][1] + f" ({len(too_long)} such records; data.skip_bad_records=true skips them)")
    if too_long:
        run.skipped += [message for _, message in too_long]
        dropped = {id(record) for record, _ in too_long}
        run.records = [r for r in run.records if id(r) not in dropped]
        run.say(f"skipped {len(too_long)} records longer than data.max_length")
    loader = DataLoader(RecordDataset(run.records), batch_size=config.train.batch_size, drop_last=True,
                        sampler=EpochSampler(len(run.records), config.train.seed), collate_fn=collator,
                        num_workers=config.data.num_workers)
    if run.sharded and base_needs_evaluation(run):
        # A sharded model can't be evaluated by one process: evaluate the base before sharding it.
        run_evaluation(model.to(run.accelerator.device), run.processor, config, run.world, base_eval_dir(run))
    run.peers.wait_for_main(run.accelerator)
    run.model, run.optimizer, run.loader = run.accelerator.prepare(model, optimizer, loader)
    run.steps_per_epoch = len(run.loader) // config.train.grad_accum
    if run.steps_per_epoch == 0:
        raise ValueError(f"{len(run.records)} records are too few for batch_size={config.train.batch_size} × "
                         f"grad_accum={config.train.grad_accum} × {run.accelerator.num_processes} processes")
    total_steps = config.train.max_steps or math.ceil(config.train.epochs * run.steps_per_epoch)
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process), so
    # the schedule is the same for 1 or N processes; its state goes into mmtune's JSON run state.
    run.scheduler = get_scheduler(SCHEDULER_NAMES[config.train.scheduler], run.optimizer,
                                  num_warmup_steps=math.ceil(config.train.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
    # FSDP2 swaps each parameter for a sharded DTensor: look them up again on the prepared model.
    unwrapped = run.accelerator.unwrap_model(run.model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    generator = torch.Generator(device=run.accelerator.device).manual_seed(config.train.seed)
    run.ctx = TrainContext(model=run.model, unwrapped=unwrapped, trainable=trainable, generator=generator,
                           accelerator=run.accelerator, optimizer=run.optimizer, total_steps=total_steps,
                           output_dir=run.paths.root, tasks=sorted({r.task for r in run.records}))
    check_method_combination(run.methods)
    with on_masters(run.ctx, write_back=False):  # W0 and the like from the fp32 masters, on every engine
        for method in run.methods:
            method.setup(run.ctx)
    run.second_pass = [m for m in run.methods if m.second_pass and not m.per_task_gradients]
    run.task_method = next((m for m in run.methods if m.per_task_gradients), None)


def check_method_combination(methods: list) -> None:
    """Methods that build the step's gradient or loss themselves can't be stacked with each other (untested, and
    most combinations are not defined: whose second pass sees whose task gradients?)."""
    kinds = {"combine the tasks' gradients": [m for m in methods if m.per_task_gradients],
             "take a second gradient per step": [m for m in methods if m.second_pass],
             "balance the tasks' losses": [m for m in methods if m.balances_task_losses]}
    for what, found in kinds.items():
        if len(found) > 1:
            raise ValueError(f"{' + '.join(m.name for m in found)}: only one method may {what}")
    special = [m.name for m in methods if m.builds_own_step]
    if len(special) > 1:
        raise ValueError(f"{' + '.join(special)}: per-task gradients, second gradients and loss balancing are not "
                         "tested together; choose one of them (loss terms like l2_reg or nrca combine with any)")


def base_eval_dir(run: Run) -> Path:
    return run.paths.root / "eval" / "base"


def base_needs_evaluation(run: Run) -> bool:
    return run.config.eval.before and run.is_main and not (base_eval_dir(run) / "scores.json").exists()


def training_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """``key: saved → current`` for every training-relevant key that differs."""

    before, after = flat_config(to_dict(saved)), flat_config(to_dict(current))
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k)!r} → {after.get(k)!r}" for k in keys
            if before.get(k) != after.get(k) and not k.startswith(RESUME_MAY_CHANGE)]


def resume(run: Run) -> tuple[int, int]:
    """Phase 4 (with ``train.resume_from``): restore a verified checkpoint of the same training; return
    ``(epoch, step_in_epoch)`` to continue from."""
    config, paths = run.config, run.paths
    if paths.summary.exists() and paths.final.exists():
        done = json.loads(paths.summary.read_text()).get("steps")
        raise FileExistsError(f"{paths.root} holds a finished run (final/ saved after {done} steps): nothing to "
                              f"resume. To train further, start a new run from it (model.path={paths.final}).")
    if run.is_main:
        for path in remove_partials(paths.checkpoints):
            run.say(f"removed {path.name}: a checkpoint left half-written by a killed run")
    run.accelerator.wait_for_everyone()
    checkpoint = find_checkpoint(paths.checkpoints, config.train.resume_from, run.say)
    differences = training_differences(load_config(checkpoint / "config.yaml"), config)
    if differences:
        raise ValueError(f"{checkpoint} was trained with another configuration; resuming would silently mix "
                         f"two runs. Differences: {'; '.join(differences)}")
    if is_deepspeed(run.accelerator):
        check_engine_files(checkpoint)
    run.accelerator.load_state(str(checkpoint))
    state = load_run_state(checkpoint)
    run.scheduler.load_state_dict(state["scheduler"])
    run.ctx.generator.set_state(state["generator"])
    load_method_states(run.methods, checkpoint, run.accelerator)
    run.ctx.step = state["position"]["step"]
    if run.is_main and paths.metrics.exists():  # steps after the checkpoint are redone: drop their rows
        rows = [line for line in paths.metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= run.ctx.step]
        kept = paths.metrics.with_name(paths.metrics.name + ".tmp")
        kept.write_text("".join(row + "\n" for row in rows))
        os.replace(kept, paths.metrics)  # whole or not at all
    run.say(f"resumed from {checkpoint} at step {run.ctx.step}")
    return state["position"]["epoch"], state["position"]["step_in_epoch"]


def save_checkpoint(run: Run, position: dict) -> Path:
    """Write ``checkpoints/step-N`` atomically: into a partial folder, flushed, manifested, then renamed. A full disk
    removes the partial folder and stops the run with a ``DiskFullError`` naming the newest complete checkpoint."""
    accelerator, ctx, checkpoints = run.accelerator, run.ctx, run.paths.checkpoints
    partial, final = partial_dir(checkpoints, ctx.step), checkpoints / step_dir_name(ctx.step)
    with removed_unless_whole(partial, f"the checkpoint of step {ctx.step} ({final})", checkpoints):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        save_method_states(run.methods, partial, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_run_state(partial, position, ctx.generator, run.scheduler)
            save_config(run.config, partial / "config.yaml")
            finalize(partial, final, ctx.step)
    if accelerator.is_main_process:
        keep = run.config.train.keep_checkpoints
        if keep:
            for path in complete_checkpoints(checkpoints)[keep:]:  # newest first: the rest are pruned
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def check_finite(step: int, terms: dict[str, float], grad_norm: float, scaled: bool = False) -> None:
    """Stop before the optimizer step when a loss term or the gradient is NaN / inf (all processes agree:
    a non-finite loss anywhere makes the all-reduced gradient norm non-finite everywhere). With fp16 loss
    scaling (``scaled``) an overflowing gradient is expected now and then: the scaler skips that step and
    lowers the scale, so only the loss is checked."""
    bad = [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)]
    if bad or not (scaled or math.isfinite(grad_norm)):
        what = f"loss term {', '.join(bad)}" if bad else f"gradient norm {grad_norm}"
        raise NonFiniteError(f"step {step}: {what} is not finite. The run stops before the optimizer step; "
                             "nothing after the last checkpoint is saved. Lower the learning rate or the method's "
                             "coefficients, or check the data.")


def step_tokens(accelerator: Accelerator, micro: list[dict]) -> float:
    """Target tokens of one optimizer step, per process on average (all processes' micro-batches counted): the
    token-mean loss divides by it, so accumulation and DDP's gradient averaging give the exact token mean."""
    count = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)),
                         device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum") / accelerator.num_processes
    return max(1.0, float(count))


def task_gradients(run: Run, micro: list[dict], tokens: float | None, totals: dict[str, float] | None = None,
                   only: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of each task's share of the step's loss, one backward per task on one forward per micro-batch
    (all-reduced across processes by hand), as ``[T, P]`` flat vectors, and the gradient of the other methods'
    extra loss terms ``[P]``. ``only``: that task's share alone (no extra terms)."""
    config, accelerator, ctx = run.config, run.accelerator, run.ctx
    accum, params = config.train.grad_accum, list(ctx.trainable.values())
    sizes = [p.numel() for p in params]
    task_grads = torch.zeros(len(ctx.tasks), sum(sizes), device=accelerator.device)
    extra_grad = torch.zeros(sum(sizes), device=accelerator.device)

    def flat(loss: torch.Tensor, retain: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)])

    for piece in micro:
        with accelerator.no_sync(run.model), accelerator.autocast():  # DDP's own all-reduce is not used here
            shares: dict[str, torch.Tensor] = {}
            terms, _ = compute_losses(ctx, run.methods, piece, config.train.loss_reduction, tokens, shares)
        if only is not None:
            shares = {only: shares[only]} if only in shares else {}
        extra = [v for k, v in terms.items() if k != "ce" and v.requires_grad] if only is None else []
        for number, (task, share) in enumerate(shares.items()):
            last = number == len(shares) - 1 and not extra
            task_grads[ctx.tasks.index(task)] += flat(share / accum, retain=not last)
        if extra:
            extra_grad += flat(sum(extra) / accum, retain=False)
        if totals is not None:
            add_step_means(totals, terms, accum)
    if accelerator.num_processes > 1:
        task_grads = accelerator.reduce(task_grads, "mean")
        extra_grad = accelerator.reduce(extra_grad, "mean")
    return task_grads, extra_grad


@torch.no_grad()
def add_flat(params: list[torch.Tensor], offset: torch.Tensor) -> None:
    """``params += offset`` for a flat ``offset`` laid out as ``task_gradients`` lays gradients out."""
    for param, piece in zip(params, torch.split(offset, [p.numel() for p in params]), strict=True):
        param.add_(piece.view_as(param).to(param.dtype))


def task_gradient_backward(run: Run, micro: list[dict], tokens: float | None, totals: dict[str, float]) -> None:
    """For a multi-task optimisation method: the tasks' gradients (and, for a task-based sharpness-aware method,
    each task's gradient again at the weights its own perturbation moves to), combined by the method into
    ``param.grad``; other methods' extra loss terms are added on top."""
    ctx, method = run.ctx, run.task_method
    params = list(ctx.trainable.values())
    task_grads, extra_grad = task_gradients(run, micro, tokens, totals)
    present = (task_grads.abs().sum(1) > 0).nonzero().flatten().tolist()  # tasks of this step (on any process)
    if not present:
        combined = torch.zeros_like(extra_grad)
    elif method.second_pass:
        perturbed, original = torch.zeros_like(task_grads), [p.detach().clone() for p in params]
        for index in present:  # every process runs the same forwards: each task is present on some process
            add_flat(params, method.task_perturbation(ctx, task_grads[index]))
            perturbed[index] = task_gradients(run, micro, tokens, only=ctx.tasks[index])[0][index]
            with torch.no_grad():  # back to the very same weights (not W + ε − ε, which rounds)
                for param, value in zip(params, original, strict=True):
                    param.copy_(value)
        combined = method.combine_task_gradients(ctx, task_grads[present], perturbed[present])
    else:
        combined = method.combine_task_gradients(ctx, task_grads[present])
    for param, grad in zip(params, torch.split(combined + extra_grad, [p.numel() for p in params]), strict=True):
        param.grad = grad.view_as(param).to(param.dtype)


def backward_micro_batches(run: Run, micro: list[dict], tokens: float | None,
                           totals: dict[str, float] | None = None) -> None:
    """The step's loss and gradient over its micro-batches (gradients synchronised on the last one); each loss
    term's step mean is added to ``totals`` when given."""
    config, accelerator, accum = run.config, run.accelerator, run.config.train.grad_accum
    for index, piece in enumerate(micro):
        last = index == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
            with accelerator.autocast():
                terms, _ = compute_losses(run.ctx, run.methods, piece, config.train.loss_reduction, tokens)
            backward(accelerator, sum(terms.values()) / accum, last)
        if totals is not None:
            add_step_means(totals, terms, accum)


def add_step_means(totals: dict[str, float], terms: dict[str, torch.Tensor], accum: int) -> None:
    """Add one micro-batch's loss terms to the step's logged means."""
    for key, value in terms.items():
        totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum


def second_pass(run: Run, micro: list[dict], tokens: float | None) -> None:
    """Sharpness-aware methods: move the weights (``perturb``), recompute the step's gradient there, move them back
    (``restore``); the step then uses that gradient from the original weights. The logged loss stays the first one."""
    ctx = run.ctx
    for method in run.second_pass:
        method.perturb(ctx)
    run.optimizer.zero_grad(set_to_none=True)
    backward_micro_batches(run, micro, tokens)
    for method in reversed(run.second_pass):
        method.restore(ctx)


def train_loop(run: Run, epoch: int, step_in_epoch: int) -> float:
    """Phase 5: optimizer steps until ``total_steps``; returns the seconds spent."""
    config, accelerator, ctx, methods = run.config, run.accelerator, run.ctx, run.methods
    accum, total_steps = config.train.grad_accum, ctx.total_steps
    run.say(f"training {total_steps} steps ({run.steps_per_epoch} per epoch), methods: {config.method.name}")
    progress = tqdm(total=total_steps, initial=ctx.step, desc="train", disable=not (run.is_main and config.train.progress))
    metrics_file = run.paths.metrics.open("ab", buffering=0) if run.is_main else None
    start_trackers(run)
    # Without progress bars (logs, CI), one status line per ~5% of the run instead.
    status_every = 0 if config.train.progress else max(1, total_steps // 20)
    started, first_step = time.time(), ctx.step
    run.watch = watch = PreemptionWatch(config.train.preempt_signals).__enter__()
    try:
        every = config.eval.every_steps
        if every and not run.sharded and ctx.step and (ctx.step % every == 0 or ctx.step == total_steps) \
                and not (during_dir(run, f"step-{ctx.step:06d}") / "scores.json").exists():
            evaluation_row(run, metrics_file)  # cut short by a preemption before the checkpoint: redone now
        while ctx.step < total_steps and run.preempted is None:
            run.loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(run.loader, step_in_epoch * accum) if step_in_epoch \
                else run.loader
            micro: list[dict] = []
            for batch in batches:
                micro.append(batch)
                if len(micro) < accum:
                    continue
                totals: dict[str, float] = {}
                ctx.batches = micro  # for methods that revisit the step's batches after it (FAMO)
                tokens = step_tokens(accelerator, micro) / accum if config.train.loss_reduction == "token" else None
                if run.task_method is not None:
                    task_gradient_backward(run, micro, tokens, totals)
                else:
                    backward_micro_batches(run, micro, tokens, totals)
                if run.second_pass:
                    second_pass(run, micro, tokens)
                micro = []
                check = functools.partial(check_finite, ctx.step + 1, totals,
                                          scaled=accelerator.mixed_precision == "fp16")
                grad_norm = optimizer_step(ctx, methods, run.optimizer, config.train.max_grad_norm, check)
                ctx.batches = []  # the step's batches are not kept beyond it
                with warnings.catch_warnings():  # under DeepSpeed the step is the engine's, which torch can't see
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                    run.scheduler.step()
                ctx.step += 1
                step_in_epoch += 1
                progress.update(1)
                if ctx.step % config.train.log_every == 0 or ctx.step == total_steps:
                    logged = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                              for k, v in totals.items()}
                    row = {"step": ctx.step, "epoch": epoch + step_in_epoch / run.steps_per_epoch,
                           "loss": sum(logged.values()), **logged, "lr": run.scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "elapsed_s": round(time.time() - started, 4)}
                    if metrics_file:
                        append_row(metrics_file, row, run.paths)
                    accelerator.log({f"train/{k}": v for k, v in row.items() if isinstance(v, float) and k != "epoch"},
                                    step=ctx.step)
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                if status_every and (ctx.step % status_every == 0 or ctx.step == total_steps):
                    elapsed = time.time() - started
                    left = elapsed / max(1, ctx.step - first_step) * (total_steps - ctx.step)
                    run.say(f"step {ctx.step}/{total_steps} ({100 * ctx.step // total_steps}%)  "
                            f"loss {sum(totals.values()):.4f}  lr {run.scheduler.get_last_lr()[0]:.2e}  "
                            f"{elapsed:.0f} s elapsed, ~{left:.0f} s left")
                done_epoch = step_in_epoch >= run.steps_per_epoch
                position = {"step": ctx.step, "epoch": epoch + int(done_epoch),
                            "step_in_epoch": 0 if done_epoch else step_in_epoch}
                if every and not run.sharded and (ctx.step % every == 0 or ctx.step == total_steps):
                    evaluation_row(run, metrics_file)
                if watch.agreed(accelerator):  # every process stops at this step, after saving it
                    checkpoint = save_checkpoint(run, position)
                    run.preempted = preempted_error(watch.requested, ctx.step, checkpoint)
                    break
                if config.train.save_every and ctx.step % config.train.save_every == 0 and ctx.step < total_steps:
                    save_checkpoint(run, position)
                if ctx.step >= total_steps or done_epoch or run.stopped_early:
                    break
            if run.stopped_early or run.preempted:
                break
            epoch, step_in_epoch = epoch + 1, 0
    finally:
        watch.__exit__(None, None, None)
        progress.close()
        if metrics_file:
            metrics_file.close()
        # Not accelerator.end_training(): it also destroys the process group, which the rest of the run still uses.
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
    return time.time() - started


def append_row(metrics_file, row: dict, paths: RunPaths) -> None:
    """One row of ``metrics.jsonl``, flushed; a row that could not be written whole is cut off again, so the rows
    written so far stay readable (a full disk then stops the run with a ``DiskFullError``)."""
    position = os.fstat(metrics_file.fileno()).st_size
    data = (json.dumps(row) + "\n").encode()
    try:
        while data:  # an unbuffered file: a short write on a nearly full disk is continued (or fails) here
            data = data[metrics_file.write(data):]
    except OSError as error:
        with contextlib.suppress(OSError):
            os.ftruncate(metrics_file.fileno(), position)
        if disk_is_full(error, paths.root):
            raise disk_full_error(f"{paths.metrics} (step {row.get('step')})", paths.checkpoints) from error
        raise


def evaluation_row(run: Run, metrics_file) -> None:
    """An evaluation during training at the current step: its row into ``metrics.jsonl`` and the trackers, then the
    best model / early stopping bookkeeping."""
    eval_row = evaluate_during_training(run, f"step-{run.ctx.step:06d}")
    if metrics_file and eval_row:
        append_row(metrics_file, eval_row, run.paths)
    if run.best is not None:
        keep_best(run, eval_row)
    if eval_row:
        run.accelerator.log({f"eval/{tracker_name(k)}": v for k, v in flat_config(eval_row["eval"]).items()
                             if isinstance(v, int | float)}, step=run.ctx.step)


def keep_best(run: Run, eval_row: dict | None) -> None:
    """After an evaluation during training (on every process; ``eval_row`` is the main process's): a new best of
    ``train.best_metric`` writes ``<run>/best``; after ``train.early_stopping_patience`` evaluations in a row without
    one, every process agrees to stop."""
    if run.is_main and eval_row is not None:
        improved = update_best(run.best, eval_row["eval"], run.ctx.step, lambda folder: save_best_model(run, folder),
                               run.paths.root)
        mark = "new best" if improved else f"best still {run.best.describe()}"
        run.say(f"step {run.ctx.step}: {run.best.metric} = {metric_value(eval_row['eval'], run.best.metric):.2f} "
                f"({mark})")
    patience = run.config.train.early_stopping_patience
    if not patience:
        return
    count = torch.tensor(float(run.best.evaluations_without_improvement if run.is_main else 0),
                         device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        count = run.accelerator.reduce(count, "sum")
    if float(count) >= patience:
        run.stopped_early = True
        run.say(f"early stop at step {run.ctx.step}: no new best {run.best.metric} in {patience} evaluations "
                f"(best {run.best.describe()}, in {run.paths.root / 'best'})")


def save_best_model(run: Run, folder: Path) -> None:
    model = run.ctx.unwrapped
    if hasattr(model, "peft_config"):  # a PEFT model (LoRA) saves its adapter (PEFT keeps adapters in fp32)
        model.save_pretrained(folder)
    else:  # in model.dtype, as final/ is
        model.save_pretrained(folder, state_dict=to_saved_dtype(model.state_dict(), saved_dtype(run.config)))
    save_processor(run.processor, folder)


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def engine_summary(accelerator: Accelerator) -> dict:
    """Which engine the run really used (a launch can fall back silently), for train_summary.json."""
    summary = {"engine": str(accelerator.distributed_type).split(".")[-1], "processes": accelerator.num_processes}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        summary["zero_stage"] = plugin.zero_stage
        summary["zero_precision"] = "bf16" if plugin.deepspeed_config.get("bf16", {}).get("enabled") else "fp32"
    return summary


def finish(run: Run, seconds: float) -> None:
    """Phase 6: post-training hooks, ``final/`` (finite weights only), summary, final evaluation and report."""
    config, accelerator, ctx, paths = run.config, run.accelerator, run.ctx, run.paths
    accelerator.wait_for_everyone()
    ctx.final_model = accelerator.unwrap_model(run.model)
    with on_masters(ctx, write_back=True):
        for method in run.methods:
            method.on_train_end(ctx)
    full_state = accelerator.get_state_dict(run.model) if run.sharded else None  # gathers shards: every process
    # final/ (and its evaluation) in model.dtype: the fp32 masters are rounded once, here (mmtune.precision)
    dtype = saved_dtype(config)
    full_state = to_saved_dtype(full_state, dtype) if full_state is not None else None
    if dtype is not None and not run.sharded:
        ctx.final_model.to(dtype)
    if run.is_main:
        bad = non_finite_tensors(full_state if full_state is not None else ctx.final_model.state_dict())
        if bad:
            raise NonFiniteError(f"the trained model has non-finite values in {len(bad)} tensors (first: {bad[0]}); "
                                 "final/ is not written")
        save_final(run, full_state)
        summary = {"steps": ctx.step, "records": len(run.records), "skipped_records": len(run.skipped),
                   "skipped_examples": run.skipped[:20], "methods": config.method.name,
                   "train_seconds": round(seconds, 2), **engine_summary(accelerator),
                   "precision": describe(config.model.dtype, config.train.fp32_masters, config.train.mixed_precision)}
        if run.best is not None:
            summary["best"] = {"metric": run.best.metric, "value": run.best.value, "step": run.best.step,
                               "folder": str(paths.root / "best"), "stopped_early": run.stopped_early}
        paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
        # A sharded model can't be evaluated by one process: evaluate the saved model instead.
        final_model = load_model(paths.final, config.model.dtype)[0].to(accelerator.device) if run.sharded \
            else ctx.final_model
        if run_evaluation(final_model, run.processor, config, run.world, paths.root / "eval" / "final"):
            report = write_report([paths.root], paths.root / "report")
            run.say(to_markdown(report))
    run.peers.wait_for_main(accelerator)
    where = [f"final model  {paths.final}", f"metrics      {paths.metrics}", f"summary      {paths.summary}"]
    if (paths.root / "eval").is_dir():
        where.append(f"evaluation   {paths.root / 'eval'}")
    if (paths.root / "report").is_dir():
        where.append(f"report       {paths.root / 'report' / 'report.md'}")
    run.say(f"done after {ctx.step} steps:\n  " + "\n  ".join(where))


def save_final(run: Run, full_state: dict | None) -> None:
    """``final/`` written into ``final.partial`` and renamed when whole: a full disk (or a kill) never leaves a final/
    that looks finished."""
    final = run.paths.final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with removed_unless_whole(partial, f"the final model ({final})", run.paths.checkpoints):
        run.ctx.final_model.save_pretrained(partial, state_dict=full_state)
        save_processor(run.processor, partial)
        save_config(run.config, partial / "mmtune_config.yaml")
    os.replace(partial, final)


def saved_dtype(config: RunConfig) -> torch.dtype | None:
    """What ``final/`` and ``best/`` are saved in when the run trained fp32 masters: ``model.dtype``."""
    return low_precision_dtype(config.model.dtype) if config.train.fp32_masters else None


def train(config: RunConfig) -> Path:
    """Run one fine-tuning; return the output folder (``final/`` holds the model)."""
    run = open_run(config)
    try:
        load_data(run)
        build_model(run)
        if not run.sharded and base_needs_evaluation(run):
            with run.accelerator.autocast():
                run_evaluation(run.ctx.unwrapped, run.processor, config, run.world, base_eval_dir(run))
        run.peers.wait_for_main(run.accelerator)
        epoch, step_in_epoch = resume(run) if config.train.resume_from else (0, 0)
        if config.eval.every_steps and not run.sharded and not (during_dir(run, "base") / "scores.json").exists():
            evaluate_during_training(run, "base")
        if run.is_main and not (run.paths.root / "config.yaml").exists():
            save_config(config, run.paths.root / "config.yaml")
        if config.train.best_metric:
            run.best = BestState.replay(run.paths.metrics, config.train.best_metric)
        seconds = train_loop(run, epoch, step_in_epoch)
        if run.preempted is not None:
            run.say(str(run.preempted))
            raise run.preempted
        finish(run, seconds)
    except Exception as error:
        lost = run.peers.lost(error, run.ctx.step if run.ctx else 0, newest_complete(run.paths.checkpoints))
        if lost is not None:
            raise lost from error
        raise
    finally:
        run.peers.close()
        release_lock(run.lock)
    return run.paths.root


def run_evaluation(model, processor, config: RunConfig, world: Path | None, out: Path,
                   limit: int | None = None) -> dict | None:
    """Evaluate the configured downstream and held-out tasks (nothing if none are configured)."""
    sides = {side: [resolve_task_path(p, world, "test") for p in getattr(config.eval, side)]
             for side in ("downstream", "heldout")}
    if not any(sides.values()):
        return None
    return evaluate(model, processor, sides, out, config.eval.batch_size, config.eval.max_new_tokens,
                    limit or config.eval.limit, config.train.progress, overwrite=True)


def during_dir(run: Run, name: str) -> Path:
    return run.paths.root / "eval" / "during" / name


def evaluate_during_training(run: Run, name: str) -> dict | None:
    """Evaluate the model on the first ``eval.during_limit`` records per task (main process; the others wait)
    into ``eval/during/<name>`` and return one metrics row: per-task scores and S / G / H, raw and normalised
    to the base on the same records (``name="base"``, evaluated once before training) — the trade-off as it
    forms."""
    from mmtune.report import summarize

    row = None
    if run.is_main:
        model = run.ctx.unwrapped
        was_training = model.training
        model.eval()
        cut = run.watch.interruptible() if run.watch is not None else contextlib.nullcontext()
        try:
            with cut, run.accelerator.autocast():  # fp32 masters beside low-precision weights need autocast
                scores = run_evaluation(model, run.processor, run.config, run.world, during_dir(run, name),
                                        limit=run.config.eval.during_limit)
        except EvaluationInterrupted as signal_name:
            shutil.rmtree(during_dir(run, name), ignore_errors=True)  # half an evaluation is no evaluation
            run.say(f"evaluation {name} cut short by {signal_name}: it is redone when the run resumes")
            scores = None
        model.train(was_training)
        base_file = during_dir(run, "base") / "scores.json"
        base = json.loads(base_file.read_text()) if base_file.exists() else None
        if scores is not None:
            summary = summarize(scores, base)
            # with each task's validation loss (teacher-forced, on the same records): which task overfits when
            losses = {task: result["target_loss"] for task, result in scores["tasks"].items()}
            row = {"step": run.ctx.step,
                   "eval": {**{k: v for k, v in summary.items() if k != "normalised"}, "val_loss": losses}}
    run.peers.wait_for_main(run.accelerator)
    return row


def find_too_long(records, collator: TrainCollator) -> list[tuple]:
    """Records whose prompt + answer exceed ``max_length``, found before training starts, not mid-run.

    The image's token count is measured once on the first record with an image (fixed-resolution processors give
    every image the same count; variable-resolution ones are checked again, exactly, in the collator).
    """
    if not records:
        return []
    from mmtune.data.collate import prompt_text

    tokenizer, processor = collator.tokenizer, collator.processor
    image_tokens = 0
    pictured = next((r for r in records if r.image is not None), None)
    if pictured is not None:
        first_prompt = prompt_text(processor, pictured.prompt)
        text_only = len(tokenizer(first_prompt, add_special_tokens=False)["input_ids"])
        with_image = processor(text=[first_prompt], images=[RecordDataset([pictured])[0]["image"]],
                               return_tensors="pt")["input_ids"].shape[1]
        image_tokens = with_image - text_only
    found = []
    for record in records:
        prompt_tokens = len(tokenizer(prompt_text(processor, record), add_special_tokens=False)["input_ids"])
        # (a conversation's earlier answers are in its rendered prompt already)
        length = prompt_tokens + (image_tokens if record.image is not None else 0) + \
            len(collator.answer_ids(record.target))
        if length > collator.max_length:
            where = f"{record.source}: " if record.source else ""
            found.append((record, f"{where}record {record.id!r} (task {record.task}, {record.image}): prompt + answer "
                                  f"is about {length} tokens, longer than data.max_length={collator.max_length}"))
    return found
