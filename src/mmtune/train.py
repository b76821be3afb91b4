"""THE training loop: one file, on Hugging Face Accelerate, calling method hooks; it never names a method.

Read top to bottom: build model and scope → methods prepare → optimizer and schedule → data →
(resume) → for each optimizer step: micro-batches (cross-entropy + methods' extra losses, backward),
clip, ``before_optimizer_step``, step, ``after_optimizer_step``, log, checkpoint → ``on_train_end`` →
save ``final/`` as a Hugging Face model folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from mmtune.config import RunConfig, save_config
from mmtune.data.collate import RecordDataset, TrainCollator
from mmtune.data.mixture import build_mixture, mixture_summary
from mmtune.data.records import RecordError
from mmtune.data.synthetic import SYNTHETIC_PREFIX, ensure_world, resolve_task_path, vocabulary
from mmtune.evaluate import evaluate
from mmtune.losses import compute_losses
from mmtune.methods.base import (
    METHODS,
    TrainContext,
    build_methods,
    load_method_states,
    save_method_states,
    shards_parameters,
)
from mmtune.models.load import load_model, save_processor
from mmtune.models.scope import apply_scope, parameter_groups, scope_summary
from mmtune.models.tiny import build_tiny
from mmtune.report import to_markdown, write_report

STATE_FILE = "mmtune_state.pt"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "final", "checkpoints")


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


def load_base(config: RunConfig):
    """The model a run starts from: a local checkpoint, or a tiny random model (tests, demos)."""
    if config.model.tiny:
        return build_tiny(config.model.tiny, words=vocabulary(), image_size=config.model.tiny_image_size,
                          hidden_size=config.model.tiny_hidden_size, num_layers=config.model.tiny_layers,
                          seed=config.train.seed)
    if not config.model.path:
        raise ValueError("set model.path (a local checkpoint folder) or model.tiny (llava | qwen2_vl)")
    return load_model(config.model.path, config.model.dtype, config.model.attn_implementation)


def world_dir(config: RunConfig) -> Path | None:
    paths = [t.path for t in config.data.tasks] + config.eval.downstream + config.eval.heldout
    if not any(p.startswith(SYNTHETIC_PREFIX) for p in paths):
        return None
    synth = config.data.synthetic
    return Path(synth.dir) if synth.dir else Path(config.train.output_dir) / "synthetic"


def prepare_output_dir(config: RunConfig, is_main: bool) -> RunPaths:
    """Refuse to write into a folder that holds another run, unless resuming or told to overwrite."""
    root = Path(config.train.output_dir)
    taken = root.exists() and any((root / m).exists() for m in RUN_MARKERS)
    if taken and not config.train.resume_from:
        if not config.train.overwrite:
            raise FileExistsError(f"{root} already holds a run; choose another train.output_dir, resume with "
                                  "train.resume_from=latest, or replace it with train.overwrite=true")
        if is_main:
            for marker in RUN_MARKERS:
                target = root / marker
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
    return RunPaths(root)


def find_checkpoint(paths: RunPaths, resume_from: str) -> Path:
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an mmtune checkpoint (no {STATE_FILE})")
        return path
    found = sorted(paths.checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"train.resume_from=latest, but {paths.checkpoints} holds no checkpoint")
    return found[-1]


def save_checkpoint(accelerator: Accelerator, paths: RunPaths, ctx: TrainContext, methods, position: dict,
                    config: RunConfig, keep: int | None) -> Path:
    directory = paths.checkpoints / f"step-{ctx.step:06d}"
    accelerator.save_state(str(directory))
    save_method_states(methods, directory, accelerator)
    if accelerator.is_main_process:
        state = {"position": position, "generator": ctx.generator.get_state()}
        torch.save(state, directory / STATE_FILE)
        save_config(config, directory / "config.yaml")
        if keep:
            old = sorted(paths.checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
            for path in old:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return directory


def train(config: RunConfig) -> Path:
    """Run one fine-tuning; return the output folder (``final/`` holds the model)."""
    cuda = torch.cuda.is_available()
    # Accelerate keeps one AcceleratorState per process; several runs in one process (the demo, notebooks)
    # may differ in mixed precision, so start each run from a fresh state (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision, cpu=not cuda,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)],
    )
    is_main = accelerator.is_main_process
    paths = prepare_output_dir(config, is_main)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    say = accelerator.print
    methods = build_methods(config.method)  # a bad method name or option fails now, before any work
    sharded = shards_parameters(accelerator)
    unsupported = [m.name for m in methods if not m.supports_sharding]
    if sharded and unsupported:
        ready = ", ".join(n for n, cls in sorted(METHODS.items()) if cls.supports_sharding)
        raise ValueError(f"{' + '.join(unsupported)}: not tested with parameters sharded over processes (FSDP / "
                         f"ZeRO-3); methods that are: {ready}. Use DDP or DeepSpeed ZeRO-2 for the others.")

    # --- data (the synthetic world, if used, is generated once by the main process) ---
    world = world_dir(config)
    if world is not None and is_main:
        synth = config.data.synthetic
        ensure_world(world, synth.seed, synth.n_train, synth.n_test, synth.image_size, config.train.progress)
    accelerator.wait_for_everyone()
    if not config.data.tasks:
        raise ValueError("data.tasks is empty: name at least one task file")
    skipped: list[str] = []
    records = build_mixture(config.data.tasks, config.train.seed,
                            resolve=lambda p: resolve_task_path(p, world, "train"),
                            skip_bad_records=config.data.skip_bad_records, skipped=skipped)
    say(f"mixture: {len(records)} records — {mixture_summary(records)}")
    if skipped:
        say(f"skipped {len(skipped)} bad records (data.skip_bad_records=true); first: {skipped[0]}")

    # --- model, scope, methods, optimizer ---
    model, processor = load_base(config)
    layout = apply_scope(model, config.scope.train_projector, config.scope.last_n_blocks, config.scope.full)
    for method in methods:
        model = method.prepare_model(model, layout)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    say(scope_summary(model, layout))
    groups = parameter_groups(model, layout, config.scope.lr_blocks, config.scope.lr_projector,
                              config.train.weight_decay)
    optimizer = torch.optim.AdamW(groups)

    collator = TrainCollator(processor, config.data.max_length)
    too_long = find_too_long(records, collator)
    if too_long and not config.data.skip_bad_records:
        raise RecordError(too_long[0][1] + f" ({len(too_long)} such records; data.skip_bad_records=true skips them)")
    if too_long:
        skipped += [message for _, message in too_long]
        dropped = {id(record) for record, _ in too_long}
        records = [r for r in records if id(r) not in dropped]
        say(f"skipped {len(too_long)} records longer than data.max_length")
    loader = DataLoader(RecordDataset(records), batch_size=config.train.batch_size, drop_last=True,
                        sampler=EpochSampler(len(records), config.train.seed), collate_fn=collator,
                        num_workers=config.data.num_workers)
    base_eval = paths.root / "eval" / "base"
    evaluate_base = config.eval.before and is_main and not (base_eval / "scores.json").exists()
    if sharded:
        # A sharded model can't be evaluated by one process: evaluate the base before sharding it.
        if evaluate_base:
            run_evaluation(model.to(accelerator.device), processor, config, world, base_eval)
        accelerator.wait_for_everyone()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # FSDP2 swaps each parameter for a sharded DTensor: look them up again on the prepared model.
    trainable = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    accum = config.train.grad_accum
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(records)} records are too few for batch_size={config.train.batch_size} × "
                         f"grad_accum={accum} × {accelerator.num_processes} processes")
    total_steps = config.train.max_steps or math.ceil(config.train.epochs * steps_per_epoch)
    # The scheduler is stepped by hand once per optimizer step (not prepared: Accelerate would step it
    # once per process), so the schedule is the same for 1 or N processes.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.train.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)

    generator = torch.Generator(device=accelerator.device).manual_seed(config.train.seed)
    ctx = TrainContext(model=model, unwrapped=accelerator.unwrap_model(model), trainable=trainable,
                       generator=generator, accelerator=accelerator, optimizer=optimizer,
                       total_steps=total_steps)
    for method in methods:
        method.setup(ctx)
    if evaluate_base and not sharded:
        run_evaluation(ctx.unwrapped, processor, config, world, base_eval)
    accelerator.wait_for_everyone()

    epoch, step_in_epoch = 0, 0
    if config.train.resume_from:
        checkpoint = find_checkpoint(paths, config.train.resume_from)
        accelerator.load_state(str(checkpoint))
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        ctx.step = state["position"]["step"]
        epoch, step_in_epoch = state["position"]["epoch"], state["position"]["step_in_epoch"]
        generator.set_state(state["generator"])
        if "methods" in state:  # checkpoints from before method state had its own file
            for method in methods:
                method.load_state_dict(state["methods"].get(method.name, {}))
        else:
            load_method_states(methods, checkpoint, accelerator)
        say(f"resumed from {checkpoint} at step {ctx.step}")
    if is_main and not (paths.root / "config.yaml").exists():
        save_config(config, paths.root / "config.yaml")

    say(f"training {total_steps} steps ({steps_per_epoch} per epoch), methods: {config.method.name}")
    progress = tqdm(total=total_steps, initial=ctx.step, desc="train", disable=not (is_main and config.train.progress))
    metrics_file = paths.metrics.open("a") if is_main else None
    tensorboard = tensorboard_writer(paths.root / "tensorboard") if is_main else None
    started = time.time()
    while ctx.step < total_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, step_in_epoch * accum) if step_in_epoch else loader
        micro: list[dict] = []
        for batch in batches:
            micro.append(batch)
            if len(micro) < accum:
                continue
            totals: dict[str, float] = {}
            for index, piece in enumerate(micro):
                last = index == len(micro) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        terms, _ = compute_losses(ctx, methods, piece)
                    accelerator.backward(sum(terms.values()) / accum)
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum
            micro = []
            grad_norm = None
            if config.train.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(list(trainable.values()), config.train.max_grad_norm))
            for method in methods:
                method.before_optimizer_step(ctx)
            optimizer.step()
            scheduler.step()
            for method in methods:
                method.after_optimizer_step(ctx)
            optimizer.zero_grad(set_to_none=True)
            ctx.step += 1
            step_in_epoch += 1
            progress.update(1)
            if ctx.step % config.train.log_every == 0 or ctx.step == total_steps:
                logged = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                          for k, v in totals.items()}
                row = {"step": ctx.step, "epoch": epoch + step_in_epoch / steps_per_epoch,
                       "loss": sum(logged.values()), **logged, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "elapsed_s": round(time.time() - started, 4)}
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if tensorboard:
                    for key, value in row.items():
                        if isinstance(value, float) and key != "epoch":
                            tensorboard.add_scalar(f"train/{key}", value, ctx.step)
                progress.set_postfix(loss=f"{row['loss']:.4f}")
            done_epoch = step_in_epoch >= steps_per_epoch
            position = {"step": ctx.step, "epoch": epoch + int(done_epoch),
                        "step_in_epoch": 0 if done_epoch else step_in_epoch}
            if config.train.save_every and ctx.step % config.train.save_every == 0 and ctx.step < total_steps:
                save_checkpoint(accelerator, paths, ctx, methods, position, config, config.train.keep_checkpoints)
            if ctx.step >= total_steps or done_epoch:
                break
        epoch, step_in_epoch = epoch + 1, 0
    progress.close()
    if metrics_file:
        metrics_file.close()
    if tensorboard:
        tensorboard.close()

    # --- post-training hooks, then the final model folder ---
    accelerator.wait_for_everyone()
    ctx.final_model = accelerator.unwrap_model(model)
    for method in methods:
        method.on_train_end(ctx)
    full_state = accelerator.get_state_dict(model) if sharded else None  # gathers shards: every process calls
    if is_main:
        ctx.final_model.save_pretrained(paths.final, state_dict=full_state)
        save_processor(processor, paths.final)
        save_config(config, paths.final / "mmtune_config.yaml")
        summary = {"steps": ctx.step, "records": len(records), "skipped_records": len(skipped),
                   "skipped_examples": skipped[:20], "methods": config.method.name,
                   "train_seconds": round(time.time() - started, 2)}
        (paths.root / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        # A sharded model can't be evaluated by one process: evaluate the saved model instead.
        final_model = load_model(paths.final, config.model.dtype)[0].to(accelerator.device) if sharded \
            else ctx.final_model
        if run_evaluation(final_model, processor, config, world, paths.root / "eval" / "final"):
            report = write_report([paths.root], paths.root / "report")
            say(to_markdown(report))
    accelerator.wait_for_everyone()
    say(f"saved {paths.final}")
    return paths.root


def tensorboard_writer(log_dir: Path):
    """A TensorBoard writer when tensorboard is installed (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def run_evaluation(model, processor, config: RunConfig, world: Path | None, out: Path) -> dict | None:
    """Evaluate the configured downstream and held-out tasks (nothing if none are configured)."""
    sides = {side: [resolve_task_path(p, world, "test") for p in getattr(config.eval, side)]
             for side in ("downstream", "heldout")}
    if not any(sides.values()):
        return None
    return evaluate(model, processor, sides, out, config.eval.batch_size, config.eval.max_new_tokens,
                    config.eval.limit, config.train.progress, overwrite=True)


def find_too_long(records, collator: TrainCollator) -> list[tuple]:
    """Records whose prompt + answer exceed ``max_length``, found before training starts, not mid-run.

    The image's token count is measured once on the first record (fixed-resolution processors give every
    image the same count; variable-resolution ones are checked again, exactly, in the collator).
    """
    if not records:
        return []
    from mmtune.data.collate import prompt_text

    tokenizer, processor = collator.tokenizer, collator.processor
    first_prompt = prompt_text(processor, records[0].prompt)
    text_only = len(tokenizer(first_prompt, add_special_tokens=False)["input_ids"])
    with_image = processor(text=[first_prompt], images=[RecordDataset(records[:1])[0]["image"]],
                           return_tensors="pt")["input_ids"].shape[1]
    image_tokens = with_image - text_only
    found = []
    for record in records:
        prompt_tokens = len(tokenizer(prompt_text(processor, record.prompt), add_special_tokens=False)["input_ids"])
        length = prompt_tokens + image_tokens + len(collator.answer_ids(record.target))
        if length > collator.max_length:
            found.append((record, f"record {record.id!r} (task {record.task}, {record.image}): prompt + answer is "
                                  f"about {length} tokens, longer than data.max_length={collator.max_length}"))
    return found
