import json

import pytest

from mmtune.cli import main
from mmtune.data.synthetic import vocabulary
from mmtune.models.tiny import save_tiny
from mmtune.train import train


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in rows))
    return path


def test_score_json_last_line(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "two", "answers": ["2"] * 10},
                                         {"id": 2, "prediction": "cat", "answers": ["dog"] * 10}])
    assert main(["score", "--metric", "vqa", "--predictions", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "vqa" and result["n"] == 2 and result["score"] == pytest.approx(50.0)


@pytest.mark.parametrize("rows,message", [
    (['{"id": 1, "prediction": "x", "answers": ["y"]}', "{oops"], "p.jsonl:2: malformed JSON"),
    ([{"id": 1, "prediction": "x"}], "p.jsonl:1: 'answers' must be a list"),
    ([{"id": 1, "prediction": "x", "answers": ["y"]}, {"id": 1, "prediction": "x", "answers": ["y"]}], "duplicate id"),
    ([{"id": 1, "answers": ["y"]}], "'prediction' must be a string"),
])
def test_score_bad_input_names_the_line(tmp_path, capsys, rows, message):
    path = _write(tmp_path / "p.jsonl", rows)
    assert main(["score", "--metric", "exact", "--predictions", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_mc_needs_choices(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "A", "answers": ["A"]}])
    assert main(["score", "--metric", "mc", "--predictions", str(path)]) == 2
    assert "p.jsonl:1: 'choices' must be a list of at least 2 strings" in capsys.readouterr().err


@pytest.mark.parametrize("metric,row,message", [
    ("exact", {"answers": "yes"}, "'answers' must be a list"),  # a string would be scored as its characters
    ("vqa", {"answers": ["yes", 3]}, "'answers' must be a list of at least 1 strings"),
    ("mc", {"choices": "xy", "answer_index": 0}, "'choices' must be a list"),
    ("mc", {"choices": ["x", "y"], "answer_index": 2}, "'answer_index' must be an integer index into the 2"),
    ("mc", {"choices": ["x", "y"], "answer_index": True}, "got True"),
    ("mc", {"choices": ["x", "y"], "answer_index": -1}, "got -1"),
    ("cider", {"answers": None}, "'answers' must be a list"),
])
def test_score_refuses_what_would_be_scored_silently_wrong(tmp_path, capsys, metric, row, message):
    path = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "yes", **row}])
    assert main(["score", "--metric", metric, "--predictions", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_score_names_the_line_of_non_utf8_bytes(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": 1, "prediction": "x", "answers": ["y"]}\n{"id": 2, "prediction": "\xff"}\n')
    assert main(["score", "--metric", "exact", "--predictions", str(path)]) == 2
    assert "p.jsonl:2: not UTF-8" in capsys.readouterr().err


def test_the_score_api_refuses_bad_items_too():
    from mmtune.metrics import score

    with pytest.raises(ValueError, match="item 'a': 'answers' must be a list"):
        score("exact", [{"id": "a", "prediction": "yes", "answers": "yes"}])


def test_a_task_name_cannot_write_outside_the_eval_folder(tmp_path, world):
    from mmtune.data.records import read_records, write_records
    from mmtune.evaluate import evaluate
    from mmtune.models.load import load_model

    records = read_records(world / "color_vqa_test.jsonl")[:2]
    records[0].task = "../../escaped"
    records[1].task = str(tmp_path / "absolute")
    write_records(records, tmp_path / "tasks" / "evil.jsonl")
    model, processor = load_model(save_tiny(tmp_path / "m", "llava", words=vocabulary()))
    evaluate(model, processor, {"heldout": [tmp_path / "tasks" / "evil.jsonl"]}, tmp_path / "out" / "ev",
             max_new_tokens=2, progress=False)
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl")} - {__import__("pathlib").Path("tasks/evil.jsonl")}
    assert all(str(p).startswith("out/ev/predictions/") for p in written) and len(written) == 2
    assert not (tmp_path / "escaped.jsonl").exists() and not (tmp_path / "absolute.jsonl").exists()


def test_eval_command_writes_scores_and_predictions(tmp_path, world, capsys):
    model = save_tiny(tmp_path / "model", "llava", words=vocabulary())
    args = ["eval", "--model", str(model), "--tasks", str(world / "count_mc_test.jsonl"),
            "--heldout", str(world / "color_vqa_test.jsonl"), "--out", str(tmp_path / "ev"),
            "--limit", "5", "--max-new-tokens", "4"]
    assert main(args) == 0
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["tasks"]["count_mc"]["n"] == 5 and scores["tasks"]["color_vqa"]["side"] == "heldout"
    lines = (tmp_path / "ev" / "predictions" / "count_mc.jsonl").read_text().splitlines()
    assert len(lines) == 5 and {"id", "prediction", "answers", "score"} <= json.loads(lines[0]).keys()
    assert main(args) == 2  # never silently overwrites
    assert "exists" in capsys.readouterr().err


def test_sampled_score_of_open_response_tasks(tmp_path, world, capsys):
    """--sample-temperature scores the caption task (not the multiple choice) on sampled answers too: the same seed
    draws the same captions, they differ from the greedy ones, and the caller's random state is left untouched."""
    import torch

    model = save_tiny(tmp_path / "model", "llava", words=vocabulary())
    args = ["eval", "--model", str(model), "--tasks", str(world / "detailed_caption_test.jsonl"),
            str(world / "count_mc_test.jsonl"), "--limit", "6", "--max-new-tokens", "8", "--sample-temperature", "1.0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "sampled" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / x / "scores.json").read_text())["tasks"] for x in "ab")
    assert "sampled_score" in a["detailed_caption"] and "sampled_score" not in a["count_mc"]
    # the caption's ceiling (its references' own best) and hallucination rate; the choice task's ceiling is 100
    assert a["detailed_caption"]["ceiling"] > 100 and a["count_mc"]["ceiling"] == 100.0
    assert "hallucination" in a["detailed_caption"] and "hallucination" not in a["count_mc"]
    lines = [json.loads(line) for line in (tmp_path / "a" / "predictions" / "detailed_caption.jsonl").read_text()
             .splitlines()]
    assert all(isinstance(line["hallucinated"], list) for line in lines)
    assert a["detailed_caption"]["hallucination"] == pytest.approx(100 * sum(bool(x["hallucinated"]) for x in lines) / 6)
    assert a["detailed_caption"]["sampled_score"] == b["detailed_caption"]["sampled_score"]
    read = lambda x, name: [json.loads(line)["prediction"]  # noqa: E731
                            for line in (tmp_path / x / "predictions" / name).read_text().splitlines()]
    sampled = read("a", "detailed_caption.sampled.jsonl")
    assert len(sampled) == 6 and sampled == read("b", "detailed_caption.sampled.jsonl")
    assert sampled != read("a", "detailed_caption.jsonl")  # greedy
    assert not (tmp_path / "a" / "predictions" / "count_mc.sampled.jsonl").exists()

    from mmtune.data.records import read_records
    from mmtune.evaluate import sampled_answers
    from mmtune.models.load import load_model

    loaded, processor = load_model(model)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = sampled_answers(loaded, processor, read_records(world / "detailed_caption_test.jsonl")[:6], 1.0, 0,
                            max_new_tokens=8, progress=False)
    assert again == sampled and torch.equal(torch.rand(3), expected_next)  # training draws what it would have


def test_batched_generation_equals_one_by_one(tmp_path, world):
    from mmtune.data.records import read_records
    from mmtune.evaluate import generate
    from mmtune.models.load import load_model

    model, processor = load_model(save_tiny(tmp_path / "m", "llava", words=vocabulary()))
    records = read_records(world / "detailed_caption_test.jsonl")[:6] + read_records(world / "count_mc_test.jsonl")[:6]
    batched = generate(model, processor, records, batch_size=12, max_new_tokens=6, progress=False)
    single = generate(model, processor, records, batch_size=1, max_new_tokens=6, progress=False)
    assert batched == single


def test_validation_loss_is_the_mean_of_each_records_own_loss(tmp_path, world):
    """teacher_forced's loss, batched, = the mean over records of the model's own cross-entropy on each record
    alone (the Hugging Face loss with labels: another code path), and its confidence ≥ exp(−loss) (Jensen)."""
    import math

    import torch

    from mmtune.data.collate import RecordDataset, TrainCollator, model_inputs
    from mmtune.data.records import read_records
    from mmtune.evaluate import teacher_forced
    from mmtune.models.load import load_model

    model, processor = load_model(save_tiny(tmp_path / "m", "llava", words=vocabulary()))
    records = read_records(world / "detailed_caption_test.jsonl")[:3] + read_records(world / "count_mc_test.jsonl")[:3]
    forced = teacher_forced(model, processor, records, batch_size=4)
    collate = TrainCollator(processor, 2048)
    with torch.no_grad():
        own = [float(model(**model_inputs(batch), labels=batch["labels"]).loss)
               for batch in (collate([item]) for item in RecordDataset(records))]
    assert forced["loss"] == pytest.approx(sum(own) / len(own), rel=1e-5)
    assert forced["confidence"] >= math.exp(-forced["loss"])


def test_nrcas_diagnostic_measures_confidence_under_a_noised_image(tmp_path, world, monkeypatch):
    """Evaluation records, per task, the target confidence with each image replaced by NRCA's noised view and the
    clean − noised gap; with a 'noise' that leaves the image as it is, the gap is exactly 0 (so the gap measured
    is the noised forward's, not an artefact)."""
    import mmtune.methods.nrca
    from mmtune.data.records import read_records
    from mmtune.evaluate import teacher_forced
    from mmtune.models.load import load_model

    model, processor = load_model(save_tiny(tmp_path / "m", "llava", words=vocabulary()))
    records = read_records(world / "detailed_caption_test.jsonl")[:4]
    forced = teacher_forced(model, processor, records, batch_size=4)
    assert forced["confidence_gap"] == pytest.approx(forced["confidence"] - forced["noised_confidence"])
    assert forced["confidence_gap"] != 0.0
    monkeypatch.setattr(mmtune.methods.nrca, "noisy_view", lambda pixels, *args, **kwargs: pixels)
    assert teacher_forced(model, processor, records, batch_size=4)["confidence_gap"] == 0.0


def test_train_with_eval_writes_report_and_report_command(tiny_config, tmp_path, capsys):
    runs = [train(tiny_config(f"method.name={m}", "train.seed=0", "eval.limit=4", "eval.max_new_tokens=4",
                              "eval.downstream=['synthetic:detailed_caption', 'synthetic:count_mc']",
                              "eval.heldout=['synthetic:color_vqa']", out=m)) for m in ("vanilla", "nrca")]
    for run in runs:
        assert (run / "eval" / "base" / "scores.json").exists()
        assert (run / "report" / "report.md").exists() and (run / "report" / "s_vs_g.png").exists()
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| vanilla |" in table and "| nrca |" in table and "base (before fine-tuning)" in table
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"S", "G", "H"} <= report["rows"][0]["values"].keys()


def test_infer_one_image_and_a_task_file_then_score_it(tmp_path, world, capsys):
    model = save_tiny(tmp_path / "model", "llava", words=vocabulary())
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    assert main(["infer", "--model", str(model), "--image", str(image), "--prompt", "What color is the square?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    out = tmp_path / "preds.jsonl"
    assert main(["infer", "--model", str(model), "--tasks", str(world / "count_mc_test.jsonl"), "--limit", "3",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["score", "--metric", "mc", "--predictions", str(out), "--json"]) == 0  # mmtune's own output scores
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    assert main(["infer", "--model", str(model), "--tasks", str(world / "count_mc_test.jsonl"), "--out", str(out),
                 "--limit", "1", "--sample", "--temperature", "0.9"]) == 2  # exists: never silently replaced
    assert main(["infer", "--model", str(model), "--image", str(image)]) == 2


def test_eval_output_rescored_by_score_and_read_by_report(tmp_path, world, capsys):
    """mmtune eval → its prediction files re-score with mmtune score (every metric, multiple choice included) →
    its folder is a row of mmtune report, under --label; synthetic:<family> tasks work with --world."""
    model = save_tiny(tmp_path / "model", "llava", words=vocabulary())
    common = ["--tasks", "synthetic:count_mc", "synthetic:detailed_caption", "--heldout", "synthetic:color_vqa",
              "--limit", "5", "--max-new-tokens", "4"]
    assert main(["eval", "--model", str(model), *common, "--out", str(tmp_path / "ev")]) == 2
    assert "need --world" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), *common, "--out", str(tmp_path / "ev"), "--world", str(world),
                 "--label", "tiny-random"]) == 0
    capsys.readouterr()
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    for task, metric in (("count_mc", "mc"), ("detailed_caption", "cider"), ("color_vqa", "exact")):
        assert scores["tasks"][task]["metric"] == metric
        assert main(["score", "--predictions", str(tmp_path / "ev" / "predictions" / f"{task}.jsonl"), "--json"]) == 0
        rescored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rescored["score"] == pytest.approx(scores["tasks"][task]["score"])
    assert main(["report", str(tmp_path / "ev"), "--out", str(tmp_path / "rep")]) == 0
    assert "| tiny-random |" in (tmp_path / "rep" / "report.md").read_text()


def test_the_diagnostic_splits_image_words_from_template(tmp_path, world):
    """Where the records name their image words (the synthetic captions do: colours, shapes, sizes, places, count,
    background), the confidence and its gap are also measured over those tokens and over the template tokens — each
    the per-record mean of exactly those tokens' probabilities, computed here by hand from the logits."""
    import torch

    from mmtune.data.collate import IGNORE_INDEX, RecordDataset, TrainCollator, model_inputs
    from mmtune.data.records import read_records
    from mmtune.evaluate import teacher_forced
    from mmtune.models.load import load_model

    model, processor = load_model(save_tiny(tmp_path / "m", "llava", words=vocabulary()))
    records = read_records(world / "detailed_caption_test.jsonl")[:3]
    assert all(r.extra["image_words"] for r in records)
    forced = teacher_forced(model, processor, records, batch_size=2)
    by_hand = {"image": [], "template": []}
    with torch.no_grad():
        for record in records:
            batch = TrainCollator(processor)([RecordDataset([record])[0]])
            probs = model(**model_inputs(batch)).logits[0, :-1].softmax(-1)
            labels = batch["labels"][0, 1:]
            kept = labels != IGNORE_INDEX
            target = probs[kept].gather(-1, labels[kept].unsqueeze(-1)).squeeze(-1)
            words = processor.tokenizer.convert_ids_to_tokens(labels[kept].tolist())
            image = torch.tensor([word in record.extra["image_words"] for word in words])
            by_hand["image"].append(float(target[image].mean()))
            by_hand["template"].append(float(target[~image].mean()))
    for part, values in by_hand.items():
        assert forced[f"confidence_{part}"] == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert forced[f"confidence_gap_{part}"] == pytest.approx(
            forced[f"confidence_{part}"] - forced[f"noised_confidence_{part}"])
    assert "confidence_image" not in teacher_forced(model, processor, read_records(world / "count_mc_test.jsonl")[:2])
