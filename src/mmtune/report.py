"""Specialization vs generalization: one table for many runs, as Markdown, JSON and PNG plots.

Two aggregates of the same per-task scores:

* raw: S = mean score over the downstream tasks, G = mean over the held-out tasks, H = 2SG / (S + G).
  Scores live on different scales (CIDEr ×100 can reach several hundred, accuracies stop at 100), so one
  task can dominate a raw mean;
* normalised to the base (scale-free): each task's score divided by the base model's score on that task,
  ×100, then averaged — ``S/base`` is "downstream skill, in % of the base's", ``G/base`` is "what is left of
  the base's held-out skills, in %". A task whose base score is 0 cannot be normalised; it is left out of
  these means and named in the report.

Runs of the same method (several seeds) are averaged (mean ± sample std); ``report.json`` keeps every
seed's values. Each method is compared with vanilla on every column: paired by seed where both ran the same seeds (a
seed fixes the data order and the initial noise for every method, so pairing removes that shared part of the noise),
Welch's t-test otherwise; the difference comes with its 95% interval, and the p-values of the whole table are
corrected together for multiple comparisons (Holm). A mean is marked ▲ / ▼ only where the Holm-adjusted p < 0.05;
"not detectable" is written with the interval, never as "no effect".
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from mmtune.files import atomic_write, naming_a_full_disk
from mmtune.stats import (  # noqa: F401 — also this module's public names (benchmarks and users import them here)
    ALPHA,
    difference_interval,
    fall_at_fixed_step,
    fewest_seeds_for_largest_fall,
    holm,
    largest_fall,
    paired_p,
    seeds_needed,
    smallest_p,
    welch_p,
)
from mmtune.summary import (  # noqa: F401 — the summary's names, public here too
    CHANCE_MARGIN,
    GAP_KEYS,
    HALLUCINATION_KEYS,
    PRIMARY_KEYS,
    SUMMARY_KEYS,
    _mean,
    harmonic,
    summarize,
)

SIGNIFICANCE = ALPHA


def comparable_settings(config: dict, scores: dict, base_scores: dict | None) -> dict:
    """What must be equal for two runs to share a table: the model they started from, the evaluated tasks and
    sides, how they were evaluated, the synthetic world, and the base model's own scores."""
    model = dict(config.get("model", {}))
    evaluation = config.get("eval", {})
    synthetic = dict(config.get("data", {}).get("synthetic", {}))
    synthetic.pop("dir", None)
    return {
        # (keys added in later versions are null by default: a run from before them compares equal)
        "model": {k: model.get(k) for k in sorted(model) if k != "gradient_checkpointing" and model.get(k) is not None},
        "tasks": {k: v["side"] for k, v in sorted(scores["tasks"].items())},
        # a task scored by another metric, or on another number of records, is another measurement
        "task_metrics": {k: v.get("metric") for k, v in sorted(scores["tasks"].items())},
        "task_sizes": {k: v.get("n") for k, v in sorted(scores["tasks"].items())},
        "eval": {k: evaluation.get(k) for k in ("max_new_tokens", "limit")},
        "world": synthetic,
        "base_scores": None if base_scores is None else
        {k: round(v["score"], 6) for k, v in sorted(base_scores["tasks"].items())},
    }


def with_lmms_eval(run: Path, config: dict, scores: dict, base_scores: dict | None, external: dict) -> tuple[dict, dict]:
    """The run's final and base scores with the lmms-eval results of its ``final/`` (or ``best/``) and of its base
    model added as held-out tasks (``mmtune.lmms_eval``); an error names what is missing."""
    from mmtune.lmms_eval import add_heldout

    mine = next((external[str((run / name).resolve())] for name in ("final", "best")
                 if str((run / name).resolve()) in external), None)
    if mine is None:
        raise ValueError(f"{run}: no lmms-eval results for its final/ among --lmms-eval (their models: "
                         f"{', '.join(sorted(external))})")
    base_path = str(Path(config.get("model", {}).get("path") or "?").expanduser().resolve())
    if base_path not in external:
        raise ValueError(f"{run}: no lmms-eval results for its base model {base_path}: run lmms-eval on the base too "
                         "(G/base divides by the base's score)")
    if base_scores is None:
        raise ValueError(f"{run}: no eval/base/scores.json to add the base's lmms-eval results to")
    return add_heldout(scores, mine["tasks"]), add_heldout(base_scores, external[base_path]["tasks"])


