"""The conversation formats LLaMA-Factory, ms-swift and TRL share, read as mmtune records.

``messages`` (OpenAI style; LLaMA-Factory's ``sharegpt`` with OpenAI tags, ms-swift's default, TRL's)::

    {"messages": [{"role": "system", "content": "..."},            # optional
                  {"role": "user", "content": "<image>What is shown?"},
                  {"role": "assistant", "content": "A red square."}],
     "images": ["img/0001.jpg"]}

``content`` is a string with ``<image>`` placeholders or a list of parts (``{"type": "image"}``,
``{"type": "text", "text": ...}``: TRL's layout). ``sharegpt`` is the same with LLaMA-Factory's default tags
(``conversations``, ``from``/``value``, ``human``/``gpt``); any other tags are set per dataset (``tags``). The images
are paths relative to the file (or, in a Hugging Face dataset, decoded images, written once as PNG files under an
image cache). The number of ``<image>`` placeholders must equal the number of images. One record per conversation:
its last exchange is the target, the earlier ones its history (trained on too, as in the LLaVA format); a system
message is put before the first user turn's text; the images go with the first user turn, in order (several
images: a record whose ``image`` is a list). Optional ``id``,
``task``, ``kind`` keys override the source's defaults (task: the file's name; kind: open).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mmtune.data.record import IMAGE_TOKEN, Record, RecordError, checked_records, image_path
from mmtune.files import naming_a_full_disk

FORMATS = ("messages", "sharegpt")
DEFAULT_TAGS = {
    "messages": {"messages": "messages", "images": "images", "system": "system", "role_tag": "role",
                 "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"},
    "sharegpt": {"messages": "conversations", "images": "images", "system": "system", "role_tag": "from",
                 "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"},
}
# Keys of a conversation item other toolkits read and mmtune does not honour: refused (a video or a preference pair
# must not train as if it were not there).
NOT_HONOURED = {"videos": "videos (mmtune trains on images)", "audios": "audio (mmtune trains on images)",
                "tools": "tool definitions", "chosen": "preference pairs (mmtune trains supervised)",
                "rejected": "preference pairs (mmtune trains supervised)", "kto_tag": "KTO labels"}


def is_conversation(item: dict, tags: dict | None = None) -> bool:
    keys = {t["messages"] for t in DEFAULT_TAGS.values()} | ({tags["messages"]} if tags else set())
    return isinstance(item, dict) and any(k in item for k in keys) and "prompt" not in item


def format_tags(formatting: str = "messages", columns: dict | None = None, tags: dict | None = None) -> dict:
    """The column and tag names of a conversation source: the format's defaults, then ``columns`` (``messages``,
    ``images``) and ``tags`` (``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``, ``system_tag``)."""
    if formatting not in FORMATS:
        raise ValueError(f"formatting {formatting!r}; choose one of {', '.join(FORMATS)}")
    merged = {**DEFAULT_TAGS[formatting], **(columns or {}), **(tags or {})}
    unknown = set(merged) - set(DEFAULT_TAGS["messages"])
    if unknown:
        raise ValueError(f"unknown column / tag name(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_TAGS['messages'])}")
    return merged


def _text(content, where_turn: str) -> tuple[str, int]:
    """A turn's text with its images as ``<image>`` placeholders where they stand, and how many there are."""
    if isinstance(content, str):
        return content.strip(), content.count(IMAGE_TOKEN)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise ValueError(f"{where_turn}: a content part must be {{'type': 'text' | 'image', ...}}, got "
                                 f"{part!r}"[:200])
            texts.append(IMAGE_TOKEN if part["type"] == "image" else (part.get("text") or "").strip())
        text = " ".join(t for t in texts if t)
        return text, text.count(IMAGE_TOKEN)
    raise ValueError(f"{where_turn}: content must be text or a list of parts, got {type(content).__name__}")


