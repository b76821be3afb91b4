"""World v3's pre-registered checks (benchmarks/world_calibration.py, benchmarks/world_v3_questions.py) on hand-written
run folders: a caption curve that peaks and falls in every seed is flagged, one that keeps rising is not; a method that
keeps the caption from falling shows a negative fall difference against vanilla."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import world_calibration  # noqa: E402
import world_v3_questions  # noqa: E402

TASKS = {"detailed_caption": ("downstream", "cider"), "count_mc": ("downstream", "mc"),
         "attribute_mc": ("downstream", "mc"), "color_vqa": ("heldout", "exact")}
BASE = {"detailed_caption": 60.0, "count_mc": 30.0, "attribute_mc": 20.0, "color_vqa": 72.0}


def _scores(values: dict) -> dict:
    return {"tasks": {k: {"score": v, "side": TASKS[k][0], "metric": TASKS[k][1], "n": 50, "target_confidence": 0.3,
                          "chance": 25.0 if TASKS[k][1] == "mc" else 0.0} for k, v in values.items()}}


def _run(root: Path, method: str, seed: int, curve: list[tuple[int, float, float]], final: dict,
         sampled: list[float] | None = None) -> Path:
    """``curve``: (step, caption CIDEr, count MC) per evaluation during training; attribute MC rises with count MC;
    ``sampled``: the caption's sampled CIDEr at the same evaluations (amendment 2), if the run sampled."""
    run = root / f"{method}-seed{seed}"
    for where, values in (("final", final), ("base", BASE), ("during/base", BASE)):
        (run / "eval" / where).mkdir(parents=True)
        scores = _scores(values)
        if sampled is not None:
            scores["tasks"]["detailed_caption"]["sampled_score"] = 40.0
        (run / "eval" / where / "scores.json").write_text(json.dumps(scores))
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "train": {"seed": seed},
                                                     "data": {"synthetic": {"version": 3}}}))
    rows = [{"step": step, "eval": {"tasks": {"detailed_caption": cap, "count_mc": mc, "attribute_mc": mc - 10,
                                              "color_vqa": 50.0}, "val_loss": {},
                                    **({"sampled": {"detailed_caption": sampled[i]}} if sampled else {})}}
            for i, (step, cap, mc) in enumerate(curve)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def _world(root: Path, keeper_falls: bool) -> None:
    for seed in range(3):
        final = {"detailed_caption": 150.0, "count_mc": 70.0, "attribute_mc": 40.0 + seed, "color_vqa": 40.0 + seed}
        _run(root, "vanilla", seed, [(50, 150 + seed, 40), (100, 200 + seed, 50), (150, 170 - seed, 60),
                                     (200, 150 - 2 * seed, 70)], final)
        fall = (20 + seed) if keeper_falls else -seed
        _run(root, "keeper", seed, [(50, 150, 40), (100, 190 + seed, 50), (150, 190 + seed, 60),
                                    (200, 190 + seed - fall, 70)], {**final, "color_vqa": 60.0 + seed})


def test_v3_calibration_checks_the_overfitting_targets(tmp_path):
    _world(tmp_path, keeper_falls=True)
    lines, ok = world_calibration.check(tmp_path)
    text = "\n".join(lines)
    assert "| 5: overfits (flagged, fall ≥ 10) | detailed_caption | – | peak 201.0 at step 100, last 148.0" in text
    assert "| 6: its peak is above the base (same records) | detailed_caption | 60.0 | 201.0 | yes |" in text
    assert "| 7: keeps improving after detailed_caption's peak | count_mc | 30.0 | 50.0 at step 100 → 70.0 | yes |" \
        in text
    assert "1: vanilla − base > 2 std | detailed_caption" not in text  # on v3 target 1 is the fixed-choice tasks'
    assert ok  # and every other target: fixed-choice gains, G kept 56–58%, the base above chance
    assert "| 4: base target-token probability ≥ 0.05 | detailed_caption | 0.300 | – | yes |" in text


def test_v3_calibration_fails_when_the_caption_keeps_improving(tmp_path):
    for seed in range(3):
        _run(tmp_path, "vanilla", seed, [(50, 150, 40), (100, 170, 50), (150, 190 + seed, 60), (200, 210 + seed, 70)],
             {"detailed_caption": 210.0, "count_mc": 70.0, "attribute_mc": 40.0, "color_vqa": 40.0})
    text = "\n".join(world_calibration.check(tmp_path)[0])
    assert "| 5: overfits (flagged, fall ≥ 10) | detailed_caption | – | peak 211.0 at step 200, last 211.0 (fall 0.0) " \
           "| **no** |" in text


def test_v3_calibration_judges_the_sampled_score_where_the_runs_sampled(tmp_path):
    """Amendment 2: greedy captions that keep improving while the sampled ones peak and fall pass target 5 on the
    sampled score (greedy shown beside); the same runs without the sampled score fail it."""
    greedy = [(50, 150, 40), (100, 170, 50), (150, 190, 60), (200, 210, 70)]
    final = {"detailed_caption": 210.0, "count_mc": 70.0, "attribute_mc": 40.0, "color_vqa": 40.0}
    for seed in range(3):
        _run(tmp_path / "sampled", "vanilla", seed, greedy, final, sampled=[60, 90 + seed, 75 - seed, 62 - 2 * seed])
        _run(tmp_path / "greedy", "vanilla", seed, greedy, final)
    text = "\n".join(world_calibration.check(tmp_path / "sampled")[0])
    assert "| 5: overfits (flagged, fall ≥ 10) | detailed_caption (sampled) | – | peak 91.0 at step 100, last 60.0 " \
           "(fall 31.0, p = " in text and "; greedy 170.0 → 210.0) | yes |" in text
    assert "| 6: its peak is above the base (same records) | detailed_caption (sampled) | 40.0 | 91.0 | yes |" in text
    assert "| 7: keeps improving after detailed_caption's peak | count_mc | 30.0 | 50.0 at step 100 → 70.0 | yes |" \
        in text
    assert "| 5: overfits (flagged, fall ≥ 10) | detailed_caption | – | peak 210.0 at step 200" in \
        "\n".join(world_calibration.check(tmp_path / "greedy")[0])
    result = world_v3_questions.questions(tmp_path / "sampled")
    assert result["score"] == "sampled" and result["vanilla"]["falls"] == {0: 28.0, 1: 31.0, 2: 34.0}


def test_v3_questions_pair_each_method_with_vanilla_by_seed(tmp_path):
    _world(tmp_path, keeper_falls=False)
    result = world_v3_questions.questions(tmp_path)
    vanilla, keeper = result["vanilla"], result["methods"]["keeper"]
    assert vanilla["peak_step"] == 100 and vanilla["falls"] == {0: 50.0, 1: 53.0, 2: 56.0}
    assert keeper["fall"]["mine"] == [0.0, 0.0, 0.0]  # its own mean curve peaks at the end
    assert keeper["fall"]["difference"] == pytest.approx(-53.0) and keeper["fall"]["p_holm"] < 0.05
    assert keeper["G/adj"]["difference"] > 0
    text = world_v3_questions.to_markdown(result)
    assert "lower than vanilla (better" in text


def test_the_v3_replan_checks_the_fall_from_the_step_fixed_in_advance(tmp_path):
    """The re-plan (benchmarks/world_v3_replan.py): C1–C4 from step 250 (fixed in advance) to the end — not from the
    peak, which comes at step 375 here —, the confirmatory seed count from the falls' spread, P1–P3, the control."""
    import world_v3_replan

    def runs(root, falls, control=False):
        for seed, fall in enumerate(falls):
            curve = [(125, 100.0, 40), (250, 200.0 + seed, 50), (375, 230.0, 60), (500, 210.0, 65),
                     (750, 200.0 + seed - fall, 70)]
            final = {"detailed_caption": 150.0, "count_mc": 70.0, "attribute_mc": 60.0, "color_vqa": 50.0}
            run = _run(root, "vanilla", 100 + seed, curve, final)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for row, rate in zip(rows, (5.0, 6.0, 8.0, 9.0, 10.0 + seed), strict=True):
                row["eval"]["hallucination"] = {"detailed_caption": rate}
                row["eval"]["val_loss"] = {"detailed_caption": 1.0 + row["step"] / 1000}
            (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    runs(tmp_path / "mix", [20.0, 24.0, 22.0])
    runs(tmp_path / "control", [5.0, 6.0, 4.0])
    lines, result, calibrated = world_v3_replan.check(tmp_path / "mix", tmp_path / "control")
    text = "\n".join(lines)
    assert result["falls"] == [20.0, 24.0, 22.0]  # from step 250, not from the peak at 375
    assert "| C1 caption falls ≥ 10 from step 250 | 22.0 | yes |" in text
    assert "| C3 30–85% of G/adj kept | 69.4 | yes |" in text  # (50 − 0) / (72 − 0)
    assert calibrated and result["confirmatory_seeds"] == 5  # sd 2 against a fall of 10: the floor of 5
    assert result["tests"]["P1"]["p_holm"] < 0.05 and result["tests"]["P2"]["p"] < 0.05
    assert "seed 100: 5.0 (mix: 20.0)" in text
    noisy = world_v3_replan.check(_noisy(tmp_path), None)
    assert not noisy[2] and noisy[1]["confirmatory_seeds"] == 11  # falls 22 ± 25: too noisy for 10 seeds


def _noisy(root: Path) -> Path:
    folder = root / "noisy"
    for seed, fall in enumerate([50.0, -5.0, 21.0]):
        run = _run(folder, "vanilla", 100 + seed, [(250, 200.0, 50), (750, 200.0 - fall, 70)],
                   {"detailed_caption": 150.0, "count_mc": 70.0, "attribute_mc": 60.0, "color_vqa": 50.0})
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row["eval"]["val_loss"] = {"detailed_caption": 1.0}
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_rereport_of_stored_per_seed_scores_is_the_report_over_the_folders(tmp_path):
    """benchmarks/rereport.py (world v2's tables regenerated) must give what `mmtune report` gives over the runs'
    folders: the same chance and ceilings (read from the regenerated world's test records), the same S/head, G/adj,
    H/head and tests — here with runs whose scores.json carry chance and ceiling as evaluation writes them today, then
    stored in an old-style JSON without them."""
    import rereport

    from mmtune.data.synthetic import ensure_world, resolve_task_path
    from mmtune.evaluate import ceiling_score, chance_score, load_tasks
    from mmtune.report import build_report

    world = {"seed": 3, "n_train": 4, "n_test": 6, "image_size": 16}
    world_dir = ensure_world(tmp_path / "world", progress=False, **world)
    facts = {}
    for task, (_, metric) in TASKS.items():
        records = load_tasks([resolve_task_path(f"synthetic:{task}", world_dir, "test")], 5)[task]
        facts[task] = {"chance": chance_score(records), "ceiling": ceiling_score(metric, records)}
    assert facts["detailed_caption"]["ceiling"] > 100 and facts["count_mc"]["chance"] == 25.0

    def folder(method: str, seed: int, values: dict) -> Path:
        run = tmp_path / f"{method}-{seed}"
        for name, found in (("final", values), ("base", BASE)):
            (run / "eval" / name).mkdir(parents=True)
            scores = _scores(found)
            for task, entry in scores["tasks"].items():
                entry.update(facts[task])
            (run / "eval" / name / "scores.json").write_text(json.dumps(scores))
        (run / "config.yaml").write_text(yaml.safe_dump({
            "method": {"name": method}, "train": {"seed": seed}, "eval": {"limit": 5, "max_new_tokens": 40},
            "data": {"synthetic": world}}))
        return run

    runs = [folder(m, s, {"detailed_caption": 150 + 10 * s + 30 * (m == "vanilla"), "count_mc": 60 + s,
                          "attribute_mc": 40 - s, "color_vqa": 60 + 5 * s * (m == "spider")})
            for m in ("vanilla", "spider") for s in range(3)]
    direct = build_report(runs)
    stored = json.loads(json.dumps(direct))
    stored["settings"]["world"] = world  # what the old JSONs hold (the synthetic config)
    again = rereport.rereport(stored, tmp_path / "world")
    for mine, theirs in zip(direct["rows"], again["rows"], strict=True):
        for key in ("S/head", "G/adj", "H/head", "detailed_caption"):
            assert theirs["values"][key]["mean"] == pytest.approx(mine["values"][key]["mean"])
            assert (theirs["values"][key]["vs_vanilla"] or {}).get("p_holm") == \
                pytest.approx((mine["values"][key]["vs_vanilla"] or {}).get("p_holm"))
    assert again["rereported"]["task_facts"]["detailed_caption"]["ceiling"] == \
        pytest.approx(facts["detailed_caption"]["ceiling"])


def test_make_bench_rewrites_only_its_own_sections_of_the_benchmarks_doc(tmp_path):
    """benchmarks/run_all.py rewrites the step and evaluation sections; the sections other scripts own (target logits,
    tokens that count, merging) stay, whatever their order (it once kept only what followed "Model merging")."""
    from run_all import others_sections

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n## Training step\nold\n\n## Target-only logits\nmine\n\n## Reading these numbers\nold\n\n"
                   "## Tokens that count\nalso mine\n\n## Model merging\nmerged\n")
    kept = others_sections(doc)
    assert kept == "\n## Target-only logits\nmine\n\n## Tokens that count\nalso mine\n\n## Model merging\nmerged\n"
    assert others_sections(tmp_path / "absent.md") == ""
