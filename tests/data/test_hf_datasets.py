"""Hugging Face datasets as task sources: save_to_disk folders and Parquet files, with a column mapping, validated
like JSONL task files."""

import pytest

from mmtune.data.hf_datasets import read_hf_records, to_hf_dataset
from mmtune.data.records import RecordError, read_records
from mmtune.train import train

datasets = pytest.importorskip("datasets")


def _rows(world, count=6):
    """VQA-style rows with the dataset's own column names and image paths relative to the dataset folder."""
    records = read_records(world / "color_vqa_train.jsonl")[:count]
    return [{"qid": index, "question": r.prompt, "answer": r.target, "img": r.image} for index, r in enumerate(records)]


COLUMNS = {"id": "qid", "prompt": "question", "answers": "answer", "image": "img"}
DEFAULTS = {"task": "colors", "kind": "open"}


def test_save_to_disk_and_parquet_read_the_same_records(world, tmp_path):
    rows = _rows(world)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    saved = read_hf_records(tmp_path / "saved", COLUMNS, defaults=DEFAULTS)
    parquet = read_hf_records(tmp_path / "parquet", COLUMNS, defaults=DEFAULTS)
    assert [(r.id, r.prompt, r.answers, r.image, r.task) for r in saved] == \
        [(r.id, r.prompt, r.answers, r.image, r.task) for r in parquet]
    assert [r.answers for r in saved] == [[row["answer"]] for row in rows] and saved[0].id == "0"


def test_bad_rows_are_named_or_skipped_and_counted(world, tmp_path):
    rows = _rows(world)
    rows[3]["img"] = "missing.png"
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(RecordError, match=r"bad.parquet\[3\]: image not found"):
        read_hf_records(tmp_path / "bad.parquet", COLUMNS, defaults=DEFAULTS)
    skipped: list[str] = []
    kept = read_hf_records(tmp_path / "bad.parquet", COLUMNS, defaults=DEFAULTS, skip_bad_records=True,
                           skipped=skipped)
    assert len(kept) == 5 and len(skipped) == 1 and "bad.parquet[3]" in skipped[0]
    with pytest.raises(ValueError, match="no column 'query' \\(for prompt\\)"):
        read_hf_records(tmp_path / "bad.parquet", {**COLUMNS, "prompt": "query"}, defaults=DEFAULTS)
    with pytest.raises(RecordError, match=r"\[0\]: missing field\(s\) \['task', 'kind'\]"):
        read_hf_records(tmp_path / "bad.parquet", COLUMNS)


def test_dataset_dict_needs_a_split(world, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(world))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds splits \['train'\]"):
        read_hf_records(tmp_path / "dd", COLUMNS, defaults=DEFAULTS)
    assert len(read_hf_records(tmp_path / "dd", COLUMNS, split="train", defaults=DEFAULTS)) == 6


def test_a_run_trains_on_a_saved_dataset_and_parquet(world, tmp_path, tiny_config):
    datasets.Dataset.from_list(_rows(world)).save_to_disk(str(tmp_path / "saved"))
    records = read_records(world / "count_mc_train.jsonl")[:6]
    to_hf_dataset(records).to_parquet(str(tmp_path / "mc.parquet"))  # mmtune's own field names: no mapping
    run = train(tiny_config(
        "data.tasks=[{path: '" + str(tmp_path / "saved") + "', columns: {id: qid, prompt: question, answers: answer, "
        "image: img}, defaults: {task: colors, kind: open}}, {path: '" + str(tmp_path / "mc.parquet") + "'}]",
        "train.max_steps=2"))
    assert (run / "final" / "config.json").exists()


def test_columns_on_a_jsonl_task_are_an_error(world, tiny_config):
    with pytest.raises(ValueError, match="columns / defaults / split apply to Hugging Face datasets"):
        train(tiny_config(f"data.tasks=[{{path: '{world / 'count_mc_train.jsonl'}', columns: {{prompt: q}}}}]"))
