"""The report on hand-written evaluations: normalisation to the base, per-seed values, marks that survive a paired
test and Holm's correction, intervals and wording."""

import json
import math

import pytest
import yaml

from mmtune.report import build_report, summarize, to_markdown, welch_p, write_report

BASE = {"cap": 500.0, "mc": 40.0, "vqa": 80.0}
SIDES = {"cap": "heldout", "mc": "downstream", "vqa": "heldout"}


def _scores(values: dict) -> dict:
    return {"tasks": {k: {"score": v, "side": SIDES[k], "metric": "x", "n": 10} for k, v in values.items()}}


def _run(root, method: str, seed: int, values: dict):
    run = root / f"{method}-{seed}"
    (run / "eval" / "final").mkdir(parents=True)
    (run / "eval" / "base").mkdir(parents=True)
    (run / "eval" / "final" / "scores.json").write_text(json.dumps(_scores(values)))
    (run / "eval" / "base" / "scores.json").write_text(json.dumps(_scores(BASE)))
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "train": {"seed": seed}}))
    return run


def test_normalised_aggregates_are_scale_free():
    out = summarize(_scores({"cap": 250.0, "mc": 60.0, "vqa": 40.0}), _scores(BASE))
    assert out["G"] == pytest.approx(145.0)  # raw: the caption's scale dominates
    assert out["G/base"] == pytest.approx(50.0)  # each held-out task kept half of the base's score
    assert out["S/base"] == pytest.approx(150.0)
    assert out["H/base"] == pytest.approx(2 * 150 * 50 / 200)


def test_a_task_at_zero_in_the_base_is_left_out_of_normalised_means():
    base = _scores({**BASE, "mc": 0.0})
    out = summarize(_scores({"cap": 500.0, "mc": 30.0, "vqa": 80.0}), base)
    assert math.isnan(out["S/base"]) and out["G/base"] == pytest.approx(100.0)


def test_welch_p_matches_the_textbook_case():
    # Equal variances 1 and n = 3: t = 3 / sqrt(2/3) = 3.674, df = 4, and the t(4) CDF has a closed form:
    # F(t) = 1/2 + 3/8 · x · (1 − t² / (12 (1 + t²/4))), x = t / sqrt(1 + t²/4)  ->  p = 2 (1 − F) = 0.02131.
    assert welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.021312, abs=1e-5)
    # two constant samples: no p = 0 from nothing, the exact label-permutation p (2 of the C(4, 2) = 6 splits)
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == pytest.approx(1 / 3) and welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert welch_p([1.0], [2.0, 3.0]) is None


def test_report_keeps_every_seed_and_marks_only_differences_beyond_noise(tmp_path):
    runs = [_run(tmp_path, "vanilla", s, {"cap": 100 + s, "mc": 70 + s, "vqa": 40 + s}) for s in range(3)]
    # the caption's gain is 200, 201, 202 over the seeds (a gain that is exactly the same in every seed is tested
    # exactly: test_a_constant_difference_over_three_seeds_is_not_p_zero)
    runs += [_run(tmp_path, "keeper", s, {"cap": 300 + 2 * s, "mc": 70 + 2 * s, "vqa": 60 + s}) for s in range(3)]
    report = write_report(runs, tmp_path / "rep")
    keeper = next(r for r in report["rows"] if r["method"] == "keeper")
    assert [s["seed"] for s in keeper["per_seed"]] == [0, 1, 2]
    assert keeper["per_seed"][2]["tasks"]["cap"] == 304
    assert keeper["values"]["G/base"]["p_vs_vanilla"] < 0.05
    assert keeper["values"]["mc"]["p_vs_vanilla"] > 0.05  # 71 ± 2 vs 71 ± 1: noise
    task_line, summary_line = [line for line in to_markdown(report).splitlines() if line.startswith("| keeper")]
    mc_cell, cap_cell = task_line.split("|")[3:5]  # columns: method, seeds, mc (down), cap (held), vqa (held)
    assert "▲" not in mc_cell and "▼" not in mc_cell and cap_cell.endswith("▲ ")
    h_base_cell = summary_line.split("|")[11]  # S/head, G/adj, H/head, S, G, H raw, then S/base, G/base, H/base
    assert h_base_cell.endswith("▲ ")
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(saved["rows"][0]["per_seed"]) == 3
    assert (tmp_path / "rep" / "tasks.png").exists() and (tmp_path / "rep" / "s_vs_g.png").exists()


