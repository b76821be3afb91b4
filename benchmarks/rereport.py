"""Re-report stored results under the current report's rules, from the per-seed scores a report.json keeps.

World v2's tables (docs/results*.json) were made before issue 35 (S/base primary, p = 0 from differences equal in every
seed, no Holm in the oldest). Their runs' folders are gone, but every report.json keeps each seed's per-task scores; what
the current rules add is each task's chance and (for captions) its ceiling, which depend only on the test records. This
regenerates the world the runs were evaluated on (its settings are in the JSON), reads chance and ceiling from the same
records the evaluation read (``mmtune.evaluate.chance_score`` / ``ceiling_score``), rebuilds each run as the report reads
a folder (``mmtune.report.report_row``) and builds the table with the report's own code (``mmtune.report.report_of``).
No model is run; nothing is re-trained. What can't be recovered is said in the output: per-record scores (no bootstrap
intervals) and curves (the v2 tables had none)::

    python benchmarks/rereport.py docs/results.json --out /tmp/rereport/main
    python benchmarks/rereport.py docs/results.json --write   # replace the JSON, print the Markdown for results.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mmtune.data.records import infer_metric
from mmtune.data.synthetic import ensure_world, resolve_task_path
from mmtune.evaluate import ceiling_score, chance_score, load_tasks
from mmtune.report import plot, report_of, report_row, to_markdown


def task_facts(world: dict, tasks: list[str], limit: int | None, world_dir: Path) -> dict[str, dict]:
    """Each task's metric, chance and ceiling on the records its evaluation read (the first ``limit`` test records)."""
    ensure_world(world_dir, world["seed"], world["n_train"], world["n_test"], world["image_size"], progress=False,
                 **({"caption_errors": world["caption_errors"]} if "caption_errors" in world else {}))
    facts = {}
    for task in tasks:
        records = load_tasks([resolve_task_path(f"synthetic:{task}", world_dir, "test")], limit)[task]
        metric = infer_metric(records)
        facts[task] = {"metric": metric, "chance": chance_score(records), "ceiling": ceiling_score(metric, records)}
    return facts


def scores_of(values: dict[str, float], sides: dict[str, str], facts: dict[str, dict]) -> dict:
    """A ``scores.json`` as the evaluation writes it, from one run's stored per-task scores."""
    return {"tasks": {task: {"score": value, "side": sides[task], **facts[task]} for task, value in values.items()}}


def rereport(stored: dict, world_dir: Path) -> dict:
    settings = stored["settings"]
    sides = stored["sides"]
    facts = task_facts(settings["world"], list(sides), (settings.get("eval") or {}).get("limit"), world_dir)
    base_scores = scores_of(stored["base"]["tasks"], sides, facts)
    runs = []
    for row in stored["rows"]:
        for seed in row["per_seed"]:
            # data.seed did not exist: each training seed drew its own records (report.data_seed reads that from null)
            config = {"model": settings["model"], "eval": settings.get("eval") or {}, "train": {"seed": seed["seed"]},
                      "data": {"seed": None, "synthetic": settings["world"]}}
            runs.append(report_row(Path(seed["run"]), row["method"], config, scores_of(seed["tasks"], sides, facts),
                                   base_scores, curve=[]))
    report = report_of(runs)
    report["rereported"] = {
        "how": "benchmarks/rereport.py: the stored per-seed task scores re-reported with the current rules "
               "(mmtune.report.report_of); chance and ceilings from the regenerated world's test records",
        "task_facts": facts,
        "not_recoverable": "per-record scores (no bootstrap intervals), curves during training (none were kept)",
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stored", type=Path, help="a report.json (e.g. docs/results.json)")
    parser.add_argument("--out", type=Path, help="write report.json, report.md and the plots here")
    parser.add_argument("--write", action="store_true", help="replace STORED (and its PNGs beside it, if any)")
    parser.add_argument("--world", type=Path, help="where to generate the world (default: a temporary folder)")
    args = parser.parse_args(argv)
    stored = json.loads(args.stored.read_text())
    if "rows" not in stored or "per_seed" not in stored["rows"][0]:
        parser.error(f"{args.stored}: not a report.json with per-seed values")
    with tempfile.TemporaryDirectory() as tmp:
        report = rereport(stored, args.world or Path(tmp) / "world")
    markdown = to_markdown(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "report.md").write_text(markdown)
        plot(report, args.out)
    if args.write:
        args.stored.write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
