import pytest
from pycocoevalcap.cider.cider import Cider

from mmtune.metrics import (
    exact_match,
    normalize_answer,
    parse_choice,
    python_ptb_tokenize,
    score,
    tokenize_captions,
    vqa_accuracy,
)


def test_vqa_accuracy_leave_one_out_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2": 2 matches → 2/3; leaving out a "3": 3 matches → 1
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("cat", answers) == 0.0
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx((9 * 1 / 3 + 0) / 10)


@pytest.mark.parametrize("raw,normal", [
    ("The Dog.", "dog"), ("two", "2"), ("dont", "don't"), ("an apple!", "apple"), ("1,000", "1000"),
    ("yes ", "yes"), ("fire-truck", "fire truck"),
])
def test_official_normalization(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("prediction,expected", [
    ("B", 1), ("b", 1), ("b .", 1), ("B.", 1), ("(B)", 1), ("The answer is B", 1), ("Answer: B", 1), ("B. blue", 1),
    ("blue", 1), ("The answer is blue.", 1), ("E", None), ("", None), ("red or blue", None),
])
def test_parse_choice(prediction, expected):
    assert parse_choice(prediction, ["red", "blue", "green", "white"]) == expected


def test_mc_counts_unparseable():
    items = [{"id": "1", "prediction": "A", "choices": ["x", "y"], "answer_index": 0},
             {"id": "2", "prediction": "Z", "choices": ["x", "y"], "answer_index": 1},
             {"id": "3", "prediction": "y", "choices": ["x", "y"], "answer_index": 1}]
    result = score("mc", items)
    assert result.score == pytest.approx(200 / 3) and result.extra["unparseable"] == 1


def test_exact_match():
    assert exact_match("The Cat", ["cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0


def test_python_ptb_matches_java_on_ordinary_captions():
    captions = {"1": ["A man's dog, running in the park.", "Two kids don't play; they sit."],
                "2": ["A red double-decker bus on a street!"]}
    java, _ = tokenize_captions(captions, use_java=True)
    python, name = tokenize_captions(captions, use_java=False)
    assert name == "ptb-python"
    assert python == java
    assert python_ptb_tokenize("A dog.") == "a dog"


def test_cider_equals_pycocoevalcap_directly():
    refs = {"a": ["a red circle on black", "a red round circle"], "b": ["a blue square", "blue square on gray"],
            "c": ["two green crosses", "a pair of green crosses"]}
    preds = {"a": "a red circle", "b": "a blue circle", "c": "green crosses"}
    items = [{"id": k, "prediction": preds[k], "answers": refs[k]} for k in refs]
    ours = score("cider", items, use_java=False)
    gts = {k: [python_ptb_tokenize(r) for r in v] for k, v in refs.items()}
    res = {k: [python_ptb_tokenize(v)] for k, v in preds.items()}
    direct, _ = Cider().compute_score(gts, res)
    assert ours.score == pytest.approx(100 * direct)
    assert {"bleu4", "rougeL", "tokenizer"} <= ours.extra.keys()


def test_empty_caption_scores_zero_and_is_counted():
    items = [{"id": "a", "prediction": "", "answers": ["a red circle"]},
             {"id": "b", "prediction": "a blue square", "answers": ["a blue square"]}]
    result = score("cider", items, use_java=False)
    assert result.per_sample[0] == 0.0 and result.extra["empty_predictions"] == 1


def test_a_captions_ceiling_is_the_best_of_its_own_references():
    """Answering each image with its best reference scores exactly the ceiling; any one fixed reference scores at
    most that; a record whose references all agree has the most headroom to fill."""
    from mmtune.metrics import caption_ceiling, score_captions

    references = {"a": ["a red circle on black", "a red circle", "red circle on a black background"],
                  "b": ["two blue squares", "two squares that are blue", "a pair of blue squares"],
                  "c": ["a green cross", "a green cross", "a green cross"]}
    ceiling = caption_ceiling(references, use_java=False)
    for j in range(3):
        fixed = score_captions({k: v[j] for k, v in references.items()}, references, use_java=False).score
        assert fixed <= ceiling + 1e-9
    per_reference = [score_captions({k: v[j] for k, v in references.items()}, references, use_java=False).per_sample
                     for j in range(3)]
    best = [max(scores[i] for scores in per_reference) for i in range(3)]
    assert ceiling == pytest.approx(sum(best) / 3)


def test_hallucinations_count_what_the_image_lacks():
    """A CHAIR-style count on a scene whose truth the test writes: a colour, a count and a place the image does not
    hold are each a hallucination; "top left" is one place (not "top" and "left"); plurals match; words outside
    every record's truth (template words) are not mentions."""
    from mmtune.metrics import hallucinations

    # the vocabulary is what any record lists: "top" is a place because the third image has something there
    truth = [["red", "circle", "top left", "one", "black"], ["blue", "square", "green", "cross", "two", "center", "gray"],
             ["top", "white", "triangle", "one", "navy"]]
    found = hallucinations(["there is a red circle at the top left on a black background .",
                            "two blue squares at the top and a green cross in the center",
                            "one white triangle at the top"], truth)
    assert found["per_answer"] == [[], ["top"], []]
    assert found["rate"] == pytest.approx(100 / 3) and found["mention_rate"] == pytest.approx(100 / 15)  # 5+6+4, 1
    found = hallucinations(["a blue circle , one object", "three red squares", "a triangle"], truth)
    assert found["per_answer"] == [["blue"], ["red"], []] and found["rate"] == pytest.approx(200 / 3)


def test_the_synthetic_captions_carry_their_scenes_truth(world):
    """Every caption record lists what its image holds; its own references name nothing else (a hallucination rate of
    0 for the truth), and another image's caption is caught."""
    from mmtune.data.records import read_records
    from mmtune.metrics import hallucinations

    for family in ("detailed_caption", "brief_caption"):
        records = read_records(world / f"{family}_test.jsonl")
        present = [r.extra["present"] for r in records]
        assert all(present)
        for j in range(5):
            assert hallucinations([r.answers[j] for r in records], present)["rate"] == 0.0
        shifted = [records[(i + 1) % len(records)].answers[0] for i in range(len(records))]
        assert hallucinations(shifted, present)["rate"] > 50.0
