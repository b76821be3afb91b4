"""Shared helpers for training tests."""

import json
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from mmtune.data.records import Record
from mmtune.step import Step, step_builder, step_tokens
from mmtune.train import load_base


def text_only_records(n: int) -> list[Record]:
    """``n`` records without an image (task ``text_qa``), as instruction mixes hold conversations with no picture."""
    return [Record(id=f"text-{i}", task="text_qa", kind="open", image=None, prompt=f"Which shape has {i + 3} sides?",
                   answers=[f"a {i + 3}-gon ."]) for i in range(n)]


def free_port() -> int:
    """A TCP port free now, for a launch's rendezvous: launches run side by side (two pytest-xdist workers, the
    DeepSpeed fixture's parallel launches), so none may take accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights(config) -> dict[str, torch.Tensor]:
    """The weights a run of ``config`` starts from (what ``mmtune train`` loads)."""
    model, _ = load_base(config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextmanager
def assembled(config):
    """A run assembled exactly as ``mmtune train`` assembles it — engine, methods, data, model, optimizer, the
    methods' ``setup`` — and not trained: for tests of single steps."""
    from mmtune.run_folder import release_lock
    from mmtune.train import build_model, open_run, prepare_training
    from mmtune.train_data import load_records

    run = open_run(config)
    try:
        run.world, run.records, run.skipped = load_records(config, run.accelerator, run.say)
        build_model(run)
        prepare_training(run)
        yield run
    finally:
        run.peers.close()
        release_lock(run.lock)


def losses(run: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]  # evaluation rows (eval.every_steps) carry no loss


def trainable_names(weights: dict, last_n: int = 2, layers: int = 4) -> set[str]:
    blocks = tuple(f"language_model.layers.{i}." for i in range(layers - last_n, layers))
    return {n for n in weights if "multi_modal_projector" in n or any(b in n for b in blocks)}


def nth_micro(run, index: int = 0) -> list[dict]:
    """The run's ``index``-th batch of its first epoch, as one step's micro-batches."""
    loader = iter(run.loader)
    for _ in range(index):
        next(loader)
    return [next(loader)]


@torch.no_grad()
def move_off_pretrained(run, scale: float = 0.01) -> None:
    """Away from W0, so distance terms (L1, L2) have a gradient; the same move in every run of a test."""
    generator = torch.Generator().manual_seed(1)
    for param in run.ctx.trainable.values():
        param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


def step_gradient(run, micro) -> dict[str, torch.Tensor]:
    """The gradient one step of the run's methods forms (before clipping and the step hooks)."""
    ctx = run.ctx
    for param in ctx.trainable.values():
        param.grad = None
    tokens = step_tokens(run.accelerator, micro) / len(micro)
    step = Step(ctx, run.methods, micro, run.config.train.loss_reduction, tokens)
    builder = step_builder(run.methods)
    builder.build_step(step) if builder is not None else step.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in ctx.trainable.items()}


def step_gradients_on_and_off(tiny_config, method: str, setting: str, marked) -> tuple[dict, dict]:
    """One step of ``method`` from the same state on the same micro-batch with ``setting`` (a boolean config key)
    true, then false: the two gradients. ``marked(batch)`` says whether a batch shows the setting on (so that a test
    fails if the setting never reached the batches)."""
    results = []
    for on in ("true", "false"):
        with assembled(tiny_config(f"method.name={method}", f"{setting}={on}", out=f"run-{on}")) as run:
            micro = nth_micro(run)
            assert bool(marked(micro[0])) == (on == "true")
            move_off_pretrained(run)
            torch.manual_seed(0)
            run.ctx.generator.manual_seed(0)
            results.append(step_gradient(run, micro))
    assert any(float(g.abs().sum()) > 0 for g in results[1].values())
    return results[0], results[1]