def test_report_without_vanilla_has_no_marks(tmp_path):
    runs = [_run(tmp_path, "spider", s, {"cap": 100.0 + s, "mc": 50.0, "vqa": 50.0}) for s in range(2)]
    report = build_report(runs)
    assert all(v["p_vs_vanilla"] is None for v in report["rows"][0]["values"].values())
    rows = [line for line in to_markdown(report).splitlines() if line.startswith("| spider")]
    assert len(rows) == 2 and not any("▲" in row or "▼" in row for row in rows)


def test_runs_that_are_not_comparable_are_refused_unless_asked(tmp_path):
    from mmtune.cli import main

    a = _run(tmp_path, "vanilla", 0, {"cap": 100.0, "mc": 50.0, "vqa": 50.0})
    b = _run(tmp_path, "vanilla", 1, {"cap": 100.0, "mc": 50.0, "vqa": 50.0})
    (b / "eval" / "base" / "scores.json").write_text(json.dumps(_scores({**BASE, "mc": 41.0})))  # another base
    with pytest.raises(ValueError, match="not comparable: their base_scores differ \\(mc: 40.0 vs 41.0\\)"):
        build_report([a, b])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r")]) == 2
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r"), "--allow-mixed"]) == 0
    c = _run(tmp_path, "spider", 0, {"cap": 100.0, "mc": 50.0})  # another task set
    with pytest.raises(ValueError, match="their tasks differ"):
        build_report([a, c])
    d = _run(tmp_path, "spider", 1, {"cap": 100.0, "mc": 50.0, "vqa": 50.0})
    (d / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "spider"}, "eval": {"limit": 5}}))
    with pytest.raises(ValueError, match="their eval differ \\(limit: None vs 5\\)"):
        build_report([a, d])
    e = _run(tmp_path, "spider", 2, {"cap": 100.0, "mc": 50.0, "vqa": 50.0})  # a task scored by another metric
    scores = json.loads((e / "eval" / "final" / "scores.json").read_text())
    scores["tasks"]["vqa"]["metric"] = "exact"
    (e / "eval" / "final" / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(ValueError, match="their task_metrics differ \\(vqa: 'x' vs 'exact'\\)"):
        build_report([a, e])


def test_holm_by_hand():
    from mmtune.report import holm

    # sorted 0.01, 0.03, 0.04: × 3, × 2, × 1, made monotone → 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.4, 0.4]) == pytest.approx([0.8, 0.8])


def test_pairing_by_seed_sees_a_consistent_gain_that_seed_noise_hides(tmp_path):
    """Seeds move both methods together (50, 60, 70); the method is 2 ± 0.5 above vanilla on each seed: Welch's test
    across seeds can't see it, the paired test does, and the interval is the t-interval of the differences."""
    from mmtune.report import difference_interval

    gains = [2.0, 2.5, 1.5]
    runs = [_run(tmp_path, "vanilla", s, {"cap": 500.0, "mc": 50.0 + 10 * s, "vqa": 80.0}) for s in range(3)]
    runs += [_run(tmp_path, "steady", s, {"cap": 500.0, "mc": 50.0 + 10 * s + gains[s], "vqa": 80.0})
             for s in range(3)]
    report = build_report(runs)
    mc = next(r for r in report["rows"] if r["method"] == "steady")["values"]["mc"]["vs_vanilla"]
    assert welch_p([50 + 10 * s + gains[s] for s in range(3)], [50 + 10 * s for s in range(3)]) > 0.5
    assert mc["test"] == "paired" and mc["p"] == pytest.approx(0.0202, abs=1e-3)  # t = 6.93, df 2
    # t(0.975, 2) = 4.303: 2 ± 4.303 · 0.5 / √3
    assert mc["interval"] == pytest.approx((2 - 1.2421, 2 + 1.2421), abs=1e-3)
    assert difference_interval([1.0, 2.0], [1.0, 2.0], paired=True) == (0.0, 0.0)


def test_holm_correction_removes_marks_that_many_comparisons_would_give_by_chance(tmp_path):
    """Three columns each at raw p ≈ 0.02 (paired): alone each would be marked; corrected over the table, none is,
    and the wording says "not detectable at this power" with the interval."""
    gains = [2.0, 2.5, 1.5]
    runs = [_run(tmp_path, "vanilla", s, {"cap": 400.0 + s, "mc": 50.0 + 10 * s, "vqa": 70.0 + 3 * s})
            for s in range(3)]
    runs += [_run(tmp_path, "lucky", s, {"cap": 400.0 + s + gains[s], "mc": 50.0 + 10 * s + gains[s],
                                         "vqa": 70.0 + 3 * s + gains[s]}) for s in range(3)]
    report = build_report(runs)
    values = next(r for r in report["rows"] if r["method"] == "lucky")["values"]
    assert all(values[k]["vs_vanilla"]["p"] < 0.05 for k in ("cap", "mc", "vqa"))
    assert all(values[k]["vs_vanilla"]["p_holm"] >= 0.05 for k in ("cap", "mc", "vqa"))
    text = to_markdown(report)
    lucky = [line for line in text.splitlines() if line.startswith("| lucky")]
    assert not any("▲" in line or "▼" in line for line in lucky)
    assert "lucky G/adj: not detectable at this power" in text and "not the same as no effect" in text


def test_chance_adjusted_means_leave_out_bases_near_chance():
    """(score − chance) / (base − chance): a 4-way choice task whose base sits below chance (18.5 vs 25, as world
    v2's attribute MC) would make /base say "+270%" for a model at 50; the adjusted mean leaves it out and names it."""
    base = {"tasks": {"mc": {"score": 60.0, "side": "downstream", "chance": 25.0},
                      "attr": {"score": 18.5, "side": "downstream", "chance": 25.0},
                      "cap": {"score": 200.0, "side": "heldout", "chance": 0.0}}}
    model = {"tasks": {"mc": {"score": 70.0, "side": "downstream"}, "attr": {"score": 50.0, "side": "downstream"},
                       "cap": {"score": 150.0, "side": "heldout"}}}
    out = summarize(model, base)
    assert out["adjusted"]["mc"] == pytest.approx(100 * 45 / 35) and "attr" not in out["adjusted"]
    assert out["S/adj"] == pytest.approx(100 * 45 / 35)
    assert out["S/base"] == pytest.approx((100 * 70 / 60 + 100 * 50 / 18.5) / 2)  # dominated by the near-chance task
    assert out["G/adj"] == pytest.approx(75.0)
    below = summarize({"tasks": {**model["tasks"], "mc": {"score": 20.0, "side": "downstream"}}}, base)
    assert below["S/adj"] < 0 and below["H/adj"] == 0.0  # below chance: no skill left, H is 0


def test_the_score_of_a_random_guess():
    from mmtune.data.records import Record
    from mmtune.evaluate import chance_score

    def record(choices):
        return Record(id="x", task="t", kind="choice" if choices else "open", image=None, prompt="?", answers=["a"],
                      choices=choices, answer_index=0 if choices else None)

    assert chance_score([record(["a", "b", "c", "d"]), record(["a", "b"])]) == pytest.approx(37.5)
    assert chance_score([record(None)]) == 0.0


def _curve(run, points: list[tuple[int, dict, dict]]) -> None:
    rows = [{"step": step, "eval": {"tasks": scores, "val_loss": loss}} for step, scores, loss in points]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


OVERFIT_SIDES = {"cap": "downstream", "mc": "downstream", "vqa": "heldout"}
NOISE = (0.0, 3.0, -2.0, 4.0, -3.0, 1.0, -4.0, 2.0)  # a seed's own offset at each evaluation, fixed per test


def _overfit_run(root, method: str, seed: int, points: list[tuple[int, dict, dict]], sampled=None):
    run = _run(root, method, seed, {"cap": 200.0, "mc": 70.0, "vqa": 60.0})
    for folder in ("final", "base"):
        scores = json.loads((run / "eval" / folder / "scores.json").read_text())
        for task, side in OVERFIT_SIDES.items():
            scores["tasks"][task]["side"] = side
        (run / "eval" / folder / "scores.json").write_text(json.dumps(scores))
    rows = [{"step": step, "eval": {"tasks": scores, "val_loss": loss}} for step, scores, loss in points]
    for row, value in zip(rows, sampled or [], strict=False):
        row["eval"]["sampled"] = {"cap": value}
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_a_task_that_overfits_during_training_is_flagged_beyond_seed_noise(tmp_path):
    """Eight seeds. The caption score peaks at step 20 and falls back while its validation loss rises; the choice task
    keeps improving. The largest-fall test (the peak's choice paid for by sign flips, Holm over the method's tests)
    names the caption (score and loss), not the choice task; a fall seen in some seeds while the others rise is noise;
    sampled captions that peak and fall are flagged as such."""
    runs = []
    for seed in range(8):
        e = NOISE[seed]
        runs.append(_overfit_run(tmp_path, "vanilla", seed, [
            (step, {"cap": cap + e * (step // 10 % 2 * 2 - 1), "mc": mc + e, "vqa": 60.0},
             {"cap": loss + 0.01 * e * (step // 10 % 2 * 2 - 1), "mc": 1.0 - step / 100, "vqa": 1.0})
            for step, cap, mc, loss in ((10, 220, 50, 2.0), (20, 260, 60, 1.6), (30, 230, 65, 1.8),
                                        (40, 205, 70, 2.1))]))
    for seed in range(8):  # half the seeds fall after step 20, half keep rising
        fall = (-30.0, 10.0)[seed % 2] + NOISE[seed]
        runs.append(_overfit_run(tmp_path, "noisy", seed, [
            (step, {"cap": 200.0 + value, "mc": 70.0, "vqa": 60.0}, {"cap": 1.0, "mc": 1.0, "vqa": 1.0})
            for step, value in ((10, 0.0), (20, 20.0), (30, 20.0 + fall / 2), (40, 20.0 + fall))]))
    for seed in range(8):  # greedy captions keep rising; sampled ones (eval.sample_temperature) peak and fall
        e = NOISE[seed]
        runs.append(_overfit_run(tmp_path, "sampler", seed, [
            (step, {"cap": 200.0 + step + e * (step % 20 == 0), "mc": 70.0 + step / 10, "vqa": 60.0},
             {"cap": 1.0, "mc": 1.0, "vqa": 1.0}) for step in (10, 20, 30, 40)],
            sampled=(50.0, 80.0 + e, 60.0, 40.0 - e / 2)))
    report = write_report(runs, tmp_path / "rep")
    flagged = {(f["method"], f["task"], f["what"]) for f in report["overfitting"]}
    assert flagged == {("vanilla", "cap", "score"), ("vanilla", "cap", "validation loss"),
                       ("sampler", "cap", "sampled score")}
    caption = next(f for f in report["overfitting"] if f["method"] == "vanilla" and f["what"] == "score")
    assert caption["step"] == 20 and caption["p"] == pytest.approx(1 / 256) and caption["p_holm"] < 0.05
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "- vanilla: cap overfits after step 20 (score 259.88 there, 204.88 at the end: fell by 55.00" in text
    assert (tmp_path / "rep" / "tasks_over_steps.png").exists()


def test_the_largest_fall_needs_five_seeds_and_a_fixed_step_is_tested_by_its_own(tmp_path):
    """Three seeds that all fall by exactly 55 from step 20: the largest-fall test can't reach 0.05 with 3 seeds and
    says so (no p = 0 from three equal falls); with step 20 fixed in advance the falls are tested by their exact
    sign-flip p, 1/8 — too few seeds, written as such; three seeds that fall by 50 ± 5 are flagged by the t-test."""
    def runs_of(method, spread):
        return [_overfit_run(tmp_path, method, seed, [
            (step, {"cap": cap + seed - (spread * (seed - 1) if step == 40 else 0), "mc": 70.0 + step, "vqa": 60.0},
             {"cap": 1.0, "mc": 1.0, "vqa": 1.0}) for step, cap in ((10, 220), (20, 260), (30, 230), (40, 205))])
                for seed in range(3)]

    equal, spread = runs_of("equal", 0.0), runs_of("spread", 5.0)
    report = build_report(equal)
    assert report["overfitting"] == []
    assert all("3 seeds: the largest-fall test needs ≥ 5" in t["reason"] for t in report["overfitting_tests"])
    assert "- equal: not tested (3 seeds: the largest-fall test needs ≥ 5" in to_markdown(report)
    fixed = build_report(equal, reference_step=20)
    cap = next(t for t in fixed["overfitting_tests"] if t["task"] == "cap")
    assert cap["p"] == pytest.approx(1 / 8) and not cap["flagged"]
    fixed = build_report(spread, reference_step=20)
    cap = next(t for t in fixed["overfitting_tests"] if t["task"] == "cap")
    assert cap["flagged"] and cap["fall"] == pytest.approx(55.0) and 0 < cap["p"] < 0.01
    assert "fall from step 20 (fixed in advance) to the end" in to_markdown(fixed)


def test_a_constant_difference_over_three_seeds_is_not_p_zero(tmp_path):
    """One record apart in each of three seeds: the exact sign-flip p (0.25), no mark, and the report says that these
    seeds can't go below 0.25 and how many could."""
    runs = [_run(tmp_path, "vanilla", s, {"cap": 400.0 + 7 * s, "mc": 50.0 + 9 * s, "vqa": 70.0 + 3 * s})
            for s in range(3)]
    runs += [_run(tmp_path, "one_more", s, {"cap": 400.0 + 7 * s, "mc": 50.5 + 9 * s, "vqa": 70.0 + 3 * s})
             for s in range(3)]
    report = build_report(runs)
    mc = next(r for r in report["rows"] if r["method"] == "one_more")["values"]["mc"]["vs_vanilla"]
    assert mc["p"] == pytest.approx(0.25) and mc["constant"] and mc["seeds_needed"] == 6
    text = to_markdown(report)
    task_line, summary_line = [line for line in text.splitlines() if line.startswith("| one_more")]
    assert "▲" not in task_line.split("|")[3] and "▲" not in summary_line.split("|")[3]  # mc, S/head
    assert "one_more S/head: not detectable at this power" in text
    assert "the same difference in all 3 seeds: an exact permutation p, which can't go below 0.25 with 3 seeds; " \
           "6 seeds could reach p < 0.05" in text


def _predictions(run, task: str, scores: list[float]) -> None:
    folder = run / "eval" / "final" / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "score": s}) + "\n"
                                                  for i, s in enumerate(scores)))


def test_differences_come_with_test_record_sampling_error_beside_seed_noise(tmp_path):
    """Per-record scores resampled together with the seeds: a gain of exactly 5 on every record and seed has the
    interval [5, 5]; a gain carried by a few records has a wide one, even though its seeds agree perfectly (the
    seed-only t-interval is a point there)."""
    from mmtune.report import bootstrap_difference

    records = [0.0, 100.0, 100.0, 0.0, 100.0, 0.0, 0.0, 100.0, 100.0, 0.0]
    lucky = [100.0, 100.0, 100.0, 0.0, 100.0, 0.0, 0.0, 100.0, 100.0, 0.0]  # one record flipped: +10 points
    runs = []
    for seed in range(2):
        for method, scores in (("vanilla", records), ("lucky", lucky)):
            run = _run(tmp_path, method, seed, {"cap": 500.0, "mc": sum(scores) / len(scores), "vqa": 80.0})
            _predictions(run, "mc", scores)
            runs.append(run)
    report = build_report(runs)
    mc = next(r for r in report["rows"] if r["method"] == "lucky")["values"]["mc"]["vs_vanilla"]
    assert mc["interval"] == (10.0, 10.0)  # seeds alone: no noise at all
    low, high = mc["bootstrap_interval"]
    assert low == 0.0 and high >= 20.0  # one record of ten: the test set can't tell
    steady = {s: {f"r{i}": v + 5 for i, v in enumerate(records)} for s in range(3)}
    base = {s: {f"r{i}": v for i, v in enumerate(records)} for s in range(3)}
    assert bootstrap_difference(steady, base) == pytest.approx((5.0, 5.0))
    assert "lucky mc: +10.0 (seeds +10.0 to +10.0; seeds and records +0.0 to" in to_markdown(report)


def _lmms_results(path, model, mme: float, pope: float):
    path.write_text(json.dumps({
        "results": {"mme": {"alias": "mme", "mme_percetion_score,none": mme, "mme_cognition_score,none": mme / 4},
                    "pope": {"alias": "pope", "pope_accuracy,none": pope, "pope_accuracy_stderr,none": 0.01}},
        "config": {"model": "llava_hf", "model_args": f"pretrained={model},dtype=bfloat16"},
        "higher_is_better": {"pope": {"pope_accuracy": True}}}))
    return path


def test_lmms_eval_results_join_the_held_out_side(tmp_path):
    runs = [_run(tmp_path, "vanilla", 0, {"cap": 400.0, "mc": 60.0, "vqa": 60.0})]
    base = tmp_path / "base-model"
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": {"path": str(base)}}))
    files = [_lmms_results(tmp_path / "base.json", base, 1400.0, 0.80),
             _lmms_results(tmp_path / "final.json", runs[0] / "final", 700.0, 0.80)]
    report = build_report(runs, lmms_eval=files)
    assert report["sides"]["mme/mme_percetion_score"] == "heldout" and report["sides"]["pope"] == "heldout"
    row = report["rows"][0]["per_seed"][0]
    # G/base: cap 80%, vqa 75%, MME perception and cognition 50% each, POPE 100%
    assert row["G/base"] == pytest.approx((80 + 75 + 50 + 50 + 100) / 5)
    with pytest.raises(ValueError, match="no lmms-eval results for its base model"):
        build_report(runs, lmms_eval=files[1:])
    with pytest.raises(ValueError, match="no lmms-eval results for its final/"):
        build_report(runs, lmms_eval=files[:1])
    (tmp_path / "bad.json").write_text(json.dumps({"results": {"mme": {"x,none": 1}}, "config": {"model_args": ""}}))
    with pytest.raises(ValueError, match="names no pretrained"):
        build_report(runs, lmms_eval=[tmp_path / "bad.json"])


def test_runs_with_replay_are_their_own_row(tmp_path):
    plain = _run(tmp_path, "vanilla", 0, {"cap": 400.0, "mc": 60.0, "vqa": 60.0})
    replayed = _run(tmp_path / "r", "vanilla", 0, {"cap": 450.0, "mc": 55.0, "vqa": 70.0})
    config = yaml.safe_load((replayed / "config.yaml").read_text())
    (replayed / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"replay_share": 0.25}}))
    report = build_report([plain, replayed])
    assert [r["method"] for r in report["rows"]] == ["vanilla", "vanilla + replay 0.25"]


