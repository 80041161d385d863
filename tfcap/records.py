"""Sharded TFRecords of captioned images: the builder behind `tfcap build-records`, and the reader.

One `tf.train.Example` per image (never per caption):

| feature          | type          | content                                               |
|------------------|---------------|-------------------------------------------------------|
| image/encoded    | bytes         | the file's bytes exactly as read (JPEG/PNG/GIF/BMP/WebP) |
| image/format     | bytes         | jpeg, png, gif, bmp or webp                           |
| image/id         | bytes         | path relative to the images folder (the file name)     |
| image/height     | int64         | pixels                                                |
| image/width      | int64         | pixels                                                |
| caption/text     | bytes list    | the original captions, unnormalized (references)      |
| caption/ids      | int64 list    | all captions' word ids, concatenated (no start/end)   |
| caption/length   | int64 list    | word count of each caption (row lengths of the above) |

Shards are `{split}-{i:05d}-of-{n:05d}.tfrecord` (`.tfrecord.gz` with gzip), next to `vocab.txt`
and `manifest.json`, which is written last.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf

import tfcap
from tfcap import images, layouts, text
from tfcap.errors import TfcapError
from tfcap.outputs import atomic_directory
from tfcap.progress import Stopwatch, progress_bar, summary

MANIFEST = "manifest.json"
VOCAB = "vocab.txt"
SCHEMA_VERSION = 1
_BATCH = 256  # elements per trip from tf.data to Python


@dataclasses.dataclass(frozen=True)
class RecordsConfig:
    """Everything that decides the content of a records folder. Saved in its manifest."""

    text: text.TextConfig = text.TextConfig()
    split: layouts.SplitConfig = layouts.SplitConfig()
    min_count: int = 5  # train-split occurrences a word needs to enter the vocabulary
    shards: int | None = None  # shards per split; None: enough for about `shard_mb` each
    shard_mb: float = 100.0
    compression: str | None = None  # None or "gzip"


def shard_name(split: str, index: int, count: int, compression: str | None) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord" + (".gz" if compression == "gzip" else "")


def _tf_compression(compression: str | None) -> str:
    return "GZIP" if compression == "gzip" else ""


def _validate_all(paths: list[str], show_progress: bool) -> dict[int, np.ndarray]:
    """Decode every image in parallel; return {index: (height, width)} of those that decode."""
    indices = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), tf.constant(paths, tf.string)))
    checked = (indices
               .map(lambda i, p: (i, images.validate(tf.io.read_file(p))), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=False)
               .ignore_errors()  # a failing image is diagnosed afterwards, one at a time
               .batch(_BATCH)
               .prefetch(tf.data.AUTOTUNE))
    sizes: dict[int, np.ndarray] = {}
    with progress_bar(len(paths), "validating images", show_progress) as advance:
        done = 0
        for index, shape in checked:
            sizes.update(zip(index.numpy().tolist(), shape.numpy()))
            advance(len(sizes) - done)
            done = len(sizes)
        advance(len(paths) - done)
    return sizes


def _example(data: bytes, image_id: str, height: int, width: int, captions: list[str],
             ids: np.ndarray, lengths: np.ndarray) -> bytes:
    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    def i(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": b([data]),
        "image/format": b([(images.sniff_format(data) or "unknown").encode()]),
        "image/id": b([image_id.encode("utf-8")]),
        "image/height": i([int(height)]),
        "image/width": i([int(width)]),
        "caption/text": b([c.encode("utf-8") for c in captions]),
        "caption/ids": i(ids),
        "caption/length": i(lengths),
    })).SerializeToString()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_counts(sizes_by_split: dict[str, list[int]], config: RecordsConfig) -> dict[str, int]:
    counts = {}
    for split, sizes in sizes_by_split.items():
        if not sizes:
            counts[split] = 0
        elif config.shards:
            counts[split] = min(config.shards, len(sizes))
        else:
            counts[split] = max(1, min(len(sizes), math.ceil(sum(sizes) / (config.shard_mb * 1e6))))
    return counts


def build_records(source: layouts.Source, out: Path, config: RecordsConfig = RecordsConfig(), *,
                  overwrite: bool = False, show_progress: bool = True) -> dict:
    """Validate, tokenize and write `source` as sharded TFRecords in `out`; return the manifest.

    Two passes over the images, both parallel tf.data pipelines: the first decodes every image
    (so the vocabulary counts only captions of images that are really written), the second
    streams the bytes into the shards. Broken images are skipped and listed in the manifest.
    """
    if config.compression not in (None, "gzip"):
        raise TfcapError(f"--compression must be gzip or none, not {config.compression}")
    if config.min_count < 1 or config.text.max_length < 1:
        raise TfcapError("--min-count and --max-length must be at least 1")
    out = Path(out)
    clock = Stopwatch()
    with atomic_directory(out, overwrite) as scratch:
        # Every image named by the captions is checked, also those in no split, so that every
        # broken one is reported (the bogus Flickr8k id `...jpg.1` is in no split).
        ids = list(source.captions)
        shapes = _validate_all([str(source.path(i)) for i in ids], show_progress)
        skipped = [{"image": ids[k], "reason": images.diagnose(source.path(ids[k]))}
                   for k in range(len(ids)) if k not in shapes]
        usable = [ids[k] for k in sorted(shapes)]
        split_of, unsplit = layouts.assign_splits(usable, source, config.split)
        shape_of = {ids[k]: shape for k, shape in shapes.items() if ids[k] in split_of}
        # Write order: split by split, images sorted by id, so shards are deterministic.
        order = {s: sorted(i for i in shape_of if split_of[i] == s) for s in layouts.SPLITS}

        train_texts = [c for i in order["train"] for c in source.captions[i]]
        if not train_texts:
            raise TfcapError("no usable image in the train split: nothing to build a vocabulary from")
        vocab = text.Vocabulary.build(text.tokenize(tf.constant(train_texts), config.text), config.min_count)
        vocab.save(scratch / VOCAB)

        written = [i for s in layouts.SPLITS for i in order[s]]
        all_texts = [c for i in written for c in source.captions[i]]
        ids_ragged, truncated = text.encode_captions(tf.constant(all_texts, tf.string), vocab, config.text)
        flat_ids, caption_lengths = ids_ragged.flat_values.numpy(), ids_ragged.row_lengths().numpy()
        caption_offsets = np.concatenate([[0], np.cumsum(caption_lengths)])

        sizes_by_split = {s: [source.path(i).stat().st_size for i in order[s]] for s in layouts.SPLITS}
        shard_counts = _shard_counts(sizes_by_split, config)
        splits_manifest = {}
        caption_index = 0
        reader = (tf.data.Dataset.from_tensor_slices(tf.constant([str(source.path(i)) for i in written] or [""]))
                  .take(len(written))
                  .map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(_BATCH)
                  .prefetch(tf.data.AUTOTUNE))
        image_bytes = (data for batch in reader for data in batch.numpy())
        options = tf.io.TFRecordOptions(compression_type=_tf_compression(config.compression))
        with progress_bar(len(written), "writing records", show_progress) as advance:
            for split in layouts.SPLITS:
                count, n_shards = len(order[split]), shard_counts[split]
                shards, n_captions = [], 0
                for shard in range(n_shards):
                    lo, hi = shard * count // n_shards, (shard + 1) * count // n_shards
                    name = shard_name(split, shard, n_shards, config.compression)
                    with tf.io.TFRecordWriter(str(scratch / name), options) as writer:
                        for image_id in order[split][lo:hi]:
                            n = len(source.captions[image_id])
                            rows = slice(caption_index, caption_index + n)
                            height, width = shape_of[image_id]
                            writer.write(_example(next(image_bytes), image_id, height, width,
                                                  source.captions[image_id],
                                                  flat_ids[caption_offsets[rows.start]:caption_offsets[rows.stop]],
                                                  caption_lengths[rows]))
                            caption_index += n
                            n_captions += n
                    advance(hi - lo)
                    shards.append({"file": name, "records": hi - lo, "sha256": _sha256(scratch / name),
                                   "bytes": (scratch / name).stat().st_size})
                splits_manifest[split] = {"images": count, "captions": n_captions, "shards": shards}

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "tfcap_version": tfcap.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"layout": source.layout, "captions_file": str(source.captions_file.resolve()),
                       "images_dir": str(source.images_dir.resolve()), "split_source": source.split_source},
            "config": dataclasses.asdict(config),
            "text": dataclasses.asdict(config.text),
            "vocab_size": len(vocab),
            "vocab_sha256": vocab.sha256,
            "min_count": config.min_count,
            "max_length": config.text.max_length,
            "compression": config.compression,
            "splits": splits_manifest,
            "images_written": len(written),
            "captions_written": caption_index,
            "truncated_captions": int(truncated.numpy().sum()),
            "unsplit_images": len(unsplit),
            "skipped": skipped,
            "bad_lines": source.bad_lines,
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    seconds = clock.seconds
    per_split = ", ".join(f"{s} {splits_manifest[s]['images']}" for s in layouts.SPLITS)
    summary(f"build-records: {len(written)} images ({per_split}), {caption_index} captions, vocab {len(vocab)}; "
            f"{len(skipped)} skipped, {len(unsplit)} in no split, {manifest['truncated_captions']} captions "
            f"truncated, {len(source.bad_lines)} bad lines; {seconds:.1f} s, "
            f"{(len(written) + len(skipped)) / max(seconds, 1e-9):.0f} images/s -> {out}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(records_dir: Path) -> dict:
    """The manifest of a records folder; TfcapError if it is not one."""
    path = Path(records_dir) / MANIFEST
    if not path.is_file():
        raise TfcapError(f"{records_dir} is not a records folder (no {MANIFEST}); make one with tfcap build-records")
    return json.loads(path.read_text(encoding="utf-8"))


def load_vocabulary(records_dir: Path) -> text.Vocabulary:
    return text.Vocabulary.load(Path(records_dir) / VOCAB)


FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "caption/text": tf.io.RaggedFeature(tf.string),
    "caption/ids": tf.io.RaggedFeature(tf.int64, value_key="caption/ids",
                                       partitions=[tf.io.RaggedFeature.RowLengths("caption/length")]),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized record.

    Returns a dict: image (tf.string []), format (tf.string []), image_id (tf.string []),
    height and width (tf.int64 []), captions (tf.string [C]), caption_ids (tf.int64 ragged [C, (words)]).
    """
    f = tf.io.parse_single_example(serialized, FEATURES)
    return {"image": f["image/encoded"], "format": f["image/format"], "image_id": f["image/id"],
            "height": f["image/height"], "width": f["image/width"], "captions": f["caption/text"],
            "caption_ids": f["caption/ids"]}


