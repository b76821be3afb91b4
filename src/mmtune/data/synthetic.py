"""A generated world with the structure of the papers' protocol, fully determined by a seed.

Images hold 1–3 objects (shape, colour, size, cell of a 3×3 grid) on a plain background, sometimes
with a rendered letter. Task families mirror the papers' datasets (world version 2, the papers' regime):

* held-out families (the base's skills, the generalization side): brief captions with five varied
  references per image (like COCO captions), colour / shape / position short answers, yes/no existence,
  reading the letter (like GQA, OKVQA, OCR-VQA, TextVQA), and lettered multiple choice on the background
  colour and on shapes, so the letter format is known before fine-tuning (options in a fixed order: see
  ``_lettered``);
* pre-training only, at a small share: short-answer counting, and the downstream caption style itself
  (a generalist base has seen a little of every format, as LLaVA-1.5 has seen captions);
* downstream open-response: the detailed caption style with five paraphrased references
  (like Flickr30k / COCO, scored with CIDEr);
* downstream fixed-choice: lettered multiple-choice counting and attribute questions
  (like ScienceQA / IconQA).

Version 1 (commit b6ccf67 and before) had one templated brief caption per image and no lettered or
counting family in pre-training; ``world.json`` records the version, so a folder of another version is never reused.

Version 3 (``data.synthetic.version: 3``; docs/results.md, pre-registered) keeps v2's images and every other family
and changes only the open-response task, towards real caption data: a detailed caption describes what the v2 base
can see (colours, places, count, background — not shapes or sizes, which its vision tower does not carry), and each
*training* image has one human-like caption — one of the paraphrases, with each image word wrong with probability
``V3_CAPTION_NOISE``, towards a language prior (``PRIOR``) — while test images keep five correct references.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mmtune.data.records import (
    CAPTION_PROMPT,
    SHORT_ANSWER_INSTRUCTION,
    Record,
    letter,
    multiple_choice_prompt,
    write_records,
)
from mmtune.files import naming_a_full_disk

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230),
    "yellow": (235, 220, 40), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"black": (15, 15, 15), "gray": (110, 110, 110), "brown": (100, 70, 40), "navy": (20, 25, 80)}
CHARACTERS = "ABCDEFGHKMNPRSTXYZ"

WORLD_VERSION = 2  # the default; ``WORLD_VERSIONS`` lists what ``data.synthetic.version`` accepts
WORLD_VERSIONS = (2, 3)
V3_CAPTION_NOISE = 0.3  # world v3: the chance that each (image) word of a training caption is wrong
# How a v3 training caption is wrong (``data.synthetic.caption_errors``), as written into the world's world.json, so
# a folder made under another rule (or before amendment 1's uniform errors) is never reused.
V3_CAPTIONS = {
    "prior": "one per training image; image words wrong with p=0.3, towards PRIOR (amendment 1)",
    "words": "one per training image; every word wrong with p=0.3, a random caption word (amendment 3)",
    "varied": "one per training image; every word true, a random subset of the objects and places in a random order "
              "and template (re-plan, issue 35)",
}
HELDOUT_FAMILIES = ("brief_caption", "color_vqa", "shape_vqa", "position_vqa", "exists_vqa", "ocr_vqa",
                    "background_mc", "shape_mc")
PRETRAIN_ONLY = ("count_vqa",)
PRETRAIN_FAMILIES = HELDOUT_FAMILIES + PRETRAIN_ONLY  # the base also sees a little detailed_caption (configs)
DOWNSTREAM_OPEN = ("detailed_caption",)
DOWNSTREAM_CHOICE = ("count_mc", "attribute_mc")
FAMILIES = PRETRAIN_FAMILIES + DOWNSTREAM_OPEN + DOWNSTREAM_CHOICE
CHOICE_FAMILIES = ("background_mc", "shape_mc", *DOWNSTREAM_CHOICE)
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    size: str
    cell: int


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    character: str | None


def sample_scene(rng: random.Random, character_rate: float = 0.4) -> Scene:
    count = rng.randint(1, 3)
    cells = rng.sample(range(9), count)
    # Distinct (shape, colour) pairs keep every question about "the red circle" unambiguous.
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], count)
    things = tuple(Thing(s, c, rng.choice(SIZES), cell) for (s, c), cell in zip(pairs, cells, strict=True))
    background = rng.choice(list(BACKGROUNDS))
    # The letter sits in a free cell so it never hides an object.
    free = [cell for cell in range(9) if cell not in cells]
    character = rng.choice(CHARACTERS) if free and rng.random() < character_rate else None
    return Scene(things, background, character)


def render(scene: Scene, size: int = 48, rng_seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for thing in scene.things:
        row, col = divmod(thing.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.45 if thing.size == "large" else 0.3)  # v1: 0.25, small shapes were hard to tell apart
        box = (cx - r, cy - r, cx + r, cy + r)
        color = COLORS[thing.color]
        if thing.shape == "circle":
            draw.ellipse(box, fill=color)
        elif thing.shape == "square":
            draw.rectangle(box, fill=color)
        elif thing.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        else:
            w = max(1.0, r / 2.5)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    if scene.character:
        used = {t.cell for t in scene.things}
        free = [c for c in range(9) if c not in used]
        row, col = divmod(free[0], 3)
        font = ImageFont.load_default(size=max(8, int(cell * 0.9)))
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        draw.text((cx, cy), scene.character, fill=(255, 255, 255), font=font, anchor="mm")
    return image


def describe(thing: Thing, with_size: bool = False) -> str:
    return f"{thing.size + ' ' if with_size else ''}{thing.color} {thing.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _at(cell: int) -> str:
    name = CELLS[cell]
    return "in the center" if name == "center" else f"at the {name}"


# --- task families: each returns (prompt, answers, choices, answer_index) or None if not applicable ---

def brief_caption(scene: Scene, rng: random.Random):
    """Five varied references per image, in a random order: the first (the training target) varies too,
    as a COCO caption does, so the base learns the content rather than one template."""
    named = ["a " + describe(t) for t in scene.things]
    n = len(scene.things)
    shapes = {1: "one shape", 2: "two shapes", 3: "three shapes"}[n]
    references = [
        _join(named),
        f"an image of {_join(named)}",
        _join(list(reversed(named))),
        f"{shapes} : {_join(named)}",
        f"{_join(named)} on a {scene.background} background",
    ]
    rng.shuffle(references)
    return "Describe the image briefly.", references, None, None


def detailed_caption(scene: Scene, rng: random.Random):
    things = scene.things
    placed = [f"a {describe(t, True)} {_at(t.cell)}" for t in things]
    n = len(things)
    count_word = {1: "one object", 2: "two objects", 3: "three objects"}[n]
    references = [
        f"there is {_join(placed)} on a {scene.background} background .",
        f"the image shows {count_word} : {_join(placed)} .",
        f"{_join(placed)} , drawn on a {scene.background} background .",
        f"on a {scene.background} background there is {_join(placed)} .",
        f"a picture of {count_word} , {_join(placed)} .",
    ]
    return CAPTION_PROMPT, references, None, None


def detailed_caption_v3(scene: Scene, rng: random.Random):
    """World v3's five correct references: colour, place, count and background — only what the base can see."""
    return CAPTION_PROMPT, _v3_references(scene), None, None


