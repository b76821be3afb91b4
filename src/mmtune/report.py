"""Specialization vs generalization: one table for many runs, as Markdown, JSON and PNG plots.

S = mean score over the downstream tasks, G = mean over the held-out tasks, H = 2SG / (S + G).
Runs of the same method (several seeds) are averaged: mean ± std. Each value is also shown as its
change against the base model (evaluated before fine-tuning).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml


def harmonic(s: float, g: float) -> float:
    return 0.0 if s + g == 0 else 2 * s * g / (s + g)


def summarize(scores: dict) -> dict:
    """Per-task scores plus S, G and H of one evaluation (``scores.json``)."""
    tasks = scores["tasks"]
    down = [t["score"] for t in tasks.values() if t["side"] == "downstream"]
    held = [t["score"] for t in tasks.values() if t["side"] == "heldout"]
    s = statistics.mean(down) if down else float("nan")
    g = statistics.mean(held) if held else float("nan")
    return {"tasks": {k: v["score"] for k, v in tasks.items()}, "S": s, "G": g,
            "H": harmonic(s, g) if down and held else float("nan")}


def load_run(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    final = run / "eval" / "final" / "scores.json"
    if not final.exists():
        raise FileNotFoundError(f"{run}: no eval/final/scores.json (train with eval.downstream / eval.heldout set)")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    base_file = run / "eval" / "base" / "scores.json"
    scores = json.loads(final.read_text())
    return {
        "run": str(run), "method": config.get("method", {}).get("name", "?"),
        "seed": config.get("train", {}).get("seed"),
        "sides": {k: v["side"] for k, v in scores["tasks"].items()},
        "final": summarize(scores),
        "base": summarize(json.loads(base_file.read_text())) if base_file.exists() else None,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_report(run_dirs: list[str | Path]) -> dict:
    runs = [load_run(r) for r in run_dirs]
    sides: dict[str, str] = {}
    for run in runs:
        sides.update(run["sides"])
    columns = [t for t in sides if sides[t] == "downstream"] + [t for t in sides if sides[t] == "heldout"]
    base = next((r["base"] for r in runs if r["base"]), None)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run["final"])
    rows = []
    for method, finals in by_method.items():
        row = {"method": method, "seeds": len(finals), "values": {}}
        for key in [*columns, "S", "G", "H"]:
            values = [f["tasks"].get(key) if key in columns else f[key] for f in finals]
            values = [v for v in values if v is not None]
            if values:
                mean, std = _mean_std(values)
                reference = (base["tasks"].get(key) if key in columns else base[key]) if base else None
                row["values"][key] = {"mean": mean, "std": std,
                                      "delta": None if reference is None else mean - reference}
        rows.append(row)
    return {"columns": columns, "sides": sides, "base": base, "rows": rows, "runs": [r["run"] for r in runs]}


def to_markdown(report: dict) -> str:
    columns = report["columns"]
    sides = report["sides"]
    head = ["method", "seeds"] + [f"{c} ({'down' if sides[c] == 'downstream' else 'held'})" for c in columns] + \
        ["S", "G", "H"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if report["base"]:
        base = report["base"]
        cells = [f"{base['tasks'].get(c, float('nan')):.1f}" for c in columns] + \
            [f"{base[k]:.1f}" for k in ("S", "G", "H")]
        lines.append("| base (before fine-tuning) | – | " + " | ".join(cells) + " |")
    for row in report["rows"]:
        cells = []
        for key in [*columns, "S", "G", "H"]:
            value = row["values"].get(key)
            if value is None:
                cells.append("–")
                continue
            text = f"{value['mean']:.1f}"
            if row["seeds"] > 1:
                text += f" ± {value['std']:.1f}"
            if value["delta"] is not None:
                text += f" ({value['delta']:+.1f})"
            cells.append(text)
        lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
    legend = ("\nScores in %. S = mean downstream (specialization), G = mean held-out (generalization), "
              "H = 2SG/(S+G). In parentheses: change against the base model; ± is the std over seeds.\n")
    return "\n".join(lines) + "\n" + legend


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    columns, rows = report["columns"], report["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * max(1, len(rows)) / 2), 4))
    width = 0.8 / (len(rows) + (1 if report["base"] else 0))
    series = ([("base", {c: report["base"]["tasks"].get(c) for c in columns}, {})] if report["base"] else []) + \
        [(r["method"], {c: r["values"].get(c, {}).get("mean") for c in columns},
          {c: r["values"].get(c, {}).get("std", 0) for c in columns}) for r in rows]
    for i, (label, means, stds) in enumerate(series):
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, [means[c] or 0 for c in columns], width, yerr=[stds.get(c, 0) for c in columns] or None,
               label=label, color=plt.get_cmap("tab20").colors[i % 20])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
    ax.set_xticklabels([f"{c}\n({report['sides'][c]})" for c in columns], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title("per-task scores by method")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "tasks.png"))

    fig, ax = plt.subplots(figsize=(5, 4.5))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP<>Xph*"
    for index, row in enumerate(rows):  # colour + marker: distinct for up to 20 methods
        s, g = row["values"].get("S"), row["values"].get("G")
        if s and g:
            ax.errorbar(s["mean"], g["mean"], xerr=s["std"], yerr=g["std"], fmt=markers[index % len(markers)],
                        color=colors[index % len(colors)], capsize=3, label=row["method"])
    if report["base"]:
        ax.scatter([report["base"]["S"]], [report["base"]["G"]], marker="*", s=200, color="black", label="base")
    ax.set_xlabel("specialization S (downstream, %)")
    ax.set_ylabel("generalization G (held-out, %)")
    ax.set_title("specialization vs generalization")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "s_vs_g.png"))
    return paths


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(run_dirs)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    plot(report, out)
    return report
