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


def test_world_v3_changes_only_the_training_captions_towards_real_caption_data(tmp_path):
    """v3: one partly wrong caption per training image, five correct references per test image, no blind-spot words
    (shapes, sizes); every other family and every image as in v2."""
    import json
    import random

    import pytest

    from mmtune.data.synthetic import (
        COLORS,
        SHAPES,
        SIZES,
        V3_CAPTION_NOISE,
        ensure_world,
        misdescribed,
        sample_scene,
    )

    generate_world(tmp_path / "v2", seed=1, n_train=60, n_test=6, image_size=32, progress=False)
    generate_world(tmp_path / "v3", seed=1, n_train=60, n_test=6, image_size=32, progress=False, version=3)
    v2, v3 = tmp_path / "v2", tmp_path / "v3"
    assert json.loads((v3 / "world.json").read_text())["version"] == 3
    for path in v2.rglob("*"):
        if path.is_file() and "detailed_caption" not in path.name and path.name != "world.json":
            assert path.read_bytes() == (v3 / path.relative_to(v2)).read_bytes(), path.name
    train, test = read_records(v3 / "detailed_caption_train.jsonl"), read_records(v3 / "detailed_caption_test.jsonl")
    assert all(len(r.answers) == 1 for r in train) and all(len(r.answers) == 5 for r in test)
    blind = set(SHAPES) | set(SIZES)
    for record in train + test:
        words = set(" ".join(record.answers).replace(",", " ").split())
        assert not words & blind, record.id
        assert set(record.extra["image_words"]) & words  # the diagnostic's split names words the caption has
    # a training caption describes what an annotator saw: the same scene's test references would differ in places
    v2_train = {r.id: r for r in read_records(v2 / "detailed_caption_train.jsonl")}
    assert all(r.id in v2_train for r in train)
    # the noise rate: each described value is wrong with probability V3_CAPTION_NOISE
    # (amendment 1: towards the language prior — a wrong colour is "red" unless the object is red)
    rng, wrong, total, prior = random.Random(0), 0, 0, 0
    for _ in range(2000):
        scene = sample_scene(rng)
        seen, _ = misdescribed(scene, rng, V3_CAPTION_NOISE)
        pairs = [(a.color, b.color) for a, b in zip(scene.things, seen.things, strict=True) if a.color != b.color]
        wrong += len(pairs)
        prior += sum(said == "red" for true, said in pairs)
        total += len(scene.things)
        assert all(t.color in COLORS for t in seen.things)
    assert abs(wrong / total - V3_CAPTION_NOISE) < 0.03
    assert prior / wrong == pytest.approx(5 / 6, abs=0.03)  # all but where the truth was red
    with pytest.raises(FileExistsError, match="different synthetic world"):
        ensure_world(v3, seed=1, n_train=60, n_test=6, image_size=32, progress=False)  # a v2 is wanted
    with pytest.raises(ValueError, match="version 4 is unknown"):
        generate_world(tmp_path / "v4", seed=1, n_train=2, n_test=2, progress=False, version=4)