def _v3_references(scene: Scene, count: int | None = None) -> list[str]:
    placed = [f"a {t.color} object {_at(t.cell)}" for t in scene.things]
    count = count or len(scene.things)
    count_word = f"{COUNT_WORDS[count]} object{'s' if count > 1 else ''}"
    return [
        f"there is {_join(placed)} on a {scene.background} background .",
        f"the image shows {count_word} : {_join(placed)} .",
        f"{_join(placed)} , drawn on a {scene.background} background .",
        f"on a {scene.background} background there is {_join(placed)} .",
        f"a picture of {count_word} , {_join(placed)} .",
    ]


# World v3's annotators err towards a language prior: a wrong value is the slot's most common word in their captions
# (amendment 1 of the pre-registration, docs/results.md), as captioners write frequent words where they don't belong.
PRIOR = {"color": "red", "cell": CELLS.index("center"), "background": "gray", "count": 2}


def misdescribed(scene: Scene, rng: random.Random, noise: float) -> tuple[Scene, int]:
    """The scene as a careless annotator saw it: each object's colour and place, the background and the count are
    each wrong with probability ``noise``; a wrong value is the slot's ``PRIOR`` word (another value drawn uniformly
    where the truth is the prior word itself)."""
    def other(value, pool, prior):
        if rng.random() >= noise:
            return value
        return prior if value != prior else rng.choice([v for v in pool if v != value])

    things = tuple(Thing(t.shape, other(t.color, list(COLORS), PRIOR["color"]), t.size,
                         other(t.cell, range(9), PRIOR["cell"])) for t in scene.things)
    count = other(len(scene.things), (1, 2, 3), PRIOR["count"])
    return Scene(things, other(scene.background, list(BACKGROUNDS), PRIOR["background"]), scene.character), count


