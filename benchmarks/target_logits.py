"""What train.target_logits saves: the model's head on the positions that predict a target, against every position.

A tiny LLaVA (the test's shape: LLM width 64, 4 blocks) with a real-size vocabulary (150,000 extra words, as
Qwen2-VL's 151,646) on batches of the synthetic world's mix — detailed captions, lettered counting, short answers —
each batch collated both ways from the same records; a forward and backward of the per-sample cross-entropy, timed
(median of the rounds), and the logits each holds. Each setting runs in its own process for its peak memory::

    python benchmarks/target_logits.py            # → a Markdown table
    python benchmarks/target_logits.py --vocab 0  # the synthetic vocabulary alone (~150 words): the head is cheap
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(target_logits: bool, vocab: int, batches: int, rounds: int, world: Path) -> dict:
    import torch

    from mmtune.data.collate import KEEP, RecordDataset, TrainCollator, model_inputs
    from mmtune.data.records import read_records
    from mmtune.data.synthetic import ensure_world, vocabulary
    from mmtune.losses import sample_cross_entropy
    from mmtune.models.tiny import build_tiny

    torch.manual_seed(0)
    ensure_world(world, 0, 256, 16, 32, progress=False)
    records = [r for family in ("detailed_caption", "count_mc", "color_vqa")
               for r in read_records(world / f"{family}_train.jsonl")[:16 * batches // 3 + 16]]
    records = [records[i] for i in torch.randperm(len(records), generator=torch.Generator().manual_seed(0))]
    model, processor = build_tiny("llava", words=[*vocabulary(), *(f"w{i}" for i in range(vocab))])
    collate = TrainCollator(processor, target_logits=target_logits)
    data = [collate([RecordDataset(records)[i] for i in range(b * 16, b * 16 + 16)]) for b in range(batches)]
    times, logits_elements, positions = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for batch in data:
            model.zero_grad(set_to_none=True)
            logits = model(**model_inputs(batch)).logits
            sample_cross_entropy(logits, batch["labels"], batch.get(KEEP)).mean().backward()
            logits_elements.append(logits.numel())
            positions.append(logits.shape[1] / batch["input_ids"].shape[1])
        times.append((time.perf_counter() - start) / batches)
    return {"target_logits": target_logits, "vocabulary": len(processor.tokenizer), "seconds_per_batch":
            statistics.median(times), "logits_mib": statistics.mean(logits_elements) * 4 / 2**20,
            "positions_share": statistics.mean(positions),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=150_000, help="extra words in the vocabulary")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "on", args.vocab, args.batches, args.rounds, Path(args.world))))
        return
    world = Path(tempfile.mkdtemp()) / "world"
    rows = []
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--world", str(world), "--vocab",
                              str(args.vocab), "--batches", str(args.batches), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", **__import__("os").environ}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    off = rows[0]
    print(f"vocabulary {off['vocabulary']:,}; batches of 16, {args.batches} per round, median of {args.rounds} rounds")
    print("| train.target_logits | head positions (share of the sequence) | logits per batch | s / batch (fwd+bwd) | "
          "peak RSS |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {str(row['target_logits']).lower()} | {100 * row['positions_share']:.0f}% | "
              f"{row['logits_mib']:.0f} MiB | {row['seconds_per_batch']:.3f} "
              f"({row['seconds_per_batch'] / off['seconds_per_batch']:.2f}×) | {row['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
