"""Shared fixtures: small captioned datasets generated on the fly, in each layout tfcap reads."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small vocabulary of captions; every word appears often enough to pass --min-count 1.
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def make_image_bytes(seed: int, fmt: str = "JPEG", size=(40, 32), mode: str = "RGB") -> bytes:
    """A small random image encoded as `fmt`, deterministic in `seed`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def captions_for(index: int) -> list[str]:
    """Five captions per image; punctuation, case and a comma to exercise normalization and CSV quoting."""
    color, shape = COLORS[index % len(COLORS)], SHAPES[index % len(SHAPES)]
    return [f"A {color} {shape}.", f"The {shape} is {color}!", f"{color.title()}, bright {shape}",
            f"one {color} {shape} here", f"a small {color} {shape}"]


def write_images(folder: Path, count: int, formats=("JPEG", "PNG", "GIF", "BMP", "WEBP")) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        fmt = formats[i % len(formats)]
        name = f"img{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        (folder / name).write_bytes(make_image_bytes(i, fmt))
        names.append(name)
    return names


@pytest.fixture
def kaggle_dataset(tmp_path: Path) -> Path:
    """Kaggle layout: captions.txt (CSV with quoted commas) and Images/, 20 images of 5 formats."""
    root = tmp_path / "kaggle"
    names = write_images(root / "Images", 20)
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(names):
            for caption in captions_for(i):
                writer.writerow([name, caption])
    return root


@pytest.fixture
def original_dataset(tmp_path: Path) -> Path:
    """Original Flickr8k layout: Flickr8k.token.txt, official split files, Flicker8k_Dataset/."""
    root = tmp_path / "original"
    names = write_images(root / "Flicker8k_Dataset", 12, formats=("JPEG",))
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = [f"{name}#{k}\t{c}" for i, name in enumerate(names) for k, c in enumerate(captions_for(i))]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:8]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[8:10]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(names[10:11]) + "\n")  # names[11]: no split
    return root


def flickr8k() -> Path | None:
    value = os.environ.get("TFCAP_FLICKR8K")
    return Path(value) if value else None


needs_flickr8k = pytest.mark.skipif(not os.environ.get("TFCAP_FLICKR8K"), reason="TFCAP_FLICKR8K is not set")


@pytest.fixture(autouse=True, scope="session")
def _session_cache_home(tmp_path_factory):
    """Shard verification stamps (`records.verify_shards`) of the tests go to a folder of this
    session's, not to the user's ~/.cache; subprocesses inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