def human_caption(scene: Scene, rng: random.Random, noise: float = V3_CAPTION_NOISE) -> tuple[str, Scene, int]:
    """World v3's training caption: one paraphrase at random, of the scene as misdescribed; also returns what it says."""
    seen, count = misdescribed(scene, rng, noise)
    return rng.choice(_v3_references(seen, count)), seen, count


def _v3_vocabulary() -> list[str]:
    """Every word a v3 reference can hold (template, colours, places, counts, backgrounds), sorted."""
    words = {"there", "is", "a", "object", "objects", "on", "background", "the", "image", "shows", "drawn",
             "picture", "of", "and", "at", "in", ".", ",", ":"}
    words |= set(COLORS) | set(BACKGROUNDS) | {COUNT_WORDS[n] for n in (1, 2, 3)}  # a scene holds 1–3 objects
    for cell in range(9):
        words |= set(_at(cell).split())
    return sorted(words)


V3_VOCABULARY = _v3_vocabulary()


def noisy_words(caption: str, rng: random.Random, noise: float = V3_CAPTION_NOISE) -> str:
    """Plain label noise (amendment 3): each word of ``caption`` (punctuation included) is, with probability
    ``noise``, replaced by another word of the v3 captions' vocabulary drawn uniformly — template words as well as
    image words, with no preference for any word. Words are the tokenizer's (``\\w+`` or one punctuation mark), written
    back separated by single spaces ("left," → "left ,": the same tokens)."""
    def other(word: str) -> str:
        if rng.random() >= noise:
            return word
        return rng.choice([w for w in V3_VOCABULARY if w != word])

    return " ".join(other(word) for word in re.findall(r"\w+|[^\w\s]", caption))


def varied_caption(scene: Scene, rng: random.Random) -> str:
    """The re-planned v3's training caption (``caption_errors: varied``), as one of Flickr30k's five annotators writes
    one: every word true, but naming a random non-empty subset of the objects in a random order, each object's place
    said or not (a coin flip), in one of the five templates at random — so no training caption is the full
    description the test references give, and each image is described one way only."""
    things = list(rng.sample(scene.things, rng.randint(1, len(scene.things))))
    placed = [f"a {t.color} object" + (f" {_at(t.cell)}" if rng.random() < 0.5 else "") for t in things]
    count = len(scene.things)
    count_word = f"{COUNT_WORDS[count]} object{'s' if count > 1 else ''}"
    return rng.choice([
        f"there is {_join(placed)} on a {scene.background} background .",
        f"the image shows {count_word} : {_join(placed)} .",
        f"{_join(placed)} , drawn on a {scene.background} background .",
        f"on a {scene.background} background there is {_join(placed)} .",
        f"a picture of {count_word} , {_join(placed)} .",
    ])