def load_run(run_dir: str | Path, lmms_eval: dict | None = None) -> dict:
    """A training run's folder, or a folder written by ``mmtune eval`` (``scores.json`` + ``eval_info.json``);
    ``lmms_eval``: lmms-eval results by model folder (``mmtune.lmms_eval.by_model``), added as held-out tasks."""
    run = Path(run_dir)
    if (run / "eval_info.json").exists() and (run / "scores.json").exists():
        return load_evaluation(run)
    final = run / "eval" / "final" / "scores.json"
    if not final.exists():
        raise FileNotFoundError(f"{run}: no eval/final/scores.json (train with eval.downstream / eval.heldout set), "
                                "nor an `mmtune eval` folder (scores.json + eval_info.json)")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    base_file = run / "eval" / "base" / "scores.json"
    scores = json.loads(final.read_text())
    base_scores = json.loads(base_file.read_text()) if base_file.exists() else None
    if lmms_eval:
        scores, base_scores = with_lmms_eval(run, config, scores, base_scores, lmms_eval)
    curve = []  # S / G as training went (eval.every_steps): rows of metrics.jsonl with an "eval" entry
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if "eval" in row:
                curve.append({"step": row["step"], **{k: row["eval"].get(k) for k in SUMMARY_KEYS},
                              "tasks": row["eval"].get("tasks", {}), "val_loss": row["eval"].get("val_loss", {}),
                              "sampled": row["eval"].get("sampled", {}),
                              **{key: row["eval"].get(key, {}) for key in (*GAP_KEYS, *HALLUCINATION_KEYS)}})
    return report_row(run, run_label(config), config, scores, base_scores, curve)


def run_label(config: dict) -> str:
    """A run's row: its method (``method_label``), and its data mixture when that is not the plain one (replay), so runs
    that trained on different data are never averaged together."""
    label = method_label(config.get("method", {}))
    share = (config.get("data") or {}).get("replay_share") or 0
    return f"{label} + replay {share:g}" if share else label


def report_row(folder: Path, label: str, config: dict, scores: dict, base_scores: dict | None,
               curve: list[dict]) -> dict:
    """One evaluated model as the report reads it (a training run's final evaluation or an ``mmtune eval``)."""
    return {
        "run": str(folder), "method": label, "curve": curve,
        "settings": comparable_settings(config, scores, base_scores),
        "seed": config.get("train", {}).get("seed"),
        "data_seed": data_seed(config),
        "data": trained_on(folder, config),
        "reference_step": (config.get("eval") or {}).get("overfit_reference_step"),
        "sides": {k: v["side"] for k, v in scores["tasks"].items()},
        "final": summarize(scores, base_scores),
        "base": summarize(base_scores, base_scores) if base_scores else None,
    }


def data_seed(config: dict) -> int | None:
    """Which records a run's tasks drew: ``data.seed``, or its training seed where that is null or the run is from
    before ``data.seed`` (every seed then drew its own records)."""
    data = config.get("data") or {}
    return data["seed"] if data.get("seed") is not None else config.get("train", {}).get("seed")


def trained_on(folder: Path, config: dict) -> str:
    """What a run trained on, to compare runs by: the digest of its training records (``train_summary.json``), else
    its data seed."""
    summary = folder / "train_summary.json"
    digest = json.loads(summary.read_text()).get("records_digest") if summary.is_file() else None
    return f"records {digest}" if digest else f"data seed {data_seed(config)}"


def method_label(section: dict) -> str:
    """A row's name: the method, with the options the run set (``l2_reg (lam=50)``), so runs of one method with
    different settings are separate rows, never averaged together."""
    name = section.get("name", "?")
    options = [(method, key, value) for method, values in section.items() if method != "name" and
               isinstance(values, dict) for key, value in sorted(values.items())]
    if not options:
        return name
    single = len({m for m, _, _ in options}) == 1 and "+" not in name

    def shown(method: str, key: str, value) -> str:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{key}={text}" if single else f"{method}.{key}={text}"

    return f"{name} (" + ", ".join(shown(*option) for option in options) + ")"


def load_evaluation(folder: Path) -> dict:
    """An ``mmtune eval`` folder as a report row labelled by ``--label``. A model trained by mmtune carries its run
    config (``mmtune_config.yaml``), so the row compares with training runs from the same base; any other model is
    its own base. Normalised columns need the base's scores (``mmtune eval --base-scores``); else raw scores only."""
    info = json.loads((folder / "eval_info.json").read_text())
    scores = json.loads((folder / "scores.json").read_text())
    run_config_file = Path(info["model"]) / "mmtune_config.yaml"
    config = yaml.safe_load(run_config_file.read_text()) if run_config_file.exists() else \
        {"model": {"path": info["model"]}}
    config = {**config, "eval": {**config.get("eval", {}), **info["eval"]}}
    base_scores = json.loads(Path(info["base_scores"]).read_text()) if info.get("base_scores") else None
    return report_row(folder, info["label"], config, scores, base_scores, curve=[])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def against_vanilla(mine: dict[int, float], vanilla: dict[int, float]) -> dict | None:
    """The comparison of one column with vanilla's (values by seed): test, p, difference and its 95% interval, and how
    many seeds a difference of this size would need to be detected (80% power, two-sided 0.05; before correction)."""
    shared = sorted(set(mine) & set(vanilla))
    if len(shared) >= 2 and len(shared) == len(mine) == len(vanilla):
        a, b = [mine[s] for s in shared], [vanilla[s] for s in shared]
        test, p = "paired", paired_p(a, b)
    else:
        a, b = list(mine.values()), list(vanilla.values())
        test, p = "welch", welch_p(a, b)
    if p is None:
        return None
    paired = test == "paired"
    differences = [x - y for x, y in zip(a, b, strict=True)] if paired else []
    constant = (statistics.pstdev(differences) == 0) if paired else \
        (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0)
    return {"test": test, "p": p, "difference": statistics.mean(a) - statistics.mean(b),
            "interval": difference_interval(a, b, paired), "seeds": len(a),
            "constant": constant, "seeds_needed": seeds_needed(a, b, paired)}