def test_s_counts_every_downstream_task_as_its_share_of_the_headroom_above_chance():
    """The demo's case: both MC downstream tasks start at chance (29.5 and 18.5 against 25), so /adj leaves them out
    and S/adj is the caption alone; S/head counts them — (score − chance) / (100 − chance) — and the caption by its
    ceiling (the best of its own references). G keeps the base-relative share (G/adj); H/head combines the two."""
    base = {"tasks": {"cap": {"score": 234.8, "side": "downstream", "chance": 0.0, "ceiling": 400.0, "metric": "cider"},
                      "count": {"score": 29.5, "side": "downstream", "chance": 25.0, "metric": "mc"},
                      "attr": {"score": 18.5, "side": "downstream", "chance": 25.0, "metric": "mc"},
                      "held": {"score": 80.0, "side": "heldout", "chance": 0.0, "metric": "exact"}}}
    model = {"tasks": {"cap": {"score": 301.1, "side": "downstream", "metric": "cider"},
                       "count": {"score": 69.5, "side": "downstream", "metric": "mc"},
                       "attr": {"score": 42.5, "side": "downstream", "metric": "mc"},
                       "held": {"score": 60.0, "side": "heldout", "metric": "exact"}}}
    out = summarize(model, base)
    assert set(out["adjusted"]) == {"cap", "held"}  # the MC tasks are within 5 points of chance in the base
    assert out["headroom"] == pytest.approx({"cap": 100 * 301.1 / 400, "count": 100 * 44.5 / 75,
                                             "attr": 100 * 17.5 / 75})
    assert out["S/head"] == pytest.approx((75.275 + 59.333 + 23.333) / 3, abs=1e-3)
    assert out["G/adj"] == pytest.approx(75.0)
    assert out["H/head"] == pytest.approx(2 * out["S/head"] * 75 / (out["S/head"] + 75))
    # the base's own S/head: the MC tasks near 0 (a guess), the caption at its share of the ceiling
    assert summarize(base, base)["headroom"]["attr"] < 0
    # a caption evaluated before its ceiling was recorded is left out (and named in the report), not given 100
    old = {"tasks": {k: {key: v for key, v in t.items() if key != "ceiling"} for k, t in base["tasks"].items()}}
    assert "cap" not in summarize(model, old)["headroom"]


