"""Speed and memory benchmarks; prints numbers and writes them to docs/benchmarks.md.

* training step time and peak memory of each method relative to ``vanilla`` (tiny LLaVA, 50/50
  open/choice mix, batch 16), each method in its own process so peak RSS is its own, in interleaved
  rounds; the time spent in the methods' optimizer-step hooks is measured directly;
* evaluation throughput: samples/s of batched greedy generation at batch 1 vs 16.

Run: ``make bench`` (or ``python benchmarks/run_all.py [--steps N] [--rounds R]``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmtune.estimate import tensors_in

ROOT = Path(__file__).resolve().parents[1]
METHODS_SMALL = ["vanilla", "nrca", "spider", "nrca+spider", "l2_reg", "random_mask", "pcgrad", "cagrad", "sam",
                 "task_sam", "uncertainty", "famo", "dft", "asft", "eaft", "ewc", "lora", "lora_sculpt"]
METHODS_LARGE = ["vanilla", "nrca", "spider"]


READING = """
## Reading these numbers

- Each method runs in its own process, in {rounds} interleaved rounds (vanilla, nrca, spider, ..., then again),
  so that slow phases of the shared machine hit every method alike. Step time is the median over the steps
  of all rounds (after {warm} warm-up steps per run); "per round" is the range of the ratio to the vanilla run
  of the same round; its width (5–10 points even for `l2_reg`, which adds only a small loss term) is the
  round-to-round noise of this shared machine.
- **NRCA** runs the noisy forward only on the open-response half of the batch, against the reference's
  second full pass (≈ 2×); target ≤ 1.6×.
- **PCGrad / CAGrad** run one backward per task present in the step on a shared forward (two tasks in this mix;
  their cost grows with the number of tasks: with three, on the v2 world, their training took ≈ 3.4× vanilla's in
  runs not controlled for machine load, docs/results.md). Their extra memory is one flat gradient per task (T × the
  trainable parameters), invisible at this size.
- **SAM** adds a second forward and backward per step; **task-based SAM** adds, on top of PCGrad's per-task
  backward passes, one forward and one backward per task at that task's perturbed weights (here 2 tasks: the
  per-task gradients, then 2 perturbed passes).
- **Uncertainty weighting** only re-weighs the loss (its Adam over T numbers is in "hook ms/step"); **FAMO** forwards
  the step's batch again after the step to see how each task's loss moved: that extra forward is its hook time.
- **SPIDER** is element-wise work over the trainable parameters, independent of the number of tokens: the
  gradient sum before the step, then per tensor the two importances, the coefficients and the interpolation
  (about 20 in-place kernels with host-side scalars; the mean/std of |W0| are computed once). "hook ms/step"
  is the time spent in SPIDER's two hooks, measured directly: it does not depend on how the machine's speed
  drifts between runs, so "1 + hooks/vanilla" is the steadier estimate of the step-time ratio (target
  ≤ 1.10×). The update costs less than the AdamW step itself. Forward and backward grow with tokens ×
  parameters while SPIDER grows with parameters only, so at the papers' setting (16 sequences of up to
  2,048 tokens per step) its share is smaller still.
- **Memory**: "method state" is the size of the tensors a method keeps, relative to the trainable
  parameters: 2.00 for SPIDER (W0 and G, target ≤ 2×; the reference keeps 3), 1.00 for the baselines that
  keep W0. SPIDER's three scratch buffers (the size of the largest trainable tensor) live only during the
  update. Peak RSS is the whole process (Python, torch, data), so it understates relative differences.
