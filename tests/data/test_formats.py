"""Every converter on a fixture folder in the dataset's real layout (a few records, tiny images)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmtune.cli import main
from mmtune.data.formats import prepare
from mmtune.data.formats.llava import export
from mmtune.data.records import RecordError, read_records


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))


def _karpathy(root, name, with_filepath):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        entry = {"filename": f"img{i}.jpg", "split": split, "imgid": i, "cocoid": 100 + i,
                 "sentences": [{"raw": f"A dog number {i} runs. ", "tokens": []},
                               {"raw": "Ein Hund läuft über die Straße", "tokens": []}]}
        if with_filepath:
            entry["filepath"] = "val2014"
            _image(root / "val2014" / entry["filename"])
        else:
            _image(root / "flickr30k-images" / entry["filename"])
        images.append(entry)
    _json(root / name, {"images": images, "dataset": "x"})


def test_coco_karpathy_keeps_all_references_and_restval(tmp_path):
    _karpathy(tmp_path, "dataset_coco.json", with_filepath=True)
    records, _ = prepare("coco", tmp_path, "train")
    assert [r.id for r in records] == ["coco-100", "coco-101"]  # train includes restval by convention
    assert records[0].answers == ["A dog number 0 runs.", "Ein Hund läuft über die Straße"]
    assert records[0].kind == "open" and records[0].metric == "cider"
    assert records[0].prompt == "Provide a one-sentence caption for the provided image."
    assert records[0].image == str(tmp_path / "val2014" / "img0.jpg")
    without, _ = prepare("coco", tmp_path, "train", restval=False)
    assert [r.id for r in without] == ["coco-100"]


def test_flickr30k(tmp_path):
    _karpathy(tmp_path, "dataset_flickr30k.json", with_filepath=False)
    (record,) = prepare("flickr30k", tmp_path, "test")[0]
    assert record.id == "flickr30k-3" and record.image.endswith("flickr30k-images/img3.jpg")


def _scienceqa(root):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["cat", "frog"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train", "subject": "natural science"},
        "2": {"question": "Pick one", "choices": ["a", "b", "c", "d", "e"], "answer": 4, "hint": "Context here.",
              "image": "image.png", "split": "train"},
        "3": {"question": "No image", "choices": ["x", "y"], "answer": 1, "hint": "", "image": None, "split": "train"},
    }
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"train": ["1", "2", "3"], "test": []})
    for pid in ("1", "2"):
        _image(root / "images" / "train" / pid / "image.png")


def test_scienceqa_only_image_problems_with_hint_and_letters(tmp_path):
    _scienceqa(tmp_path)
    records, _ = prepare("scienceqa", tmp_path, "train")
    assert [r.id for r in records] == ["scienceqa-1", "scienceqa-2"]
    first, second = records
    assert first.prompt.splitlines() == ["Which is a mammal?", "A. cat", "B. frog",
                                         "Answer with the option's letter from the given choices directly."]
    assert first.answers == ["A"] and first.answer_index == 0 and first.kind == "choice"
    assert second.prompt.startswith("Context: Context here.\nPick one\nA. a")
    assert "E. e" in second.prompt and second.answers == ["E"]


def test_iconqa_choose_txt(tmp_path):
    for qid, answer in (("10", 1), ("11", 0)):
        _json(tmp_path / "test" / "choose_txt" / qid / "data.json",
              {"question": "How many?", "choices": ["1", "2", "3"], "answer": answer, "ques_type": "choose_txt"})
        _image(tmp_path / "test" / "choose_txt" / qid / "image.png")
    records, _ = prepare("iconqa", tmp_path, "test")
    assert [(r.id, r.answers[0]) for r in records] == [("iconqa-10", "B"), ("iconqa-11", "A")]


def test_okvqa_keeps_ten_answers(tmp_path):
    _json(tmp_path / "OpenEnded_mscoco_val2014_questions.json",
          {"questions": [{"question_id": 5, "image_id": 42, "question": "What sport?"}]})
    _json(tmp_path / "mscoco_val2014_annotations.json",
          {"annotations": [{"question_id": 5, "answers": [{"answer": "tennis", "answer_id": i} for i in range(10)]}]})
    _image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    (record,) = prepare("okvqa", tmp_path, "val")[0]
    assert len(record.answers) == 10 and record.metric == "vqa"
    assert record.prompt == "What sport?\nAnswer the question using a single word or phrase."


def test_textvqa(tmp_path):
    _json(tmp_path / "TextVQA_0.5.1_val.json",
          {"data": [{"question_id": 1, "question": "What brand?", "image_id": "abc", "answers": ["nokia"] * 10}]})
    _image(tmp_path / "train_images" / "abc.jpg")
    (record,) = prepare("textvqa", tmp_path, "val")[0]
    assert record.id == "textvqa-1" and record.answers == ["nokia"] * 10


def test_gqa(tmp_path):
    _json(tmp_path / "questions" / "testdev_balanced_questions.json",
          {"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "fullAnswer": "Yes, it is red."}})
    _image(tmp_path / "images" / "n1.jpg")
    (record,) = prepare("gqa", tmp_path, "testdev_balanced")[0]
    assert record.answers == ["yes"] and record.metric == "exact"


def test_ocrvqa_splits(tmp_path):
    _json(tmp_path / "dataset.json", {
        "b1": {"questions": ["Who wrote this book?", "Is this a comic?"], "answers": ["Jane Doe", "No"], "split": 1},
        "b2": {"questions": ["Title?"], "answers": ["X"], "split": 3}})
    _image(tmp_path / "images" / "b1.jpg")
    _image(tmp_path / "images" / "b2.jpg")
    records, _ = prepare("ocrvqa", tmp_path, "train")
    assert [r.id for r in records] == ["ocrvqa-b1-0", "ocrvqa-b1-1"]
    assert prepare("ocrvqa", tmp_path, "test")[0][0].answers == ["X"]


def test_llava_read_and_export_round_trip(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _json(tmp_path / "llava.json", [
        {"id": "x1", "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "And its color?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]}])
    records, _ = prepare("llava", tmp_path, "")
    # One record per conversation: earlier pairs are its history (all trained on); text-only items are kept.
    assert [(r.id, r.prompt, r.target, r.history) for r in records] == [
        ("x1", "And its color?", "Red.", [{"prompt": "What is this?", "answer": "A red square."}]),
        ("t", "text only", "ok", [])]
    assert records[0].image.endswith("a.png") and records[1].image is None
    out = tmp_path / "export" / "mix.json"
    assert export(records, out, image_root=tmp_path) == 2
    exported = json.loads(out.read_text())
    assert exported[0]["conversations"][0]["value"].startswith("<image>\n") and "image" not in exported[1]
    assert "<image>" not in exported[0]["conversations"][2]["value"]
    again, _ = prepare("llava", tmp_path, "", file="export/mix.json")
    assert [(r.prompt, r.target, r.image, r.history) for r in again] == \
        [(r.prompt, r.target, r.image, r.history) for r in records]


def test_llava_conversation_that_is_not_human_gpt_pairs_is_named(tmp_path):
    _json(tmp_path / "llava.json", [{"id": "odd", "conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(RecordError, match=r"llava.json: item 0 \(id 'odd'\): 1 turns"):
        prepare("llava", tmp_path, "")


def test_missing_image_names_the_record_or_is_counted(tmp_path):
    _scienceqa(tmp_path)
    (tmp_path / "images" / "train" / "2" / "image.png").unlink()
    with pytest.raises(RecordError, match="record 'scienceqa-2': image not found"):
        prepare("scienceqa", tmp_path, "train")
    records, skipped = prepare("scienceqa", tmp_path, "train", skip_bad_records=True)
    assert len(records) == 1 and len(skipped) == 1


def test_limit_draws_reproducibly(tmp_path):
    _json(tmp_path / "dataset.json", {f"b{i}": {"questions": ["q"], "answers": ["a"], "split": 1} for i in range(30)})
    for i in range(30):
        _image(tmp_path / "images" / f"b{i}.jpg")
    first = [r.id for r in prepare("ocrvqa", tmp_path, "train", limit=10, seed=0)[0]]
    assert first == [r.id for r in prepare("ocrvqa", tmp_path, "train", limit=10, seed=0)[0]]
    assert first != [r.id for r in prepare("ocrvqa", tmp_path, "train", limit=10, seed=1)[0]]
    assert len(first) == 10


def test_cli_prepare_stats_export(tmp_path, capsys):
    _scienceqa(tmp_path / "sqa")
    out = tmp_path / "sqa.jsonl"
    assert main(["data", "prepare", "scienceqa", "--root", str(tmp_path / "sqa"), "--split", "train",
                 "--out", str(out)]) == 0
    assert len(read_records(out)) == 2
    assert main(["data", "prepare", "scienceqa", "--root", str(tmp_path / "sqa"), "--out", str(out)]) == 2  # exists
    assert main(["data", "stats", str(out)]) == 0
    assert "scienceqa" in capsys.readouterr().out
    assert main(["data", "export-llava", str(out), "--out", str(tmp_path / "mix.json")]) == 0
    assert len(json.loads((tmp_path / "mix.json").read_text())) == 2


def test_scienceqa_mini_splits_find_images_under_each_problems_own_split(tmp_path):
    # The release: pid_splits.json has minival / minitest lists of val / test problems, and every image sits
    # under images/<the problem's split>/<pid>/ (ScienceQA's own loader builds that path from problem["split"]).
    problems = {"7": {"question": "Q?", "choices": ["x", "y"], "answer": 1, "hint": "", "image": "image.png",
                      "split": "val"},
                "8": {"question": "Q?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": "image.png",
                      "split": "test"}}
    _json(tmp_path / "problems.json", problems)
    _json(tmp_path / "pid_splits.json", {"val": ["7"], "test": ["8"], "minival": ["7"], "minitest": ["8"]})
    _image(tmp_path / "images" / "val" / "7" / "image.png")
    _image(tmp_path / "images" / "test" / "8" / "image.png")
    (record,) = prepare("scienceqa", tmp_path, "minival")[0]
    assert record.image == str(tmp_path / "images" / "val" / "7" / "image.png")
    assert prepare("scienceqa", tmp_path, "minitest")[0][0].id == "scienceqa-8"
    with pytest.raises(ValueError, match="no split 'minidev'; it has minitest, minival, test, val"):
        prepare("scienceqa", tmp_path, "minidev")


def test_iconqa_accepts_the_folder_as_downloaded(tmp_path):
    root = tmp_path / "iconqa_data"
    _json(root / "problems.json", {"5": {"question": "Q?", "choices": ["a", "b"], "answer": 1, "split": "val",
                                         "ques_type": "choose_txt"}})
    _json(root / "pid_splits.json", {"choose_txt_val": ["5"]})
    _json(root / "iconqa" / "val" / "choose_txt" / "5" / "data.json",
          {"question": "Q?", "choices": ["a", "b"], "answer": 1, "ques_type": "choose_txt"})
    _image(root / "iconqa" / "val" / "choose_txt" / "5" / "image.png")
    (record,) = prepare("iconqa", root, "val")[0]
    assert record.answers == ["B"] and record.image == str(root / "iconqa" / "val" / "choose_txt" / "5" / "image.png")
    with pytest.raises(FileNotFoundError, match="splits found: val"):
        prepare("iconqa", root, "test")


def test_ocrvqa_image_extension_comes_from_the_image_url(tmp_path):
    _json(tmp_path / "dataset.json", {
        "p1": {"imageURL": "http://ecx.images-amazon.com/images/I/51abc.png", "questions": ["Title?"],
               "answers": ["A"], "split": 1},
        "g1": {"imageURL": "http://ecx.images-amazon.com/images/I/61xyz.gif", "questions": ["Genre?"],
               "answers": ["B"], "split": 1}})
    _image(tmp_path / "images" / "p1.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "g1.gif")
    records, _ = prepare("ocrvqa", tmp_path, "train")
    assert [Path(r.image).name for r in records] == ["p1.png", "g1.gif"]


def test_llava_mixes_that_reuse_ids_keep_every_conversation(tmp_path):
    # llava_instruct_150k concatenates three subsets keyed by the COCO image id: one id, several conversations.
    _image(tmp_path / "coco" / "000000033471.jpg")
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A bus."}]
    _json(tmp_path / "llava_instruct_150k.json",
          [{"id": "000000033471", "image": "coco/000000033471.jpg", "conversations": conversation},
           {"id": "000000033471", "image": "coco/000000033471.jpg", "conversations": conversation},
           {"id": "000000052846", "image": "coco/000000033471.jpg", "conversations": conversation}])
    records, skipped = prepare("llava", tmp_path, "", file="llava_instruct_150k.json")
    assert [r.id for r in records] == ["000000033471@0", "000000033471@1", "000000052846"] and not skipped


def test_export_llava_replaces_a_planted_link(tmp_path, world):
    from mmtune.data.formats.llava import export
    from mmtune.data.records import read_records

    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "mix.json"
    out.symlink_to(victim)
    export(read_records(world / "count_mc_test.jsonl")[:2], out, overwrite=True)
    assert victim.read_text() == "precious" and not out.is_symlink() and json.loads(out.read_text())
