"""Conversation data as LLaMA-Factory / ms-swift / TRL users have it, and the dataset registry."""

import json

import pytest
from PIL import Image

from mmtune.config import TaskSpec
from mmtune.data.mixture import build_mixture, read_task
from mmtune.data.records import RecordError, read_records
from mmtune.data.registry import load_registry


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for name, color in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (8, 8), color).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_messages_with_placeholders_and_parts(folder):
    path = write_jsonl(folder / "chart.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."},
                      {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "A square."}],
         "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
         "images": ["img/b.png"], "id": "b", "kind": "open", "task": "colours"},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
    ])
    first, second, text_only = read_records(path)
    assert first.task == "chart" and first.kind == "open" and first.id == "0"
    assert first.prompt == "And the shape?" and first.target == "A square."
    # the image stays where its placeholder stands; the system message goes to the template's system slot
    assert first.history == [{"prompt": "<image>What colour?", "answer": "Red."}] and first.system == "Be brief."
    assert first.image == str(folder / "img" / "a.png")
    assert (second.id, second.task, second.prompt, second.target) == ("b", "colours", "<image> Colour?", "Blue.")
    assert text_only.image is None


@pytest.mark.parametrize("item, message", [
    ({"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}],
      "images": ["img/a.png"]}, "2 image placeholder.*but 1 image"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "must end with an 'assistant' turn"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "role 'assistant' out of place"),
    ({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
      "images": ["img/missing.png"]}, "image not found"),
])
def test_bad_conversations_are_named_by_file_and_line(folder, item, message):
    path = write_jsonl(folder / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "Fine."}, {"role": "assistant", "content": "Yes."}]}, item])
    with pytest.raises(RecordError, match=f"bad.jsonl:2: .*{message}"):
        read_records(path)
    skipped = []
    assert len(read_records(path, skip_bad_records=True, skipped=skipped)) == 1 and len(skipped) == 1


def test_several_images_in_one_conversation(folder):
    path = write_jsonl(folder / "pairs.jsonl", [
        {"messages": [{"role": "user", "content": "<image><image>Same colour?"}, {"role": "assistant", "content": "No."}],
         "images": ["img/a.png", "img/b.png"]}])
    record, = read_records(path)
    assert record.images == [str(folder / "img" / "a.png"), str(folder / "img" / "b.png")]


def test_a_hugging_face_dataset_with_decoded_images(folder, monkeypatch):
    """TRL's llava-instruct-mix-vsft layout: messages with content parts, and an images column of decoded images."""
    import datasets

    monkeypatch.setenv("MMTUNE_CACHE", str(folder / "cache"))
    rows = {"messages": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                        {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": colour}]}]
                         for colour in ("red", "blue")],
            "images": [[Image.open(folder / "img" / "a.png")], [Image.open(folder / "img" / "b.png")]]}
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(folder / "vsft")
    spec = TaskSpec(path=str(folder / "vsft"), defaults={"task": "vsft"})
    records = read_task(spec)
    assert [r.target for r in records] == ["red", "blue"] and records[0].task == "vsft"
    written = [r.image for r in records]
    assert all(str(folder / "cache") in p for p in written)
    assert Image.open(written[1]).getpixel((0, 0)) == (0, 0, 255)
    stamp = [p for p in (folder / "cache").rglob("*.png")][0].stat().st_mtime_ns
    assert [r.image for r in read_task(spec)] == written  # the second read reuses the files
    assert [p for p in (folder / "cache").rglob("*.png")][0].stat().st_mtime_ns == stamp


