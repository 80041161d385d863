"""The feature cache: a frozen encoder encodes each image once, training reads the features.

A cache entry is a `tf.data.Dataset.save` snapshot of one split, one element per image:
`image_id` tf.string [], `pooled` tf.float32 [C], `grid` tf.float16 [L, C] (only for the attention
decoder; float16 halves the disk and memory of the largest tensor), `captions` tf.string [(n)],
`caption_ids` tf.int64 ragged [(n), (words)]. It lives in `<cache dir>/<split>-<key>/`, where the
key hashes the records (shard sha256s, vocabulary), the encoder (architecture, alpha, size,
precision, weights fingerprint), whether the grid is stored and whether the images were mirrored
(left-right, for `--augment flip`: a second entry of the train split, its elements in the same
order). Entries are written to a scratch name and renamed, so an interrupted build is never
mistaken for a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import re
import signal
import threading
from pathlib import Path

import tensorflow as tf

from tfcap import inputs, records
from tfcap.errors import TfcapError
from tfcap.outputs import OutputLock, atomic_directory
from tfcap.progress import Stopwatch, progress_bar, summary

CACHE_FORMAT = 3  # 2: random-init encoders have calibrated BatchNorm statistics; 3: on smooth images


def default_cache_dir(records_dir: Path) -> Path:
    """Beside the records: `records/` caches in `records.cache/`, leaving the records folder untouched."""
    records_dir = Path(records_dir).resolve()
    return records_dir.with_name(records_dir.name + ".cache")


def cache_key(records_dir: Path, split: str, encoder, with_grid: bool, mirrored: bool = False) -> str:
    manifest = records.read_manifest(records_dir)
    identity = {"format": CACHE_FORMAT, "split": split, "vocab": manifest["vocab_sha256"],
                "shards": [s["sha256"] for s in manifest["splits"][split]["shards"]],
                "encoder": encoder.feature_key, "grid": with_grid}
    if mirrored:  # only then: the keys of unmirrored entries are those of caches built before mirroring
        identity["mirrored"] = True
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _entry(cache_dir: Path, records_dir: Path, split: str, encoder, with_grid: bool, mirrored: bool = False) -> Path:
    return Path(cache_dir) / f"{split}-{cache_key(records_dir, split, encoder, with_grid, mirrored)}"


def find_features(records_dir: Path, split: str, encoder, with_grid: bool, cache_dir: Path | None = None,
                  mirrored: bool = False) -> Path | None:
    """An existing cache entry that serves the request (one with the grid also serves pooled-only)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(records_dir)
    for grid in ((True,) if with_grid else (False, True)):
        entry = _entry(cache_dir, records_dir, split, encoder, grid, mirrored)
        if (entry / "dataset_spec.pb").exists() or any(entry.glob("*.snapshot")):
            return entry
    return None


def build_features(records_dir: Path, split: str, encoder, with_grid: bool, *, cache_dir: Path | None = None,
                   batch_size: int = 32, show_progress: bool = True, mirrored: bool = False) -> Path:
    """Encode every image of a split once and save the features; return the cache entry's path.

    The encoder runs with BatchNorm folded (`Encoder.folded`): the same features, sooner.
    mirrored: encode each image flipped left-right (the features of `--augment flip`).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(records_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = _entry(cache_dir, records_dir, split, encoder, with_grid, mirrored)
    count = records.read_manifest(records_dir)["splits"][split]["images"]
    clock = Stopwatch()
    encoder = encoder.folded()  # same feature_key: folding changes speed, not features

    def encode(batch):
        image = tf.image.flip_left_right(batch["image"]) if mirrored else batch["image"]  # [B, S, S, 3]
        grid = encoder(image)  # [B, h, w, C] float32
        flat = tf.reshape(grid, [tf.shape(grid)[0], -1, encoder.feature_dim])
        out = {"image_id": batch["image_id"], "pooled": encoder.pool(flat),
               "captions": batch["captions"], "caption_ids": batch["caption_ids"]}
        if with_grid:
            out["grid"] = tf.cast(flat, tf.float16)
        return out

    encoded = (inputs.image_batches(records_dir, split, encoder.preprocess, batch_size)
               .map(encode))  # sequential: the encoder itself uses every core
    what = f"{split} images" + (" (mirrored)" if mirrored else "")
    with (progress_bar(count, f"encoding {what}", show_progress) as advance, _sigterm_as_exit(),
          atomic_directory(entry, overwrite=True) as scratch):
        try:
            _save_batches(encoded, scratch, advance)
        except tf.errors.OpError as e:
            raise TfcapError(f"encoding the {what} of {records_dir} failed: {_op_error_text(e)}") from None
    summary(f"feature cache: {count} {what} encoded by {encoder.feature_key} in {clock.seconds:.1f} s, "
            f"{clock.rate(count):.1f} images/s -> {entry}")
    return entry


def _op_error_text(error: tf.errors.OpError) -> str:
    """The cause in a tf.data error's first line, without the function and iterator names around it."""
    text = re.sub(r"^\{\{.*?\}\}\s*", "", (error.message or str(error)).strip().splitlines()[0])
    return text.rsplit("Iterator::", 1)[-1].split(": ", 1)[-1] if "Iterator::" in text else text