def conversation_record(item: dict, index: int, tags: dict, defaults: dict,
                        image_path: Callable[[object, int], str]) -> Record:
    """One conversation as a record (``image_path(image, k)``: the path of the item's k-th image entry); its images
    stay where their placeholders stand, in whichever user turn."""
    turns = item.get(tags["messages"])
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{tags['messages']}' must be a non-empty list of turns")
    refused = [f"'{key}' ({NOT_HONOURED[key]})" for key in item if key in NOT_HONOURED and item[key]]
    if refused:
        raise ValueError(f"{', '.join(refused)}: not read by mmtune, so this conversation would train without them; "
                         "drop the key (or the conversation)")
    role, content = tags["role_tag"], tags["content_tag"]
    system, exchanges, pending, placeholders = [], [], None, 0
    for number, turn in enumerate(turns):
        where = f"turn {number}"
        if not isinstance(turn, dict) or role not in turn or content not in turn:
            raise ValueError(f"{where}: expected {{'{role}': ..., '{content}': ...}}, got {turn!r}"[:200])
        text, images = _text(turn[content], where)
        placeholders += images
        if turn[role] == tags["system_tag"] and not exchanges and pending is None:
            system.append(text)
        elif turn[role] == tags["user_tag"] and pending is None:
            pending = text
        elif turn[role] == tags["assistant_tag"] and pending is not None:
            if images:
                raise ValueError(f"{where}: an image in an assistant turn (images go with user turns)")
            exchanges.append({"prompt": pending, "answer": text})
            pending = None
        else:
            raise ValueError(f"{where}: role {turn[role]!r} out of place; expected an optional "
                             f"{tags['system_tag']!r}, then {tags['user_tag']!r} / {tags['assistant_tag']!r} pairs")
    if pending is not None or not exchanges:
        raise ValueError(f"the conversation must end with an {tags['assistant_tag']!r} turn (its answer is the target)")
    images = item.get(tags["images"])
    if images is None and item.get("image"):  # LLaVA's layout: one "image" beside "conversations"
        images = [item["image"]]
    images = images or []
    if not isinstance(images, list):
        images = [images]
    if placeholders != len(images):
        raise ValueError(f"{placeholders} image placeholder(s) ({IMAGE_TOKEN} or image parts) but {len(images)} "
                         f"image(s) in '{tags['images']}'")
    column = item.get(tags["system"])  # LLaMA-Factory's system column
    if column is not None:
        if not isinstance(column, str):
            raise ValueError(f"'{tags['system']}' must be a string, got {column!r}"[:200])
        system.insert(0, column)
    for number, exchange in enumerate(exchanges):
        if not exchange["prompt"].replace(IMAGE_TOKEN, "").strip() or not exchange["answer"].strip():
            raise ValueError(f"exchange {number}: a user turn with no text besides its image, or an empty answer "
                             "(mmtune needs an instruction and a target in every exchange)")
    last = exchanges[-1]
    record_id = item.get("id", index)
    record = Record(id=str(record_id) if isinstance(record_id, int | str) else record_id,
                    task=item.get("task", defaults.get("task")), kind=item.get("kind", defaults.get("kind", "open")),
                    image=([image_path(image, k) for k, image in enumerate(images)] if len(images) > 1 else
                           image_path(images[0], 0) if images else None), prompt=last["prompt"],
                    answers=[last["answer"]], history=exchanges[:-1], metric=item.get("metric", defaults.get("metric")),
                    system="\n".join(s for s in system if s.strip()) or None)
    record.validate()
    return record


def relative_image(base: Path) -> Callable[[object, int], str]:
    def path(image, _k: int) -> str:
        if not isinstance(image, str):
            raise ValueError(f"an image must be a path here, got {type(image).__name__}")
        return image_path(image, base)
    return path


def iter_conversation_file(path: Path, tags: dict | None, defaults: dict, skip_bad_records: bool = False,
                           skipped: list[str] | None = None, check_images: bool = True) -> Iterator[Record]:
    """Records from a JSON list or a JSONL file of conversations, each bad item named by file and line / item.
    ``tags`` None: ``messages`` or ``sharegpt`` names, as the first item has them."""
    defaults = {"task": path.stem, **defaults}
    image = relative_image(path.parent)

    def build(raw, index: int) -> Record:
        nonlocal tags
        item = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(item, dict):
            raise ValueError("a conversation must be a JSON object")
        if tags is None:
            tags = format_tags("messages" if "messages" in item else "sharegpt")
        return conversation_record(item, index, tags, defaults, image)

    def candidates():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" or text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}: invalid JSON ({error})") from None
            if not isinstance(items, list):
                raise RecordError(f"{path}: expected a JSON list of conversations")
            for index, item in enumerate(items):
                yield f"{path}: item {index}", (lambda item=item, index=index: build(item, index))
        else:
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    yield f"{path}:{number}", (lambda line=line, number=number: build(line, number - 1))

    yield from checked_records(candidates(), skip_bad_records, check_images, skipped)


def decoded_image_writer(cache: Path, source: str) -> Callable[[object, int, int], str]:
    """Write decoded images (PIL images, or ``{"bytes", "path"}`` as ``datasets`` stores them) once as PNG files under
    ``cache/<hash of the source>/`` and return their paths; paths (strings) pass through."""
    folder = Path(cache) / hashlib.sha1(str(source).encode()).hexdigest()[:16]

    def write(image, row: int, k: int, base: Path) -> str:
        if isinstance(image, str):
            return relative_image(base)(image, k)
        if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
            return relative_image(base)(image["path"], k)
        target = folder / f"{row}-{k}.png"
        if not target.is_file():
            from PIL import Image

            if isinstance(image, dict):
                image = Image.open(io.BytesIO(image["bytes"]))
            if not hasattr(image, "save"):
                raise ValueError(f"an image must be a path, a decoded image or {{'bytes': ...}}, got "
                                 f"{type(image).__name__}")
            with naming_a_full_disk(f"decoded images into the image cache {folder} ($MMTUNE_CACHE)", cache):
                folder.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial.png")
                image.convert("RGB").save(partial)
                os.replace(partial, target)
        return str(target)

    return write
