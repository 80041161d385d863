"""A dataset as read from disk: its captions by image, fixed splits, and defects found.

Image ids are paths relative to the images folder, normalized once when read (`image_id`), so
`./2-café.jpg` and `2-café.jpg`, or `café` spelled in NFC and in NFD, are one image with one
record. Its captions are merged.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path

from tfcap.errors import TfcapError

_SEPARATOR = "\x1f"  # ASCII unit separator: between the captions of one image in `Captions`


def image_id(name: str) -> str:
    """The id of an image named `name` in a captions file: NFC, no `./`, `//` or `a/../`.

    ASCII names without dots after a slash are returned as they are: the common case, and cheap.
    """
    if name.isascii() and "//" not in name and "/." not in name and not name.startswith("./"):
        return name
    return posixpath.normpath(unicodedata.normalize("NFC", name))


class Captions(Mapping):
    """The captions of each image in first-seen order: image id -> list of caption strings.

    Held as one string per image (its captions joined by U+001F), a third of the memory of a list
    of strings: at COCO scale (123,287 images) this table is most of build-records' footprint.
    Rows naming one image by several spellings (`./a.jpg`, `a.jpg`; NFC, NFD) are merged, and a
    caption such a row repeats from another spelling is dropped and counted in `duplicates`.
    The same caption twice under the same spelling is kept: Flickr8k's annotators wrote 10
    captions twice for one image, and its two layouts must agree.
    """

    def __init__(self) -> None:
        self._joined: dict[str, str] = {}
        self._spelling: dict[str, str] = {}  # id -> its first spelling, where that is not the id
        self._by_spelling: dict[str, dict[str, set[str]]] = {}  # id -> spelling -> captions, for ids with several
        self.duplicates = 0
        self.total = 0

    def add(self, name: str, caption: str) -> None:
        """Add `caption` to the image named `name` (a spelling of its id)."""
        caption = caption.replace(_SEPARATOR, " ")
        if not caption.isascii():  # a lone surrogate (JSON's "\ud83d") has no UTF-8: "?" for it
            caption = caption.encode("utf-8", "replace").decode("utf-8")
        key = image_id(name)
        joined = self._joined.get(key)
        if joined is None:
            self._joined[key] = caption
            if name != key:
                self._spelling[key] = name
            self.total += 1
            return
        spellings = self._by_spelling.get(key)
        if spellings is None:
            first = self._spelling.get(key, key)
            if name == first:
                self._joined[key] = joined + _SEPARATOR + caption
                self.total += 1
                return
            spellings = self._by_spelling[key] = {first: set(joined.split(_SEPARATOR))}
        if any(caption in captions for spelling, captions in spellings.items() if spelling != name):
            self.duplicates += 1
            return
        spellings.setdefault(name, set()).add(caption)
        self._joined[key] = joined + _SEPARATOR + caption
        self.total += 1

    def count(self, image: str) -> int:
        return self._joined[image].count(_SEPARATOR) + 1

    def __getitem__(self, image: str) -> list[str]:
        return self._joined[image].split(_SEPARATOR)

    def __contains__(self, image: object) -> bool:
        return image in self._joined

    def __iter__(self) -> Iterator[str]:
        return iter(self._joined)

    def __len__(self) -> int:
        return len(self._joined)


@dataclasses.dataclass
class Source:
    """Captions of a dataset, grouped by image, in first-seen order."""

    layout: str  # kaggle | original | generic | flickr30k | coco | karpathy
    captions_file: Path
    images_dir: Path
    captions: Mapping[str, list[str]]  # image id (path relative to images_dir) -> its captions
    splits: dict[str, str]  # image id -> split, for images whose split the data fixes
    split_source: str  # "official", "column", "karpathy", "files" (COCO: val/test by hash) or "hash"
    bad_lines: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason", skipped
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> file name on disk, where they differ

    @property
    def duplicate_captions(self) -> int:
        return getattr(self.captions, "duplicates", 0)

    def path(self, image_id: str) -> str:
        # A string, not a Path: pathlib parses each id again (0.25 s for Flickr8k's 8,091 images).
        return os.path.join(self.images_dir, self.renamed.get(image_id, image_id))

    def find_renamed(self, image_ids: list[str]) -> list[str]:
        """Of these ids, whose files are not found by their name, those found in another Unicode
        normal form (a file saved in NFD, as macOS does, named in NFC by the captions); later
        `path` calls give the file's real name. Returns the ids found."""
        listings: dict[str, dict[str, str]] = {}
        found = []
        for i in image_ids:
            if i.isascii():
                continue
            folder, name = posixpath.split(i)
            if folder not in listings:
                try:
                    names = os.listdir(os.path.join(self.images_dir, folder))
                except OSError:
                    names = []
                listings[folder] = {unicodedata.normalize("NFC", n): n for n in names if not n.isascii()}
            actual = listings[folder].get(unicodedata.normalize("NFC", name))
            if actual is not None and actual != name:
                self.renamed[i] = posixpath.join(folder, actual)
                found.append(i)
        return found


def need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise TfcapError(f"{what} {path} is not a directory")
    return path


def first_dir(candidates: list[Path], what: str, hint: str) -> Path:
    """The first of `candidates` that is a directory, or an error naming them all."""
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise TfcapError(f"no {what} ({', '.join(str(c) for c in candidates)}); {hint}")
    return found