def test_variants_of_different_methods_never_share_a_style():
    """Issue 36: "vanilla + replay 0.25", "spider + replay 0.25" and "ewc + replay 0.25" were the same pink triangles.
    A variant keeps its method's colour (methods differ) and takes a marker other than its method's own."""
    from mmtune.report import method_style

    styles = {label: method_style(label) for label in ("vanilla + replay 0.25", "spider + replay 0.25",
                                                       "ewc + replay 0.25", "vanilla", "spider", "ewc")}
    assert len({color for color, _ in styles.values()}) == 3
    assert len(set(styles.values())) == 6
    for name in ("vanilla", "spider", "ewc"):
        assert styles[f"{name} + replay 0.25"][0] == styles[name][0]
        assert styles[f"{name} + replay 0.25"][1] != styles[name][1]
    assert method_style("my own label") == method_style("my own label")  # stable
    from mmtune.methods import METHODS

    registered = [m for m in METHODS if not m.startswith("test_")]
    assert len({method_style(m)[0] for m in registered}) == len(registered)  # every method its own colour


def test_the_s_vs_g_plot_shows_the_primary_summary_where_every_row_has_it(tmp_path):
    """The scatter is what the verdicts are about: S/head against G/adj — not the older /base means — once the
    downstream tasks' chance and ceiling are known; the /base means where they are not (older evaluations)."""
    from mmtune.report import scatter_keys

    runs = [_run(tmp_path, "vanilla", s, {"cap": 100 + s, "mc": 70 + s, "vqa": 40 + s}) for s in range(2)]
    assert scatter_keys(build_report(runs)) == ("S/head", "G/adj")  # "mc" scored as an accuracy: ceiling 100
    for run in runs:  # a CIDEr task downstream without its ceiling: S/head can't be computed
        scores = json.loads((run / "eval" / "final" / "scores.json").read_text())
        scores["tasks"]["mc"]["metric"] = "cider"
        (run / "eval" / "final" / "scores.json").write_text(json.dumps(scores))
    assert scatter_keys(build_report(runs)) == ("S/base", "G/base")