def open_score_key(curves: list[list[dict]], task: str) -> str:
    """Which curve entry holds an open-response task's score to judge overfitting by: ``"sampled"`` where every
    evaluation sampled it (``eval.sample_temperature``: confidence in wrong words shows there), else ``"tasks"``
    (greedy)."""
    points = [p for c in curves for p in c]
    return "sampled" if points and all(task in (p.get("sampled") or {}) for p in points) else "tasks"


OVERFIT_MEASURES = (("score", "tasks", 1), ("validation loss", "val_loss", -1), ("sampled score", "sampled", 1),
                    ("hallucination", "hallucination", -1), ("sampled hallucination", "sampled_hallucination", -1))


def overfitting_tests(method: str, curves: list[list[dict]], tasks: list[str],
                      reference_step: int | None = None) -> list[dict]:
    """Every overfitting test of one method over its evaluations during training (``eval.every_steps``): for each task
    and measure — the score (greedy), the validation loss (a rise), the sampled score (``eval.sample_temperature``) —
    each seed's fall from a step to the last evaluation, tested over the seeds (``mmtune.stats``):

    * ``reference_step`` given (fixed in advance: ``eval.overfit_reference_step``, e.g. the end of the first epoch):
      the fall from that step, one-sided paired t-test (the exact sign-flip p where the falls are the same in every
      seed);
    * otherwise the largest fall over every earlier step, calibrated against the largest fall under every sign flip
      of the seeds — the choice of the peak is paid for; it needs ≥ 5 seeds to reach p < 0.05.

    The p-values of the method's tests are Holm-corrected together (``p_holm``); ``flagged`` where that is < 0.05 and
    the mean fall is positive. A test that can't be run says why (``reason``)."""
    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves])) if curves else []
    if len(curves) < 2 or len(steps) < 2:
        return []
    tests = []
    for task in tasks:
        for what, key, sign in OVERFIT_MEASURES:
            series = [{p["step"]: (p.get(key) or {}).get(task) for p in c} for c in curves]
            if any(s.get(step) is None for s in series for step in steps):
                continue
            entry = {"method": method, "task": task, "what": what, "seeds": len(series), "p": None}
            earlier = steps[:-1] if reference_step is None else [reference_step]
            if reference_step is not None and reference_step not in steps[:-1]:
                tests.append({**entry, "reason": f"the reference step {reference_step} is not an evaluation before "
                                                 f"the last (evaluated at steps {steps})"})
                continue
            falls = np.array([[sign * (s[step] - s[steps[-1]]) for step in earlier] for s in series])
            if reference_step is not None:
                chosen, p = 0, fall_at_fixed_step(falls[:, 0].tolist())
                test = f"fall from step {reference_step} (fixed in advance), one-sided paired t-test"
            elif len(series) < fewest_seeds_for_largest_fall():
                tests.append({**entry, "reason": f"{len(series)} seeds: the largest-fall test needs "
                                                 f"≥ {fewest_seeds_for_largest_fall()} (or a reference step fixed in "
                                                 "advance: eval.overfit_reference_step)"})
                continue
            else:
                chosen, p = largest_fall(falls)
                test = "largest fall over the earlier steps, max-t over sign flips of the seeds"
            means = [statistics.mean(s[step] for s in series) for step in steps]
            at = steps.index(earlier[chosen])
            tests.append({**entry, "step": earlier[chosen], "p": p, "test": test, "best": means[at],
                          "last": means[-1], "fall": float(falls[:, chosen].mean())})
    tested = [t for t in tests if t["p"] is not None]
    for entry, adjusted in zip(tested, holm([t["p"] for t in tested]), strict=True):
        entry["p_holm"] = adjusted
        entry["flagged"] = adjusted < SIGNIFICANCE and entry["fall"] > 0
    return tests


def overfitting(method: str, curves: list[list[dict]], tasks: list[str],
                reference_step: int | None = None) -> list[dict]:
    """The flags of ``overfitting_tests``: the tasks (and measures) whose fall survives the method's correction."""
    return [t for t in overfitting_tests(method, curves, tasks, reference_step) if t.get("flagged")]


def per_sample_scores(folder: str | Path, task: str) -> dict[str, float] | None:
    """A run's per-record scores on ``task`` (its predictions file), by record id; None when not kept."""
    from mmtune.files import safe_file_name

    folder = Path(folder)
    for where in (folder / "eval" / "final" / "predictions", folder / "predictions"):
        path = where / f"{safe_file_name(task)}.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return {str(row["id"]): float(row["score"]) for row in rows if "score" in row}
    return None


