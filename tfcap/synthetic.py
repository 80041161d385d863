"""Synthetic captioned scenes: coloured shapes on a dark background, drawn with NumPy.

`tfcap demo` trains on these offline. A scene is one group of identical shapes ("three small
yellow squares") or two groups and a spatial relation ("two red circles above a blue square").
Every image gets up to four reference captions that are faithful paraphrases (the other group
order with the inverse relation, "little"/"big" for "small"/"large", "one" for "a"), so
multi-reference BLEU is meaningful while the language (~24 words) stays regular enough for a
small LSTM. The best single caption for every image scores about 0.1 BLEU-4 on held-out scenes.

Scenes are made to be unambiguous: shapes never overlap or touch (a gap of a few pixels, so
each is one connected component), the two groups of a pair have different colours and lie in
opposite halves of the image with a gap between them, and colours are saturated, flat and
unlike the grey background. Everything is deterministic in (seed, image index).

Written in the generic layout that `tfcap build-records --captions OUT/captions.csv --images
OUT/images` reads: OUT/images/scene00000.png ... and OUT/captions.csv (`image,caption,split`).
Held-out images for `tfcap caption-dir` are the same config with another seed, written without
captions.

What a frozen encoder can tell apart (linear probes and a small LSTM on 3000 64-px scenes):
colour, size and count survive global pooling of any conv features; shape needs pretrained
features (ImageNet MobileNet-0.25 fed 128 px: ~1.0, He-initialized random conv: ~0.45); which
group is above needs a spatial grid (2x2 pooling) rather than one global average.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcap.errors import TfcapError
from tfcap.outputs import atomic_directory

# Saturated and far apart in RGB, and none grey, so no shape can be mistaken for background.
COLORS = {"red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 80, 240), "yellow": (245, 225, 30),
          "white": (245, 245, 245), "purple": (160, 50, 220), "orange": (250, 140, 20), "cyan": (30, 220, 230)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
PLURALS = {"cross": "crosses"}
SIZES = {"small": 0.15, "large": 0.26}  # box side as a fraction of the image side (ratio ~1.75)
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}  # first is canonical
NUMBERS = {1: "one", 2: "two", 3: "three"}
# Canonical relation of a pair (first group to second) -> its inverse, used for the other order.
RELATIONS = {"above": "below", "left of": "right of", "and": "and"}
_BACKGROUND = (20, 60)  # range of the grey background level; far below every colour's brightest channel


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """What scenes are drawn and how they are split. Same config, same bytes."""

    images: int = 3000
    size: int = 64  # image side in pixels
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    sizes: tuple[str, ...] = ("small", "large")  # with one size, captions leave size out
    counts: tuple[int, ...] = (1, 2, 3)
    relations: tuple[str, ...] = ("above", "left of")  # of pairs; "and" places the groups anywhere apart
    pair_fraction: float = 0.5  # share of scenes with two groups
    captions_per_image: int = 4  # at most; single-group scenes have fewer distinct paraphrases
    noise: float = 6.0  # std of the background's per-pixel noise, in 0-255 units

    def check(self) -> None:
        unknown = ([c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
                   + [s for s in self.sizes if s not in SIZES] + [n for n in self.counts if n not in NUMBERS]
                   + [r for r in self.relations if r not in RELATIONS])
        if unknown:
            raise TfcapError(f"unknown scene settings: {', '.join(map(str, unknown))}")
        if not (self.colors and self.shapes and self.sizes and self.counts) or self.images < 1:
            raise TfcapError("scenes need at least one image, colour, shape, size and count")
        if self.pair_fraction > 0 and (len(self.colors) < 2 or not self.relations):
            raise TfcapError("pairs need two colours and a relation (or set pair_fraction=0)")
        if self.size < 32:
            raise TfcapError("scenes need images of at least 32 pixels")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise TfcapError("val and test fractions must be >= 0 and sum to less than 1")


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` identical shapes: what one phrase of a caption names."""

    count: int
    color: str
    shape: str
    size: str


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape: its group, centre (row, column) and half side, in pixels."""

    group: int
    y: float
    x: float
    r: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything drawn in one image; `relation` says where groups[0] is relative to groups[1]."""

    index: int
    groups: tuple[Group, ...]
    relation: str | None
    shapes: tuple[Shape, ...]
    background: int  # grey level


def _phrase(group: Group, article: str, with_size: bool, synonym: int) -> str:
    number = article if group.count == 1 else NUMBERS[group.count]
    noun = group.shape if group.count == 1 else PLURALS.get(group.shape, group.shape + "s")
    return " ".join([number] + ([SIZE_WORDS[group.size][synonym]] if with_size else []) + [group.color, noun])


