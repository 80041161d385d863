"""The feature cache: a frozen encoder encodes each image once, training reads the features.

A cache entry is a `tf.data.Dataset.save` snapshot of one split, one element per image:
`image_id` tf.string [], `pooled` tf.float32 [C], `grid` tf.float16 [L, C] (only for the attention
decoder; float16 halves the disk and memory of the largest tensor), `captions` tf.string [(n)],
`caption_ids` tf.int64 ragged [(n), (words)]. It lives in `<cache dir>/<split>-<key>/`, where the
key hashes the records (shard sha256s, vocabulary), the encoder (architecture, alpha, size,
precision, weights fingerprint) and whether the grid is stored. Entries are written to a scratch
name and renamed, so an interrupted build is never mistaken for a cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tensorflow as tf

from tfcap import inputs, records
from tfcap.outputs import atomic_directory
from tfcap.progress import Stopwatch, progress_bar, summary

CACHE_FORMAT = 3  # 2: random-init encoders have calibrated BatchNorm statistics; 3: on smooth images


def default_cache_dir(records_dir: Path) -> Path:
    """Beside the records: `records/` caches in `records.cache/`, leaving the records folder untouched."""
    records_dir = Path(records_dir).resolve()
    return records_dir.with_name(records_dir.name + ".cache")


def cache_key(records_dir: Path, split: str, encoder, with_grid: bool) -> str:
    manifest = records.read_manifest(records_dir)
    identity = {"format": CACHE_FORMAT, "split": split, "vocab": manifest["vocab_sha256"],
                "shards": [s["sha256"] for s in manifest["splits"][split]["shards"]],
                "encoder": encoder.feature_key, "grid": with_grid}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _entry(cache_dir: Path, records_dir: Path, split: str, encoder, with_grid: bool) -> Path:
    return Path(cache_dir) / f"{split}-{cache_key(records_dir, split, encoder, with_grid)}"


def find_features(records_dir: Path, split: str, encoder, with_grid: bool, cache_dir: Path | None = None) -> Path | None:
    """An existing cache entry that serves the request (one with the grid also serves pooled-only)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(records_dir)
    for grid in ((True,) if with_grid else (False, True)):
        entry = _entry(cache_dir, records_dir, split, encoder, grid)
        if (entry / "dataset_spec.pb").exists() or any(entry.glob("*.snapshot")):
            return entry
    return None


def build_features(records_dir: Path, split: str, encoder, with_grid: bool, *, cache_dir: Path | None = None,
                   batch_size: int = 32, show_progress: bool = True) -> Path:
    """Encode every image of a split once and save the features; return the cache entry's path.

    The encoder runs with BatchNorm folded (`Encoder.folded`): the same features, sooner.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(records_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = _entry(cache_dir, records_dir, split, encoder, with_grid)
    count = records.read_manifest(records_dir)["splits"][split]["images"]
    clock = Stopwatch()
    encoder = encoder.folded()  # same feature_key: folding changes speed, not features

    def encode(batch):
        grid = encoder(batch["image"])  # [B, h, w, C] float32
        flat = tf.reshape(grid, [tf.shape(grid)[0], -1, encoder.feature_dim])
        out = {"image_id": batch["image_id"], "pooled": encoder.pool(flat),
               "captions": batch["captions"], "caption_ids": batch["caption_ids"]}
        if with_grid:
            out["grid"] = tf.cast(flat, tf.float16)
        return out

    with progress_bar(count, f"encoding {split} images", show_progress) as advance:
        def tick(batch):
            n = tf.shape(batch["image_id"])[0]
            tf.py_function(lambda k: advance(int(k)), [n], [])
            return batch

        encoded = (inputs.image_batches(records_dir, split, encoder.preprocess, batch_size)
                   .map(encode)  # sequential: the encoder itself uses every core
                   .map(tick)
                   .unbatch())
        with atomic_directory(entry, overwrite=True) as scratch:
            encoded.save(str(scratch))
    summary(f"feature cache: {count} {split} images encoded by {encoder.feature_key} in {clock.seconds:.1f} s, "
            f"{clock.rate(count):.1f} images/s -> {entry}")
    return entry


def load_features(entry: Path) -> tf.data.Dataset:
    """The cached elements of one split (see the module docstring)."""
    return records.without_autotuning(tf.data.Dataset.load(str(entry)))


def features_for(records_dir: Path, split: str, encoder, with_grid: bool, *, cache_dir: Path | None = None,
                 batch_size: int = 32, show_progress: bool = True) -> tf.data.Dataset:
    """Cached features of a split, building the cache entry first if there is none."""
    entry = find_features(records_dir, split, encoder, with_grid, cache_dir)
    if entry is None:
        entry = build_features(records_dir, split, encoder, with_grid, cache_dir=cache_dir,
                               batch_size=batch_size, show_progress=show_progress)
    return load_features(entry)
