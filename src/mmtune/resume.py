"""Save and resume: ``checkpoints/step-N`` written whole or not at all, and a resume that continues the very same
training (verified checkpoint, same configuration, the scheduler, generator, methods' state and data position)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mmtune.checkpoint import (
    check_engine_files,
    complete_checkpoints,
    finalize,
    find_checkpoint,
    load_run_state,
    partial_dir,
    remove_partials,
    removed_unless_whole,
    save_run_state,
    step_dir_name,
)
from mmtune.config import RunConfig, flat_config, load_config, save_config, to_dict
from mmtune.methods.base import load_method_states, save_method_states

if TYPE_CHECKING:
    from mmtune.run import Run

# Config keys that may differ between a checkpoint and the run resuming it: where things go and how they are
# shown. Everything else changes what is trained, so a resume with a different value is refused.
RESUME_MAY_CHANGE = ("train.output_dir", "train.resume_from", "train.overwrite", "train.progress", "train.log_every",
                     "train.report_to", "train.preempt_signals", "train.ddp_timeout",
                     "train.save_every", "train.keep_checkpoints", "data.num_workers", "data.synthetic.dir", "eval.")



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
    if run.engine.deepspeed:
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