def bootstrap_difference(mine: dict, vanilla: dict, draws: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float] | None:
    """The ``level`` interval of a task's mean score difference from vanilla with both sources of noise: seeds (the
    shared seeds resampled as pairs) and the test records (resampled with the same draw for every run, so a record
    hard for one model is hard for the other). ``mine`` / ``vanilla``: seed → {record id: score}."""
    import numpy as np

    seeds = sorted(set(mine) & set(vanilla))
    if not seeds:
        return None
    ids = sorted(set.intersection(*[set(mine[s]) & set(vanilla[s]) for s in seeds]))
    if len(ids) < 2:
        return None
    differences = np.array([[mine[s][i] - vanilla[s][i] for i in ids] for s in seeds])
    rng = np.random.default_rng(seed)
    pick_seeds = rng.integers(0, len(seeds), size=(draws, len(seeds)))
    pick_records = rng.integers(0, len(ids), size=(draws, len(ids)))
    means = np.array([differences[pick_seeds[b]][:, pick_records[b]].mean() for b in range(draws)])
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _value(summary: dict, key: str, columns: list[str]) -> float | None:
    value = summary["tasks"].get(key) if key in columns else summary.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def check_comparable(runs: list[dict]) -> None:
    """Refuse to average or compare runs that differ in base, tasks or evaluation, naming the difference."""
    first = runs[0]
    for run in runs[1:]:
        for key, value in run["settings"].items():
            if value != first["settings"][key]:
                mine, theirs = first["settings"][key], value
                detail = [f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                          if mine.get(k) != theirs.get(k)] if isinstance(mine, dict) and isinstance(theirs, dict) \
                    else [f"{mine!r} vs {theirs!r}"]
                raise ValueError(f"{first['run']} and {run['run']} are not comparable: their {key} differ "
                                 f"({'; '.join(detail)[:600]}). Report them separately, or pass --allow-mixed "
                                 "(allow_mixed=True) to put them in one table anyway.")


def build_report(run_dirs: list[str | Path], allow_mixed: bool = False,
                 lmms_eval: list[str | Path] | None = None, reference_step: int | None = None) -> dict:
    """The table over ``run_dirs``; ``lmms_eval``: lmms-eval results files of the runs' final models and of their
    base, added as held-out tasks (``mmtune.lmms_eval``); ``reference_step``: the step the overfitting test compares
    the end with (fixed in advance; default: the runs' ``eval.overfit_reference_step``, else the largest-fall test)."""
    from mmtune.lmms_eval import by_model

    external = by_model(lmms_eval) if lmms_eval else None
    return report_of([load_run(r, external) for r in run_dirs], allow_mixed, reference_step)


def report_of(runs: list[dict], allow_mixed: bool = False, reference_step: int | None = None) -> dict:
    """The table over runs as ``load_run`` reads them (``report_row``): what ``build_report`` computes once the folders
    are read — also how stored per-seed scores are re-reported under the current rules (benchmarks/rereport.py)."""
    if not runs:
        raise ValueError("no runs to report")
    if not allow_mixed:
        check_comparable(runs)
    sides: dict[str, str] = {}
    for run in runs:
        sides.update(run["sides"])
    columns = [t for t in sides if sides[t] == "downstream"] + [t for t in sides if sides[t] == "heldout"]
    base = next((r["base"] for r in runs if r["base"]), None)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    keys = [*columns, *SUMMARY_KEYS]
    per_method = {method: {key: [v for r in group if (v := _value(r["final"], key, columns)) is not None]
                           for key in keys} for method, group in by_method.items()}
    by_seed = {method: {key: {r["seed"]: v for r in group if (v := _value(r["final"], key, columns)) is not None}
                        for key in keys} for method, group in by_method.items()}
    vanilla = per_method.get("vanilla")
    rows = []
    for method, group in by_method.items():
        row = {"method": method, "seeds": len(group), "values": {}, "curves": [r["curve"] for r in group if r["curve"]],
               "per_seed": [{"run": r["run"], "seed": r["seed"], "data_seed": r["data_seed"],
                             "tasks": r["final"]["tasks"], "hallucination": r["final"]["hallucination"],
                             **{k: r["final"].get(k) for k in SUMMARY_KEYS if k in r["final"]}} for r in group]}
        for key in keys:
            values = per_method[method][key]
            if not values:
                continue
            mean, std = _mean_std(values)
            reference = _value(base, key, columns) if base else None
            compared = against_vanilla(by_seed[method][key], by_seed["vanilla"][key]) \
                if vanilla is not None and method != "vanilla" else None
            row["values"][key] = {"mean": mean, "std": std, "delta": None if reference is None else mean - reference,
                                  "p_vs_vanilla": compared["p"] if compared else None, "vs_vanilla": compared}
        rows.append(row)
    if "vanilla" in by_method:  # test-set sampling error beside seed noise, per task, from the kept predictions
        for row in rows:
            if row["method"] == "vanilla":
                continue
            for task in columns:
                compared = (row["values"].get(task) or {}).get("vs_vanilla")
                samples = {side: {r["seed"]: per_sample_scores(r["run"], task) for r in by_method[side]}
                           for side in (row["method"], "vanilla")}
                if compared and all(v is not None for side in samples.values() for v in side.values()):
                    compared["bootstrap_interval"] = bootstrap_difference(samples[row["method"]], samples["vanilla"])
    family = [v["vs_vanilla"] for row in rows for v in row["values"].values() if v["vs_vanilla"]]
    for compared, adjusted in zip(family, holm([c["p"] for c in family]), strict=True):
        compared["p_holm"] = adjusted
    if reference_step is None:
        fixed = {r["reference_step"] for r in runs} - {None}
        if len(fixed) > 1:
            raise ValueError(f"the runs fix different eval.overfit_reference_step values ({sorted(fixed)}): pass one "
                             "with --reference-step")
        reference_step = next(iter(fixed), None)
    # Overfitting is judged on the tasks that trained (downstream); a held-out task's fall is forgetting, which G shows.
    downstream = [c for c in columns if sides[c] == "downstream"]
    tests = [test for row in rows for test in overfitting_tests(row["method"], row["curves"], downstream,
                                                                 reference_step)]
    flags = [test for test in tests if test.get("flagged")]
    data_seeds = {r["run"]: r["data"] for r in runs}
    drawn_by_seed = defaultdict(set)
    for run in runs:
        drawn_by_seed[run["seed"]].add(run["data"])
    unnormalised = sorted(c for c in columns if base and not base["tasks"].get(c))
    near_chance = sorted(c for c in columns if base and c not in base.get("adjusted", {}))
    return {"columns": columns, "sides": sides, "base": base, "rows": rows, "runs": [r["run"] for r in runs],
            "settings": runs[0]["settings"],
            "not_normalised": unnormalised, "near_chance": near_chance, "overfitting": flags,
            "overfitting_tests": tests, "reference_step": reference_step, "data_seeds": data_seeds,
            "data_paired_by_seed": all(len(drawn) == 1 for drawn in drawn_by_seed.values()),
            "no_ceiling": sorted(c for c in downstream if any(c not in r["final"].get("headroom", {}) for r in runs)),
            "significance": {"test": "paired t-test over shared seeds, Welch otherwise", "correction": "holm",
                             "comparisons": len(family), "alpha": SIGNIFICANCE}}


