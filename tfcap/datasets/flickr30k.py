"""Flickr30k as Kaggle ships it: results.csv and flickr30k_images/.

results.csv is `|`-separated, `image_name| comment_number| comment`, with a header, stray
spaces around the fields and a few malformed lines (e.g. `2199200615.jpg| 4 A dog runs ...`,
the second separator missing). It is read line by line, not as CSV: captions hold unmatched
quotes. The images are in flickr30k_images/ beside it, or in flickr30k_images/flickr30k_images/
as the Kaggle archive unpacks.
"""

from __future__ import annotations

from pathlib import Path

from tfcap.datasets import karpathy
from tfcap.datasets.source import Captions, Source, first_dir, need_dir
from tfcap.reading import bad_line, numbered_lines

RESULTS_FILE = "results.csv"
IMAGE_DIR = "flickr30k_images"


def find(data: Path) -> Path | None:
    """The results.csv of the dataset folder `data`, if it has one."""
    return next((f for f in (data / RESULTS_FILE, data / IMAGE_DIR / RESULTS_FILE) if f.is_file()), None)


def read_results(path: Path, skip_bad_lines: bool) -> tuple[Captions, list[str]]:
    captions = Captions()
    bad: list[str] = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("|", 2)]
        if number == 1 and fields[0].lower() == "image_name":
            continue
        if len(fields) != 3 or not fields[1].isdigit():
            bad_line(f"{path}:{number}", "expected image_name| comment_number| comment", skip_bad_lines, bad)
            continue
        if not fields[0] or not fields[2]:
            bad_line(f"{path}:{number}", "empty image or caption", skip_bad_lines, bad)
            continue
        captions.add(fields[0], fields[2])
    return captions, bad


def read(results: Path, images_dir: Path | None, skip_bad_lines: bool, restval: bool) -> Source:
    """Captions from `results`; splits from Karpathy's dataset_flickr30k.json beside it, else by hash."""
    base = results.parent.parent if results.parent.name == IMAGE_DIR else results.parent
    if images_dir is None:
        images_dir = first_dir([base / IMAGE_DIR / IMAGE_DIR, base / IMAGE_DIR], "image folder", "pass --images DIR")
    captions, bad = read_results(results, skip_bad_lines)
    splits_file = karpathy.find_beside("flickr30k", base)
    splits = karpathy.read_splits(splits_file, restval) if splits_file else {}
    return Source("flickr30k", results, need_dir(images_dir, "images folder"), captions, splits,
                  "karpathy" if splits_file else "hash", bad)