def captions(scene: Scene, config: SceneConfig) -> list[str]:
    """Distinct reference captions of a scene, at most `config.captions_per_image`.

    Paraphrases, most canonical first: for a pair, both group orders (the second with the inverse
    relation); then "little"/"big" for "small"/"large"; then "one" for "a". Each differs in words
    that carry content, so no fixed phrase ("there is ...") helps a caption that ignores the image.
    """
    with_size = len(config.sizes) > 1
    found: list[str] = []
    for article in ("a", "one"):
        for synonym in (0, 1) if with_size else (0,):
            phrases = [_phrase(g, article, with_size, synonym) for g in scene.groups]
            if scene.relation is None:
                variants = phrases
            else:
                variants = [f"{phrases[0]} {scene.relation} {phrases[1]}",
                            f"{phrases[1]} {RELATIONS[scene.relation]} {phrases[0]}"]
            found += [v for v in variants if v not in found]
    return found[: config.captions_per_image]


def _place_band(rng: np.random.Generator, count: int, r: float, lo: np.ndarray, hi: np.ndarray,
                axis: int, gap: float) -> list[tuple[float, float]]:
    """Centres of `count` boxes of half side r in [lo, hi] (row, col), spread along `axis` in slots."""
    slot = (hi[axis] - lo[axis]) / count
    slack_along = max(0.0, slot / 2 - r - gap / 2)  # neighbours stay `gap` apart
    across = 1 - axis
    centres = []
    for k in range(count):
        c = np.empty(2)
        c[axis] = lo[axis] + slot * (k + 0.5) + rng.uniform(-slack_along, slack_along)
        c[across] = rng.uniform(lo[across] + r, max(lo[across] + r, hi[across] - r))
        centres.append((float(c[0]), float(c[1])))
    return centres


def _place_free(rng: np.random.Generator, count: int, r: float, size: int, gap: float) -> list[tuple[float, float]]:
    """Centres of `count` boxes anywhere in the image, apart by `gap`; falls back to a row."""
    for _ in range(100):
        centres = rng.uniform(r + 1, size - r - 1, size=(count, 2))
        apart = all(np.max(np.abs(centres[i] - centres[j])) >= 2 * r + gap
                    for i in range(count) for j in range(i))
        if apart:
            return [(float(y), float(x)) for y, x in centres]
    axis = int(rng.integers(2))
    return _place_band(rng, count, r, np.array([1.0, 1.0]), np.array([size - 1.0, size - 1.0]), axis, gap)


def sample_scene(config: SceneConfig, index: int) -> Scene:
    """The scene of image `index`, drawn from its own generator so images are independent of each other."""
    rng = np.random.default_rng([config.seed, index])
    size = config.size
    gap = max(3.0, 0.05 * size)

    def pick(options):
        return options[rng.integers(len(options))]

    def group(exclude_color: str | None = None) -> Group:
        colors = [c for c in config.colors if c != exclude_color]
        return Group(pick(config.counts), pick(colors), pick(config.shapes), pick(config.sizes))

    def half_side(g: Group) -> float:
        return SIZES[g.size] * size / 2 * rng.uniform(0.94, 1.06)  # jitter stays far from the other size

    shapes: list[Shape] = []
    if rng.random() >= config.pair_fraction:
        groups, relation = (group(),), None
        r = half_side(groups[0])
        shapes += [Shape(0, y, x, r) for y, x in _place_free(rng, groups[0].count, r, size, gap)]
    else:
        first = group()
        groups, relation = (first, group(exclude_color=first.color)), pick(config.relations)
        # "above": first group in the top half; "left of": left half; "and": either, either way round.
        axis = {"above": 0, "left of": 1}.get(relation, int(rng.integers(2)))
        order = (0, 1) if relation != "and" or rng.random() < 0.5 else (1, 0)
        mid = size / 2
        for band, g in enumerate(order):
            lo, hi = np.array([1.0, 1.0]), np.array([size - 1.0, size - 1.0])
            if band == 0:
                hi[axis] = mid - gap / 2
            else:
                lo[axis] = mid + gap / 2
            r = half_side(groups[g])
            shapes += [Shape(g, y, x, r) for y, x in _place_band(rng, groups[g].count, r, lo, hi, 1 - axis, gap)]
    background = int(rng.integers(*_BACKGROUND))
    return Scene(index, groups, relation, tuple(shapes), background)