def _save_batches(batches: tf.data.Dataset, path: Path, advance) -> None:
    """`Dataset.save` of the elements of `batches` (unbatched) into `path`, batches pulled here.

    `Dataset.save` is one C++ call: it deadlocks when its input fails (tensorflow#61736), and
    while it runs the main thread handles no signal, so Ctrl-C and SIGTERM wait for its end. So
    this (main) thread iterates the pipeline, where errors and signals arrive between batches,
    and hands each batch over a queue to `save` in a worker thread; an exception here ends the
    worker's input, lets `save` return, and propagates (the caller removes the partial entry).
    """
    handoff, end, failed = queue.Queue(maxsize=2), object(), []

    def handed_over():
        while (batch := handoff.get()) is not end:
            yield batch

    def save():
        try:
            tf.data.Dataset.from_generator(handed_over, output_signature=batches.element_spec).unbatch().save(str(path))
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            failed.append(e)

    worker = threading.Thread(target=save, name="feature-cache-save", daemon=True)

    def hand_over(item) -> bool:
        while worker.is_alive():
            with contextlib.suppress(queue.Full):
                handoff.put(item, timeout=0.2)  # a timeout, so that signals are handled meanwhile
                return True
        return False  # save failed

    worker.start()
    try:
        for batch in batches:
            if not hand_over(batch):
                break
            advance(int(tf.shape(batch["image_id"])[0]))
    finally:
        hand_over(end)
        worker.join()
    if failed:
        raise failed[0]


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit (exit code 143) in the main thread for the block, so that
    `finally` and `except` clauses clean up (Python's default is to die on the spot)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_features(entry: Path) -> tf.data.Dataset:
    """The cached elements of one split (see the module docstring)."""
    return records.without_autotuning(tf.data.Dataset.load(str(entry)))


def features_for(records_dir: Path, split: str, encoder, with_grid: bool, *, cache_dir: Path | None = None,
                 batch_size: int = 32, show_progress: bool = True, mirrored: bool = False) -> tf.data.Dataset:
    """Cached features of a split (of its images flipped left-right if `mirrored`), building the
    cache entry first if there is none.

    The shards are verified first (`records.verify_shards`): the cache key holds the manifest's
    sha256 of each shard, which then are those of the bytes on disk.
    """
    records.verify_shards(records_dir, split)
    entry = find_features(records_dir, split, encoder, with_grid, cache_dir, mirrored)
    if entry is None:
        # One builder at a time (the workers of a multi-worker cluster, two runs on the same records):
        # the others wait for its entry instead of encoding the same images into the same scratch
        # directory. The lock dies with its process, so a builder that is killed hands over to the next.
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(records_dir)
        with OutputLock(cache_dir / split, on_busy=lambda pid: summary(
                f"feature cache: waiting for tfcap process {pid} to encode the {split} images")):
            entry = find_features(records_dir, split, encoder, with_grid, cache_dir, mirrored)  # built meanwhile?
            if entry is None:
                entry = build_features(records_dir, split, encoder, with_grid, cache_dir=cache_dir,
                                       batch_size=batch_size, show_progress=show_progress, mirrored=mirrored)
    return load_features(entry)
