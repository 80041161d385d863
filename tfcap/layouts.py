"""Captioned-image datasets on disk: layout detection, caption parsing, and train/val/test splits.

Three layouts are read, detected automatically:

- kaggle:   DATA/captions.txt (CSV `image,caption` with a header, quoted commas) and DATA/Images/.
- original: Flickr8k.token.txt (`IMAGE.jpg#N<TAB>caption`) in DATA or DATA/Flickr8k_text/, with
            images in Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/ beside it (or --images).
- generic:  any CSV with a header naming an image column (`image`, `file`, `filename` or `path`)
            and a `caption` column, optionally a `split` column; images under --images.

Official Flickr8k split files (Flickr_8k.{train,dev,test}Images.txt) are used whenever they are
found next to the captions (dev becomes val); otherwise images are split deterministically by a
seeded hash of their id, never by caption.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from pathlib import Path

from tfcap.errors import TfcapError

SPLITS = ("train", "val", "test")
OFFICIAL_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
TOKEN_FILE = "Flickr8k.token.txt"
ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
IMAGE_COLUMNS = ("image", "file", "filename", "path")


@dataclasses.dataclass
class Source:
    """Captions of a dataset, grouped by image, in first-seen order."""

    layout: str  # kaggle | original | generic
    captions_file: Path
    images_dir: Path
    captions: dict[str, list[str]]  # image id (path relative to images_dir) -> its captions
    splits: dict[str, str]  # image id -> split, for images whose split the data fixes
    split_source: str  # "official" (Flickr8k split files), "column" (CSV split column) or "hash"
    bad_lines: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason", skipped

    def path(self, image_id: str) -> str:
        # A string, not a Path: pathlib parses each id again (0.25 s for Flickr8k's 8,091 images).
        return os.path.join(self.images_dir, image_id)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How images are split when the data does not fix it."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


def _bad_line(where: str, reason: str, skip: bool, bad: list[str]) -> None:
    message = f"{where}: {reason}"
    if not skip:
        raise TfcapError(f"{message} (pass --skip-bad-lines to skip such lines)")
    bad.append(message)


def _read_csv(path: Path, skip_bad_lines: bool) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    bad: list[str] = []
    start = 1  # line where the row being read starts: a quoted field may span lines
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            image_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
            if image_col is None or "caption" not in header:
                raise TfcapError(f"{path}:1: header must name an image column ({'/'.join(IMAGE_COLUMNS)}) "
                                 f"and a caption column, got {','.join(header) or 'nothing'}")
            caption_col = header.index("caption")
            split_col = header.index("split") if "split" in header else None
            start = reader.line_num + 1
            for row in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if any("\n" in cell or "\r" in cell for cell in row):  # no caption spans lines
                    _bad_line(where, f"unclosed quote: the field runs on to line {reader.line_num}",
                              skip_bad_lines, bad)
                    continue
                if len(row) != len(header):
                    _bad_line(where, f"expected {len(header)} fields, got {len(row)}", skip_bad_lines, bad)
                    continue
                image, caption = row[image_col].strip(), row[caption_col].strip()
                if not image or not caption:
                    _bad_line(where, "empty image or caption", skip_bad_lines, bad)
                    continue
                if split_col is not None:
                    split = row[split_col].strip().lower().replace("dev", "val")
                    if split not in SPLITS:
                        _bad_line(where, f"split must be one of {', '.join(SPLITS)}, got {split!r}",
                                  skip_bad_lines, bad)
                        continue
                    splits[image] = split
                captions.setdefault(image, []).append(caption)
    except UnicodeDecodeError as e:
        raise TfcapError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise TfcapError(f"{path}:{start}: malformed CSV: {e}") from None
    return captions, splits, bad


def _read_token_file(path: Path, skip_bad_lines: bool) -> tuple[dict[str, list[str]], list[str]]:
    captions: dict[str, list[str]] = {}
    bad: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TfcapError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_, index = key.rpartition("#")
        if not tab or not hash_ or not image or not index.strip().isdigit() or not caption.strip():
            _bad_line(f"{path}:{number}", "expected IMAGE#N<TAB>caption", skip_bad_lines, bad)
            continue
        captions.setdefault(image.strip(), []).append(caption.strip())
    return captions, bad


def _read_official_splits(folder: Path) -> dict[str, str] | None:
    files = {split: folder / name for split, name in OFFICIAL_SPLIT_FILES.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    splits: dict[str, str] = {}
    for split, f in files.items():
        for name in f.read_text(encoding="utf-8").split():
            splits.setdefault(name, split)
    return splits


def _find_official_splits(*folders: Path) -> dict[str, str] | None:
    for folder in folders:
        found = _read_official_splits(folder)
        if found is not None:
            return found
    return None


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise TfcapError(f"{what} {path} is not a directory")
    return path


def read_source(data: Path | None, *, captions_file: Path | None = None, images_dir: Path | None = None,
                layout: str = "auto", skip_bad_lines: bool = False) -> Source:
    """Detect the layout of `data` (or use `layout`) and read its captions and fixed splits."""
    if data is not None and not Path(data).exists():
        raise TfcapError(f"{data} does not exist")
    data = Path(data) if data is not None else None
    images_dir = Path(images_dir) if images_dir is not None else None
    if captions_file is not None or layout == "generic":
        if captions_file is None or images_dir is None:
            raise TfcapError("the generic layout needs --captions FILE.csv and --images DIR")
        captions_file = Path(captions_file)
        if not captions_file.is_file():
            raise TfcapError(f"captions file {captions_file} does not exist")
        captions, splits, bad = _read_csv(captions_file, skip_bad_lines)
        source_splits, how = (splits, "column") if splits else (None, "hash")
        official = _find_official_splits(captions_file.parent) if not splits else None
        if official is not None:
            source_splits, how = official, "official"
        return Source("generic", captions_file, _need_dir(images_dir, "images folder"), captions,
                      source_splits or {}, how, bad)
    if data is None:
        raise TfcapError("give a dataset folder DATA, or --captions FILE.csv --images DIR")
    if data.is_file():
        raise TfcapError(f"{data} is a file; for a captions CSV use --captions {data} --images DIR")

    kaggle = data / "captions.txt"
    token_dirs = [d for d in (data, data / "Flickr8k_text") if (d / TOKEN_FILE).is_file()]
    if layout in ("auto", "kaggle") and kaggle.is_file():
        images = images_dir or data / "Images"
        captions, splits, bad = _read_csv(kaggle, skip_bad_lines)
        official = _find_official_splits(data, data / "Flickr8k_text")
        return Source("kaggle", kaggle, _need_dir(images, "images folder"), captions, official or splits,
                      "official" if official else ("column" if splits else "hash"), bad)
    if layout in ("auto", "original") and token_dirs:
        text_dir = token_dirs[0]
        if images_dir is None:
            candidates = [base / name for base in (text_dir, text_dir.parent) for name in ORIGINAL_IMAGE_DIRS]
            images_dir = next((c for c in candidates if c.is_dir()), None)
            if images_dir is None:
                raise TfcapError(f"no image folder ({', '.join(ORIGINAL_IMAGE_DIRS)}) next to {text_dir}; "
                                 "pass --images DIR")
        captions, bad = _read_token_file(text_dir / TOKEN_FILE, skip_bad_lines)
        official = _find_official_splits(text_dir)
        return Source("original", text_dir / TOKEN_FILE, _need_dir(images_dir, "images folder"), captions,
                      official or {}, "official" if official else "hash", bad)
    looks_for = {"kaggle": "kaggle: captions.txt and Images/ in DATA",
                 "original": f"original: {TOKEN_FILE} in DATA or DATA/Flickr8k_text/"}
    tried = list(looks_for) if layout == "auto" else [layout]
    raise TfcapError(f"{data}: {'no known layout matches' if layout == 'auto' else f'not the {layout} layout'} ("
                     f"{'; '.join(looks_for[t] for t in tried if t in looks_for)}); "
                     "for another captions CSV use --captions FILE.csv --images DIR")


def _hash_rank(image_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode("utf-8")).digest()


def assign_splits(image_ids: list[str], source: Source, config: SplitConfig) -> tuple[dict[str, str], list[str]]:
    """Split images into train/val/test.

    Returns (image id -> split, ids in no split). With fixed splits (official files or a CSV
    column) images the data leaves out stay out. Otherwise images are ranked by a seeded hash of
    their id, so the split is deterministic, by image, and stable when images are added.
    """
    if source.split_source != "hash":
        assigned = {i: source.splits[i] for i in image_ids if i in source.splits}
        return assigned, [i for i in image_ids if i not in source.splits]
    if not (0 <= config.val_fraction < 1 and 0 <= config.test_fraction < 1
            and config.val_fraction + config.test_fraction < 1):
        raise TfcapError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    ranked = sorted(image_ids, key=lambda i: _hash_rank(i, config.seed))
    n_test = round(len(ranked) * config.test_fraction)
    n_val = round(len(ranked) * config.val_fraction)
    assigned = {i: "test" for i in ranked[:n_test]}
    assigned.update({i: "val" for i in ranked[n_test:n_test + n_val]})
    assigned.update({i: "train" for i in ranked[n_test + n_val:]})
    return assigned, []
