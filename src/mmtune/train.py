"""THE training loop, on Hugging Face Accelerate, calling method hooks; it never names a method.

``train`` reads top to bottom as its phases, each a function here or a module of its own:

1. ``open_run``     the engine, the methods (a bad name fails now), the locked run folder (``mmtune.run_folder``);
2. data             the world and the task mixture (``mmtune.train_data``);
3. ``build_model``  model, what trains (scope, methods' model changes, fp32 masters under a bf16 ``model.dtype``:
                    ``mmtune.precision``), optimizer; ``prepare_training``: data loader, the engine, schedule,
                    the methods' ``setup``;
4. resume           a verified checkpoint of the same training (``mmtune.resume``);
5. ``train_loop``   one ``mmtune.step.train_step`` per optimizer step, its row in the step log (``mmtune.step_log``),
                    evaluation / best model / early stop (``mmtune.during_training``), a preemption check (SIGTERM
                    saves this step and stops: ``mmtune.preemption``), checkpoints;
6. ``finish``       ``on_train_end``, ``final/`` (a Hugging Face model folder in ``model.dtype``, only with finite
                    weights, written whole or not at all), the summary, the final evaluation and report.

A lost process of a multi-process run is named (``mmtune.liveness``); a full disk is a clear error
(``mmtune.checkpoint``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_scheduler
from transformers.optimization import Adafactor

from mmtune.best import BestState
from mmtune.checkpoint import newest_complete
from mmtune.config import SCHEDULERS, RunConfig, save_config
from mmtune.data.collate import accepts_logits_to_keep
from mmtune.data.mixture import drawn_indices
from mmtune.data.padding_free import padding_free_refusal
from mmtune.during_training import (
    base_needs_evaluation,
    evaluate_during_training,
    evaluation_row,
    is_due,
    redo_cut_evaluation,
    run_evaluation,
)
from mmtune.engines import on_masters
from mmtune.errors import NonFiniteError, Preempted, RunInUseError  # noqa: F401  (RunInUseError: public here)
from mmtune.methods.base import TrainContext
from mmtune.models.base_model import check_model_source, load_base, whole_init  # noqa: F401 — public here too
from mmtune.models.load import load_model
from mmtune.models.save import write_model_folder
from mmtune.models.scope import apply_scope_config, parameter_groups, scope_summary
from mmtune.precision import (
    describe,
    keep_fp32_masters,
    low_precision_dtype,
    saved_dtype,
    to_saved_dtype,
)
from mmtune.preemption import PreemptionWatch, preempted_error
from mmtune.report import to_markdown, write_report
from mmtune.resume import resume, save_checkpoint
from mmtune.run import Run, open_run  # noqa: F401 — public here too
from mmtune.run_folder import release_lock
from mmtune.step import train_step
from mmtune.step_log import StepLog
from mmtune.train_data import build_loader, load_records, optimizer_steps


def build_optimizer(config: RunConfig, groups: list[dict], sharded: bool = False) -> torch.optim.Optimizer:
    """``train.optimizer`` over the scope's parameter groups (each group keeps its learning rate). AdamW is torch's
    fused kernel where it applies (the Trainer's default, ``adamw_torch_fused``: one kernel for all tensors, about
    6× faster than the per-tensor loop on this CPU at 6M trainable parameters); sharded parameters keep the
    multi-tensor loop, which is what is tested there."""
    name = config.train.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9)
    if name == "adafactor":  # with explicit learning rates (not Adafactor's relative step)
        return Adafactor(groups, lr=groups[0]["lr"], scale_parameter=False, relative_step=False, warmup_init=False)
    if not sharded:
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
            pass
    return torch.optim.AdamW(groups)


def say_what_an_epoch_leaves_out(run: Run, epoch_records: int) -> None:
    """Announce the records of each epoch's order that fill no whole optimizer step (drop_last, and micro-batches
    short of grad_accum): they are not trained that epoch — a new order each epoch leaves out others."""
    train = run.config.train
    per_step = train.batch_size * train.grad_accum * run.accelerator.num_processes
    left_out = epoch_records - run.steps_per_epoch * per_step
    if left_out > 0:
        run.say(f"each epoch trains {run.steps_per_epoch} steps of {per_step} records: {left_out} of its "
                f"{epoch_records} records fill no whole step and are left out of that epoch (a new order each epoch "
                "leaves out others); a multiple of train.batch_size × grad_accum × processes trains them all")


def build_model(run: Run) -> None:
    """Phase 3a: the model as it will train — scope, the methods' model changes (LoRA), fp32 masters, gradient
    checkpointing — and the optimizer over its parameter groups."""
    config = run.config
    model, run.processor = load_base(config)
    if config.model.tiny and (config.eval.downstream or config.eval.heldout):
        run.say(f"model.tiny={config.model.tiny}: a random-init model — its scores (and the base's) are noise; "
                "configs/quickstart.yaml fine-tunes the shipped pre-trained base instead")
    model.train()  # from_pretrained returns eval mode, where activation checkpointing (and dropout) would not act
    layout = apply_scope_config(model, config.scope)
    for method in run.methods:
        model = method.prepare_model(model, layout)
    if config.train.fp32_masters and low_precision_dtype(config.model.dtype) and not run.engine.deepspeed:
        added = keep_fp32_masters(model)  # DeepSpeed keeps its own masters
        run.say(f"fp32 masters of the trainable parameters: +{added / 2**20:.1f} MiB; frozen weights stay "
                f"{config.model.dtype}, compute under {run.accelerator.mixed_precision} autocast")
    if config.model.gradient_checkpointing:  # each block's activations recomputed in the backward
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5's name
        enable({"use_reentrant": False}) if enable else \
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run.say(scope_summary(model, layout))
    run.model = model
    run.optimizer = build_optimizer(config, parameter_groups(
        model, layout, config.train.learning_rate or config.scope.lr_blocks,
        config.train.learning_rate or config.scope.lr_projector, config.train.weight_decay,
        config.train.learning_rate or config.scope.lr_vision), run.sharded)


def prepare_training(run: Run) -> None:
    """Phase 3b: the data loader; model, optimizer and loader handed to the engine; the schedule; the methods'
    ``setup`` (on the fp32 masters, whatever the engine)."""
    config = run.config
    refused = config.data.padding_free and padding_free_refusal(run.model)
    if refused:
        raise ValueError(refused)
    target_logits = config.train.target_logits and accepts_logits_to_keep(run.model)
    if config.train.target_logits and not target_logits:
        run.say(f"train.target_logits: {type(run.model).__name__}'s forward takes no logits_to_keep; its head runs at "
                "every position")
    loader, run.records = build_loader(config, run.records, run.processor, run.skipped, run.say, target_logits,
                                       keep_samples=any(m.reads_samples for m in run.methods))
    run.plan = getattr(loader.sampler, "plan", None)
    if run.sharded and base_needs_evaluation(run):
        # A sharded model can't be evaluated by one process: evaluate the base before sharding it (under ZeRO-3 a
        # checkpoint is loaded already partitioned, so the main process loads it whole for this).
        with whole_init():  # also: transformers' generate would wait for the other processes under ZeRO-3
            base = run.model
            if any(hasattr(p, "ds_tensor") for p in base.parameters()):
                base = load_base(config)[0]
            run_evaluation(base.to(run.accelerator.device), run.processor, config, run.world, run.paths.base_eval,
                           say=run.say)
        del base
    run.peers.wait_for_main(run.accelerator)
    run.model, run.optimizer, run.loader = run.accelerator.prepare(run.model, run.optimizer, loader)
    run.steps_per_epoch = len(run.loader) // config.train.grad_accum
    if run.steps_per_epoch == 0:
        raise ValueError(f"{len(run.records)} records are too few for batch_size={config.train.batch_size} × "
                         f"grad_accum={config.train.grad_accum} × {run.accelerator.num_processes} processes")
    say_what_an_epoch_leaves_out(run, len(loader.sampler))
    total_steps = config.train.max_steps or math.ceil(config.train.epochs * run.steps_per_epoch)
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process), so
    # the schedule is the same for 1 or N processes; its state goes into mmtune's JSON run state.
    run.scheduler = get_scheduler(SCHEDULERS[config.train.scheduler], run.optimizer,
                                  num_warmup_steps=math.ceil(config.train.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
    # FSDP2 swaps each parameter for a sharded DTensor: look them up again on the prepared model.
    unwrapped = run.accelerator.unwrap_model(run.model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    generator = torch.Generator(device=run.accelerator.device).manual_seed(config.train.seed)
    run.ctx = TrainContext(model=run.model, unwrapped=unwrapped, trainable=trainable, generator=generator,
                           accelerator=run.accelerator, engine=run.engine, optimizer=run.optimizer,
                           total_steps=total_steps,
                           output_dir=run.paths.root, tasks=sorted({r.task for r in run.records}),
                           batches=lambda: run.loader, records=run.records,
                           collator=getattr(run.loader, "collate_fn", None))
    with on_masters(run.ctx, write_back=False):  # W0 and the like from the fp32 masters, on every engine
        for method in run.methods:
            method.setup(run.ctx)


@dataclass
class LoopEnd:
    """How the loop ended: the seconds it took, whether early stopping ended it, and the preemption that did."""

    seconds: float
    stopped_early: bool = False
    preempted: Preempted | None = None


def train_loop(run: Run, epoch: int, step_in_epoch: int) -> LoopEnd:
    """Phase 5: optimizer steps until ``total_steps`` (or an early stop, or a preemption); returns how it ended."""
    config, accelerator, ctx = run.config, run.accelerator, run.ctx
    run.say(f"training {ctx.total_steps} steps ({run.steps_per_epoch} per epoch), methods: {config.method.name}")
    log = StepLog(accelerator, config, run.paths, ctx.total_steps, ctx.step)
    run.watch = watch = PreemptionWatch(config.train.preempt_signals, announce=run.is_main).__enter__()
    started = time.time()
    stopped, preempted = False, None
    try:
        stopped = redo_cut_evaluation(run, log)
        steps = optimizer_steps(run.loader, accelerator.skip_first_batches, config.train.grad_accum,
                                run.steps_per_epoch, epoch, step_in_epoch, count=ctx.total_steps - ctx.step)
        for epoch, step_in_epoch, micro in steps:
            done = train_step(ctx, run.methods, micro, run.optimizer, run.scheduler, config.train)
            log.step(ctx.step, epoch + step_in_epoch / run.steps_per_epoch, done.terms,
                     run.scheduler.get_last_lr()[0], done.grad_norm, done.task_losses, ctx.tasks, done.diagnostics)
            done_epoch = step_in_epoch >= run.steps_per_epoch
            position = {"step": ctx.step, "epoch": epoch + int(done_epoch),
                        "step_in_epoch": 0 if done_epoch else step_in_epoch}
            if is_due(run):
                stopped = evaluation_row(run, log) or stopped
            if watch.agreed(accelerator):  # every process stops at this step, after saving it
                preempted = preempted_error(watch.requested, ctx.step, save_checkpoint(run, position))
                break
            if config.train.save_every and ctx.step % config.train.save_every == 0 and ctx.step < ctx.total_steps:
                save_checkpoint(run, position)
            if stopped:
                break
    finally:
        watch.__exit__(None, None, None)
        log.close()
    return LoopEnd(time.time() - started, stopped, preempted)


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


def records_digest(records: list) -> str:
    """A short fingerprint of the training records (their ids, repeats counted, order ignored)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(str(r.id) for r in records)).encode()).hexdigest()[:16]


