"""Scoring is the user's choice: a task's metric from its task spec or its records, else a rule that is printed;
eval.downstream / eval.heldout read the same specs as data.tasks."""

import json

import pytest
from PIL import Image

from mmtune.config import ConfigError, TaskSpec
from mmtune.evaluate import evaluate, run_evaluation
from mmtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llava", words="red blue square circle colour shape what is".split())


def _conversations(folder, metric=None, n=4):
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(folder / "img" / "a.png")
    items = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                           {"role": "assistant", "content": "red"}], "images": ["img/a.png"], "id": str(i),
              **({"metric": metric} if metric else {})} for i in range(n)]
    path = folder / "chart.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_a_records_own_metric_is_used_and_the_rule_is_printed_where_none_is_said(tiny, tmp_path):
    model, processor = tiny
    told: list[str] = []
    scores = evaluate(model, processor, {"downstream": [_conversations(tmp_path, "cider")]}, tmp_path / "a",
                      progress=False, say=told.append)
    assert scores["tasks"]["chart"]["metric"] == "cider" and scores["tasks"]["chart"]["metric_choice"] == "declared"
    assert told == []
    (tmp_path / "b").mkdir()
    scores = evaluate(model, processor, {"downstream": [_conversations(tmp_path / "b")]}, tmp_path / "b" / "out",
                      progress=False, say=told.append)
    assert scores["tasks"]["chart"]["metric"] == "exact"
    assert told == ["chart: scored by exact (inferred: mean answer 1.0 words ≤ 3; choose with metric: in its task "
                    "spec or records)"]


def test_a_task_spec_chooses_the_metric_and_draws_n(tiny, tmp_path):
    model, processor = tiny
    path = _conversations(tmp_path, n=6)
    scores = evaluate(model, processor, {"heldout": [TaskSpec(path=str(path), metric="cider", n=3)]}, tmp_path / "o",
                      progress=False)
    assert scores["tasks"]["chart"]["metric"] == "cider" and scores["tasks"]["chart"]["n"] == 3


def test_disagreeing_metrics_are_refused(tiny, tmp_path):
    model, processor = tiny
    path = _conversations(tmp_path, "exact")
    with pytest.raises(ValueError, match="record '0' declares metric 'exact', but its task spec .* says metric: cider"):
        evaluate(model, processor, {"downstream": [TaskSpec(path=str(path), metric="cider")]}, tmp_path / "o",
                 progress=False)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1].replace('"exact"', '"cider"') + "\n")
    with pytest.raises(ValueError, match="task chart: its records declare several metrics \\(cider, exact\\)"):
        evaluate(model, processor, {"downstream": [path]}, tmp_path / "p", progress=False)


def test_eval_sides_take_task_specs_and_registry_names(tiny, tiny_config, tmp_path):
    """eval.downstream as data.tasks: {path, metric, n}, dataset:<name> from data.registry; bad records skipped with
    data.skip_bad_records are counted in scores.json."""
    model, processor = tiny
    path = _conversations(tmp_path, n=5)
    with path.open("a") as handle:
        handle.write("{broken\n")
    (tmp_path / "registry.json").write_text(json.dumps({"charts": {"file_name": "chart.jsonl", "task": "held_charts",
                                                                   "formatting": "messages", "metric": "cider"}}))
    config = tiny_config(f"eval.downstream=[{{path: {path}, metric: vqa, n: 2}}]",
                         "eval.heldout=['dataset:charts']", f"data.registry={tmp_path / 'registry.json'}",
                         "data.skip_bad_records=true")
    assert config.eval.downstream[0] == TaskSpec(path=str(path), metric="vqa", n=2)
    scores = run_evaluation(model, processor, config, None, tmp_path / "eval")
    tasks = scores["tasks"]
    assert (tasks["chart"]["metric"], tasks["chart"]["n"], tasks["chart"]["side"]) == ("vqa", 2, "downstream")
    assert (tasks["held_charts"]["metric"], tasks["held_charts"]["n"]) == ("cider", 5)
    assert scores["skipped_records"]["count"] == 2  # the broken line, once per side
    assert "chart.jsonl:6" in scores["skipped_records"]["examples"][0]
    with pytest.raises(ConfigError, match="weight and probability are training settings"):
        tiny_config("eval.downstream=[{path: x.jsonl, weight: 2}]")