def _mark(value: dict | None, vanilla: dict | None) -> str:
    """▲ / ▼: above / below vanilla beyond seed noise, after the table's Holm correction."""
    compared = (value or {}).get("vs_vanilla")
    if vanilla is None or not compared or compared["p_holm"] >= SIGNIFICANCE:
        return ""
    return " ▲" if value["mean"] > vanilla["mean"] else " ▼"


def _power_note(compared: dict) -> str:
    """How many seeds a difference of this size would need, or why these seeds can't test it."""
    needed, n = compared.get("seeds_needed"), compared.get("seeds", 0)
    if compared["difference"] == 0:
        return ""
    if compared.get("constant"):
        floor = smallest_p(n) if compared["test"] == "paired" else None
        note = f"the same difference in all {n} seeds" if compared["test"] == "paired" else "no spread within either method"
        return (f"{note}: an exact permutation p" + (f", which can't go below {floor:.3g} with {n} seeds" if floor else "")
                + (f"; {needed} seeds could reach p < 0.05" if needed else ""))
    if needed is None:
        return ""
    return f"≈ {needed} seeds would detect a difference this size (80% power)" if needed <= 1000 else \
        "more than 1,000 seeds would be needed to detect a difference this size"


def verdicts(report: dict, keys: tuple[str, ...] = PRIMARY_KEYS) -> list[str]:
    """One sentence per method and summary column, generated from the numbers: detected or not, the interval, and
    how many seeds a difference of this size would need."""
    lines = []
    for row in report["rows"]:
        for key in keys:
            compared = (row["values"].get(key) or {}).get("vs_vanilla")
            if not compared:
                continue
            low, high = compared["interval"]
            span = f"difference {compared['difference']:+.1f}, 95% interval {low:+.1f} to {high:+.1f}"
            power = _power_note(compared)
            if compared["p_holm"] < SIGNIFICANCE:
                word = "above" if compared["difference"] > 0 else "below"
                lines.append(f"- {row['method']} {key}: {word} vanilla ({span}; {compared['test']}, Holm p = "
                             f"{compared['p_holm']:.3g})")
            else:
                lines.append(f"- {row['method']} {key}: not detectable at this power ({span}; {compared['test']}, "
                             f"Holm p = {compared['p_holm']:.3g}" + (f"; {power}" if power else "") +
                             ") — not the same as no effect")
    return lines


def overfitting_lines(report: dict) -> list[str]:
    """The overfitting section: each flag, and each test that could not be run, with why."""
    tests = report.get("overfitting_tests") or []
    if not tests:
        return []
    fixed = report.get("reference_step")
    how = (f"the fall from step {fixed} (fixed in advance) to the end, one-sided paired t-test over the seeds"
           if fixed is not None else "the largest fall from any earlier evaluation to the end, its p from the same "
           "maximum under every sign flip of the seeds (the choice of the peak paid for; ≥ 5 seeds)")
    lines = ["", f"Overfitting during training (the downstream tasks' score or hallucination rate past its best, or "
                 f"validation loss past its minimum: {how}; Holm over each method's tests, p < 0.05):", ""]
    for flag in report.get("overfitting", []):
        direction = "rose" if flag["what"] in ("validation loss", "hallucination", "sampled hallucination") else "fell"
        lines.append(f"- {flag['method']}: {flag['task']} overfits after step {flag['step']} ({flag['what']} "
                     f"{flag['best']:.2f} there, {flag['last']:.2f} at the end: {direction} by {flag['fall']:.2f}; "
                     f"p = {flag['p']:.3g}, Holm {flag['p_holm']:.3g})")
    untested = {}
    for test in tests:
        if test["p"] is None:
            untested.setdefault((test["method"], test["reason"]), []).append(f"{test['task']} {test['what']}")
    for (method, reason), what in untested.items():
        lines.append(f"- {method}: not tested ({reason}): {', '.join(what)}")
    if not report.get("overfitting") and not untested:
        lines.append(f"- none flagged ({sum(t['p'] is not None for t in tests)} tests)")
    return lines


