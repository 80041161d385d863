"""Synthetic scenes: determinism, captions that match the pixels, and the build-records round trip."""

from __future__ import annotations

import collections
import csv
import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfcap import datasets, synthetic
from tfcap.cli import main
from tfcap.errors import TfcapError

SMALL = synthetic.SceneConfig(images=40, seed=3)
WORDS = {"a": 1, "one": 1, "two": 2, "three": 3}


def parse(caption: str) -> tuple[list[tuple[int, str | None, str, str]], str | None]:
    """A caption back into [(count, size, colour, shape)] and its relation, by the grammar alone."""
    words, groups, relation = caption.split(), [], None
    while words:
        count = WORDS[words.pop(0)]
        size = next((s for s, names in synthetic.SIZE_WORDS.items() if words[0] in names), None)
        if size:
            words.pop(0)
        color, noun = words.pop(0), words.pop(0)
        shape = noun if count == 1 else next(s for s in synthetic.SHAPES
                                             if synthetic.PLURALS.get(s, s + "s") == noun)
        groups.append((count, size, color, shape))
        if words:
            relation = words.pop(0) + (" " + words.pop(0) if words[0] == "of" else "")
    return groups, relation


def canonical(caption: str) -> tuple:
    """Order-free meaning of a caption: "B below A" is "A above B"."""
    groups, relation = parse(caption)
    inverse = {v: k for k, v in synthetic.RELATIONS.items()}
    if relation in inverse and relation not in synthetic.RELATIONS:
        groups, relation = groups[::-1], inverse[relation]
    if relation == "and":
        groups = sorted(groups)
    return tuple(groups), relation


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (a tiny flood fill: propagate the max label)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        h, w = mask.shape
        neighbours = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.max(neighbours, axis=0), 0)
        if np.array_equal(new, labels):
            return [labels == k for k in np.unique(labels[mask])]
        labels = new


def fill_shape(component: np.ndarray) -> str:
    """Guess circle/square/triangle from how much of its bounding box a component fills."""
    rows, cols = np.nonzero(component)
    fill = component.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = synthetic.write_scenes(tmp_path / "a", SMALL)
    b = synthetic.write_scenes(tmp_path / "b", SMALL)
    synthetic.write_scenes(tmp_path / "c", synthetic.SceneConfig(images=40, seed=4))
    csv_a, csv_b, csv_c = ((tmp_path / x / "captions.csv").read_bytes() for x in "abc")
    assert csv_a == csv_b and a["references"] == b["references"]
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images) == 40 and all(p.suffix == ".png" for p in images)
    assert all(p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes() for p in images)
    assert csv_c != csv_a
    assert sum(p.read_bytes() != (tmp_path / "c" / "images" / p.name).read_bytes() for p in images) >= 38


def test_captions_match_pixels():
    """Parse each image's first caption and check it against the pixels alone: colours, counts, sizes, shapes,
    and the relation; the other captions must mean the same scene."""
    config = synthetic.SceneConfig(images=150, seed=7)
    scenes, pixels = synthetic.generate(config)
    colors = {tuple(v): k for k, v in synthetic.COLORS.items()}
    seen = collections.Counter()
    for scene, image in zip(scenes, pixels):
        refs = synthetic.captions(scene, config)
        assert len(set(canonical(c) for c in refs)) == 1, refs
        groups, relation = parse(refs[0])
        # Every non-grey pixel is one of the named colours; the background is grey.
        grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]) & (image[..., 0] < 128)
        present = {colors[tuple(p)] for p in image[~grey]}
        assert present == {g[2] for g in groups}, refs[0]
        boxes = []
        for count, size, color, shape in groups:
            parts = components(np.all(image == synthetic.COLORS[color], axis=-1))
            assert len(parts) == count, refs[0]
            for part in parts:
                rows, cols = np.nonzero(part)
                extent = max(np.ptp(rows), np.ptp(cols)) + 1
                assert (extent > 0.2 * config.size) == (size == "large"), (refs[0], extent)
                if size == "large":  # small shapes are too few pixels to tell apart by fill
                    assert fill_shape(part) == shape, refs[0]
                seen[shape] += 1
            rows, cols = np.nonzero(np.any(parts, axis=0))
            boxes.append((rows.min(), rows.max(), cols.min(), cols.max()))  # of the whole group
        if relation == "above":
            assert boxes[0][1] + 2 < boxes[1][0], refs[0]  # first group wholly above the second, with a gap
        elif relation == "left of":
            assert boxes[0][3] + 2 < boxes[1][2], refs[0]
    assert set(seen) == set(config.shapes)