def test_world_v3_word_noise_is_plain_label_noise_on_every_caption_word(tmp_path):
    """Amendment 3 (``caption_errors: words``): each word of a training caption — template words too — is replaced with
    probability V3_CAPTION_NOISE by another caption word at random; test references stay correct; the rule is in
    world.json, so a world made under the other rule is not reused."""
    import json
    import random
    import re
    from collections import Counter

    import pytest

    from mmtune.data.synthetic import (
        V3_CAPTION_NOISE,
        V3_VOCABULARY,
        _v3_references,
        ensure_world,
        noisy_words,
        sample_scene,
    )

    rng, changed, total, template_changed, replacements = random.Random(0), 0, 0, 0, Counter()
    for _ in range(2000):
        caption = rng.choice(_v3_references(sample_scene(rng)))
        noisy = noisy_words(caption, rng)
        pairs = list(zip(re.findall(r"\w+|[^\w\s]", caption), noisy.split(), strict=True))  # word for word
        for true, said in pairs:
            assert true in V3_VOCABULARY and said in V3_VOCABULARY
            if true != said:
                changed += 1
                replacements[said] += 1
                template_changed += true in ("there", "is", "the", "background", ".")
        total += len(pairs)
    assert abs(changed / total - V3_CAPTION_NOISE) < 0.02
    assert template_changed > 0.2 * changed  # not only image words
    top = replacements.most_common(1)[0][1] / changed
    assert top < 2.5 / len(V3_VOCABULARY)  # no word is preferred (uniform: 1/(|V| − 1) each)

    generate_world(tmp_path / "w", seed=1, n_train=60, n_test=6, image_size=32, progress=False, version=3,
                   caption_errors="words")
    prior = tmp_path / "p"
    generate_world(prior, seed=1, n_train=60, n_test=6, image_size=32, progress=False, version=3)
    words = tmp_path / "w"
    assert "amendment 3" in json.loads((words / "world.json").read_text())["captions"]
    assert (words / "detailed_caption_test.jsonl").read_bytes() == (prior / "detailed_caption_test.jsonl").read_bytes()
    train = read_records(words / "detailed_caption_train.jsonl")
    assert train and all(len(r.answers) == 1 for r in train)
    assert [r.answers for r in train] != [r.answers for r in read_records(prior / "detailed_caption_train.jsonl")]
    with pytest.raises(FileExistsError, match="different synthetic world"):
        ensure_world(prior, seed=1, n_train=60, n_test=6, image_size=32, progress=False, version=3,
                     caption_errors="words")
    with pytest.raises(ValueError, match="caption_errors='labels' is unknown"):
        generate_world(tmp_path / "x", seed=1, n_train=2, n_test=2, progress=False, version=3, caption_errors="labels")


def test_the_world_version_is_a_config_key(tmp_path):
    import pytest

    from mmtune.cli import CONFIGS, WORLD_RECIPES
    from mmtune.config import load_config

    v3 = load_config(CONFIGS / WORLD_RECIPES[3], [])
    assert v3.data.synthetic.version == 3 and v3.eval.every_steps
    assert load_config(CONFIGS / WORLD_RECIPES[2], []).data.synthetic.version == 2
    with pytest.raises(ValueError, match="data.synthetic.version=5"):
        load_config(CONFIGS / WORLD_RECIPES[2], ["data.synthetic.version=5"])


def test_world_v3_varied_captions_are_true_partial_and_one_per_image(tmp_path):
    """The re-plan's first candidate (``caption_errors: varied``): each training image has one caption, every word of it
    true of the scene (no hallucination against its truth), naming a random part of the scene — some captions leave
    objects or places out — in one of the five templates; test references are the full, correct five."""
    import json

    from mmtune.data.synthetic import generate_world
    from mmtune.metrics import hallucinations

    varied, prior = tmp_path / "v", tmp_path / "p"
    generate_world(varied, seed=1, n_train=200, n_test=6, image_size=32, progress=False, version=3,
                   caption_errors="varied")
    generate_world(prior, seed=1, n_train=20, n_test=6, image_size=32, progress=False, version=3)
    assert "every word true" in json.loads((varied / "world.json").read_text())["captions"]
    assert (varied / "detailed_caption_test.jsonl").read_bytes() == (prior / "detailed_caption_test.jsonl").read_bytes()
    train = read_records(varied / "detailed_caption_train.jsonl")
    assert len(train) == 200 and all(len(r.answers) == 1 for r in train)
    assert hallucinations([r.answers[0] for r in train], [r.extra["present"] for r in train])["rate"] == 0.0
    named = [sum(c in r.answers[0] for c in r.extra["present"] if c in ("red", "green", "blue", "yellow", "purple",
                                                                         "white")) for r in train]
    colours = [sum(c in ("red", "green", "blue", "yellow", "purple", "white") for c in r.extra["present"])
               for r in train]
    assert any(n < c for n, c in zip(named, colours, strict=True))  # some objects left out
    assert any("object ," in r.answers[0] or "object and" in r.answers[0] or r.answers[0].endswith("object .")
               for r in train)  # some places left out
    assert len({r.answers[0].split()[0] for r in train}) >= 4  # the templates vary