def hallucination_lines(report: dict) -> list[str]:
    """Each task's hallucination rate (answers naming something the image lacks) per method, where it was scored."""
    found = []
    for row in report["rows"]:
        for task in report["columns"]:
            values = [s["hallucination"][task] for s in row["per_seed"] if task in (s.get("hallucination") or {})]
            if values:
                mean, std = _mean_std(values)
                base = ((report["base"] or {}).get("hallucination") or {}).get(task)
                found.append(f"- {row['method']} {task}: {mean:.1f}%" + (f" ± {std:.1f}" if len(values) > 1 else "")
                             + (f" (base {base:.1f}%)" if base is not None else ""))
    if not found:
        return []
    return ["", "Hallucination (the share of answers that name something the image lacks — a colour, count, object or "
                "place its record does not list in extra.present; CHAIR-style):", "", *found]


def _format(value: dict | None, seeds: int, vanilla: dict | None, delta: bool = True) -> str:
    if value is None:
        return "–"
    text = f"{value['mean']:.1f}"
    if seeds > 1:
        text += f" ± {value['std']:.1f}"
    if delta and value["delta"] is not None:
        text += f" ({value['delta']:+.1f})"
    return text + _mark(value, vanilla)


SUMMARY_HEADS = {"S/head": "S/head %", "G/adj": "G/adj %", "H/head": "H/head %", "S": "S (raw)", "G": "G (raw)",
                 "H": "H (raw)", "S/base": "S/base %", "G/base": "G/base %", "H/base": "H/base %", "S/adj": "S/adj %",
                 "H/adj": "H/adj %"}


