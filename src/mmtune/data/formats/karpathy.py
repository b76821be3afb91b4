"""COCO Captions and Flickr30k in the Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import CAPTION_PROMPT, Record

LAYOUT_COCO = """ROOT/dataset_coco.json   Karpathy split: {"images": [{"filepath": "val2014", "filename": ..., "split":
                                    train|val|test|restval, "sentences": [{"raw": ...}], "cocoid": ...}]}
ROOT/<filepath>/<filename>  the images (e.g. ROOT/val2014/COCO_val2014_000000391895.jpg); or --images DIR"""
LAYOUT_FLICKR = """ROOT/dataset_flickr30k.json  Karpathy split: {"images": [{"filename": ..., "split": train|val|test,
                                    "sentences": [{"raw": ...}], "imgid": ...}]}
ROOT/flickr30k-images/<filename>  the images (or ROOT/<filename>, or --images DIR)"""


def _convert(root: Path, split: str, task: str, annotation: str, images: str | None, restval: bool,
             default_image_dirs: tuple[str, ...]) -> Iterator[Record]:
    data = load_json(root / annotation)
    wanted = {split} | ({"restval"} if split == "train" and restval else set())
    for entry in data["images"]:
        if entry.get("split") not in wanted:
            continue
        key = entry.get("cocoid", entry.get("imgid")) if task == "coco" else entry.get("imgid", entry.get("filename"))
        if images:
            image = Path(images) / entry["filename"]
        elif entry.get("filepath"):
            image = root / entry["filepath"] / entry["filename"]
        else:
            candidates = [root / d / entry["filename"] for d in default_image_dirs]
            image = next((c for c in candidates if c.exists()), candidates[0])
        references = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        yield Record(id=f"{task}-{key}", task=task, kind="open", image=str(image), prompt=CAPTION_PROMPT,
                     answers=references, metric="cider")


def convert_coco(root: Path, split: str, images: str | None = None, restval: bool = True,
                 annotation: str = "dataset_coco.json", **_) -> Iterator[Record]:
    return _convert(root, split, "coco", annotation, images, restval, ("",))


def convert_flickr30k(root: Path, split: str, images: str | None = None, restval: bool = True,
                      annotation: str = "dataset_flickr30k.json", **_) -> Iterator[Record]:
    return _convert(root, split, "flickr30k", annotation, images, restval, ("flickr30k-images", ""))
