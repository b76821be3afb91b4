import hashlib

from mmtune.data.records import read_records
from mmtune.data.synthetic import FAMILIES, generate_world


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_world_is_determined_by_its_seed(tmp_path):
    generate_world(tmp_path / "a", seed=3, n_train=12, n_test=4, progress=False)
    generate_world(tmp_path / "b", seed=3, n_train=12, n_test=4, progress=False)
    generate_world(tmp_path / "c", seed=4, n_train=12, n_test=4, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_every_family_has_valid_records(world):
    for family in FAMILIES:
        records = read_records(world / f"{family}_test.jsonl")
        assert records, family
        for record in records:
            record.validate()
    captions = read_records(world / "detailed_caption_test.jsonl")
    assert all(len(r.answers) == 5 for r in captions)
    choices = read_records(world / "count_mc_test.jsonl")
    assert all(r.answers[0] == "ABCD"[r.answer_index] for r in choices)


def test_world_v2_families(world):
    """v2: varied caption references, lettered questions the base learns, counting, and a version marker."""
    import json

    captions = read_records(world / "brief_caption_test.jsonl")
    assert all(len(r.answers) == 5 for r in captions)
    assert len({r.answers[0].split(" ")[0] for r in captions}) > 1  # the training target varies in form
    for family in ("background_mc", "shape_mc", "count_mc", "attribute_mc"):
        for record in read_records(world / f"{family}_test.jsonl"):
            assert record.kind == "choice" and record.metric == "mc"
            assert record.answers == ["ABCD"[record.answer_index]] and len(record.choices) == 4
    counts = read_records(world / "count_vqa_test.jsonl")
    assert {r.answers[0] for r in counts} <= {"one", "two", "three"}
    assert json.loads((world / "world.json").read_text())["version"] == 2


def test_a_world_of_another_version_is_not_reused(tmp_path):
    import json

    import pytest

    from mmtune.data.synthetic import ensure_world

    ensure_world(tmp_path / "w", seed=0, n_train=4, n_test=2, image_size=32, progress=False)
    marker = tmp_path / "w" / "world.json"
    old = json.loads(marker.read_text())
    old.pop("version")  # what a version-1 world wrote
    marker.write_text(json.dumps(old))
    with pytest.raises(FileExistsError, match="different synthetic world"):
        ensure_world(tmp_path / "w", seed=0, n_train=4, n_test=2, image_size=32, progress=False)