def to_markdown(report: dict) -> str:
    """Two tables: per-task scores (raw), then the summary — the primary S/head, G/adj, H/head first, then the other
    rules (raw, normalised to the base, chance-adjusted) — and what the numbers say against vanilla."""
    columns, sides, base = report["columns"], report["sides"], report["base"]
    vanilla = next((r for r in report["rows"] if r["method"] == "vanilla"), None)

    def table(keys: list[str], head: list[str], base_cells: list[str], delta: bool) -> list[str]:
        lines = ["| method | seeds | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
        if base:
            lines.append("| base (before fine-tuning) | – | " + " | ".join(base_cells) + " |")
        for row in report["rows"]:
            cells = [_format(row["values"].get(k), row["seeds"], vanilla["values"].get(k) if vanilla else None,
                             delta) for k in keys]
            lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
        return lines

    def cell(value) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"

    task_head = [f"{c} ({'down' if sides[c] == 'downstream' else 'held'})" for c in columns]
    base_tasks = [f"{base['tasks'].get(c, float('nan')):.1f}" for c in columns] if base else []
    lines = ["Per-task scores (accuracy in %, CIDEr ×100):", "", *table(columns, task_head, base_tasks, True)]
    keys = [k for k in SUMMARY_HEADS if k in ("S", "G", "H", "S/head")] if not base else list(SUMMARY_HEADS)
    base_summary = [cell(base.get(k)) for k in keys] if base else []
    lines += ["", "Summary (primary: S/head, G/adj, H/head):", "",
              *table(keys, [SUMMARY_HEADS[k] for k in keys], base_summary, True)]
    legend = ["", "S/head (specialization) = mean over the downstream tasks of the share of each task's headroom above "
              "chance gained, (score − chance) / (ceiling − chance) ×100 — ceiling 100 for accuracies, and for captions "
              "the CIDEr of the best of each record's own references; a new skill counts even where the base sat at "
              "chance. G/adj (generalization) = mean over the held-out tasks of the share of the base's above-chance "
              "skill kept, (score − chance) / (base − chance) ×100 (a base near chance can't be a denominator: such "
              "tasks are left out and named). H/head = 2·S/head·G/adj / (S/head + G/adj). The older rules stay beside "
              "them: raw means (CIDEr and accuracies mixed), /base (score / base ×100) and /adj for both sides. "
              "In parentheses: change against the base model; ± is the sample std over seeds. "
              "▲ / ▼: above / below vanilla beyond seed noise — a paired t-test over the seeds both ran (Welch's "
              "otherwise; an exact permutation p where the differences have no spread), Holm-corrected over the "
              f"table's {report.get('significance', {}).get('comparisons', 0)} comparisons, p < 0.05. The ± and the "
              "tests cover training seeds only: one base and one fixed set of test records."]
    legend += overfitting_lines(report)
    legend += hallucination_lines(report)
    intervals = [(row["method"], task, compared) for row in report["rows"] for task in columns
                 if (compared := (row["values"].get(task) or {}).get("vs_vanilla"))
                 and compared.get("bootstrap_interval")]
    if intervals:
        legend += ["", "Per task, the difference from vanilla with its 95% interval — over seeds only (t), and over "
                       "seeds and test records resampled together (bootstrap, 2,000 draws):", ""]
        for method, task, compared in intervals:
            (tl, th), (bl, bh) = compared["interval"], compared["bootstrap_interval"]
            legend.append(f"- {method} {task}: {compared['difference']:+.1f} (seeds {tl:+.1f} to {th:+.1f}; seeds and "
                          f"records {bl:+.1f} to {bh:+.1f})")
    found = verdicts(report)
    if found:
        legend += ["", "Against vanilla (from the numbers above):", "", *found]
    seeds = report.get("data_seeds") or {}
    if len(set(seeds.values())) > 1:
        drawn = ("runs of the same seed drew the same records, so the paired tests pair the data too, but the ± over "
                 "seeds includes different training data") if report.get("data_paired_by_seed") else \
            "their differences include different training data, and pairing by seed does not pair the data"
        legend += ["", "These runs drew different training records (data.seed, or the training seed where it is null "
                       f"or the run older than data.seed — {', '.join(sorted(set(seeds.values())))}): {drawn}."]
    if report.get("not_normalised"):
        legend.append(f"Left out of the /base means (base score 0): {', '.join(report['not_normalised'])}.")
    if report.get("near_chance"):
        legend.append(f"Left out of the /adj means (base within {CHANCE_MARGIN:g} points of chance; S/head counts a "
                      f"downstream one): {', '.join(report['near_chance'])}.")
    if report.get("no_ceiling"):
        legend.append(f"Left out of S/head (no ceiling recorded: evaluated before mmtune kept a caption task's "
                      f"ceiling): {', '.join(report['no_ceiling'])}.")
    return "\n".join(lines + legend) + "\n"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with naming_a_full_disk(path, path.parent):
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


MARKERS = "osD^vP<>Xph*"


def method_style(method: str) -> tuple[tuple, str]:
    """The same colour and marker for a method in every plot of every report. A registered method has its own (by its
    place among the registered methods); a variant of one ("spider + replay 0.25", "l2_reg (lam=50)") keeps its
    method's colour — so two methods' variants never look alike — with a marker of its own; any other label gets a
    stable pair from its text."""
    import hashlib

    import matplotlib.pyplot as plt

    from mmtune.methods import METHODS

    colors = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors  # one per registered method (23 today)
    names = sorted(m for m in METHODS if not m.startswith("test_"))
    digest = int(hashlib.sha1(method.encode()).hexdigest(), 16)
    if method in names:
        index = names.index(method)
        return colors[index % len(colors)], MARKERS[index % 12]
    base = method.split(" ")[0]
    if base in names:
        index = names.index(base)
        own = MARKERS[index % 12]
        return colors[index % len(colors)], [m for m in MARKERS if m != own][digest % 11]
    return colors[digest % len(colors)], MARKERS[(digest // len(colors)) % 12]


AXIS_NAMES = {"S/head": "specialization S/head (% of headroom gained)",
              "G/adj": "generalization G/adj (% of base skill kept)",
              "S/base": "specialization S (mean of score / base × 100)",
              "G/base": "generalization G (mean of score / base × 100)",
              "S": "specialization S (raw mean)", "G": "generalization G (raw mean)"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def scatter_keys(report: dict) -> tuple[str, str]:
    """The S-vs-G plot's axes: the primary summary (S/head, G/adj) where every row has both, else the base-normalised
    means, else the raw ones — the plot shows what the table's verdicts are about."""
    rows = report["rows"]

    def everywhere(key: str) -> bool:
        return bool(rows) and all(_finite((row["values"].get(key) or {}).get("mean")) for row in rows)

    for keys in (("S/head", "G/adj"), ("S/base", "G/base")):
        if report["base"] is not None and all(everywhere(k) for k in keys):
            return keys
    return "S", "G"


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Per-task bars and the S-vs-G scatter; normalised to the base (scale-free) when the base is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    columns, rows, base = report["columns"], report["rows"], report["base"]
    normalised = base is not None
    shown = [c for c in columns if c not in report.get("not_normalised", [])] if normalised else columns

    def per_task(row: dict, c: str) -> tuple[float, float]:
        if not normalised:
            value = row["values"].get(c, {})
            return value.get("mean") or 0.0, value.get("std", 0.0)
        values = [s["tasks"][c] / base["tasks"][c] * 100 for s in row["per_seed"] if c in s["tasks"]]
        return (_mean_std(values) if values else (0.0, 0.0))

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shown) * max(1, len(rows)) / 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        color, _ = method_style(row["method"])
        stats = [per_task(row, c) for c in shown]
        ax.bar([j + i * width for j in range(len(shown))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], label=row["method"], color=color)
    if normalised:
        ax.axhline(100, color="black", linewidth=1, linestyle="--", label="base = 100")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))])
    ax.set_xticklabels([f"{c}\n({report['sides'][c]})" for c in shown], fontsize=8)
    ax.set_ylabel("score, % of the base model's" if normalised else "score (accuracy %, CIDEr ×100)")
    ax.set_title("per-task scores by method")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "tasks.png"))

    s_key, g_key = scatter_keys(report)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for row in rows:
        s, g = row["values"].get(s_key), row["values"].get(g_key)
        if s and g:
            color, marker = method_style(row["method"])
            ax.errorbar(s["mean"], g["mean"], xerr=s["std"], yerr=g["std"], fmt=marker, color=color, capsize=3,
                        label=row["method"])
    if base and all(_finite(base.get(k)) for k in (s_key, g_key)):
        ax.scatter([base[s_key]], [base[g_key]], marker="*", s=200, color="black", label="base")
    ax.set_xlabel(AXIS_NAMES[s_key])
    ax.set_ylabel(AXIS_NAMES[g_key])
    ax.set_title("specialization vs generalization")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "s_vs_g.png"))

    curves = [(row, curve) for row in rows for curve in row.get("curves", [])]
    if curves:  # eval.every_steps: the trade-off as it formed, and every task over the steps
        paths.append(_plot_s_g_over_steps(curves, out_dir))
        paths.append(_plot_tasks_over_steps(rows, columns, curves, out_dir))
    return paths


