"""Flickr8k's two layouts (Kaggle's captions.txt, the original Flickr8k.token.txt), and any CSV.

- kaggle:   DATA/captions.txt (CSV `image,caption` with a header, quoted commas) and DATA/Images/.
- original: Flickr8k.token.txt (`IMAGE.jpg#N<TAB>caption`) in DATA or DATA/Flickr8k_text/, with
            images in Flicker8k_Dataset/, Flickr8k_Dataset/ or Images/ beside it (or --images).
- generic:  any CSV with a header naming an image column (`image`, `file`, `filename` or `path`)
            and a `caption` column, optionally a `split` column; images under --images.

Official Flickr8k split files (Flickr_8k.{train,dev,test}Images.txt) are used whenever they are
found next to the captions (dev becomes val).
"""

from __future__ import annotations

from pathlib import Path

from tfcap.datasets.source import Captions, Source, first_dir, image_id, need_dir
from tfcap.datasets.splits import SPLITS
from tfcap.errors import TfcapError
from tfcap.reading import bad_line, clip, csv_file_rows, excerpt, numbered_lines, read_text

OFFICIAL_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
KAGGLE_FILE = "captions.txt"
TOKEN_FILE = "Flickr8k.token.txt"
ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
IMAGE_COLUMNS = ("image", "file", "filename", "path")


def read_csv(path: Path, skip_bad_lines: bool) -> tuple[Captions, dict[str, str], list[str]]:
    captions = Captions()
    splits: dict[str, str] = {}
    bad: list[str] = []
    rows = csv_file_rows(path)
    _, _, header = next(rows, (1, 1, []))
    header = [h.strip().lower() for h in header]
    image_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    if image_col is None or "caption" not in header:
        raise TfcapError(f"{path}:1: header must name an image column ({'/'.join(IMAGE_COLUMNS)}) "
                         f"and a caption column, got {clip(','.join(header)) or 'nothing'}")
    caption_col = header.index("caption")
    split_col = header.index("split") if "split" in header else None
    for start, end, row in rows:
        where = f"{path}:{start}"
        if not any(cell.strip() for cell in row):
            continue
        if any("\n" in cell or "\r" in cell for cell in row):  # no caption spans lines
            bad_line(where, f"unclosed quote: the field runs on to line {end}", skip_bad_lines, bad)
            continue
        if len(row) != len(header):
            bad_line(where, f"expected {len(header)} fields, got {len(row)}", skip_bad_lines, bad)
            continue
        image, caption = row[image_col].strip(), row[caption_col].strip()
        if not image or not caption:
            bad_line(where, "empty image or caption", skip_bad_lines, bad)
            continue
        if split_col is not None:
            split = row[split_col].strip().lower().replace("dev", "val")
            if split not in SPLITS:
                bad_line(where, f"split must be one of {', '.join(SPLITS)}, got {excerpt(split, 40)}",
                         skip_bad_lines, bad)
                continue
            splits[image_id(image)] = split
        captions.add(image, caption)
    return captions, splits, bad


def read_token_file(path: Path, skip_bad_lines: bool) -> tuple[Captions, list[str]]:
    captions = Captions()
    bad: list[str] = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_, index = key.rpartition("#")
        if not tab or not hash_ or not image or not index.strip().isdigit() or not caption.strip():
            bad_line(f"{path}:{number}", "expected IMAGE#N<TAB>caption", skip_bad_lines, bad)
            continue
        captions.add(image.strip(), caption.strip())
    return captions, bad


def _read_official_splits(folder: Path) -> dict[str, str] | None:
    files = {split: folder / name for split, name in OFFICIAL_SPLIT_FILES.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    splits: dict[str, str] = {}
    for split, f in files.items():
        for name in read_text(f).split():
            splits.setdefault(image_id(name), split)
    return splits


def find_official_splits(*folders: Path) -> dict[str, str] | None:
    for folder in folders:
        found = _read_official_splits(folder)
        if found is not None:
            return found
    return None


def read_generic(captions_file: Path, images_dir: Path, skip_bad_lines: bool) -> Source:
    if not captions_file.is_file():
        raise TfcapError(f"captions file {captions_file} does not exist")
    captions, splits, bad = read_csv(captions_file, skip_bad_lines)
    source_splits, how = (splits, "column") if splits else (None, "hash")
    official = find_official_splits(captions_file.parent) if not splits else None
    if official is not None:
        source_splits, how = official, "official"
    return Source("generic", captions_file, need_dir(images_dir, "images folder"), captions,
                  source_splits or {}, how, bad)


def read_kaggle(data: Path, images_dir: Path | None, skip_bad_lines: bool) -> Source:
    kaggle = data / KAGGLE_FILE
    images = images_dir or data / "Images"
    captions, splits, bad = read_csv(kaggle, skip_bad_lines)
    official = find_official_splits(data, data / "Flickr8k_text")
    return Source("kaggle", kaggle, need_dir(images, "images folder"), captions, official or splits,
                  "official" if official else ("column" if splits else "hash"), bad)


def token_dirs(data: Path) -> list[Path]:
    return [d for d in (data, data / "Flickr8k_text") if (d / TOKEN_FILE).is_file()]


def read_original(text_dir: Path, images_dir: Path | None, skip_bad_lines: bool) -> Source:
    if images_dir is None:
        images_dir = first_dir([base / name for base in (text_dir, text_dir.parent) for name in ORIGINAL_IMAGE_DIRS],
                               "image folder", "pass --images DIR")
    captions, bad = read_token_file(text_dir / TOKEN_FILE, skip_bad_lines)
    official = find_official_splits(text_dir)
    return Source("original", text_dir / TOKEN_FILE, need_dir(images_dir, "images folder"), captions,
                  official or {}, "official" if official else "hash", bad)


EXPERT_FILE = "ExpertAnnotations.txt"


def read_expert_judgments(data: Path, *, keep_own: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """Flickr8k-Expert (Hodosh et al. 2013): (image, caption, the three experts' judgments 1-4) of
    each judged pair, from ExpertAnnotations.txt and Flickr8k.token.txt in DATA or DATA/Flickr8k_text/.

    Without `keep_own`, pairs whose caption is one of the image's own are left out, as the
    reference-free metric literature does (CLIPScore: 5,664 of the 5,822 pairs remain).
    """
    folders = [d for d in token_dirs(Path(data)) if (d / EXPERT_FILE).is_file()]
    if not folders:
        raise TfcapError(f"{data}: no {EXPERT_FILE} beside a {TOKEN_FILE} (in it or in its Flickr8k_text/)")
    folder = folders[0]
    captions = {}
    for number, line in numbered_lines(folder / TOKEN_FILE):
        key, tab, caption = line.partition("\t")
        if tab:
            captions[key.strip()] = caption.strip()
    pairs = []
    for number, line in numbered_lines(folder / EXPERT_FILE):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5 or fields[1] not in captions or not all(f.strip() in ("1", "2", "3", "4") for f in fields[2:]):
            raise TfcapError(f"{folder / EXPERT_FILE}:{number}: expected IMAGE<TAB>IMAGE#N<TAB>three judgments 1-4")
        image, caption_id = fields[0].strip(), fields[1]
        if keep_own or caption_id.rpartition("#")[0] != image:
            pairs.append((image, captions[caption_id], tuple(int(f) for f in fields[2:])))
    return pairs
