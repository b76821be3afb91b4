"""A run's training data (mmtune.train_data): bad and over-length records named or counted."""

import json

import pytest

from mmtune.train import train


def test_an_over_length_record_names_its_file_and_line(tiny_config, world):
    with pytest.raises(Exception, match=r"detailed_caption_train.jsonl:\d+: record .* longer than data.max_length=20"):
        train(tiny_config("data.max_length=20", out="long"))


def test_skip_bad_records_counts_them_in_the_summary(tiny_config, tmp_path, world):
    lines = (world / "count_mc_train.jsonl").read_text().splitlines()[:12]
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(world / row["image"])
    rows[3]["image"] = "missing.png"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    with pytest.raises(Exception, match="bad.jsonl:4: image not found"):
        train(tiny_config(f"data.tasks=[{{path: '{bad}'}}]", out="strict"))
    run = train(tiny_config(f"data.tasks=[{{path: '{bad}'}}]", "data.skip_bad_records=true", out="lenient"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["skipped_records"] == 2 and summary["records"] == 11