def trained_records(run: Run) -> list:
    """The records training drew from: the run's records, or — a sampled mixture, whose record list holds every
    source whole — each task's and the replay's drawn n (every epoch trained, where they are drawn afresh)."""
    if run.plan is None:
        return run.records
    epochs = range(max(1, math.ceil(run.ctx.step / run.steps_per_epoch))) if run.plan.resample else [0]
    return [run.records[i] for i in sorted({i for epoch in epochs for i in drawn_indices(run.plan, epoch)})]


def finish(run: Run, seconds: float, stopped_early: bool = False) -> None:
    """Phase 6: post-training hooks, ``final/`` (finite weights only), summary, final evaluation and report."""
    config, accelerator, ctx, paths = run.config, run.accelerator, run.ctx, run.paths
    accelerator.wait_for_everyone()
    ctx.final_model = accelerator.unwrap_model(run.model)
    with on_masters(ctx, write_back=True):
        for method in run.methods:
            method.on_train_end(ctx)
    full_state = accelerator.get_state_dict(run.model) if run.sharded else None  # gathers shards: every process
    if full_state is not None:
        full_state = keyed_as(full_state, ctx.final_model)
    # final/ (and its evaluation) in model.dtype: the fp32 masters are rounded once, here (mmtune.precision)
    dtype = saved_dtype(config.model.dtype, config.train.fp32_masters)
    full_state = to_saved_dtype(full_state, dtype) if full_state is not None else None
    if dtype is not None and not run.sharded:
        ctx.final_model.to(dtype)
    if run.is_main:
        bad = non_finite_tensors(full_state if full_state is not None else ctx.final_model.state_dict())
        if bad:
            raise NonFiniteError(f"the trained model has non-finite values in {len(bad)} tensors (first: {bad[0]}); "
                                 "final/ is not written")
        save_final(run, full_state)
        trained = trained_records(run)
        summary = {"steps": ctx.step, "records": len(trained), "skipped_records": len(run.skipped),
                   # which records trained (data.seed): runs with the same digest trained on the same records
                   "data_seed": config.data.draw_seed(config.train.seed), "records_digest": records_digest(trained),
                   "skipped_examples": run.skipped[:20], "methods": config.method.name,
                   "train_seconds": round(seconds, 2), **engine_summary(accelerator),
                   "precision": describe(config.model.dtype, config.train.fp32_masters, config.train.mixed_precision)}
        if run.best is not None:
            summary["best"] = {"metric": run.best.metric, "value": run.best.value, "step": run.best.step,
                               "folder": str(paths.root / "best"), "stopped_early": stopped_early}
        paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
        # A sharded model can't be evaluated by one process: evaluate the saved model instead.
        # Under ZeRO-3 transformers would load the model partitioned and generate in step with the other processes
        # (collectives only this process enters): whole_init switches both off.
        with whole_init():
            final_model = load_model(paths.final, config.model.dtype)[0].to(accelerator.device) if run.sharded \
                else ctx.final_model
            evaluated = run_evaluation(final_model, run.processor, config, run.world, paths.root / "eval" / "final",
                                       say=None if config.eval.before else run.say)  # the base's said it
        if evaluated:
            report = write_report([paths.root], paths.root / "report")
            run.say(to_markdown(report))
    run.peers.wait_for_main(accelerator)
    where = [f"final model  {paths.final}", f"metrics      {paths.metrics}", f"summary      {paths.summary}"]
    if (paths.root / "eval").is_dir():
        where.append(f"evaluation   {paths.root / 'eval'}")
    if (paths.root / "report").is_dir():
        where.append(f"report       {paths.root / 'report' / 'report.md'}")
    run.say(f"done after {ctx.step} steps:\n  " + "\n  ".join(where))


