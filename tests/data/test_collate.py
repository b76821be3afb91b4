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


def _conversation_records(world, tmp_path):
    """A two-exchange conversation with an image and a text-only record, written as a task file (words from the
    synthetic vocabulary, so the tiny word-level tokenizers know them)."""
    from mmtune.data.records import Record, write_records

    caption, count = read_records(world / "detailed_caption_train.jsonl")[0], read_records(world / "count_vqa_train.jsonl")[0]
    other = read_records(world / "detailed_caption_train.jsonl")[1]
    records = [
        Record(id="talk", task="chat", kind="open", image=caption.image, prompt=count.prompt, answers=count.answers,
               history=[{"prompt": caption.prompt, "answer": caption.target}]),
        Record(id="text", task="chat", kind="open", image=None, prompt=caption.prompt, answers=[caption.target]),
        caption,
        Record(id="pair", task="chat", kind="open", image=[caption.image, other.image], prompt=caption.prompt,
               answers=[other.target]),  # two images in one record
    ]
    path = tmp_path / "chat.jsonl"
    write_records(records, path)
    return read_records(path), [count.target, caption.target]


# The tiny architectures; InternVL and LLaVA-OneVision size an image's tokens by its shape and count (tiles, anyres).
ARCHITECTURES = ["llava", "qwen2_vl", "idefics3", "qwen3_vl", "gemma3", "internvl", "llava_onevision"]
FIXED_TOKENS_PER_IMAGE = ["llava", "qwen2_vl", "idefics3", "qwen3_vl", "gemma3"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_conversations_learn_every_answer_and_text_only_records_batch_with_images(world, tmp_path, architecture):
    """Conversations, a text-only record and a two-image record in one batch, on each tiny architecture."""
    import torch

    from mmtune.data.collate import subset_batch

    model, processor = build_tiny(architecture, words=vocabulary())
    records, (last_answer, first_answer) = _conversation_records(world, tmp_path)
    assert records[1].image is None and records[0].history  # both survive the JSONL round trip
    assert len(records[3].images) == 2
    samples = [RecordDataset(records)[i] for i in range(4)]
    batch = TrainCollator(processor)(samples)
    tokenizer = processor.tokenizer
    learned = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    text = tokenizer.decode(learned, skip_special_tokens=True).replace(" ", "")
    assert text == (first_answer + last_answer).lower().replace(" ", "")  # both assistant turns, nothing else
    text_only = tokenizer.decode(batch["input_ids"][1][batch["labels"][1] != IGNORE_INDEX], skip_special_tokens=True)
    assert text_only.replace(" ", "") == first_answer.lower().replace(" ", "")
    assert batch["image_mask"].tolist() == [True, False, True, True]
    assert batch["image_counts"].tolist() == [1, 0, 1, 2]
    tokens = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert tokens[1] == 0 and tokens[2] > 0
    if architecture in FIXED_TOKENS_PER_IMAGE:
        assert tokens[3] == 2 * tokens[2]  # the second image is shown too
    out = model(**model_inputs(batch))
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # a sub-batch carries exactly its rows' images (what NRCA, EWC, per-task use) — none for a text-only row alone
    # (issue 36: EWC's one-record Fisher batches crashed in the vision tower on a 0-image pixel_values)
    for rows in ([3], [1, 3], [2], [1]):
        part = subset_batch(batch, torch.tensor(rows))
        logits = model(**model_inputs(part)).logits
        real = part["attention_mask"].bool()  # (a padded position's logits follow its position ids, which differ)
        torch.testing.assert_close(logits[real], out.logits[rows][real], rtol=1e-4, atol=1e-4)
    generation = GenerationCollator(processor)(samples)  # the conversation's history is in its prompt
    assert model.generate(**model_inputs(generation), max_new_tokens=2).shape[0] == 4


def test_bad_history_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "task": "t", "kind": "open", "image": null, "prompt": "p", "answers": ["x"], '
                    '"history": [{"prompt": "q"}]}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'history'\[0\] must be"):
        read_records(path)


def test_subset_batch_follows_images_past_text_only_rows():
    import torch

    from mmtune.data.collate import subset_batch

    batch = {"input_ids": torch.arange(3).unsqueeze(1), "image_mask": torch.tensor([True, False, True]),
             "pixel_values": torch.tensor([[10.0], [12.0]])}  # one image each for rows 0 and 2
    assert subset_batch(batch, torch.tensor([2]))["pixel_values"].tolist() == [[12.0]]
    assert subset_batch(batch, torch.tensor([0, 2]))["pixel_values"].tolist() == [[10.0], [12.0]]
    grid = {**batch, "image_grid_thw": torch.tensor([[1, 1, 2], [1, 1, 1]]),
            "pixel_values": torch.tensor([[0.0], [1.0], [2.0]])}  # Qwen2-VL: patches of all images, flattened
    out = subset_batch(grid, torch.tensor([1, 2]))
    assert out["pixel_values"].tolist() == [[2.0]] and out["image_grid_thw"].tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("architecture", ["internvl", "llava_onevision"])
def test_images_of_varying_size_follow_their_record(world, tmp_path, architecture):
    """A wide image takes more pixel_values rows than a square one (InternVL: 2 tiles + a thumbnail; LLaVA-OneVision:
    more anyres views); a sub-batch still carries exactly its records' and gives their rows' logits."""
    import torch
    from PIL import Image

    from mmtune.data.collate import subset_batch
    from mmtune.data.records import Record

    model, processor = build_tiny(architecture, words=vocabulary())
    caption = read_records(world / "detailed_caption_train.jsonl")[0]
    with Image.open(caption.image) as square:
        wide = tmp_path / "wide.png"
        square.convert("RGB").resize((2 * square.width, square.height)).save(wide)
    records = [caption, Record(id="wide", task="t", kind="open", image=str(wide), prompt=caption.prompt,
                               answers=caption.answers),
               Record(id="two", task="t", kind="open", image=[str(wide), caption.image], prompt=caption.prompt,
                      answers=caption.answers)]
    batch = TrainCollator(processor)([RecordDataset(records)[i] for i in range(3)])
    if architecture == "internvl":
        assert batch["pixel_counts"].tolist() == [1, 3, 4]  # square: 1 tile; wide: 2 tiles + thumbnail
    full = model(**model_inputs(batch)).logits
    for rows in ([1], [2], [0, 2], [1, 2]):
        part = subset_batch(batch, torch.tensor(rows))
        width = part["input_ids"].shape[1]
        logits = model(**model_inputs(part)).logits
        for index, row in enumerate(rows):
            real = part["attention_mask"][index].bool()
            torch.testing.assert_close(logits[index][real], full[row, :width][real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_training_on_conversations_and_text_only_records(world, tmp_path, tiny_config, architecture):
    from mmtune.train import train

    _conversation_records(world, tmp_path)
    run = train(tiny_config(f"model.tiny={architecture}", "method.name=nrca+spider", "train.batch_size=4",
                            "train.max_steps=2",
                            f"data.tasks=[{{path: '{tmp_path / 'chat.jsonl'}', weight: 2}}, "
                            "{path: 'synthetic:detailed_caption', n: 4}]"))
    assert (run / "final" / "config.json").exists()


def test_ewc_estimates_its_fisher_over_text_only_records_too(world, tmp_path, tiny_config):
    """Issue 36, item 1: EWC's Fisher takes one record at a time; a text-only record's one-row batch carried a 0-image
    pixel_values and the vision tower crashed (`cannot reshape tensor of 0 elements`), depending on which records
    the Fisher drew. Every record of the mix is drawn here (samples ≥ the records)."""
    from mmtune.train import train

    _conversation_records(world, tmp_path)
    run = train(tiny_config("method.name=ewc", "method.ewc.samples=64", "train.batch_size=4", "train.max_steps=1",
                            f"data.tasks=[{{path: '{tmp_path / 'chat.jsonl'}'}}]", out="ewc-text-only"))
    assert (run / "final" / "config.json").exists()


def test_image_tokens_mark_exactly_the_image_words_of_the_answer(world):
    """extra.image_words → a mask over the answer tokens (by character offsets, so any fast tokenizer's pieces of a
    word count); absent when no record names any."""
    from mmtune.data.records import Record

    _, processor = build_tiny("qwen2_vl", words=vocabulary())
    caption = read_records(world / "detailed_caption_train.jsonl")[0]
    other = Record(id="x", task="t", kind="open", image=caption.image, prompt=caption.prompt,
                   answers=["a red circle"], extra={"image_words": ["Red"]})  # matched whole-word, any case
    batch = TrainCollator(processor, mark_image_tokens=True)([RecordDataset([caption, other])[i] for i in range(2)])
    assert "image_tokens" not in TrainCollator(processor)([RecordDataset([caption])[0]])  # training batches skip it
    tokenizer = processor.tokenizer
    for row, record in enumerate([caption, other]):
        marked = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][batch["image_tokens"][row]].tolist())
        answer = [t for t in tokenizer.tokenize(record.target)]
        expected = [t for t in answer if t in {w.lower() for w in record.extra["image_words"]}]
        assert marked == expected and marked
        assert not (batch["image_tokens"][row] & (batch["labels"][row] == IGNORE_INDEX)).any()
    choices = RecordDataset(read_records(world / "count_mc_train.jsonl")[:2])
    plain = TrainCollator(processor, mark_image_tokens=True)([choices[i] for i in range(2)])
    assert "image_tokens" not in plain


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_an_image_in_a_later_turn_stays_there(world, architecture):
    """A conversation whose second user turn shows the image (and one showing an image in each turn): the row is the
    processor's own rendering of the whole conversation in one piece — the image's tokens in the turn that placed
    it — every answer learned and nothing else; the model runs on it, and a sub-batch gives the same logits."""
    import torch

    from mmtune.data.collate import conversation, subset_batch
    from mmtune.data.records import Record

    model, processor = build_tiny(architecture, words=vocabulary())
    caption, count = read_records(world / "detailed_caption_train.jsonl")[0], read_records(world / "count_vqa_train.jsonl")[0]
    other = read_records(world / "detailed_caption_train.jsonl")[1]
    later = Record(id="later", task="chat", kind="open", image=caption.image, prompt="<image>" + count.prompt,
                   answers=count.answers, history=[{"prompt": caption.prompt, "answer": caption.target}])
    each = Record(id="each", task="chat", kind="open", image=[caption.image, other.image],
                  prompt="<image>" + count.prompt, answers=count.answers,
                  history=[{"prompt": "<image>" + caption.prompt, "answer": caption.target}])
    records = [later, caption, each]
    samples = [RecordDataset(records)[i] for i in range(3)]
    batch = TrainCollator(processor)(samples)
    tokenizer = processor.tokenizer
    for row, record in ((0, later), (2, each)):
        whole = processor.apply_chat_template(conversation(record, processor=processor), add_generation_prompt=True,
                                              tokenize=False)
        expected = processor(text=[whole], images=[samples[row]["image"]], return_tensors="pt")["input_ids"][0]
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        prompt_part = ids[:len(expected)]
        if architecture in FIXED_TOKENS_PER_IMAGE:  # (tiles and anyres size an image by what is shown with it)
            assert prompt_part.tolist() == expected.tolist()
        first_image = (ids == processor.image_token_id).nonzero()[0].item()
        first_answer_end = (batch["labels"][row][real] != IGNORE_INDEX).nonzero()[0].item()
        assert (first_image > first_answer_end) == (record is later)  # the image comes after the first answer
        learned = tokenizer.decode(ids[batch["labels"][row][real] != IGNORE_INDEX], skip_special_tokens=True)
        assert learned.replace(" ", "") == (caption.target + count.target).lower().replace(" ", "")
    out = model(**model_inputs(batch))
    for rows in ([0], [2], [1, 2]):
        part = subset_batch(batch, torch.tensor(rows))
        logits = model(**model_inputs(part)).logits
        real = part["attention_mask"].bool()
        torch.testing.assert_close(logits[real], out.logits[rows][real], rtol=1e-4, atol=1e-4)
    generation = GenerationCollator(processor)(samples)  # evaluation's prompt: the image in its turn as well
    assert model.generate(**model_inputs(generation), max_new_tokens=2).shape[0] == 3