def test_scenes_are_unambiguous_and_varied():
    config = synthetic.SceneConfig(images=400, seed=1)
    scenes = [synthetic.sample_scene(config, i) for i in range(config.images)]
    for s in scenes:
        assert len(s.shapes) == sum(g.count for g in s.groups)
        for i, a in enumerate(s.shapes):  # boxes inside the image and apart
            assert a.r <= a.y <= config.size - a.r and a.r <= a.x <= config.size - a.r
            for b in s.shapes[:i]:
                assert max(abs(a.y - b.y), abs(a.x - b.x)) >= a.r + b.r + 3
        if s.relation:
            assert s.groups[0].color != s.groups[1].color
    pairs = [s for s in scenes if s.relation]
    assert 0.4 < len(pairs) / len(scenes) < 0.6
    assert collections.Counter(s.relation for s in pairs).keys() == {"above", "left of"}
    assert len({synthetic.captions(s, config)[0] for s in scenes}) > 250  # not a handful of captions


def test_split_is_exact_and_seeded():
    splits = synthetic.assign_splits(synthetic.SceneConfig(images=1000))
    assert collections.Counter(splits) == {"train": 800, "val": 100, "test": 100}
    assert splits == synthetic.assign_splits(synthetic.SceneConfig(images=1000))
    assert splits != synthetic.assign_splits(synthetic.SceneConfig(images=1000, seed=1))


def test_config_is_checked(tmp_path):
    for bad in (dict(colors=("pink",)), dict(shapes=("hexagon",)), dict(counts=(4,)), dict(size=16),
                dict(val_fraction=0.6, test_fraction=0.5), dict(colors=("red",))):
        with pytest.raises(TfcapError):
            synthetic.write_scenes(tmp_path / "x", synthetic.SceneConfig(images=4, **bad))
    assert not (tmp_path / "x").exists()


def test_one_size_and_all_shapes():
    config = synthetic.SceneConfig(images=60, sizes=("large",), shapes=synthetic.SHAPES, relations=("and",), noise=0)
    scenes, pixels = synthetic.generate(config)
    assert pixels.shape == (60, 64, 64, 3) and pixels.dtype == np.uint8
    assert all(np.sum(np.all(p == s.background, axis=-1)) > 64 * 64 / 2 for s, p in zip(scenes, pixels))
    for s in scenes:
        for c in synthetic.captions(s, config):
            assert not {"large", "big"} & set(c.split())
            assert canonical(c)[1] in (None, "and")


def test_csv_reads_and_build_records_succeeds(tmp_path):
    summary = synthetic.write_scenes(tmp_path / "scenes", SMALL)
    source = datasets.read_source(None, captions_file=summary["captions_file"], images_dir=summary["images_dir"])
    assert source.layout == "generic" and source.split_source == "column"
    assert source.captions == summary["references"]
    assert collections.Counter(source.splits.values()) == summary["images"] == {"train": 32, "val": 4, "test": 4}
    with open(summary["captions_file"], newline="") as f:
        assert sum(1 for _ in csv.reader(f)) == summary["captions"] + 1

    out = tmp_path / "records"
    result = CliRunner().invoke(main, ["build-records", "--captions", summary["captions_file"], "--images",
                                       summary["images_dir"], "-o", str(out), "--min-count", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: manifest["splits"][s]["images"] for s in ("train", "val", "test")} == summary["images"]


def test_images_only_for_caption_dir(tmp_path):
    summary = synthetic.write_scenes(tmp_path / "held", synthetic.SceneConfig(images=10, seed=9, size=96),
                                     with_captions=False)
    files = sorted(p.name for p in (tmp_path / "held").iterdir())
    assert files == sorted(summary["references"]) and summary["captions_file"] is None
    image = tf.io.decode_png((tmp_path / "held" / files[0]).read_bytes())
    assert image.shape == (96, 96, 3)
    with pytest.raises(TfcapError, match="already exists"):
        synthetic.write_scenes(tmp_path / "held", synthetic.SceneConfig(images=10), with_captions=False)


def test_vocabulary_and_caption_lengths():
    """Report the language of the default config (run with -s to see it)."""
    config = synthetic.SceneConfig(images=2000)
    refs = [synthetic.captions(synthetic.sample_scene(config, i), config) for i in range(config.images)]
    words = collections.Counter(w for r in refs for c in r for w in c.split())
    lengths = collections.Counter(len(c.split()) for r in refs for c in r)
    per_image = collections.Counter(len(r) for r in refs)
    print(f"\nvocabulary ({len(words)}): {' '.join(sorted(words))}\ncaption lengths: {sorted(lengths.items())}"
          f"\ncaptions per image: {sorted(per_image.items())}")
    assert 15 <= len(words) <= 40 and min(lengths) >= 3 and max(lengths) <= 12
