"""How much of a padded batch is padding, for a run's training mixture: a random order against data.group_by_length.

No model runs: each record's length (prompt + answer + image tokens, as ``mmtune.train_data.record_lengths`` measures
it for the over-length check) from the run's processor, then the padded share of the epochs' batches. A Qwen2-VL
processor gives images of different sizes different token counts; the demo's LLaVA base gives each image 64::

    python benchmarks/padding.py --config configs/demo.yaml                      # the demo's mix
    python benchmarks/padding.py --config configs/quickstart.yaml --epochs 3 train.batch_size=8
"""

from __future__ import annotations

import argparse
import statistics

from mmtune.config import load_config
from mmtune.data.collate import TrainCollator
from mmtune.data.mixture import build_mixture
from mmtune.data.synthetic import resolve_task_path
from mmtune.preview import preview_processor, preview_records
from mmtune.train_data import EpochSampler, LengthGroupedSampler, padded_share, record_lengths, world_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "train.progress=false"])
    preview_records(config, 1)  # the synthetic world, generated if the run would generate it
    world = world_dir(config)
    records = build_mixture(config.data.tasks, config.train.seed, resolve=lambda p: resolve_task_path(p, world, "train"),
                            data_seed=config.data.draw_seed(config.train.seed))
    lengths = record_lengths(records, TrainCollator(preview_processor(config), config.data.max_length))
    batch, seed = config.train.batch_size, config.train.seed
    print(f"{len(records)} records, batch {batch}; lengths {min(lengths)}–{max(lengths)} tokens, "
          f"median {statistics.median(lengths):g}")
    for name, sampler in (("random order", EpochSampler(len(lengths), seed)),
                          ("data.group_by_length", LengthGroupedSampler(lengths, batch, seed))):
        shares = []
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            shares.append(100 * padded_share(lengths, list(sampler), batch))
        print(f"{name:<22} padding {statistics.mean(shares):5.1f}% of the positions "
              f"(epochs: {', '.join(f'{s:.1f}' for s in shares)})")


if __name__ == "__main__":
    main()
