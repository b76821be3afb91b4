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
    (_line(answers="yes"), "'answers' must be a non-empty list of strings"),  # not trained on "y"
    (_line(kind="choice", choices="xy", answer_index=0, answers=["A"]), "'choices' must be a list of strings"),
    (_line(kind="choice", choices=["x", "y"], answer_index=1, answers=["A"]), "disagrees with 'answer_index' 1"),
    (_line(kind="choice", choices=["x", "y"], answer_index=True, answers=["B"]), "must be an integer, got True"),
    (_line(prompt=["p"]), "'prompt' must be a non-empty string"),
    (_line(task=7), "'task' must be a non-empty string"),
    (_line(image=3), "'image' must be a path string"),
    (_line(extra=[1]), "'extra' must be a mapping"),
])
def test_bad_record_errors_name_file_line_and_problem(tmp_path, line, message):
    path = _write(tmp_path, [_line(id="good"), line])
    with pytest.raises(RecordError, match=message) as error:
        read_records(path)
    assert f"{path}:2:" in str(error.value)


def test_choice_answers_may_be_the_letter_or_the_option_text(tmp_path):
    path = _write(tmp_path, [_line(id="a", kind="choice", choices=["x", "y"], answer_index=1, answers=["B"]),
                             _line(id="b", kind="choice", choices=["x", "y"], answer_index=1, answers=["y"])])
    assert len(read_records(path)) == 2


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = _write(tmp_path, [_line(id="a")])
    path.write_bytes(path.read_bytes() + b'{"id": "\xff"}\n')
    with pytest.raises(RecordError, match=f"{path}:2: not UTF-8"):
        read_records(path)


def test_truncated_image_fails_at_validation_even_when_skipping(tmp_path):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    path = _write(tmp_path, [_line(id="a"), _line(id="b", image="cut.jpg")])
    with pytest.raises(RecordError, match="task.jsonl:2: unreadable image .*cut.jpg"):
        read_records(path)
    skipped = []
    assert [r.id for r in read_records(path, skip_bad_records=True, skipped=skipped)] == ["a"] and len(skipped) == 1


def test_writing_replaces_a_planted_link_instead_of_following_it(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.tmp").symlink_to(target)  # what an old writer followed
    out.symlink_to(target)
    (record,) = read_records(_write(tmp_path, [_line()]))
    write_records([record], out, overwrite=True)
    assert target.read_text() == "precious" and not out.is_symlink() and "a cat" in out.read_text()


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
