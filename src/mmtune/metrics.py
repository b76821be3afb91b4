"""The metrics the papers report, defined exactly, each returning a percentage (0–100).

* ``cider``  — CIDEr-D of the COCO caption evaluation (``pycocoevalcap``) on PTB-tokenized text, with
  BLEU-4, ROUGE-L and (opt-in, when Java is present) METEOR beside it;
* ``vqa``    — the official VQA accuracy: answer normalisation, then ``min(1, matches/3)`` averaged over
  the 10 leave-one-out subsets of the annotators' answers;
* ``mc``     — multiple-choice accuracy with a robust parse of the predicted option;
* ``exact``  — exact match after the VQA normalisation (GQA, OCR-VQA).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

# ---------------------------------------------------------------- caption tokenization
PTB_PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_PTB_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|[a-z0-9]+(?:[.\-/][a-z0-9]+)*|[^\sa-z0-9]",
                        re.IGNORECASE)


def java_available() -> bool:
    return shutil.which("java") is not None


def python_ptb_tokenize(text: str) -> str:
    """The COCO evaluation's tokenization without Java: lower-case, PTB splits of clitics and punctuation,
    punctuation removed. It matches Stanford's PTBTokenizer on ordinary captions (words, commas, periods,
    possessives, contractions); exotic input (URLs, emoticons) may split differently."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    tokens = _PTB_TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def tokenize_captions(captions: dict[str, list[str]], use_java: bool | None = None) -> tuple[dict, str]:
    """PTB-tokenize ``{id: [caption, ...]}``; returns the tokenized dict and which tokenizer ran."""
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb-java"
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}, "ptb-python"


# ---------------------------------------------------------------- VQA normalization (official evaluation rules)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "thats": "that's", "thered": "there'd", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation: punctuation, periods, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(1, matches/3)`` averaged over the leave-one-out subsets of the annotators' answers (0–1)."""
    prediction = normalize_answer(prediction)
    normalized = [normalize_answer(a) for a in answers]
    if len(normalized) == 1:
        return float(prediction == normalized[0])
    scores = []
    for left_out in range(len(normalized)):
        others = normalized[:left_out] + normalized[left_out + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    prediction = normalize_answer(prediction)
    return float(any(prediction == normalize_answer(a) for a in answers))


# ---------------------------------------------------------------- multiple choice
_BARE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*[.):]?\s*$")  # "B", "(B)", "B.", "b ." (word-level decoders)
_LETTER_THEN_TEXT = re.compile(r"^\s*\(?([A-Z])[.):]\s")  # "B. text", "B) text"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\(?([A-Z])\)?(?:[.):\s]|$)", re.IGNORECASE)  # "The answer is B"
_OPTION = re.compile(r"^\s*option\s+\(?([A-Z])\)?", re.IGNORECASE)


def _index(letter_text: str, choices: Sequence[str]) -> int | None:
    index = ord(letter_text.upper()) - ord("A")
    return index if 0 <= index < len(choices) else None


def parse_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """The option a prediction picks (index), or None when it cannot be parsed or is out of range.

    Order: an upper-case letter ("B", "(B)", "B.", "B. text"); the option's own text ("blue"); a lower-case
    letter ("b", from lower-casing tokenizers); "The answer is B" / "Answer: B" / "Option B"; finally a
    prediction that mentions exactly one option's text.
    """
    text = prediction.strip()
    match = _BARE_LETTER.match(text) or _LETTER_THEN_TEXT.match(text)
    if match:
        return _index(match.group(1), choices)
    norm = normalize_answer(text)
    exact = [i for i, c in enumerate(choices) if normalize_answer(c) == norm]
    if len(exact) == 1:
        return exact[0]
    match = (_BARE_LETTER.match(text.upper()) if len(text) <= 4 else None) or _ANSWER_IS.search(text) \
        or _OPTION.match(text)
    if match:
        return _index(match.group(1), choices)
    contained = [i for i, c in enumerate(choices) if normalize_answer(c) and
                 re.search(rf"\b{re.escape(normalize_answer(c))}\b", norm)]
    return contained[0] if len(contained) == 1 else None


# ---------------------------------------------------------------- scoring whole prediction sets
@dataclass
class Score:
    metric: str
    score: float  # percentage
    n: int
    extra: dict = field(default_factory=dict)  # e.g. BLEU-4 / ROUGE-L beside CIDEr, unparseable counts
    per_sample: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "score": self.score, "n": self.n, **self.extra}