def shard_paths(records_dir: Path, split: str) -> list[str]:
    manifest = read_manifest(records_dir)
    if split not in manifest["splits"]:
        raise TfcapError(f"no split {split!r} in {records_dir}; it has {', '.join(manifest['splits'])}")
    return [str(Path(records_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]


def load_split(records_dir: Path, split: str, *, shuffle_shards: bool = False, seed: int | None = None,
               parse: bool = True) -> tf.data.Dataset:
    """A tf.data.Dataset over one split's records, shards read in parallel.

    Elements are dicts as from `parse_example` (or serialized tf.string scalars if not `parse`),
    in a deterministic order (shards interleaved) unless `shuffle_shards`.
    """
    manifest = read_manifest(records_dir)
    files = shard_paths(records_dir, split)
    compression = _tf_compression(manifest.get("compression"))
    names = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
    if shuffle_shards:
        names = names.shuffle(max(len(files), 1), seed=seed, reshuffle_each_iteration=True)
    dataset = names.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                               cycle_length=max(1, min(len(files), 4)), num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=not shuffle_shards)
    if parse:
        dataset = dataset.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


def iterate_examples(records_dir: Path, split: str) -> Iterator[dict]:
    """Parsed records of a split as Python values (bytes, ints, caption_ids as lists), for tests and tools."""
    for example in load_split(records_dir, split):
        values = {k: v.numpy() for k, v in example.items() if k != "caption_ids"}
        values["captions"] = values["captions"].tolist()
        values["caption_ids"] = example["caption_ids"].to_list()
        yield values