"""

WARM = 5


def one_method(method: str, steps: int, world: str, out: str, hidden: int) -> dict:
    from mmtune.config import load_config
    from mmtune.methods.base import METHODS
    from mmtune.train import train

    hook_seconds = [0.0]

    def timed(hook):
        def wrapper(self, ctx):
            start = time.perf_counter()
            hook(self, ctx)
            hook_seconds[0] += time.perf_counter() - start
        return wrapper

    for cls in METHODS.values():  # time what each method adds around the optimizer step
        for hook in ("before_optimizer_step", "after_optimizer_step"):
            setattr(cls, hook, timed(getattr(cls, hook)))

    state_bytes = [0]

    def measured_setup(setup):
        def wrapper(self, ctx):
            setup(self, ctx)
            state_bytes[0] += sum(t.numel() * t.element_size() for t in tensors_in(self.state_dict()))
        return wrapper

    for cls in METHODS.values():  # the memory a method keeps: the tensors of its state after setup
        cls.setup = measured_setup(cls.setup)

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"method.name={method}", f"train.max_steps={steps}", "train.batch_size=16", "train.progress=false",
        "train.log_every=1", f"train.output_dir={out}", f"data.synthetic.dir={world}",
        f"model.tiny_hidden_size={hidden}",
        "data.tasks=[{path: 'synthetic:detailed_caption', n: 128}, {path: 'synthetic:count_mc', n: 128}]",
        "data.synthetic.n_train=256", "data.synthetic.n_test=64", "eval.downstream=[]", "eval.heldout=[]"])
    run = train(config)
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [b - a for a, b in zip(elapsed[WARM - 1:], elapsed[WARM:], strict=False)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parameters = trainable_parameters(config)  # loads the base once more: count and size from one load
    trainable = sum(p.numel() for p in parameters)
    trainable_bytes = sum(p.numel() * p.element_size() for p in parameters)
    return {"method": method, "hidden": hidden, "step_seconds": step_seconds, "hook_ms": hook_seconds[0] / steps * 1e3,
            "peak_rss_mb": peak_mb, "trainable": trainable, "state_x": state_bytes[0] / trainable_bytes}


def trainable_parameters(config):
    from mmtune.models.scope import apply_scope
    from mmtune.train import load_base

    model, _ = load_base(config)
    apply_scope(model, config.scope.train_projector, config.scope.last_n_blocks)
    return [p for p in model.parameters() if p.requires_grad]


def eval_throughput(world: Path, batch_size: int, n: int) -> float:
    from mmtune.data.records import read_records
    from mmtune.data.synthetic import vocabulary
    from mmtune.evaluate import generate
    from mmtune.models.tiny import build_tiny

    model, processor = build_tiny("llava", words=vocabulary(), hidden_size=128)
    records = read_records(world / "detailed_caption_test.jsonl")[:n]
    generate(model, processor, records[:4], batch_size, 16, progress=False)  # warm-up
    start = time.perf_counter()
    generate(model, processor, records, batch_size, 16, progress=False)
    return n / (time.perf_counter() - start)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (hidden, method): median step time over all rounds, ratio to vanilla, per-round ratio range."""
    rows = []
    keys = list(dict.fromkeys((r["hidden"], r["method"]) for r in runs))
    for hidden, method in keys:
        mine = [r for r in runs if (r["hidden"], r["method"]) == (hidden, method)]
        vanilla = [r for r in runs if (r["hidden"], r["method"]) == (hidden, "vanilla")]
        step = statistics.median(s for r in mine for s in r["step_seconds"])
        base = statistics.median(s for r in vanilla for s in r["step_seconds"])
        per_round = [statistics.median(m["step_seconds"]) / statistics.median(v["step_seconds"])
                     for m, v in zip(mine, vanilla, strict=True)]
        rows.append({"hidden": hidden, "method": method, "trainable": mine[0]["trainable"], "step_s": step,
                     "ratio": step / base, "round_min": min(per_round), "round_max": max(per_round),
                     "hook_ms": statistics.median(r["hook_ms"] for r in mine), "state_x": mine[0]["state_x"],
                     "hook_estimate": 1 + statistics.median(r["hook_ms"] for r in mine) / 1e3 / base,
                     "rss": statistics.median(r["peak_rss_mb"] for r in mine),
                     "rss_ratio": statistics.median(r["peak_rss_mb"] for r in mine)
                     / statistics.median(r["peak_rss_mb"] for r in vanilla)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_method(args.child, args.steps, args.world, args.out, args.hidden)))
        return

    from mmtune.data.synthetic import ensure_world

    tmp = Path(tempfile.mkdtemp(prefix="mmtune-bench-"))
    world = ensure_world(tmp / "world", 0, 256, 64, 32, progress=False)
    runs = []
    for round_index in range(args.rounds):
        for hidden, methods in ((128, METHODS_SMALL), (512, METHODS_LARGE)):
            for method in methods:
                out = tmp / f"{method.replace('+', '_')}-{hidden}-{round_index}"
                output = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                                         "--world", str(world), "--hidden", str(hidden), "--out", str(out)],
                                        capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(output.strip().splitlines()[-1]))
                last = runs[-1]
                print(f"round {round_index} hidden {hidden} {method}: median step "
                      f"{statistics.median(last['step_seconds']):.4f} s, hooks {last['hook_ms']:.1f} ms/step", flush=True)
    rows = summarise(runs)
    throughput = {b: eval_throughput(world, b, 64) for b in (1, 16)}

    lines = [
        "# Benchmarks", "",
        f"Measured by `benchmarks/run_all.py` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"{args.rounds} rounds × {args.steps} steps per method. Re-run `make bench` to refresh.", "",
        "## Training step (tiny LLaVA, batch 16, 50/50 open/choice mix, projector + last 2 blocks trained)", "",
        "| LLM hidden | trainable params | method | step time (s) | × vanilla | per round | hook ms/step "
        "| 1 + hooks/vanilla | method state (× trainable) | peak RSS (MB) | × vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['hidden']} | {r['trainable']:,} | {r['method']} | {r['step_s']:.4f} | {r['ratio']:.3f} | "
                     f"{r['round_min']:.2f}–{r['round_max']:.2f} | {r['hook_ms']:.1f} | {r['hook_estimate']:.3f} | "
                     f"{r['state_x']:.2f} | {r['rss']:.0f} | "
                     f"{r['rss_ratio']:.2f} |")
    lines += ["", "Targets: `nrca` ≤ 1.6× vanilla (the reference's two full passes cost ≈ 2×); `spider` ≤ 1.10× "
              "time and extra memory ≤ 2× the trainable parameters' size (W0 and G). Peak RSS is the whole "
              "process (Python, torch, data), so it understates relative differences on a model this small.", "",
              "## Evaluation throughput (batched greedy generation, 16 new tokens)", "",
              "| batch size | samples/s |", "|---|---|"]
    lines += [f"| {b} | {v:.1f} |" for b, v in throughput.items()]
    lines += ["", f"Batch 16 is {throughput[16] / throughput[1]:.1f}× faster than one sample at a time.", ""]
    doc = ROOT / "docs" / "benchmarks.md"
    doc.write_text("\n".join(lines) + READING.format(rounds=args.rounds, warm=WARM) + others_sections(doc))
    print("\n".join(lines))


OWN = ("## Training step", "## Evaluation throughput", "## Reading these numbers")


def others_sections(doc: Path) -> str:
    """The sections of ``doc`` that other scripts own (target logits, tokens that count, merging): kept as they are."""
    if not doc.exists():
        return ""
    sections = doc.read_text().split("\n## ")[1:]
    kept = [section for section in sections if not any(f"## {section}".startswith(own) for own in OWN)]
    return "".join(f"\n## {section}" for section in kept)


if __name__ == "__main__":
    main()
