"""NRCA's diagnostic split on finished runs: the confidence gap (clean − noised image) over a caption's image words
against its template words, for the base and each run's final model, on the run's own detailed_caption test records.

Why: a caption is mostly template the image can't change ("there is … on a … background"); the gap over the whole
answer averages those in. This prints, per model, the target confidence and its gap over all tokens, over the image
words (colours, shapes, sizes, places, count, background: what the world's generator drew) and over the rest.

Run: ``python benchmarks/diagnostic_split.py runs/v2-remedies/vanilla-seed{0,1,2}`` (runs of docs/results.md).
The world is regenerated from the runs' ``world.json`` into a temporary folder (same seed: the same records, now with
``extra.image_words``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from mmtune.data.records import read_records
from mmtune.data.synthetic import generate_world
from mmtune.evaluate import teacher_forced
from mmtune.models.load import load_model

FIELDS = ("confidence", "confidence_gap", "confidence_image", "confidence_gap_image", "confidence_template",
          "confidence_gap_template")


def main(run_dirs: list[str]) -> None:
    torch.manual_seed(0)
    first = Path(run_dirs[0])
    config = json.loads(json.dumps(__import__("yaml").safe_load((first / "config.yaml").read_text())))
    world_file = Path(config["data"]["synthetic"]["dir"]) / "world.json"
    world = json.loads(world_file.read_text())
    out = Path(tempfile.mkdtemp()) / "world"
    generate_world(out, seed=world["seed"], n_train=1, n_test=world["n_test"], image_size=world["image_size"],
                   families=("detailed_caption",), progress=False)
    records = read_records(out / "detailed_caption_test.jsonl")
    models = [("base", config["model"]["path"])] + [(Path(d).name, str(Path(d) / "final")) for d in run_dirs]
    print(f"detailed_caption test, {len(records)} records; image words per caption: "
          f"{sum(len(r.extra['image_words']) for r in records) / len(records):.1f} distinct on average")
    print("| model | " + " | ".join(FIELDS) + " |")
    print("|---|" + "---|" * len(FIELDS))
    for name, path in models:
        model, processor = load_model(path)
        forced = teacher_forced(model, processor, records, batch_size=32)
        print(f"| {name} | " + " | ".join(f"{forced[k]:.4f}" for k in FIELDS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