def _unique_thing(scene: Scene, rng: random.Random) -> Thing:
    return rng.choice(scene.things)


def _unique_by(scene: Scene, rng: random.Random, attribute: str) -> Thing | None:
    """A random object whose ``attribute`` no other object shares (so "the red object" names one), or None."""
    values = [getattr(t, attribute) for t in scene.things]
    candidates = [t for t in scene.things if values.count(getattr(t, attribute)) == 1]
    return rng.choice(candidates) if candidates else None


def color_vqa(scene: Scene, rng: random.Random):
    thing = _unique_by(scene, rng, "shape")
    if thing is None:
        return None
    return f"What color is the {thing.shape}?\n{SHORT_ANSWER_INSTRUCTION}", [thing.color], None, None


def shape_vqa(scene: Scene, rng: random.Random):
    thing = _unique_by(scene, rng, "color")
    if thing is None:
        return None
    return f"What shape is the {thing.color} object?\n{SHORT_ANSWER_INSTRUCTION}", [thing.shape], None, None


def position_vqa(scene: Scene, rng: random.Random):
    thing = _unique_thing(scene, rng)
    return f"Where is the {describe(thing)}?\n{SHORT_ANSWER_INSTRUCTION}", [CELLS[thing.cell]], None, None


def exists_vqa(scene: Scene, rng: random.Random):
    if rng.random() < 0.5:
        thing = _unique_thing(scene, rng)
        shape, color, answer = thing.shape, thing.color, "yes"
    else:
        present = {(t.shape, t.color) for t in scene.things}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        shape, color = rng.choice(absent)
        answer = "no"
    return f"Is there a {color} {shape}?\n{SHORT_ANSWER_INSTRUCTION}", [answer], None, None


def ocr_vqa(scene: Scene, rng: random.Random):
    if scene.character is None:
        return None
    return f"What letter is written in the image?\n{SHORT_ANSWER_INSTRUCTION}", [scene.character.lower()], None, None


def count_vqa(scene: Scene, rng: random.Random):
    answer = COUNT_WORDS[len(scene.things)]
    return f"How many objects are there?\n{SHORT_ANSWER_INSTRUCTION}", [answer], None, None


# Lettered questions list their options in a fixed order (the pool's order, as IconQA lists its counting
# choices in ascending order): the letter is then a function of the answer and the option set. A pointer over
# shuffled options ("find the option that says X, answer its letter") was not learned at this scale: measured,
# an 8-block base stayed at 25% on shuffled lettered questions after 3,000 pre-training steps, and a 4-layer
# text-only model at chance after 1,500 steps of pure option lookup.
def _lettered(question: str, truth: str, pool: tuple[str, ...] | list[str], rng: random.Random, context=None):
    chosen = set(pool) if len(pool) == 4 else {truth, *rng.sample([q for q in pool if q != truth], 3)}
    options = [p for p in pool if p in chosen]
    index = options.index(truth)
    return multiple_choice_prompt(question, options, context=context), [letter(index)], options, index


def background_mc(scene: Scene, rng: random.Random):
    return _lettered("What color is the background?", scene.background, list(BACKGROUNDS), rng)


def shape_mc(scene: Scene, rng: random.Random):
    thing = _unique_by(scene, rng, "color")
    if thing is None:
        return None
    return _lettered(f"Which shape is the {thing.color} object?", thing.shape, SHAPES, rng)


def count_mc(scene: Scene, rng: random.Random):
    return _lettered("How many objects are in the image?", COUNT_WORDS[len(scene.things)],
                     list(COUNT_WORDS.values()), rng)


def attribute_mc(scene: Scene, rng: random.Random):
    thing = _unique_thing(scene, rng)
    if rng.random() < 0.5:
        question, truth, pool = f"Which color does the {thing.shape} at the {CELLS[thing.cell]} have?", thing.color, list(COLORS)
    else:
        question, truth, pool = f"Which shape is the {thing.color} object at the {CELLS[thing.cell]}?", thing.shape, list(SHAPES)
    context = f"The objects are drawn on a {scene.background} background."
    return _lettered(question, truth, pool, rng, context=context)


