"""Compute only the tokens that count, side by side: padded, length-grouped and padding-free batches, with the head on
every position or on the targets only, for vanilla and NRCA — each against the plain Hugging Face forward (the loss a
Trainer computes from ``labels``) on the same batches.

A tiny Qwen2-VL (LLM width 64, 4 blocks) with a real-size vocabulary (150,000 extra words, as Qwen2-VL's 151,646), on
a mix with real variance: detailed captions, two-turn conversations (a caption, then a counting question), lettered
counting answers and one-word colour answers, every image drawn at one of five sizes (32×32 to 128×128 pixels: 4 to
64 image tokens with Qwen2-VL's dynamic resolution). Every setting draws the same epoch of records; the grouped
layout orders it by ``data.group_by_length``'s sampler, the others by the plain epoch order, and every 8th batch of the
epoch is measured (the epoch's spread of lengths: grouped batches run from the longest to the shortest) — so the HF
forward and mmtune's losses of one layout see the very same batches. Each setting
runs in its own process (its peak memory is its own): a forward and backward of the loss per batch, timed over the
epoch's batches (median of the rounds); real tokens per second count the records' tokens, not the padding::

    python benchmarks/tokens_that_count.py            # → the Markdown table of docs/benchmarks.md
    python benchmarks/tokens_that_count.py --vocab 0  # the synthetic vocabulary alone (~150 words)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(32, 32), (64, 48), (96, 96), (128, 64), (128, 128)]
LAYOUTS = ["padded", "grouped", "padding_free"]


def mixed_records(world: Path, count: int) -> list:
    """Captions, conversations, lettered and one-word answers, each image at one of ``SIZES``, shuffled."""
    import random

    from PIL import Image

    from mmtune.data.records import Record, read_records

    rng = random.Random(0)
    captions = read_records(world / "detailed_caption_train.jsonl")
    counts = read_records(world / "count_mc_train.jsonl")
    colors = read_records(world / "color_vqa_train.jsonl")
    resized = world / "resized"
    resized.mkdir(exist_ok=True)

    def sized(path: str) -> str:
        width, height = rng.choice(SIZES)
        target = resized / f"{Path(path).stem}-{width}x{height}.png"
        if not target.exists():
            with Image.open(path) as image:
                image.convert("RGB").resize((width, height)).save(target)
        return str(target)

    records = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            r = captions[i]
            records.append(Record(id=r.id, task="caption", kind="open", image=sized(r.image), prompt=r.prompt,
                                  answers=r.answers))
        elif kind == 1:
            c, q = captions[i], counts[i]
            records.append(Record(id=f"talk-{i}", task="conversation", kind="open", image=sized(c.image),
                                  prompt=q.prompt, answers=q.answers,
                                  history=[{"prompt": c.prompt, "answer": c.target}]))
        elif kind == 2:
            r = counts[i]
            records.append(Record(id=r.id, task="count", kind=r.kind, image=sized(r.image), prompt=r.prompt,
                                  answers=r.answers, choices=r.choices))
        else:
            r = colors[i % len(colors)]
            records.append(Record(id=r.id, task="color", kind=r.kind, image=sized(r.image), prompt=r.prompt,
                                  answers=r.answers))
    rng.shuffle(records)
    return records


def measure(setting: dict, vocab: int, batch_size: int, batches: int, rounds: int, world: Path) -> dict:
    import torch

    from mmtune.config import MethodSection
    from mmtune.data.collate import KEEP, RecordDataset, TrainCollator, model_inputs
    from mmtune.data.padding_free import PADDING_FREE, pack
    from mmtune.data.synthetic import ensure_world, vocabulary
    from mmtune.losses import compute_losses
    from mmtune.methods.base import TrainContext, build_methods
    from mmtune.models.tiny import build_tiny
    from mmtune.train_data import EpochSampler, LengthGroupedSampler, record_lengths

    torch.manual_seed(0)
    spread = 8  # the epoch holds 8× the measured batches: every 8th batch is measured, the epoch's spread of lengths
    ensure_world(world, 0, batch_size * batches * spread, 16, 32, progress=False)
    records = mixed_records(world, batch_size * batches * spread)
    model, processor = build_tiny("qwen2_vl", words=[*vocabulary(), *(f"w{i}" for i in range(vocab))])
    processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}  # dynamic resolution
    model.train()
    collate = TrainCollator(processor, target_logits=setting["targets"],
                            padding_free=setting["layout"] == "padding_free")
    lengths = record_lengths(records, collate)
    sampler = LengthGroupedSampler(lengths, batch_size, 0) if setting["layout"] == "grouped" else \
        EpochSampler(len(records), 0)
    order = list(sampler)
    data = [collate([RecordDataset(records)[j] for j in order[b * batch_size:(b + 1) * batch_size]])
            for b in range(0, batches * spread, spread)]
    real = sum(int(batch["attention_mask"].sum()) for batch in data)
    positions = sum(batch["attention_mask"].numel() for batch in data)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ctx = TrainContext(model=model, unwrapped=model, trainable=params, generator=torch.Generator().manual_seed(0))
    methods = [] if setting["method"] == "hf" else build_methods(MethodSection(setting["method"]))

    def hf_loss(batch):
        """The plain Hugging Face forward: the model's own loss from ``labels`` over whole-sequence logits (the
        padding-free one as transformers' DataCollatorWithFlattening feeds it: one row, positions restarting)."""
        inputs = {k: v for k, v in model_inputs(batch).items() if k != KEEP}
        if batch.get(PADDING_FREE):
            inputs, _ = pack(inputs, batch["labels"], model.model.get_rope_index)
            labels = batch["labels"][batch["attention_mask"].bool()].unsqueeze(0)
        else:
            labels = batch["labels"]
        return model(**inputs, labels=labels).loss

    times = []
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        for batch in data:
            model.zero_grad(set_to_none=True)
            if setting["method"] == "hf":
                loss = hf_loss(batch)
            else:
                terms, _ = compute_losses(ctx, methods, batch)
                loss = sum(terms.values())
            loss.backward()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return {**setting, "vocabulary": len(processor.tokenizer), "padded_share": 1 - real / positions,
            "real_tokens": real, "seconds": seconds, "tokens_per_s": real / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def settings() -> list[dict]:
    rows = [{"layout": layout, "targets": False, "method": "hf"} for layout in LAYOUTS]
    rows += [{"layout": layout, "targets": targets, "method": method}
             for method in ("vanilla", "nrca") for layout in LAYOUTS for targets in (False, True)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=150_000, help="extra words in the vocabulary")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.vocab, args.batch_size, args.batches, args.rounds,
                                 Path(args.world))))
        return
    world = Path(tempfile.mkdtemp(prefix="mmtune-tokens-")) / "world"
    rows = []
    for setting in settings():
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(setting), "--world", str(world),
                              "--vocab", str(args.vocab), "--batch-size", str(args.batch_size), "--batches",
                              str(args.batches), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", **os.environ})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    hf = {row["layout"]: row for row in rows if row["method"] == "hf"}
    print(f"Qwen2-VL tiny, vocabulary {rows[0]['vocabulary']:,}; {args.batches} batches of {args.batch_size} (every "
          f"8th of an epoch of {args.batches * 8}), forward + backward, median of {args.rounds} rounds after one "
          "warm-up, each setting in its own process")
    print()
    print("| loss | layout | head on | padded share | real tokens / s | × HF, same layout | × HF padded | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        loss = "HF forward (labels)" if row["method"] == "hf" else f"mmtune {row['method']}"
        layout = row["layout"].replace("_", "-")
        head = "targets" if row["targets"] else "every position"
        padded = "0% (none given to the model)" if row["layout"] == "padding_free" else f"{100 * row['padded_share']:.1f}%"
        same = row["tokens_per_s"] / hf[row["layout"]]["tokens_per_s"]
        base = row["tokens_per_s"] / hf["padded"]["tokens_per_s"]
        print(f"| {loss} | {layout} | {head} | {padded} | {row['tokens_per_s']:,.0f} | {same:.2f}× | {base:.2f}× | "
              f"{row['peak_rss_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