def test_the_report_says_whether_pairing_by_seed_pairs_the_data(tmp_path):
    """Runs from before data.seed drew their records by training seed: seed k of every method drew the same records,
    so a paired comparison still pairs the data; a method whose seed-k run drew other records breaks that."""
    runs = [_run(tmp_path, method, s, {"cap": 100 + s, "mc": 70 + s, "vqa": 40 + s})
            for method in ("vanilla", "spider") for s in range(2)]
    text = to_markdown(build_report(runs))
    assert "runs of the same seed drew the same records" in text
    config = yaml.safe_load((runs[-1] / "config.yaml").read_text())
    (runs[-1] / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"seed": 7}}))
    text = to_markdown(build_report(runs))
    assert "pairing by seed does not pair the data" in text and "same records" not in text


def test_tasks_over_steps_names_rows_and_columns_without_overlap():
    """Long task names side by side: each column's title (the task) clears its neighbours', every row says what it
    plots on its left, every bottom axis says the x axis is the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    from mmtune.report import STEP_ROWS, tasks_over_steps_figure

    columns = ["detailed_caption", "attribute_mc", "background_mc", "position_vqa", "brief_caption"]
    curve = [{"step": step, "tasks": {t: 50.0 + step for t in columns}, "val_loss": {t: 1.0 for t in columns}}
             for step in (10, 20)]
    fig = tasks_over_steps_figure([{"method": "vanilla", "curves": [curve]}], columns, [({}, curve)])
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    titles = [ax.title.get_window_extent(renderer) for ax in axes[:len(columns)]]
    assert [ax.get_title() for ax in axes[:len(columns)]] == columns
    assert all(left.x1 <= right.x0 for left, right in zip(titles, titles[1:], strict=False))
    rows = len(axes) // len(columns)
    assert [axes[i * len(columns)].get_ylabel() for i in range(rows)] == list(STEP_ROWS.values())[:rows]
    assert all(ax.get_xlabel() == "optimizer step" for ax in axes[-len(columns):])
