"""Captioned-image datasets on disk: their layouts, detected automatically, and train/val/test splits.

| layout    | module      | detected by                                                        |
|-----------|-------------|--------------------------------------------------------------------|
| kaggle    | flickr8k    | DATA/captions.txt (CSV image,caption) and DATA/Images/             |
| original  | flickr8k    | Flickr8k.token.txt in DATA or DATA/Flickr8k_text/                  |
| flickr30k | flickr30k   | results.csv (`|`-separated) in DATA or DATA/flickr30k_images/      |
| coco      | coco        | annotations/captions_{train,val}{2014,2017}.json in DATA           |
| karpathy  | karpathy    | DATA is a dataset_*.json, or a folder holding one                  |
| generic   | flickr8k    | --captions FILE.csv --images DIR                                   |

Every layout yields a `Source`: captions by image id (normalized, duplicates merged: `source`),
the splits the data fixes, and the lines skipped. Images are otherwise split deterministically by
a seeded hash of their id, never by caption (`splits`).
"""

from __future__ import annotations

from pathlib import Path

from tfcap.datasets import coco, flickr8k, flickr30k, karpathy
from tfcap.datasets.source import Captions, Source, image_id
from tfcap.datasets.splits import SPLITS, SplitConfig, assign_splits
from tfcap.errors import TfcapError

LAYOUTS = ("auto", "kaggle", "original", "flickr30k", "coco", "karpathy", "generic")

__all__ = ["LAYOUTS", "SPLITS", "Captions", "Source", "SplitConfig", "assign_splits", "image_id", "read_source"]


def read_source(data: Path | None, *, captions_file: Path | None = None, images_dir: Path | None = None,
                layout: str = "auto", skip_bad_lines: bool = False, restval: bool = True) -> Source:
    """Detect the layout of `data` (or use `layout`) and read its captions and fixed splits.

    `restval`: Karpathy's restval images go to train (else they are in no split).
    """
    if layout not in LAYOUTS:
        raise TfcapError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if data is not None and not Path(data).exists():
        raise TfcapError(f"{data} does not exist")
    data = Path(data) if data is not None else None
    images_dir = Path(images_dir) if images_dir is not None else None
    if captions_file is not None or layout == "generic":
        if captions_file is None or images_dir is None:
            raise TfcapError("the generic layout needs --captions FILE.csv and --images DIR")
        return flickr8k.read_generic(Path(captions_file), images_dir, skip_bad_lines)
    if data is None:
        raise TfcapError("give a dataset folder DATA, or --captions FILE.csv --images DIR")
    if data.is_file():
        if layout in ("auto", "karpathy") and data.suffix == ".json":
            return karpathy.read(data, images_dir, skip_bad_lines, restval)
        raise TfcapError(f"{data} is a file; for a captions CSV use --captions {data} --images DIR")

    if layout in ("auto", "kaggle") and (data / flickr8k.KAGGLE_FILE).is_file():
        return flickr8k.read_kaggle(data, images_dir, skip_bad_lines)
    if layout in ("auto", "original") and flickr8k.token_dirs(data):
        return flickr8k.read_original(flickr8k.token_dirs(data)[0], images_dir, skip_bad_lines)
    if layout in ("auto", "flickr30k") and flickr30k.find(data):
        return flickr30k.read(flickr30k.find(data), images_dir, skip_bad_lines, restval)
    if layout in ("auto", "coco") and coco.annotation_files(data):
        return coco.read(data, images_dir, skip_bad_lines, restval)
    if layout in ("auto", "karpathy") and karpathy.find(data):
        return karpathy.read(karpathy.find(data), images_dir, skip_bad_lines, restval)
    looks_for = {"kaggle": f"kaggle: {flickr8k.KAGGLE_FILE} and Images/ in DATA",
                 "original": f"original: {flickr8k.TOKEN_FILE} in DATA or DATA/Flickr8k_text/",
                 "flickr30k": "flickr30k: results.csv in DATA", "coco": "coco: annotations/captions_*.json",
                 "karpathy": "karpathy: dataset_*.json"}
    tried = list(looks_for) if layout == "auto" else [layout]
    raise TfcapError(f"{data}: {'no known layout matches' if layout == 'auto' else f'not the {layout} layout'} ("
                     f"{'; '.join(looks_for[t] for t in tried if t in looks_for)}); "
                     "for another captions CSV use --captions FILE.csv --images DIR")
