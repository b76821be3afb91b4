import json

import pytest
from PIL import Image

from mmtune.config import TaskSpec
from mmtune.data.mixture import build_mixture, draw
from mmtune.data.records import Record, RecordError, multiple_choice_prompt, read_records, write_records


def _write(tmp_path, lines):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _line(**changes):
    record = {"id": "r1", "task": "t", "kind": "open", "image": "ok.png", "prompt": "p", "answers": ["a cat"]}
    record.update(changes)
    return json.dumps(record)


def test_reads_and_resolves_image_relative_to_file(tmp_path):
    path = _write(tmp_path, [_line()])
    (record,) = read_records(path)
    assert record.image == str(tmp_path / "ok.png")
    assert record.target == "a cat"


@pytest.mark.parametrize("line,message", [
    ("{not json", "Expecting property name"),
    (_line(image="missing.png"), "image not found"),
    (_line(answers=[]), "no answer"),
    (_line(kind="essay"), "'kind' is 'essay'"),
    (_line(kind="choice", choices=["x", "y"], answer_index=5), "not an index"),
    (_line(colour="red"), "unknown field"),
])
def test_bad_record_errors_name_file_line_and_problem(tmp_path, line, message):
    path = _write(tmp_path, [_line(id="good"), line])
    with pytest.raises(RecordError, match=message) as error:
        read_records(path)
    assert f"{path}:2:" in str(error.value)


def test_corrupt_image_is_reported(tmp_path):
    path = _write(tmp_path, [_line(image="bad.png")])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RecordError, match="unreadable image"):
        read_records(path)


def test_duplicate_ids_are_errors(tmp_path):
    path = _write(tmp_path, [_line(), _line()])
    with pytest.raises(RecordError, match="duplicate id 'r1'"):
        read_records(path)


def test_skip_bad_records_counts_them(tmp_path):
    path = _write(tmp_path, [_line(id="a"), "{bad", _line(id="b", image="nope.png"), _line(id="c")])
    skipped = []
    records = read_records(path, skip_bad_records=True, skipped=skipped)
    assert [r.id for r in records] == ["a", "c"]
    assert len(skipped) == 2 and ":2:" in skipped[0] and ":3:" in skipped[1]


def test_write_refuses_to_overwrite_and_round_trips(tmp_path):
    path = _write(tmp_path, [_line(id="x", kind="choice", choices=["a", "b"], answer_index=1, answers=["B"])])
    records = read_records(path)
    out = tmp_path / "sub" / "copy.jsonl"
    write_records(records, out)
    with pytest.raises(FileExistsError):
        write_records(records, out)
    again = read_records(out)
    assert again == records


def test_multiple_choice_prompt_convention():
    prompt = multiple_choice_prompt("What?", ["x", "y", "z"], context="ctx")
    assert prompt.splitlines() == ["Context: ctx", "What?", "A. x", "B. y", "C. z",
                                   "Answer with the option's letter from the given choices directly."]


def test_draw_is_seeded_and_weighted():
    records = [Record(str(i), "t", "open", "i.png", "p", ["a"]) for i in range(100)]
    assert draw(records, 10, seed=1) == draw(records, 10, seed=1)
    assert draw(records, 10, seed=1) != draw(records, 10, seed=2)
    assert len(draw(records, 10, seed=1, weight=2.5)) == 25
    assert len(draw(records, None, seed=1)) == 100


def test_mixture_mixes_tasks(world):
    specs = [TaskSpec("synthetic:detailed_caption", n=10), TaskSpec("synthetic:count_mc", n=5)]
    from mmtune.data.synthetic import resolve_task_path

    mixed = build_mixture(specs, seed=0, resolve=lambda p: resolve_task_path(p, world, "train"))
    assert sorted({r.task for r in mixed}) == ["count_mc", "detailed_caption"]
    assert len(mixed) == 15