GENERATORS: dict[str, Callable] = {
    "brief_caption": brief_caption, "color_vqa": color_vqa, "shape_vqa": shape_vqa,
    "position_vqa": position_vqa, "exists_vqa": exists_vqa, "ocr_vqa": ocr_vqa,
    "background_mc": background_mc, "shape_mc": shape_mc, "count_vqa": count_vqa,
    "detailed_caption": detailed_caption, "count_mc": count_mc, "attribute_mc": attribute_mc,
}
METRIC = {"brief_caption": "cider", "detailed_caption": "cider", **{f: "mc" for f in CHOICE_FAMILIES}}


def vocabulary() -> list[str]:
    """Every word the world can produce: the tiny tokenizers' vocabulary."""
    words = [*SHAPES, *COLORS, *SIZES, *CELLS, *BACKGROUNDS, *CHARACTERS.lower(), *COUNT_WORDS.values(),
             "1", "2", "3", "4"]
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        for generate in GENERATORS.values():
            out = generate(scene, rng)
            if out:
                words += [out[0], *out[1], *(out[2] or [])]
    return words


CAPTION_FAMILIES = ("brief_caption", "detailed_caption")


def image_words(scene: Scene, count: int | None = None) -> list[str]:
    """The words of a caption that depend on the image — its objects' colours, shapes, sizes, places and count, and the
    background — for NRCA's diagnostic split (``extra.image_words``); the rest of a caption is template."""
    words = {scene.background, COUNT_WORDS[count or len(scene.things)]}
    for thing in scene.things:
        words |= {thing.color, thing.shape, thing.size, *CELLS[thing.cell].split()}
    return sorted(words)


def scene_truth(scene: Scene) -> list[str]:
    """Everything a caption can truly say of the scene — its objects' colours, shapes, sizes and places (whole cell
    names: "top left" is not "top"), how many there are, the background — as ``extra.present``: the truth the
    hallucination score (``mmtune.metrics.hallucinations``) checks a caption's mentions against."""
    words = {scene.background, COUNT_WORDS[len(scene.things)]}
    for thing in scene.things:
        words |= {thing.color, thing.shape, thing.size, CELLS[thing.cell]}
    return sorted(words)


def make_records(scenes: list[tuple[str, Scene]], family: str, split: str, seed: int,
                 version: int = WORLD_VERSION, caption_errors: str = "prior") -> list[Record]:
    rng = random.Random(f"{seed}-{family}-{split}")
    records = []
    kind = "choice" if family in CHOICE_FAMILIES else "open"
    v3_caption = version >= 3 and family == "detailed_caption"
    for image_path, scene in scenes:
        words = image_words(scene) if family in CAPTION_FAMILIES else None
        if v3_caption and split == "train" and caption_errors == "varied":
            out = (CAPTION_PROMPT, [varied_caption(scene, rng)], None, None)
        elif v3_caption and split == "train" and caption_errors == "words":
            out = (CAPTION_PROMPT, [noisy_words(rng.choice(_v3_references(scene)), rng)], None, None)
        elif v3_caption and split == "train":
            caption, seen, count = human_caption(scene, rng)
            out, words = (CAPTION_PROMPT, [caption], None, None), image_words(seen, count)
        elif v3_caption:
            out = detailed_caption_v3(scene, rng)
        else:
            out = GENERATORS[family](scene, rng)
        if out is None:
            continue
        prompt, answers, choices, answer_index = out
        records.append(Record(
            id=f"{family}-{split}-{Path(image_path).stem}", task=family, kind=kind, image=image_path,
            prompt=prompt, answers=answers, choices=choices, answer_index=answer_index,
            metric=METRIC.get(family, "exact"),
            extra={"image_words": words, "present": scene_truth(scene)} if family in CAPTION_FAMILIES else {},
        ))
    return records


