"""EWC's Fisher-weighted distance to W0 against the plain mean squared distance, at the end of finished ewc runs.

Why: on world v2, EWC at λ = 500 (L2's ≈ 1 × cross-entropy value) left a penalty of 1–4% of the cross-entropy.
This prints, per run, the plain mean of (W − W0)² over the trainable entries and EWC's Σ F̂ (W − W0)² / n with the
Fisher the run's own setup estimates (the same records, the same base).

Run: ``python benchmarks/ewc_distance.py runs/v2-ewc-lam500/ewc-seed{0,1,2}``.
"""

from __future__ import annotations

import sys
import tempfile

from transformers import AutoModelForImageTextToText

from mmtune.config import load_config
from mmtune.methods.ewc import ewc_penalty
from mmtune.run_folder import release_lock
from mmtune.train import build_model, open_run, prepare_training
from mmtune.train_data import load_records


def distances(run_dir: str) -> tuple[float, float]:
    config = load_config(f"{run_dir}/config.yaml", [f"train.output_dir={tempfile.mkdtemp()}/probe",
                                                    "eval.downstream=[]", "eval.heldout=[]"])
    run = open_run(config)
    try:
        run.world, run.records, run.skipped = load_records(config, run.accelerator, run.say)
        build_model(run)
        prepare_training(run)  # the method's setup: W0 and the Fisher, as the run had them
        method = run.methods[0]
        final = dict(AutoModelForImageTextToText.from_pretrained(f"{run_dir}/final").named_parameters())
        trained = {name: final[name].detach() for name in run.ctx.trainable}
        count = sum(t.numel() for t in trained.values())
        plain = sum(float((trained[n] - method.pretrained[n]).pow(2).sum()) for n in trained) / count
        return plain, float(ewc_penalty(trained, method.pretrained, method.fisher))
    finally:
        run.peers.close()
        release_lock(run.lock)


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        plain, weighted = distances(folder)
        print(f"{folder}: mean squared distance {plain:.3e}, Fisher-weighted {weighted:.3e}, ratio {plain / weighted:.0f}")
