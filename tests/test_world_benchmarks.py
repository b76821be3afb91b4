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
