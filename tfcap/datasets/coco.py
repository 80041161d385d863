"""MS COCO's captions: annotations/captions_{train,val}{2014,2017}.json, images in train2014/, val2014/ ...

Each file has `images[]` (`id`, `file_name`) and `annotations[]` (`image_id`, `id`, `caption`).
An image's id is `{train,val}{year}/{file_name}`, relative to the folder holding train2014/ and
val2014/ (DATA, DATA/images, or --images). 2014 is read when its files are there (Karpathy's splits
are of 2014), else 2017. Splits: Karpathy's, when dataset_coco.json is beside the annotations;
else train from the train file, and the val file's images split by image into val and test
(`--test-fraction` of them in test).

COCO's own defects: captions with trailing spaces and newlines (stripped), annotations whose image
is not in images[] and empty captions (bad entries: an error naming file and annotation id, or
skipped with --skip-bad-lines).
"""

from __future__ import annotations

from pathlib import Path

from tfcap.datasets import karpathy
from tfcap.datasets.source import Captions, Source, need_dir
from tfcap.datasets.splits import VAL_OR_TEST
from tfcap.errors import TfcapError
from tfcap.reading import bad_line, describe, excerpt, load_json

YEARS = ("2014", "2017")
KINDS = ("train", "val")


def annotation_files(data: Path) -> dict[str, Path]:
    """{"train": ..., "val": ...} of the first year that has either, in data/annotations/ or data/."""
    for year in YEARS:
        for folder in (data / "annotations", data):
            found = {kind: folder / f"captions_{kind}{year}.json" for kind in KINDS}
            found = {kind: f for kind, f in found.items() if f.is_file()}
            if found:
                return found
    return {}


def _reduce(entry: dict):
    if "caption" in entry and "image_id" in entry:
        return ("annotation", entry["image_id"], entry.get("id"), entry["caption"])
    if "file_name" in entry and "id" in entry:
        return ("image", entry["id"], entry["file_name"])
    return entry


def _load(path: Path) -> tuple[list, list]:
    data = load_json(path, _reduce)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise TfcapError(f"{path}: not a COCO captions file (no images[] and annotations[] lists)")
    return data["images"], data["annotations"]


def _is_id(value: object) -> bool:
    """COCO ids are integers; strings are taken too. Not true/false (true == 1 as a key), floats or containers."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _shown(image_id: int | str) -> str:
    return str(image_id) if isinstance(image_id, int) and image_id.bit_length() < 64 else excerpt(image_id, 40)


def _read_file(path: Path, folder: str, captions: Captions, skip_bad_lines: bool, bad: list[str]) -> list[str]:
    """Add the captions of one annotations file; return its image ids in images[] order.

    An entry of the wrong types is a bad entry, and so is an image whose id an earlier image has
    (its annotations would belong to either).
    """
    images, annotations = _load(path)
    names: dict[object, str] = {}
    first: dict[object, int] = {}  # image id -> its entry in images[]
    for k, image in enumerate(images):
        where = f"{path}: images[{k}]"
        if not (isinstance(image, tuple) and image[0] == "image" and _is_id(image[1]) and isinstance(image[2], str)
                and image[2].strip()):
            bad_line(where, "expected an object with an integer id and a file_name", skip_bad_lines, bad)
            continue
        if first.setdefault(image[1], k) != k:
            bad_line(where, f"id {_shown(image[1])} is already the id of images[{first[image[1]]}]",
                     skip_bad_lines, bad)
            continue
        names[image[1]] = f"{folder}/{image[2].strip()}"
    for k, annotation in enumerate(annotations):
        if not (isinstance(annotation, tuple) and annotation[0] == "annotation"):
            bad_line(f"{path}: annotations[{k}]", "expected an object with image_id and caption", skip_bad_lines, bad)
            continue
        _, image, number, caption = annotation
        # Named by its id, as COCO's tools do, where that is an id; else by its place.
        where = f"{path}: annotation {number}" if _is_id(number) and len(_shown(number)) <= 40 else (
            f"{path}: annotations[{k}]")
        if not _is_id(image):
            bad_line(where, f"image_id must be an integer, got {describe(image)}", skip_bad_lines, bad)
            continue
        if image not in names:
            bad_line(where, f"image_id {_shown(image)} is not in images[]", skip_bad_lines, bad)
            continue
        if not isinstance(caption, str) or not caption.strip():
            bad_line(where, "empty caption" if isinstance(caption, str) else
                     f"caption must be a string, got {describe(caption)}", skip_bad_lines, bad)
            continue
        captions.add(names[image], caption.strip())
    return list(names.values())


def read(data: Path, images_dir: Path | None, skip_bad_lines: bool, restval: bool = True) -> Source:
    files = annotation_files(data)
    year = next(iter(files.values())).stem[-4:]
    if images_dir is None:
        folders = [f"{kind}{year}" for kind in files]
        images_dir = next((d for d in (data, data / "images") if any((d / f).is_dir() for f in folders)), None)
        if images_dir is None:
            raise TfcapError(f"no {' or '.join(folders)}/ in {data} or {data / 'images'}; pass --images DIR")
    captions, bad, splits = Captions(), [], {}
    for kind, path in files.items():
        for i in _read_file(path, f"{kind}{year}", captions, skip_bad_lines, bad):
            splits[i] = "train" if kind == "train" else VAL_OR_TEST
    splits_file = karpathy.find_beside("coco", data, data / "annotations")
    if splits_file is not None:
        splits = karpathy.read_splits(splits_file, restval)
    return Source("coco", files.get("train", files.get("val")), need_dir(images_dir, "images folder"), captions, splits,
                  "karpathy" if splits_file else "files", bad)
