"""One evaluation summarised: per-task scores, S / G / H by every rule the report knows (raw, /base, /adj, and the
primary S/head, G/adj, H/head: docs/report.md). Used during training (each evaluation's row) and by the report; no
plotting, no statistics."""

from __future__ import annotations

import math
import statistics

# NRCA's diagnostic logged per task at each evaluation during training: the gap over the whole answer, and over its
# image-dependent and template tokens where the records say which is which (mmtune.evaluate.teacher_forced)
GAP_KEYS = ("confidence_gap", "confidence_gap_image", "confidence_gap_template")
# The share of answers naming something the image lacks (CHAIR-style, where the records list what it holds), greedy and
# sampled (mmtune.evaluate.hallucination), logged per task at each evaluation during training
HALLUCINATION_KEYS = ("hallucination", "sampled_hallucination")

SUMMARY_KEYS = ("S", "G", "H", "S/base", "G/base", "H/base", "S/adj", "G/adj", "H/adj", "S/head", "H/head")
# The primary summary: S/head (each downstream task's share of its headroom above chance gained — a new skill, often
# at chance in the base), G/adj (each held-out task's share of the base's above-chance skill kept), H/head of the two.
PRIMARY_KEYS = ("S/head", "G/adj", "H/head")
# A task whose base is within this many points of chance can't be chance-adjusted (the ratio would explode or flip).
CHANCE_MARGIN = 5.0


def harmonic(s: float, g: float) -> float:
    """2SG/(S+G); 0 when either side is at or below 0 (chance-adjusted scores can be negative: no skill left)."""
    if math.isnan(s) or math.isnan(g):
        return float("nan")
    return 0.0 if s <= 0 or g <= 0 else 2 * s * g / (s + g)


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def summarize(scores: dict, base: dict | None = None) -> dict:
    """Per-task scores plus raw S, G, H of one evaluation (``scores.json``) and, given the base model's
    evaluation, the normalised S/base, G/base, H/base."""
    tasks = scores["tasks"]
    values = {k: v["score"] for k, v in tasks.items()}
    down = [k for k, v in tasks.items() if v["side"] == "downstream"]
    held = [k for k, v in tasks.items() if v["side"] == "heldout"]
    out = {"tasks": values, "S": _mean([values[k] for k in down]), "G": _mean([values[k] for k in held])}
    out["H"] = harmonic(out["S"], out["G"])
    out["hallucination"] = {k: v["hallucination"] for k, v in tasks.items() if "hallucination" in v}
    # Headroom: (score − chance) / (ceiling − chance) — how much of what there was to learn above a guess is learned.
    # The ceiling is 100 for accuracies and, for captions, the score of the best of each record's own references
    # (``evaluate.ceiling_score``); a task without one (a CIDEr evaluation from before it was recorded) is left out.
    reference = base["tasks"] if base is not None else {}
    headroom = {}
    for k in down:
        found = {**reference.get(k, {}), **tasks[k]}
        chance = found.get("chance", 0.0)
        ceiling = found.get("ceiling", None if found.get("metric") == "cider" else 100.0)
        if ceiling is not None and ceiling - chance > 0:
            headroom[k] = 100 * (values[k] - chance) / (ceiling - chance)
    out["headroom"] = headroom
    out["S/head"] = _mean([headroom[k] for k in down if k in headroom])
    if base is not None:
        ref = {k: v["score"] for k, v in base["tasks"].items()}
        norm = {k: 100 * values[k] / ref[k] for k in values if ref.get(k)}
        out["normalised"] = norm
        out["S/base"] = _mean([norm[k] for k in down if k in norm])
        out["G/base"] = _mean([norm[k] for k in held if k in norm])
        out["H/base"] = harmonic(out["S/base"], out["G/base"])
        # Chance-adjusted: (score − chance) / (base − chance), the share of the base's above-chance skill a model
        # has; a base at or near chance has no skill to share and is left out (named in the report).
        chance = {k: v.get("chance", 0.0) for k, v in base["tasks"].items()}
        adjusted = {k: 100 * (values[k] - chance[k]) / (ref[k] - chance[k]) for k in values
                    if k in ref and ref[k] - chance[k] >= CHANCE_MARGIN}
        out["adjusted"] = adjusted
        out["S/adj"] = _mean([adjusted[k] for k in down if k in adjusted])
        out["G/adj"] = _mean([adjusted[k] for k in held if k in adjusted])
        out["H/adj"] = harmonic(out["S/adj"], out["G/adj"])
        out["H/head"] = harmonic(out["S/head"], out["G/adj"])
    return out