def world_marker(version: int, seed: int, n_train: int, n_test: int, image_size: int,
                 families: tuple[str, ...], caption_errors: str = "prior") -> dict:
    """What ``world.json`` holds: everything that makes two worlds the same (a v3 world also names its caption rule)."""
    if caption_errors not in V3_CAPTIONS:
        raise ValueError(f"caption_errors={caption_errors!r} is unknown; valid: {', '.join(V3_CAPTIONS)}")
    return {"version": version, "seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size,
            "families": list(families), **({"captions": V3_CAPTIONS[caption_errors]} if version >= 3 else {})}


def generate_world(out_dir: str | Path, seed: int = 0, n_train: int = 1000, n_test: int = 200,
                   image_size: int = 48, families: tuple[str, ...] = FAMILIES,
                   overwrite: bool = False, progress: bool = True,
                   version: int = WORLD_VERSION, caption_errors: str = "prior") -> dict[str, dict[str, Path]]:
    """Write images and one task file per (family, split); return ``{family: {split: path}}``. ``caption_errors``
    (v3 only): how a training caption is written — ``"prior"`` (image words wrong, towards ``PRIOR``), ``"words"`` (any
    word wrong, at random: ``noisy_words``) or ``"varied"`` (all true, a random part of the scene: ``varied_caption``)."""
    marked = world_marker(version, seed, n_train, n_test, image_size, families, caption_errors)
    if version not in WORLD_VERSIONS:
        raise ValueError(f"synthetic world version {version} is unknown; valid: {', '.join(map(str, WORLD_VERSIONS))}")
    out = Path(out_dir)
    marker = out / "world.json"
    if marker.exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a synthetic world; pass overwrite to regenerate it")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; valid: {FAMILIES}")
    files: dict[str, dict[str, Path]] = {family: {} for family in families}
    for split, count in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"{seed}-{split}")
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        scenes = []
        for index in tqdm(range(count), desc=f"synth {split} images", disable=not progress, leave=False):
            scene = sample_scene(rng)
            path = image_dir / f"{index:06d}.png"
            render(scene, image_size).save(path)
            scenes.append((str(path), scene))
        for family in families:
            path = out / f"{family}_{split}.jsonl"
            write_records(make_records(scenes, family, split, seed, version, caption_errors), path, overwrite=True)
            files[family][split] = path
    import json

    marker.write_text(json.dumps(marked, indent=2) + "\n")
    return files


SYNTHETIC_PREFIX = "synthetic:"


def ensure_world(world_dir: str | Path, seed: int, n_train: int, n_test: int, image_size: int,
                 progress: bool = True, version: int = WORLD_VERSION, caption_errors: str = "prior") -> Path:
    """Generate the world into ``world_dir`` unless the same world is already there."""
    import json

    world_dir = Path(world_dir)
    wanted = world_marker(version, seed, n_train, n_test, image_size, FAMILIES, caption_errors)
    marker = world_dir / "world.json"
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise FileExistsError(f"{world_dir} holds a different synthetic world ({found}); wanted {wanted}. "
                                  "Point data.synthetic.dir elsewhere or remove it.")
        return world_dir
    with naming_a_full_disk(f"the synthetic world into {world_dir} (data.synthetic.dir; it is made again, whole, "
                            "on the next run)", world_dir.parent):
        generate_world(world_dir, seed, n_train, n_test, image_size, progress=progress, version=version,
                       caption_errors=caption_errors)
    return world_dir


def resolve_task_path(path: str, world_dir: Path | None, split: str) -> Path:
    """``synthetic:<family>`` → the family's task file of ``split`` in the world; anything else is a file path."""
    if not path.startswith(SYNTHETIC_PREFIX):
        return Path(path)
    family = path[len(SYNTHETIC_PREFIX):]
    if family not in FAMILIES:
        raise ValueError(f"unknown synthetic family {family!r}; valid: {', '.join(FAMILIES)}")
    if world_dir is None:
        raise ValueError(f"{path}: no synthetic world configured")
    return world_dir / f"{family}_{split}.jsonl"
