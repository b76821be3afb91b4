"""Model merging cost: wall time and peak memory of `merge_folders` (streamed, tensor by tensor, sharded output)
against loading every model and merging in memory, for N = 3 fine-tuned models of a synthetic 50M-parameter
checkpoint (25 fp32 tensors of 2M entries; safetensors). Each variant runs in its own process (its own peak RSS).
Prints the numbers and writes them to docs/benchmarks.md (section "Model merging").

Run: ``python benchmarks/merging.py [--tensors 25] [--size 2000000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Model merging"


def make_models(root: Path, tensors: int, size: int, count: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(size, generator=generator) for i in range(tensors)}
    folders = []
    for index in range(count + 1):
        folder = root / ("base" if index == 0 else f"run{index}")
        folder.mkdir(parents=True)
        state = base if index == 0 else {k: v + 0.01 * torch.randn(size, generator=generator) for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}\n")
        folders.append(folder)
    return folders[0], folders[1:]


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(variant: str, root: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mmtune.merging import MergeRecipe, merge_folders, merge_state_dicts

    recipe = MergeRecipe("ties", density=0.2)
    base, runs = root / "base", sorted(root.glob("run*"))
    baseline_mb = status_mb("VmRSS")  # Python, torch, mmtune
    started = time.perf_counter()
    if variant == "streamed":
        merge_folders(base, runs, root / "out-streamed", recipe, shard_bytes=64 * 1024**2)
    else:
        merged = merge_state_dicts(load_file(str(base / "model.safetensors")),
                                   [load_file(str(r / "model.safetensors")) for r in runs], recipe)
        (root / "out-memory").mkdir()
        save_file(merged, str(root / "out-memory" / "model.safetensors"))
    seconds = time.perf_counter() - started
    peak_mb = status_mb("VmHWM")  # this process's high-water mark (ru_maxrss would carry the parent's over exec)
    print(json.dumps({"variant": variant, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb),
                      "above_imports_mb": round(peak_mb - baseline_mb)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=25)
    parser.add_argument("--size", type=int, default=2_000_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    lines = [SECTION, "",
             "TIES (density 0.2) of 3 fine-tuned models onto their base, for synthetic checkpoints of fp32 tensors "
             "(4 models read). Each variant runs in its own process; \"above imports\" is the peak RSS minus the "
             "process's RSS after importing Python, torch and mmtune. `python benchmarks/merging.py`.", "",
             "| model size | variant | wall time | peak RSS above imports |", "|---|---|---|---|"]
    for size in (args.size, 4 * args.size):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_models(root, args.tensors, size, 3)
            for variant in ("streamed", "in_memory"):
                out = subprocess.run([sys.executable, __file__, "--child", variant, str(root)], capture_output=True,
                                     text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                model_mb = args.tensors * size * 4 / 1024**2
                lines.append(f"| {args.tensors} × {size:,} ({model_mb:.0f} MB) | {row['variant']} | "
                             f"{row['seconds']:.1f} s | {row['above_imports_mb']} MB |")
    lines += ["", "Streamed (`merge_folders`, what `mmtune merge --rule` runs) reads one tensor of each model at a time "
              "and writes 64 MB output shards; in memory loads all four models and the result. Same output (tested in "
              "`tests/test_merging.py`). The streamed peak follows the largest tensor, not the number of tensors: "
              "here ≈ 13–15 × one tensor's fp32 size (the four inputs, the fp32 task vectors and TIES's "
              "temporaries) plus the 64 MB output shard. The in-memory merge needs ≈ 6.5 × one model.", ""]
    text = "\n".join(lines)
    print(text)
    doc = ROOT / "docs" / "benchmarks.md"
    current = doc.read_text()
    if SECTION in current:
        start = current.index(SECTION)
        end = current.find("\n## ", start + 1)
        current = current[:start] + current[end + 1:] if end != -1 else current[:start]
    doc.write_text(current.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