def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels of `shape` with offsets (dy, dx) from its centre, inside the box of half side r."""
    ay, ax = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (ay <= r * 0.85) & (ax <= r * 0.85)  # a bit smaller, so its area is near the circle's
    if shape == "triangle":  # pointing up, base on the box's bottom edge
        return (dy <= r) & (ax <= (dy + r) / 2)
    if shape == "diamond":
        return ay + ax <= r
    if shape == "cross":
        return ((ay <= r * 0.33) | (ax <= r * 0.33)) & (ay <= r) & (ax <= r)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    if shape == "star":  # five points, one up
        angle = np.arctan2(dx, -dy)
        radius = r * (0.5 + 0.5 * np.abs(np.cos(angle * 2.5)) ** 3)
        return dy**2 + dx**2 <= radius**2
    raise TfcapError(f"unknown shape {shape!r}")


def render(scene: Scene, config: SceneConfig) -> np.ndarray:
    """The image of a scene: uint8 [size, size, 3]."""
    rng = np.random.default_rng([config.seed, scene.index, 1])
    size = config.size
    grey = np.full((size, size), np.float32(scene.background))
    if config.noise:
        grey += np.float32(config.noise) * rng.standard_normal((size, size), dtype=np.float32)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = np.clip(grey, 0, 255).astype(np.uint8)[..., None]  # grey: r == g == b
    for s in scene.shapes:
        group = scene.groups[s.group]
        # Only the shape's box: pixels whose centres (row + 0.5, col + 0.5) can be inside it.
        y0, x0 = max(0, int(s.y - s.r - 1)), max(0, int(s.x - s.r - 1))
        y1, x1 = min(size, int(s.y + s.r + 2)), min(size, int(s.x + s.r + 2))
        dy, dx = np.arange(y0, y1)[:, None] + 0.5 - s.y, np.arange(x0, x1)[None, :] + 0.5 - s.x
        image[y0:y1, x0:x1][shape_mask(group.shape, dy, dx, s.r)] = COLORS[group.color]
    return image


def generate(config: SceneConfig) -> tuple[list[Scene], np.ndarray]:
    """All scenes of a config and their images (uint8 [images, size, size, 3])."""
    config.check()
    scenes = [sample_scene(config, i) for i in range(config.images)]
    return scenes, np.stack([render(s, config) for s in scenes])


def assign_splits(config: SceneConfig) -> list[str]:
    """Split of each image: a seeded permutation, so exact fractions and no dependence on content."""
    order = np.random.default_rng([config.seed, 2]).permutation(config.images)
    n_test, n_val = round(config.images * config.test_fraction), round(config.images * config.val_fraction)
    splits = np.full(config.images, "train", dtype=object)
    splits[order[:n_test]] = "test"
    splits[order[n_test:n_test + n_val]] = "val"
    return splits.tolist()


def image_name(index: int) -> str:
    return f"scene{index:05d}.png"


def _write_pngs(folder: Path, images: np.ndarray) -> list[str]:
    """Encode and write PNGs in parallel through tf.data (PNG encoding is the costly part)."""
    names = [image_name(i) for i in range(len(images))]

    def write(image, path):
        # Level 1: 3x faster than the default, and the noisy background hardly compresses anyway.
        with tf.control_dependencies([tf.io.write_file(path, tf.io.encode_png(image, compression=1))]):
            return tf.identity(path)

    paths = tf.constant([str(folder / n) for n in names])
    for _ in tf.data.Dataset.from_tensor_slices((images, paths)).map(write, tf.data.AUTOTUNE).batch(256):
        pass
    return names


def write_scenes(out: Path, config: SceneConfig = SceneConfig(), *, with_captions: bool = True,
                 overwrite: bool = False) -> dict:
    """Draw the scenes of `config` and write them to the folder `out` (created atomically).

    with_captions: OUT/images/*.png and OUT/captions.csv (`image,caption,split`, one row per
      caption), the generic layout of `tfcap build-records`. Without: only OUT/*.png, for
      `tfcap caption-dir`; the references are in the returned summary alone.
    Returns:
      a summary: paths, images and captions per split, vocabulary, caption lengths, and
      `references` (image file name -> its captions).
    """
    scenes, pixels = generate(config)
    splits = assign_splits(config)
    references = {image_name(s.index): captions(s, config) for s in scenes}
    out = Path(out)
    with atomic_directory(out, overwrite) as scratch:
        images_dir = scratch / "images" if with_captions else scratch
        images_dir.mkdir(exist_ok=True)
        _write_pngs(images_dir, pixels)
        if with_captions:
            with open(scratch / "captions.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "caption", "split"])
                for (name, refs), split in zip(references.items(), splits):
                    writer.writerows([name, c, split] for c in refs)
    all_captions = [c for refs in references.values() for c in refs]
    lengths = np.bincount([len(c.split()) for c in all_captions])
    return {
        "out": str(out),
        "images_dir": str(out / "images" if with_captions else out),
        "captions_file": str(out / "captions.csv") if with_captions else None,
        "images": {split: splits.count(split) for split in ("train", "val", "test")} if with_captions
        else {"all": len(scenes)},
        "captions": len(all_captions),
        "pairs": sum(s.relation is not None for s in scenes),
        "vocabulary": sorted({w for c in all_captions for w in c.split()}),
        "caption_lengths": {n: int(k) for n, k in enumerate(lengths) if k},
        "references": references,
    }
