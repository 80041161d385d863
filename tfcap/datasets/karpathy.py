"""Karpathy's splits of Flickr8k, Flickr30k and COCO: dataset_{flickr8k,flickr30k,coco}.json.

`images[]`, each with `filename`, an optional `filepath` (COCO: train2014 or val2014), `split`
(train, val, test or restval) and `sentences[]` with `raw` and `tokens`. Captions are taken from
`raw` and normalized by tfcap (`tfcap.text`), never from Karpathy's `tokens`, so a dataset gives
the same vocabulary and ids in this layout as in its own. `restval` goes to train unless
`restval=False` (--no-restval), which leaves those images out.

The file is parsed with hooks that reduce each sentence to its text and each image to a tuple as
soon as it is read: the raw objects of dataset_coco.json would take gigabytes.
"""

from __future__ import annotations

from pathlib import Path

from tfcap.datasets.source import Captions, Source, image_id, need_dir
from tfcap.errors import TfcapError
from tfcap.reading import bad_line, describe, excerpt, load_json

KARPATHY_SPLITS = {"train": "train", "val": "val", "test": "test", "restval": "train"}
IMAGE_DIRS = ("Images", "images", "flickr30k_images/flickr30k_images", "flickr30k_images", "Flicker8k_Dataset",
              "Flickr8k_Dataset")


def find_beside(name: str, *folders: Path) -> Path | None:
    """dataset_{name}.json in one of `folders`, if there is one."""
    return next((f / f"dataset_{name}.json" for f in folders if (f / f"dataset_{name}.json").is_file()), None)


def find(data: Path) -> Path | None:
    """The one dataset_*.json in folder `data`; an error if there are several."""
    found = sorted(data.glob("dataset_*.json"))
    if len(found) > 1:
        raise TfcapError(f"{data} holds {', '.join(f.name for f in found)}: give one of them as DATA")
    return found[0] if found else None


class _Image(tuple):
    """(filepath, filename, split, sentences): what the parse keeps of an entry of images[]."""


def _reduce(entry: dict):
    if "raw" in entry and ("tokens" in entry or "sentid" in entry):
        return entry["raw"]  # a sentence: its text
    if "filename" in entry and "sentences" in entry:
        return _Image((entry.get("filepath", ""), entry["filename"], entry.get("split"), entry["sentences"]))
    return entry


def _load(path: Path) -> list:
    data = load_json(path, _reduce)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TfcapError(f"{path}: not a Karpathy split file (no images[] list)")
    return data["images"]


def _entries(path: Path, skip_bad_lines: bool, bad: list[str]):
    """(where, image name relative to the images folder, Karpathy split, sentences) of each valid entry.

    An entry of the wrong types, or naming an image an earlier entry named, is a bad entry: its
    split and captions would be ambiguous.
    """
    first: dict[str, str] = {}  # image id -> the entry that named it first
    for k, entry in enumerate(_load(path)):
        where = f"{path}: images[{k}]"
        if not isinstance(entry, _Image):
            bad_line(where, "expected an object with filename and sentences", skip_bad_lines, bad)
            continue
        filepath, filename, split, sentences = entry
        if not isinstance(filename, str) or not filename.strip() or not isinstance(filepath, str):
            bad_line(where, "filename (and filepath) must be non-empty strings", skip_bad_lines, bad)
            continue
        if not isinstance(split, str) or split not in KARPATHY_SPLITS:
            bad_line(where, f"split must be one of {', '.join(KARPATHY_SPLITS)}, got {describe(split)}",
                     skip_bad_lines, bad)
            continue
        name = f"{filepath.strip()}/{filename.strip()}" if filepath.strip() else filename.strip()
        earlier = first.setdefault(image_id(name), f"images[{k}]")
        if earlier != f"images[{k}]":
            bad_line(where, f"image {excerpt(name, 40)} is already listed at {earlier}",
                     skip_bad_lines, bad)
            continue
        yield where, name, split, sentences


def read_splits(path: Path, restval: bool = True) -> dict[str, str]:
    """Image id -> split from a Karpathy file (for another layout's captions); bad entries left out."""
    return {image_id(name): KARPATHY_SPLITS[split] for _, name, split, _ in _entries(path, True, [])
            if restval or split != "restval"}


def read(path: Path, images_dir: Path | None, skip_bad_lines: bool, restval: bool = True) -> Source:
    captions, splits, bad = Captions(), {}, []
    for where, name, split, sentences in _entries(path, skip_bad_lines, bad):
        texts = [s.strip() for s in sentences if isinstance(s, str)] if isinstance(sentences, list) else []
        if not texts or not all(texts) or len(texts) != len(sentences):
            bad_line(where, "sentences must each have a non-empty raw text", skip_bad_lines, bad)
            continue
        for text in texts:
            captions.add(name, text)
        if restval or split != "restval":
            splits[image_id(name)] = KARPATHY_SPLITS[split]
    if images_dir is None:
        images_dir = _find_images(path.parent, next(iter(captions), None))
    return Source("karpathy", path, need_dir(images_dir, "images folder"), captions, splits, "karpathy", bad)


def _find_images(base: Path, first: str | None) -> Path:
    """The folder beside the JSON holding its first image: base itself (COCO's train2014/ ...) or one of IMAGE_DIRS."""
    candidates = [base] + [base / d for d in IMAGE_DIRS]
    if first is not None:
        for folder in candidates:
            if (folder / first).exists():
                return folder
    existing = [c for c in candidates[1:] if c.is_dir()]
    if existing:
        return existing[0]
    if first is not None and "/" in first:
        return base
    raise TfcapError(f"no image folder beside {base} ({', '.join(IMAGE_DIRS)}); pass --images DIR")