def test_registry_names_datasets(folder):
    (folder / "mix.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}],
         "images": ["img/a.png"]}]))
    write_jsonl(folder / "turns.jsonl", [
        {"dialog": [{"speaker": "q", "text": "<image>Colour?"}, {"speaker": "a", "text": "Blue."}],
         "pics": ["img/b.png"]}])
    (folder / "registry.json").write_text(json.dumps({
        "llava_mix": {"file_name": "mix.json", "formatting": "sharegpt", "task": "mix", "kind": "open"},
        "custom": {"file_name": "turns.jsonl", "formatting": "messages", "columns": {"messages": "dialog",
                   "images": "pics"}, "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "q",
                                               "assistant_tag": "a"}}}))
    registry = load_registry(folder / "registry.json")
    mixed = build_mixture([TaskSpec(path="dataset:llava_mix"), TaskSpec(path="dataset:custom")], seed=0,
                          registry=registry)
    assert sorted((r.task, r.target) for r in mixed) == [("mix", "Red."), ("turns", "Blue.")]
    with pytest.raises(ValueError, match="no dataset 'nope' in data.registry; it has: custom, llava_mix"):
        read_task(TaskSpec(path="dataset:nope"), registry=registry)
    with pytest.raises(ValueError, match="data.registry is not set"):
        read_task(TaskSpec(path="dataset:custom"))


@pytest.mark.parametrize("entry, message", [
    ({"hf_hub_url": "lmms-lab/x"}, "not downloaded at run time"),
    ({"file_name": "x.json", "formatting": "alpaca"}, "text-only"),
    ({"file_name": "x.json", "ranking": True}, "unknown key"),
    ({"formatting": "messages"}, "'file_name'"),
])
def test_bad_registry_entries_are_named(tmp_path, entry, message):
    (tmp_path / "r.json").write_text(json.dumps({"mine": entry}))
    with pytest.raises(ValueError, match=f"r.json: dataset 'mine': .*{message}"):
        load_registry(tmp_path / "r.json")


def test_conversations_keep_their_shape_as_the_template_renders_them(folder):
    """An image placed after the text stays there; a system message goes to the template's system slot (Qwen2-VL's
    ChatML has one); a template without one (the tiny LLaVA's) gets it before the first user text, with a warning."""
    from mmtune.data.collate import prompt_text
    from mmtune.models.tiny import build_tiny

    path = write_jsonl(folder / "shape.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Look: <image> What colour?"},
                      {"role": "assistant", "content": "Red."}], "images": ["img/a.png"]}])
    record, = read_records(path)
    _, qwen = build_tiny("qwen2_vl")
    rendered = prompt_text(qwen, record)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:<|vision_start|>")
    assert "<|vision_end|>What colour?" in rendered
    _, opened = build_tiny("qwen2_vl")  # a template that opens every rendering with a BOS (Llama 3's, Mistral's)
    opened.chat_template = "<s>" + opened.chat_template
    assert prompt_text(opened, record).startswith("<s><|im_start|>system\nBe brief.<|im_end|>")
    _, llava = build_tiny("llava")
    with pytest.warns(UserWarning, match="has no system slot"):
        rendered = prompt_text(llava, record)
    assert "ASSISTANT: Be brief." not in rendered and "USER: Be brief.\nLook:<image>\nWhat colour?" in rendered


def test_a_later_turns_image_stays_in_its_turn(folder):
    """Its placeholder is kept where it stands (tests/data/test_collate.py renders it there); no double space."""
    import warnings

    path = write_jsonl(folder / "later.jsonl", [
        {"messages": [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."},
                      {"role": "user", "content": "What is <image> this?"},
                      {"role": "assistant", "content": "A square."}], "images": ["img/a.png"]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record, = read_records(path)
    assert record.prompt == "What is <image> this?" and record.history[0]["prompt"] == "Hello there."


@pytest.mark.parametrize("key, value", [("videos", ["v.mp4"]), ("rejected", "No."), ("tools", "[]")])
def test_keys_mmtune_would_not_honour_are_refused(folder, key, value):
    path = write_jsonl(folder / "other.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], key: value}])
    with pytest.raises(RecordError, match=f"other.jsonl:1: '{key}' .*not read by mmtune"):
        read_records(path)


def test_a_system_column_goes_to_the_system_slot(folder):
    path = write_jsonl(folder / "sys.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "system": "Be kind."}])
    record, = read_records(path)
    assert record.system == "Be kind." and record.prompt == "Hi"