def keyed_as(state: dict, model: torch.nn.Module) -> dict:
    """``state`` (the engine's model's, gathered from its shards) keyed as ``model``'s own parameters: where a method
    replaced the final model by the one it wrapped (LoRA: PEFT's adapters merged and unloaded), every key of the
    wrapper's state carries its prefix (``base_model.model.``), which ``final/`` must not."""
    names = list(model.state_dict())
    if not names or names[0] in state:
        return state
    prefix = next((key[:-len(names[0])] for key in state if key.endswith("." + names[0])), None)
    if prefix is None:
        raise RuntimeError(f"the gathered weights don't name the final model's: no key ends in {names[0]!r} "
                           f"(first keys: {list(state)[:3]})")
    return {key.removeprefix(prefix): value for key, value in state.items()}


def save_final(run: Run, full_state: dict | None) -> None:
    """``final/`` (``mmtune.models.save``: written whole or not at all)."""
    write_model_folder(run.ctx.final_model, run.processor, run.paths.final, state_dict=full_state,
                       run_config=run.config, overwrite=True, checkpoints=run.paths.checkpoints,
                       what=f"the final model ({run.paths.final})")


def train(config: RunConfig) -> Path:
    """Run one fine-tuning; return the output folder (``final/`` holds the model)."""
    run = open_run(config)
    try:
        run.world, run.records, run.skipped = load_records(config, run.accelerator, run.say)
        build_model(run)
        prepare_training(run)
        if not run.sharded and base_needs_evaluation(run):
            with run.accelerator.autocast():
                run_evaluation(run.ctx.unwrapped, run.processor, config, run.world, run.paths.base_eval,
                               say=run.say)
        run.peers.wait_for_main(run.accelerator)
        epoch, step_in_epoch = resume(run) if config.train.resume_from else (0, 0)
        if config.eval.every_steps and not run.sharded and not (run.paths.during("base") / "scores.json").exists():
            evaluate_during_training(run, "base")
        if run.is_main and not (run.paths.root / "config.yaml").exists():
            save_config(config, run.paths.root / "config.yaml")
        if config.train.best_metric:
            run.best = BestState.replay(run.paths.metrics, config.train.best_metric)
        end = train_loop(run, epoch, step_in_epoch)
        if end.preempted is not None:
            run.say(str(end.preempted))
            raise end.preempted
        finish(run, end.seconds, end.stopped_early)
    except Exception as error:
        lost = run.peers.lost(error, run.ctx.step if run.ctx else 0, newest_complete(run.paths.checkpoints))
        if lost is not None:
            raise lost from error
        raise
    finally:
        run.peers.close()
        release_lock(run.lock)
    return run.paths.root
