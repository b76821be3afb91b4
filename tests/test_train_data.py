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


def test_length_grouped_batches_pad_less_and_keep_a_random_order_per_epoch():
    """data.group_by_length: every record once per epoch, a function of (seed, epoch); batches of similar length —
    on a mix of short answers and long captions the padded share falls several-fold."""
    import random

    from mmtune.train_data import EpochSampler, LengthGroupedSampler, padded_share

    rng = random.Random(0)
    lengths = [rng.choice([70, 72, 75]) for _ in range(300)] + [rng.randint(90, 140) for _ in range(200)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(500)) and list(sampler) == first  # a permutation, the same when redrawn
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(500))
    assert lengths[first[0]] == max(lengths)  # the longest first: an out-of-memory shows at step 1
    grouped = padded_share(lengths, first, 8)
    plain = padded_share(lengths, list(EpochSampler(500, 3)), 8)
    assert grouped < plain / 4, (grouped, plain)


def test_a_length_grouped_run_resumes_exactly(tiny_config, capsys):
    import torch

    from helpers import final_weights, losses

    settings = ["data.group_by_length=true", "train.max_steps=6", "train.batch_size=4"]
    full = train(tiny_config(*settings, "train.save_every=3", out="full"))
    assert "data.group_by_length: batches of similar length — padding is" in capsys.readouterr().out
    resumed = train(tiny_config(*settings, f"train.resume_from={full / 'checkpoints' / 'step-000003'}", out="again"))
    assert losses(resumed) == losses(full)[3:]
    again = final_weights(resumed)
    assert all(torch.equal(value, again[key]) for key, value in final_weights(full).items())
    from mmtune.config import ConfigError

    with pytest.raises(ConfigError, match="group_by_length works on the fixed mixture"):
        tiny_config("data.group_by_length=true", "data.temperature=1")


@pytest.mark.parametrize("architecture", ["qwen2_vl", "llava"])
def test_record_lengths_count_each_images_tokens_at_its_size(world, tmp_path, architecture):
    """Qwen2-VL's dynamic resolution gives a 128×128 image 16× the tokens of a 32×32 one: the lengths that
    group_by_length sorts by are each record's collated length (LLaVA: one count for every size)."""
    from PIL import Image

    from mmtune.data.collate import RecordDataset, TrainCollator
    from mmtune.data.records import Record, read_records
    from mmtune.data.synthetic import vocabulary
    from mmtune.models.tiny import build_tiny
    from mmtune.train_data import record_lengths

    _, processor = build_tiny(architecture, words=vocabulary())
    if architecture == "qwen2_vl":
        processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    records, record = [], read_records(world / "detailed_caption_train.jsonl")[0]
    for i, size in enumerate([(32, 32), (128, 128), (96, 64), (64, 128)]):  # one caption, four image sizes
        path = tmp_path / f"{i}.png"
        with Image.open(record.image) as image:
            image.convert("RGB").resize(size).save(path)
        records.append(Record(id=record.id, task="caption", kind="open", image=str(path), prompt=record.prompt,
                              answers=record.answers))
    records.append(Record(id="two", task="caption", kind="open", image=[records[1].image, records[2].image],
                          prompt=records[0].prompt, answers=records[0].answers))
    collator = TrainCollator(processor)
    collated = [int(collator([RecordDataset(records)[i]])["attention_mask"].sum()) for i in range(len(records))]
    assert record_lengths(records, collator) == collated
    assert (len(set(collated[:4])) > 1) == (architecture == "qwen2_vl")
