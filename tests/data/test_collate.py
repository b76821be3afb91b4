import pytest

from mmtune.data.collate import IGNORE_INDEX, GenerationCollator, RecordDataset, TrainCollator, model_inputs
from mmtune.data.records import RecordError, read_records
from mmtune.data.synthetic import vocabulary
from mmtune.models.tiny import build_tiny


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_only_the_answer_is_learned(world, architecture):
    model, processor = build_tiny(architecture, words=vocabulary())
    records = read_records(world / "detailed_caption_train.jsonl")[:2] + read_records(world / "count_mc_train.jsonl")[:2]
    dataset = RecordDataset(records)
    batch = TrainCollator(processor)([dataset[i] for i in range(4)])
    tokenizer = processor.tokenizer
    for row, record in enumerate(records):
        learned = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
        text = tokenizer.decode(learned, skip_special_tokens=True)
        assert text.replace(" ", "") == record.target.lower().replace(" ", "")
        # padding never learned, attention covers exactly the real tokens
        real = batch["attention_mask"][row].bool()
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()
    assert batch["open_mask"].tolist() == [True, True, False, False]
    out = model(**model_inputs(batch))
    assert out.logits.shape[:2] == batch["input_ids"].shape

    generation = GenerationCollator(processor)([dataset[i] for i in range(4)])
    assert (generation["attention_mask"][:, -1] == 1).all()  # left padded


def test_too_long_record_names_the_record(world):
    _, processor = build_tiny("llava", words=vocabulary())
    records = read_records(world / "detailed_caption_train.jsonl")[:1]
    with pytest.raises(RecordError, match=f"record '{records[0].id}'.*max_length=10"):
        TrainCollator(processor, max_length=10)([RecordDataset(records)[0]])
