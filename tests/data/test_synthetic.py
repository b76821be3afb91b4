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
