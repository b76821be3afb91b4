"""``mmtune estimate`` against what a real run holds, on this CPU: a tiny model and a ~100M-parameter one.

For each size, in a fresh process: the estimate (meta device) of the run's per-device memory, then the run itself —
assembled as ``mmtune train`` assembles it, one optimizer step — with each part measured on the real tensors
(weights, gradients, AdamW's state, the method's state; activations counted by the same saved-tensor hook on a real
forward) and the process's peak resident memory above what it held before the model existed. The parts are
expected to agree exactly except the activations (the meta device takes PyTorch's math attention path); the peak
also holds the data, the tokenizer, PyTorch's allocator caches and transient buffers the estimate leaves out.

Run: ``python benchmarks/estimate_check.py``; writes ``docs/benchmarks_memory.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": {"hidden": 64, "layers": 4, "vision_hidden": 32}, "100M": {"hidden": 768, "layers": 16,
                                                                             "vision_hidden": 384}}
METHOD = "spider"


def measure(size: dict, workdir: str) -> dict:
    import resource

    import torch

    from mmtune.config import load_config
    from mmtune.data.synthetic import ensure_world
    from mmtune.estimate import activation_bytes, estimate, tensors_in
    from mmtune.run_folder import release_lock
    from mmtune.step import train_step
    from mmtune.train import build_model, open_run, prepare_training
    from mmtune.train_data import load_records

    torch.set_num_threads(2)
    world = ensure_world(Path(workdir) / "world", 0, 128, 32, 32, progress=False)
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.tiny_hidden_size={size['hidden']}", f"model.tiny_layers={size['layers']}",
        f"model.tiny_vision_hidden_size={size['vision_hidden']}", f"method.name={METHOD}", "train.batch_size=8",
        "train.max_steps=1", "train.progress=false", "train.report_to=[]", "eval.downstream=[]", "eval.heldout=[]",
        f"data.synthetic.dir={world}", f"train.output_dir={Path(workdir) / 'run'}",
        "data.tasks=[{path: 'synthetic:detailed_caption', n: 32}, {path: 'synthetic:count_mc', n: 32}]"])
    predicted = estimate(config, "ddp", 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = open_run(config)
    try:
        run.world, run.records, run.skipped = load_records(config, run.accelerator, run.say)
        build_model(run)
        prepare_training(run)
        micro = [next(iter(run.loader))]
        sequence = int(micro[0]["input_ids"].shape[1])
        train_step(run.ctx, run.methods, micro, run.optimizer, run.scheduler, config.train)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        model = run.ctx.unwrapped

        def nbytes(state) -> int:
            return sum(t.numel() * t.element_size() for t in tensors_in(state) if t.dim() > 0)

        from mmtune.models.scope import layout_of

        layout = layout_of(model)
        measured = {
            "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "optimizer state": nbytes(run.optimizer.state_dict()["state"]),
            "method state": sum(nbytes(m.state_dict()) for m in run.methods),
            "activations": activation_bytes(model, layout, 8, sequence, torch.float32, device="cpu"),
        }
    finally:
        run.peers.close()
        release_lock(run.lock)
    at_length = estimate(config, "ddp", 1, sequence=sequence)
    parts = at_length.parts
    expected = {"weights": parts["frozen weights"] + parts["trainable weights (masters)"],
                "optimizer state": parts["optimizer state"], "method state": parts["method state"],
                "activations": parts["activations"]}
    return {"parameters": predicted.parameters, "trainable": predicted.trainable, "sequence": sequence,
            "measured": measured, "estimated": expected, "estimate_total": at_length.total, "peak_rss_growth": peak}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        size = json.loads(sys.argv[2])
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(measure(size, workdir)))
        return 0
    results = {}
    for name, size in SIZES.items():
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(size)], capture_output=True, text=True,
                             check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    lines = ["# `mmtune estimate` against a real run", "",
             f"`python benchmarks/estimate_check.py`: a tiny LLaVA and a ~100M-parameter one, method `{METHOD}`, batch 8, "
             "fp32, DDP with one process, one optimizer step on this CPU; the estimate taken at the batch's real "
             "sequence length.", "",
             "| model | parameters | part | estimated (MB) | measured (MB) | estimated ÷ measured |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for part, value in r["measured"].items():
            est = r["estimated"][part]
            lines.append(f"| {name} | {r['parameters'] / 1e6:.1f}M | {part} | {est / 2**20:.1f} | {value / 2**20:.1f} "
                         f"| {est / value:.3f} |")
        lines.append(f"| {name} | | whole estimate vs the process's peak RSS growth | {r['estimate_total'] / 2**20:.1f} | "
                     f"{r['peak_rss_growth'] / 2**20:.1f} | {r['estimate_total'] / r['peak_rss_growth']:.3f} |")
    (ROOT / "docs" / "benchmarks_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