def score_captions(predictions: dict[str, str], references: dict[str, list[str]],
                   use_java: bool | None = None, meteor: bool = False) -> Score:
    """CIDEr-D (×100) with BLEU-4, ROUGE-L and, if asked and Java is present, METEOR, on PTB-tokenized text.

    METEOR is opt-in: pycocoevalcap runs it as a long-lived Java subprocess that can stall on some systems,
    and a stalled metric must never hold a training run hostage.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    empty = sum(not predictions[i].strip() for i in ids)
    # an empty prediction scores 0; a placeholder keeps the tokenizer's line alignment intact
    res, tokenizer = tokenize_captions({i: [predictions[i].strip() or "empty"] for i in ids}, use_java)
    gts, _ = tokenize_captions({i: [r for r in references[i]] for i in ids}, use_java)
    for i in ids:
        if not predictions[i].strip():
            res[i] = ["__empty__"]
    cider, cider_per = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    extra = {"bleu4": 100 * float(bleu[3]), "rougeL": 100 * float(rouge), "tokenizer": tokenizer, "empty_predictions": empty}
    if meteor and (use_java if use_java is not None else java_available()):
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor, _ = Meteor().compute_score(gts, res)
            extra["meteor"] = 100 * float(meteor)
        except Exception as error:  # METEOR's Java process can fail on odd systems; CIDEr stands
            extra["meteor_error"] = str(error)[:200]
    return Score("cider", 100 * float(cider), len(ids), extra, [100 * float(c) for c in cider_per])


def _strings(value, name: str, least: int) -> None:
    if not isinstance(value, list) or len(value) < least or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{name}' must be a list of at least {least} strings, got {value!r}"[:300])


def check_item(item: dict, metric: str) -> None:
    """Refuse what would be scored silently wrong: a string where a list belongs (iterated as characters), a
    boolean or out-of-range ``answer_index``, a missing prediction."""
    if not isinstance(item.get("prediction"), str):
        raise ValueError("'prediction' must be a string (use \"\" for an empty answer)")
    if metric == "mc":
        _strings(item.get("choices"), "choices", 2)
        index = item.get("answer_index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(item["choices"]):
            raise ValueError(f"'answer_index' must be an integer index into the {len(item['choices'])} choices, "
                             f"got {index!r}")
    else:
        _strings(item.get("answers"), "answers", 1)


def score(metric: str, items: list[dict], use_java: bool | None = None, meteor: bool = False) -> Score:
    """Score ``items`` of ``{"id", "prediction", "answers", ["choices", "answer_index"]}``."""
    if not items:
        raise ValueError("nothing to score: no predictions")
    for item in items:
        try:
            check_item(item, metric)
        except ValueError as error:
            raise ValueError(f"item {item.get('id')!r}: {error}") from None
    if metric == "cider":
        return score_captions({i["id"]: i["prediction"] for i in items}, {i["id"]: i["answers"] for i in items},
                              use_java, meteor)
    if metric == "mc":
        per_sample, unparseable = [], 0
        for item in items:
            picked = parse_choice(item["prediction"], item["choices"])
            unparseable += picked is None
            per_sample.append(100.0 * (picked == item["answer_index"]))
        return Score("mc", sum(per_sample) / len(per_sample), len(items), {"unparseable": unparseable}, per_sample)
    if metric in ("vqa", "exact"):
        rule = vqa_accuracy if metric == "vqa" else exact_match
        per_sample = [100.0 * rule(item["prediction"], item["answers"]) for item in items]
        empty = sum(not item["prediction"].strip() for item in items)
        return Score(metric, sum(per_sample) / len(per_sample), len(items), {"empty_predictions": empty}, per_sample)
    raise ValueError(f"unknown metric {metric!r}; choose one of cider, vqa, mc, exact")


# ---------------------------------------------------------------- a caption's ceiling and its hallucinations
def caption_ceiling(references: dict[str, list[str]], use_java: bool | None = None) -> float:
    """The CIDEr-D (×100) of answering each record with the best of its own references, scored against all of them:
    the most a model that writes one true caption per image can get. It is the ceiling of a caption task's headroom
    (``mmtune.report``: S counts each downstream task's share of the headroom above chance); a model can pass it
    slightly, by writing the references' consensus rather than any one of them."""
    from pycocoevalcap.cider.cider import Cider

    gts, _ = tokenize_captions(references, use_java)
    best = dict.fromkeys(gts, 0.0)
    for j in range(max(len(v) for v in gts.values())):
        candidates = {i: [v[min(j, len(v) - 1)]] for i, v in gts.items()}
        _, per_record = Cider().compute_score(gts, candidates)
        for i, value in zip(sorted(gts), per_record, strict=True):  # pycocoevalcap scores in sorted-key order
            best[i] = max(best[i], 100 * float(value))
    return sum(best.values()) / len(best)


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.lower()))


def _singular(word: str) -> str:
    """``circles`` → ``circle``, ``boxes`` → ``box``: a mention matches the listed word in either number."""
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def mentions(answer: str, vocabulary: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The phrases of ``vocabulary`` (word tuples, singular) that ``answer`` names, longest first at each position
    ("top left" before "top"), each word matched whole and in either number."""
    words = tuple(_singular(w) for w in _words(answer))
    longest = max((len(p) for p in vocabulary), default=0)
    found, i = [], 0
    while i < len(words):
        for width in range(min(longest, len(words) - i), 0, -1):
            if words[i:i + width] in vocabulary:
                found.append(words[i:i + width])
                i += width
                break
        else:
            i += 1
    return found


def phrase(text: str) -> tuple[str, ...]:
    return tuple(_singular(w) for w in _words(text))


def hallucinations(answers: list[str], present: list[list[str]]) -> dict:
    """CHAIR-style hallucination of free-form answers: which of the things they name the image lacks.

    ``present[i]``: the words or phrases true of record i's image (objects, colours, counts, places: a record's
    ``extra.present``, from a synthetic scene's truth or COCO's instance annotations). The vocabulary of things that
    can be named is every phrase any record of the task lists; an answer's mention of one its own record does not
    list is a hallucination. Returns the share of answers with at least one (``rate``, %, CHAIR_s), the share of
    mentions that are (``mention_rate``, %, CHAIR_i), and per answer the hallucinated phrases."""
    truths = [{phrase(p) for p in listed} for listed in present]
    vocabulary = set().union(*truths) - {()}
    per_answer, named, wrong = [], 0, 0
    for answer, truth in zip(answers, truths, strict=True):
        found = mentions(answer, vocabulary)
        absent = [" ".join(p) for p in found if p not in truth]
        per_answer.append(absent)
        named += len(found)
        wrong += len(absent)
    return {"rate": 100 * sum(bool(a) for a in per_answer) / len(per_answer) if per_answer else float("nan"),
            "mention_rate": 100 * wrong / named if named else 0.0, "per_answer": per_answer}