def _plot_s_g_over_steps(curves: list[tuple[dict, list[dict]]], out_dir: Path) -> Path:
    """S (solid) and G (dashed) of each run at each evaluation during training."""
    import matplotlib.pyplot as plt

    # the primary summary where every point has it, else normalised to the base (the base above 0 on the subset), else raw
    points = [p for _, curve in curves for p in curve]
    keys = next((pair for pair in (("S/head", "G/adj"), ("S/base", "G/base"))
                 if all(_finite(p.get(k)) for p in points for k in pair)), ("S", "G"))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labelled = set()
    for row, curve in curves:
        color, marker = method_style(row["method"])
        steps = [point["step"] for point in curve]
        for key, style in zip(keys, ("-", "--"), strict=True):
            label = None if (row["method"], key) in labelled else f"{row['method']} {key.split('/')[0]}"
            labelled.add((row["method"], key))
            ax.plot(steps, [point.get(key) for point in curve], style, marker=marker, color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("solid: " + AXIS_NAMES[keys[0]] + "\ndashed: " + AXIS_NAMES[keys[1]], fontsize=8)
    ax.set_title("specialization and generalization during training")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "s_g_over_steps.png")


def _plot_tasks_over_steps(rows: list[dict], columns: list[str], curves: list[tuple[dict, list[dict]]],
                           out_dir: Path) -> Path:
    return _save(tasks_over_steps_figure(rows, columns, curves), out_dir / "tasks_over_steps.png")


# What each row of tasks_over_steps.png shows (its y label)
STEP_ROWS = {"tasks": "score\n(-- sampled)", "val_loss": "validation loss",
             "confidence_gap": "clean − noised confidence\n(-- image words, : template)",
             "hallucination": "hallucinating answers %\n(-- sampled)"}


def tasks_over_steps_figure(rows: list[dict], columns: list[str], curves: list[tuple[dict, list[dict]]]):
    """Every task's score, validation loss, confidence gap (and hallucination rate) over the steps, per method (mean
    over seeds): where each overfits. One column per task (its name on top), one row per quantity (its name on the
    left), the steps on every bottom axis."""
    import matplotlib.pyplot as plt

    made_up = any((point.get("hallucination") or {}) for _, curve in curves for point in curve)
    fig, axes = plt.subplots(3 + made_up, len(columns), figsize=(3.2 * len(columns) + 1, 8 + 2.5 * made_up),
                             squeeze=False)
    for row in rows:
        color, marker = method_style(row["method"])
        for j, task in enumerate(columns):
            # the gap over the whole answer (solid), its image-dependent tokens (dashed) and template (dotted)
            panels = [(0, "tasks", "-"), (0, "sampled", "--"), (1, "val_loss", "-"),
                      *((2, key, style) for key, style in zip(GAP_KEYS, ("-", "--", ":"), strict=True)),
                      *(((3, "hallucination", "-"), (3, "sampled_hallucination", "--")) if made_up else ())]
            for i, key, style in panels:
                points = defaultdict(list)
                for curve in row.get("curves", []):
                    for point in curve:
                        if _finite((point.get(key) or {}).get(task)):
                            points[point["step"]].append(point[key][task])
                steps = sorted(points)
                if not steps and key != "tasks":
                    continue
                axes[i][j].plot(steps, [statistics.mean(points[s]) for s in steps], style, marker=marker,
                                color=color, label=row["method"] if (i, j, key) == (0, 0, "tasks") else None)
    for j, task in enumerate(columns):
        axes[0][j].set_title(task, fontsize=9)
    for i, what in enumerate(list(STEP_ROWS.values())[:len(axes)]):
        axes[i][0].set_ylabel(what, fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step", fontsize=8)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    return fig


def write_report(run_dirs: list[str | Path], out_dir: str | Path, allow_mixed: bool = False,
                 lmms_eval: list[str | Path] | None = None, reference_step: int | None = None) -> dict:
    report = build_report(run_dirs, allow_mixed, lmms_eval, reference_step)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "report.md", to_markdown(report))
    plot(report, out)
    return report
