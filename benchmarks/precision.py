"""bf16 against fp32: does a bf16 run's update agree with the fp32 run's? With and without fp32 master weights.

The shipped tiny base (assets/tiny-llava-base), its weights rounded to the bf16 grid so every run starts from the same
model, trained on the demo's downstream mix at the papers' learning rates (2e-4 blocks, 2e-5 projector) for
``--steps`` steps, three ways: fp32; bf16 with fp32 masters (the default); bf16 without (``train.fp32_masters=false``,
every weight updated in place in bf16). Per trainable matrix: the cosine of the bf16 run's update (final − start)
with the fp32 run's rounded to bf16 (the grid ``final/`` is saved in), the ratio of their norms, and the share of
elements that moved. Writes docs/benchmarks_precision.md.

Run: ``.venv/bin/python benchmarks/precision.py [--steps 20] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from mmtune.config import load_config
from mmtune.models.load import load_model, save_processor
from mmtune.train import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"bf16, fp32 masters": ["model.dtype=bf16", "train.mixed_precision=bf16"],
            "bf16, no masters": ["model.dtype=bf16", "train.mixed_precision=bf16", "train.fp32_masters=false"]}


def part(name: str) -> str:
    if "multi_modal_projector" in name:
        return "projector"
    return "attention" if "self_attn" in name else "mlp" if "mlp" in name else "other"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_precision.md"))
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = load_model(ROOT / "assets" / "tiny-llava-base")
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
        base = tmp / "base"
        model.save_pretrained(base)
        save_processor(processor, base)
        start = weights(base)
        for seed in args.seeds:
            common = [f"model.path={base}", f"train.seed={seed}", f"train.max_steps={args.steps}",
                      "scope.lr_blocks=2e-4", "scope.lr_projector=2e-5", "train.progress=false", "eval.before=false",
                      "eval.downstream=[]", "eval.heldout=[]", f"data.synthetic.dir={tmp / 'world'}"]
            runs = {"fp32": train(load_config(ROOT / "configs" / "demo.yaml",
                                              [*common, f"train.output_dir={tmp / f'fp32-{seed}'}"]))}
            for label, overrides in VARIANTS.items():
                out = tmp / f"{label.replace(' ', '').replace(',', '-')}-{seed}"
                runs[label] = train(load_config(ROOT / "configs" / "demo.yaml",
                                                [*common, *overrides, f"train.output_dir={out}"]))
            reference = weights(runs["fp32"] / "final")
            for label in VARIANTS:
                low = weights(runs[label] / "final")
                for name, value in low.items():
                    if value.ndim != 2 or torch.equal(reference[name], start[name]):
                        continue  # frozen, or not a matrix
                    ref = reference[name].to(torch.bfloat16).float() - start[name]
                    got = value - start[name]
                    stats = rows.setdefault(f"{label}|{part(name)}", {"cos": [], "norm": [], "moved": []})
                    stats["cos"].append(float(torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(),
                                                                                    dim=0)))
                    stats["norm"].append(float(got.norm() / ref.norm()))
                    stats["moved"].append(float((got != 0).float().mean()))
    lines = ["# bf16 with and without fp32 master weights\n",
             f"Measured by `benchmarks/precision.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}` on "
             f"{platform.machine()}, torch {torch.__version__}, {datetime.date.today()}: the shipped tiny base on the "
             "bf16 grid, the demo's mix, the papers' learning rates, compared per trainable matrix with the fp32 run "
             "rounded to bf16 (the grid `final/` is saved in). Cosine: of the two updates; norm: bf16 update ÷ fp32 "
             "update; moved: share of elements the bf16 run changed. Ranges over matrices and seeds.\n",
             "| run | part | matrices | cosine min | cosine median | norm ratio (range) | moved (range) |",
             "|---|---|---|---|---|---|---|"]
    for key, stats in rows.items():
        label, where = key.split("|")
        lines.append(f"| {label} | {where} | {len(stats['cos'])} | {min(stats['cos']):.3f} | "
                     f"{statistics.median(stats['cos']):.3f} | {min(stats['norm']):.2f}–{max(stats['norm']):.2f} | "
                     f"{100 * min(stats['moved']):.0f}–{100 * max(stats['moved']):.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
