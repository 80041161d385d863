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

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf

import tfcap
from tfcap import datasets, images, text
from tfcap.errors import TfcapError
from tfcap.outputs import Output, claimed, sha256_file, write_text_atomic
from tfcap.reading import ListOf, Object, Optional, Rule, excerpt, parse_json, read_text, shape_error
from tfcap.progress import Stopwatch, progress_bar, summary

MANIFEST = "manifest.json"
VOCAB = "vocab.txt"
SCHEMA_VERSION = 1
_BATCH = 256  # elements per trip from tf.data to Python


@dataclasses.dataclass(frozen=True)
class RecordsConfig:
    """Everything that decides the content of a records folder. Saved in its manifest."""

    text: text.TextConfig = text.TextConfig()
    split: datasets.SplitConfig = datasets.SplitConfig()
    min_count: int = 5  # train-split occurrences a word needs to enter the vocabulary
    shards: int | None = None  # shards per split; None: enough for about `shard_mb` each
    shard_mb: float = 100.0
    compression: str | None = None  # None or "gzip"


def shard_name(split: str, index: int, count: int, compression: str | None) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord" + (".gz" if compression == "gzip" else "")


def _tf_compression(compression: str | None) -> str:
    return "GZIP" if compression == "gzip" else ""


# Records are serialized in TensorFlow, a batch at a time, so that Python only hands each
# finished record to the writer. The protocol buffer wire format makes that simple: a message is its fields one after the other,
# each a tag byte, a varint length and the bytes; and messages concatenated parse as one message
# with all their fields (map entries too). So an Example is `0x0A len Features`, and its Features
# the concatenation of a serialized Features message per group of features.
_BYTE_STRINGS = [bytes([b]) for b in range(256)]


def _encode(message: str, fields: dict[str, tf.Tensor], sizes: dict[str, tf.Tensor] | None = None) -> tf.Tensor:
    """Serialize a batch of protocol buffers with tf.io.encode_proto: tf.string [B].

    Args:
      message: the full type name, e.g. "tensorflow.Int64List".
      fields: field name -> values [B, n] (a message field takes serialized messages).
      sizes: field name -> tf.int32 [B], how many of the n values each message has; default all n.
    """
    sizes = sizes or {}
    counts = [sizes.get(k, tf.fill(tf.shape(v)[:1], tf.shape(v)[1])) for k, v in fields.items()]
    return tf.io.encode_proto(tf.stack(counts, axis=1), list(fields.values()), list(fields), message)


def _features_message(features: dict[str, tf.Tensor | tf.RaggedTensor]) -> tf.Tensor:
    """A batch of serialized `tf.train.Features` holding the given features.

    Args:
      features: feature name -> tf.string or tf.int64, [B] (one value each) or ragged [B, (n)].
    Returns:
      tf.string [B].
    """
    entries = []
    for name, values in features.items():
        sizes = {}
        if isinstance(values, tf.RaggedTensor):
            sizes["value"] = tf.cast(values.row_lengths(), tf.int32)
            values = values.to_tensor()
        else:
            values = values[:, None]
        kind = "bytes" if values.dtype == tf.string else "int64"
        value_list = _encode(f"tensorflow.{kind.title()}List", {"value": values}, sizes)
        feature = _encode("tensorflow.Feature", {f"{kind}_list": value_list[:, None]})
        key = tf.fill(tf.shape(value_list), name)
        entries.append(_encode("tensorflow.Features.FeatureEntry", {"key": key[:, None], "value": feature[:, None]}))
    return _encode("tensorflow.Features", {"feature": tf.stack(entries, axis=1)})


def _varint(values: tf.Tensor) -> tf.Tensor:
    """Protocol buffer varints of non-negative tf.int64 [...]: tf.string [...]."""
    groups = tf.bitwise.right_shift(values[..., None], tf.range(0, 64, 7, dtype=tf.int64))  # 7 bits each, [..., 10]
    position = tf.range(10, dtype=tf.int64)
    count = 1 + tf.reduce_sum(tf.cast(groups[..., 1:] > 0, tf.int64), axis=-1, keepdims=True)
    digits = tf.bitwise.bitwise_or(groups % 128, tf.where(position < count - 1, tf.constant(128, tf.int64), 0))
    return tf.strings.reduce_join(tf.where(position < count, tf.gather(tf.constant(_BYTE_STRINGS), digits), ""), axis=-1)


def _serialize_examples(image: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
    """Serialized `tf.train.Example`s: the bytes feature image/encoded plus serialized Features.

    The image bytes are copied once, into the result; the messages around them need only their
    lengths: Example.features > Features.feature > FeatureEntry(key, value) > Feature.bytes_list >
    BytesList.value.

    Args:
      image: tf.string [B], the image/encoded values.
      features: tf.string [B], serialized `tf.train.Features` with every other feature.
    Returns:
      tf.string [B].
    """
    def varint_size(n):
        return 1 + tf.reduce_sum(tf.cast(n[:, None] >= 128 ** tf.range(1, 9, dtype=tf.int64), tf.int64), axis=1)  # n < 2**63

    key = b"image/encoded"
    entry_start = b"\x0a" + bytes([len(key)]) + key + b"\x12"  # FeatureEntry.key, then the tag of .value
    # The length of each message, innermost first; every field here is number 1, tag 0x0A.
    image_length = tf.cast(tf.strings.length(image), tf.int64)
    bytes_list = 1 + varint_size(image_length) + image_length
    feature = 1 + varint_size(bytes_list) + bytes_list
    entry = len(entry_start) + varint_size(feature) + feature
    all_features = 1 + varint_size(entry) + entry + tf.cast(tf.strings.length(features), tf.int64)
    v = tf.unstack(_varint(tf.stack([all_features, entry, feature, bytes_list, image_length], axis=1)), axis=1)
    return tf.strings.join([b"\x0a", v[0], b"\x0a", v[1], entry_start, v[2], b"\x0a", v[3], b"\x0a", v[4], image,
                            features])


def _write_record(writer: tf.io.TFRecordWriter, record: bytes) -> None:
    writer.write(record)


def _shard_counts(sizes_by_split: dict[str, np.ndarray], config: RecordsConfig) -> dict[str, int]:
    counts = {}
    for split, sizes in sizes_by_split.items():
        if not len(sizes):
            counts[split] = 0
        elif config.shards:
            counts[split] = min(config.shards, len(sizes))
        else:
            counts[split] = max(1, min(len(sizes), math.ceil(int(sizes.sum()) / (config.shard_mb * 1e6))))
    return counts


_FORMATS = (None, "jpeg", "png", "gif", "bmp", "webp")  # image format codes in `_Files.formats`
_SPLIT_CODES = {split: code for code, split in enumerate(datasets.SPLITS)}
_CHUNK = 1024  # images whose captions are tokenized and serialized together: bounds memory, not speed


@dataclasses.dataclass
class _Files:
    """What a first look at each image file showed, as arrays indexed like `ids`: a few bytes per
    image rather than Python objects, so that COCO-scale builds stay small."""
    ids: list[str]
    formats: np.ndarray  # int8, index into _FORMATS; 0 where unusable
    sizes: np.ndarray  # int64 bytes
    reasons: dict[str, str]  # id -> why it is certainly unusable, for those few


def _first_looks(source: datasets.Source, ids: list[str]) -> _Files:
    """`images.first_look` of each image, from 16 threads: on a cold page cache, many reads in
    flight let the disk, not a one-at-a-time loop, set the pace (2.5x faster on Flickr8k). Files
    missing under their name are looked for in another Unicode normal form (`Source.find_renamed`)."""
    files = _Files(ids, np.zeros(len(ids), np.int8), np.zeros(len(ids), np.int64), {})
    codes = {name: code for code, name in enumerate(_FORMATS)}

    def look(positions):
        return positions, [images.first_look(source.path(ids[k])) for k in positions]

    def record(positions):
        window = [positions[k:k + 256] for k in range(0, len(positions), 256)]
        for chunk, looks in pool.map(look, window):
            for k, (reason, image_format, size) in zip(chunk, looks):
                files.formats[k], files.sizes[k] = codes.get(image_format, 0), size
                if reason:
                    files.reasons[ids[k]] = reason
                else:
                    files.reasons.pop(ids[k], None)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for lo in range(0, len(ids), 256 * 64):  # a window at a time: no list of every path
            record(range(lo, min(lo + 256 * 64, len(ids))))
        missing = [i for i, reason in files.reasons.items() if reason == "missing"]
        renamed = set(source.find_renamed(missing)) if missing else set()
        if renamed:
            record([k for k, i in enumerate(ids) if i in renamed])
    return files


def _tokenizer(config: text.TextConfig):
    """`text.tokenize` as one graph, traced once for the vocabulary and the write pass (tracing costs ~0.5 s)."""
    return tf.function(lambda texts: text.tokenize(texts, config), input_signature=[tf.TensorSpec([None], tf.string)],
                       autograph=False)


def _vocabulary(source: datasets.Source, ids: list[str], train: np.ndarray, config: RecordsConfig,
                tokenize) -> text.Vocabulary:
    """The vocabulary of the train images' captions (positions `train` in `ids`), counted a chunk at a time."""
    counts: dict[bytes, int] = {}
    for lo in range(0, len(train), _CHUNK):
        texts = [c for k in train[lo:lo + _CHUNK] for c in source.captions[ids[k]]]
        words, _, n = tf.unique_with_counts(tokenize(tf.constant(texts, tf.string)).flat_values)
        for word, count in zip(words.numpy().tolist(), n.numpy().tolist()):
            counts[word] = counts.get(word, 0) + count
    return text.Vocabulary.from_counts([w.decode("utf-8") for w in counts], list(counts.values()), config.min_count)


@dataclasses.dataclass
class _Shard:
    split: str
    name: str
    records: int = 0
    sha256: str = ""


def _write_pass(scratch: Path, source: datasets.Source, files: _Files, planned: dict[str, np.ndarray],
                vocab: text.Vocabulary, config: RecordsConfig, tokenize,
                show_progress: bool) -> tuple[list[_Shard], np.ndarray, int]:
    """Read, check (`images.check`) and write the planned images in one parallel tf.data pass.

    `planned`: split -> positions in `files.ids`, in record order. Captions are tokenized, encoded
    and serialized in the pipeline, `_CHUNK` images at a time, so memory does not grow with the
    dataset. Returns the shards written, the positions of images that failed to read or check
    (skipped), and the number of captions truncated in the records written.
    """
    order = np.concatenate([planned[split] for split in datasets.SPLITS]).astype(np.int64)
    ids, max_length = files.ids, config.text.max_length

    # Shards are contiguous runs of images within a split, sized by bytes on disk.
    shard_counts = _shard_counts({s: files.sizes[planned[s]] for s in datasets.SPLITS}, config)
    shards, shard_of = [], np.zeros(len(order), np.int64)
    offset = 0
    for split in datasets.SPLITS:
        count, n_shards = len(planned[split]), shard_counts[split]
        for shard in range(n_shards):
            lo, hi = offset + shard * count // n_shards, offset + (shard + 1) * count // n_shards
            shard_of[lo:hi] = len(shards)
            shards.append(_Shard(split, shard_name(split, shard, n_shards, config.compression)))
        offset += count

    generator_failed: list[BaseException] = []

    def chunks():
        try:
            for lo in range(0, len(order), _CHUNK):
                names = [ids[k] for k in order[lo:lo + _CHUNK]]
                texts = [source.captions[i] for i in names]
                yield (np.arange(lo, lo + len(names), dtype=np.int64), [source.path(i) for i in names], names,
                       [_FORMATS[files.formats[k]] for k in order[lo:lo + _CHUNK]], [c for t in texts for c in t],
                       np.array([len(t) for t in texts], np.int64))
        except BaseException as e:  # `ignore_errors` below would take it for unreadable images: raised after the loop
            generator_failed.append(e)
            raise

    # No autograph: there is no Python control flow to convert, and converting costs a second.
    @tf.autograph.experimental.do_not_convert
    def known_features(indices, paths, image_ids, formats, texts, counts):
        """The features that do not depend on the image file, serialized for a chunk of images."""
        tokens = tokenize(texts)
        encoded = vocab.encode(tokens[:, :max_length])
        lengths = tf.RaggedTensor.from_row_lengths(encoded.row_lengths(), counts)
        known = _features_message({
            "image/format": formats,
            "image/id": image_ids,
            "caption/text": tf.RaggedTensor.from_row_lengths(texts, counts),
            "caption/ids": tf.RaggedTensor.from_row_lengths(encoded.flat_values, tf.reduce_sum(lengths, axis=1)),
            "caption/length": lengths,
        })
        truncated = tf.RaggedTensor.from_row_lengths(tf.cast(tokens.row_lengths() > max_length, tf.int64), counts)
        return indices, paths, known, tf.reduce_sum(truncated, axis=1)

    @tf.autograph.experimental.do_not_convert
    def read_and_check(index, path, known, truncated):
        data = tf.io.read_file(path)
        return index, data, images.check(data), known, truncated

    @tf.autograph.experimental.do_not_convert
    def serialize(indices, datas, shapes, known, truncated):
        size = _features_message({"image/height": shapes[:, 0], "image/width": shapes[:, 1]})
        return indices, _serialize_examples(datas, tf.strings.join([size, known])), truncated

    vector = tf.TensorSpec([None], tf.string)
    signature = (tf.TensorSpec([None], tf.int64), vector, vector, vector, vector, tf.TensorSpec([None], tf.int64))
    stream = (without_autotuning(tf.data.Dataset.from_generator(chunks, output_signature=signature))
              .map(known_features, num_parallel_calls=tf.data.AUTOTUNE)
              .unbatch()
              .map(read_and_check, num_parallel_calls=tf.data.AUTOTUNE)
              .ignore_errors()  # failures show up as gaps in the index sequence, diagnosed afterwards
              .batch(_BATCH)
              .map(serialize, num_parallel_calls=tf.data.AUTOTUNE)
              .prefetch(tf.data.AUTOTUNE))
    options = tf.io.TFRecordOptions(compression_type=_tf_compression(config.compression))
    written = np.zeros(len(order), bool)
    n_truncated = 0
    writer, current = None, -1
    hashes: list[concurrent.futures.Future] = []

    def close():
        writer.close()
        hashes.append(hasher.submit(sha256_file, scratch / shards[current].name))  # while the next is written

    def open_through(target: int):
        nonlocal writer, current
        while current < target:
            if writer is not None:
                close()
            current += 1
            writer = tf.io.TFRecordWriter(str(scratch / shards[current].name), options)

    with (concurrent.futures.ThreadPoolExecutor(1) as hasher,
          progress_bar(len(order), "writing records", show_progress) as advance):
        for indices, serialized, truncated in stream:
            indices = indices.numpy()
            for k, record in zip(indices, serialized.numpy()):
                open_through(shard_of[k])
                _write_record(writer, record)
                shards[current].records += 1
            written[indices] = True
            n_truncated += int(truncated.numpy().sum())
            advance(len(indices))
        if generator_failed:
            raise generator_failed[0]
        open_through(len(shards) - 1)  # empty trailing shards still exist, so names stay consistent
        if writer is not None:
            close()
    for shard, digest in zip(shards, hashes):
        shard.sha256 = digest.result()
    return shards, order[~written], n_truncated


def build_records(source: datasets.Source, out: Path | Output, config: RecordsConfig = RecordsConfig(), *,
                  overwrite: bool = False, show_progress: bool = True) -> dict:
    """Validate, tokenize and write `source` as sharded TFRecords in `out`; return the manifest.

    `out`: a folder, or an `outputs.Output` the caller claimed (then `overwrite` is its own); it is
    written into a scratch folder of this process and renamed into place when complete.

    One parallel pass reads, checks and writes each image. The check (`images.check`) reads the
    header and the end of the file and decodes only when those leave a doubt: it skips missing,
    empty, truncated and non-image files, but passes a file with an intact header and end whose
    compressed data in between is corrupt (`images.structure_ok` says what that lets through).
    The vocabulary, which must exist before the first record is written, is counted from the
    train captions of the images that pass a first look at their first bytes (present,
    non-empty, a known format). If the check then rejects a train image, the pass is redone
    without it, so the vocabulary always counts exactly the train images written.

    Memory: beyond the captions (`source.captions`), a few bytes per image; captions are
    tokenized and records serialized a chunk of images at a time.
    """
    if config.compression not in (None, "gzip"):
        raise TfcapError(f"--compression must be gzip or none, not {config.compression}")
    if config.min_count < 1 or config.text.max_length < 1:
        raise TfcapError("--min-count and --max-length must be at least 1")
    clock = Stopwatch()
    with claimed(out, overwrite=overwrite) as output, output.directory() as scratch:
        # Every image named by the captions is checked, also those in no split, so that every
        # broken one is reported (the bogus Flickr8k id `...jpg.1` is in no split).
        ids = list(source.captions)
        files = _first_looks(source, ids)
        split_of, unsplit = datasets.assign_splits([i for i in ids if i not in files.reasons], source, config.split)
        split_codes = np.fromiter((_SPLIT_CODES.get(split_of.get(i), -1) for i in ids), np.int8, len(ids))
        del split_of
        by_id = np.array(sorted(range(len(ids)), key=ids.__getitem__), np.int64)  # records in id order
        failed = np.zeros(len(ids), bool)
        tokenize = _tokenizer(config.text)
        while True:
            planned = {s: by_id[(split_codes[by_id] == code) & ~failed[by_id]] for s, code in _SPLIT_CODES.items()}
            if not len(planned["train"]):
                raise TfcapError("no usable image in the train split: nothing to build a vocabulary from")
            vocab = _vocabulary(source, ids, planned["train"], config, tokenize)
            for stale in scratch.iterdir():
                stale.unlink()
            shards, newly_failed, n_truncated = _write_pass(scratch, source, files, planned, vocab, config, tokenize,
                                                            show_progress)
            failed[newly_failed] = True
            if not (split_codes[newly_failed] == _SPLIT_CODES["train"]).any():
                break  # the vocabulary counted exactly the train images written
        vocab.save(scratch / VOCAB)
        files.reasons.update({ids[k]: images.diagnose(source.path(ids[k])) for k in np.flatnonzero(failed)})
        skipped = [{"image": i, "reason": files.reasons[i]} for i in ids if i in files.reasons]

        splits_manifest = {}
        for split in datasets.SPLITS:
            kept = planned[split][~failed[planned[split]]]
            splits_manifest[split] = {
                "images": len(kept), "captions": sum(len(source.captions[ids[k]]) for k in kept),
                "shards": [{"file": s.name, "records": s.records, "sha256": s.sha256,
                            "bytes": (scratch / s.name).stat().st_size} for s in shards if s.split == split]}
        n_images = sum(v["images"] for v in splits_manifest.values())
        n_captions = sum(v["captions"] for v in splits_manifest.values())
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
            "images_written": n_images,
            "captions_written": n_captions,
            "truncated_captions": n_truncated,
            "unsplit_images": len(unsplit),
            "duplicate_captions": source.duplicate_captions,
            "skipped": skipped,
            "bad_lines": source.bad_lines,
        }
        write_text_atomic(scratch / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    seconds = clock.seconds
    per_split = ", ".join(f"{s} {splits_manifest[s]['images']}" for s in datasets.SPLITS)
    summary(f"build-records: {n_images} images ({per_split}), {n_captions} captions, vocab {len(vocab)}; "
            f"{len(skipped)} skipped, {len(unsplit)} in no split, {n_truncated} captions truncated, "
            f"{len(source.bad_lines)} bad lines, {source.duplicate_captions} duplicate captions dropped; "
            f"{seconds:.1f} s, {len(ids) / max(seconds, 1e-9):.0f} images/s -> {output.path}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_COUNT = Rule(_count, "a count (an integer >= 0)")
_SHA256 = Rule(lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 in hex")
# A shard is a file of the records folder itself: never a path that leads elsewhere.
_FILE_NAME = Rule(lambda v: isinstance(v, str) and v not in ("", ".", "..") and not set(v) & set("/\\\0"),
                  "a file name in the records folder")
_SPLIT = Object({"images": _COUNT, "captions": _COUNT,
                 "shards": ListOf(Object({"file": _FILE_NAME, "records": _COUNT, "sha256": _SHA256,
                                          "bytes": Optional(_COUNT)}))})
_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
# What readers of a manifest use (train, evaluate, the feature cache), checked before any of it is.
MANIFEST_SHAPE = Object({
    "splits": Object({split: _SPLIT for split in datasets.SPLITS}, rest=_SPLIT),
    "vocab_size": _COUNT,
    "vocab_sha256": _SHA256,
    "text": Object({"normalization": Optional(Rule(lambda v: v in _NORMAL_FORMS, " or ".join(_NORMAL_FORMS))),
                    "lowercase": Optional(bool), "strip_punctuation": Optional(bool), "max_length": Optional(_COUNT)},
                   closed=True),
    "compression": Optional(Rule(lambda v: v in (None, "gzip"), 'null or "gzip"')),
})


def read_manifest(records_dir: Path) -> dict:
    """The manifest of a records folder, checked for the shape its readers use; TfcapError if it is not one."""
    path = Path(records_dir) / MANIFEST
    if not path.is_file():
        raise TfcapError(f"{records_dir} is not a records folder (no {MANIFEST}); make one with tfcap build-records")
    rebuild = "rebuild the records with tfcap build-records"
    try:
        manifest = parse_json(read_text(path, "manifest"), str(path))
    except TfcapError as e:
        raise TfcapError(f"{e}; {rebuild}") from None
    error = shape_error(manifest, MANIFEST_SHAPE)
    if error is not None:
        raise TfcapError(f"{path} is damaged ({error}); {rebuild}")
    for split, entry in manifest["splits"].items():
        records = sum(shard["records"] for shard in entry["shards"])
        if records != entry["images"]:
            raise TfcapError(f"{path} is damaged (split {excerpt(split, 40)}: {entry['images']} images but "
                             f"{records} records in its shards); {rebuild}")
    return manifest


def verify_vocabulary(records_dir: Path) -> list[str]:
    """The words of the records' vocab.txt, after checking them against the manifest's vocabulary size
    and sha256: a vocabulary cut short or reordered would give the records' word ids other words."""
    manifest, path = read_manifest(records_dir), Path(records_dir) / VOCAB
    words = text.read_words(path)
    digest = text.words_sha256(words)
    if len(words) != manifest["vocab_size"] or digest != manifest["vocab_sha256"]:
        raise TfcapError(f"{path} is damaged: {len(words)} words, sha256 {digest[:12]}, where {MANIFEST} says "
                         f"{manifest['vocab_size']} words, {manifest['vocab_sha256'][:12]}; rebuild the records "
                         "with tfcap build-records")
    return words


_VERIFIED: dict[str, list] = {}  # resolved shard path -> [size, mtime_ns, sha256] verified by this process


def _stamp_file(records_dir: Path) -> Path:
    """Where the shards of a records folder verified earlier are noted: the user's cache folder,
    not the records folder, which may be read-only or shared."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = hashlib.sha256(str(Path(records_dir).resolve()).encode()).hexdigest()[:20]
    return cache_home / "tfcap" / "verified" / f"{folder}.json"


def verify_shards(records_dir: Path, split: str) -> None:
    """Check that each shard of `split` is the file build-records wrote: size and sha256 as in the
    manifest (which counted the records of exactly those bytes, so the record count holds too).

    A damaged shard would otherwise hang the feature cache (`Dataset.save` deadlocks when its input
    fails, tensorflow#61736) or end in a DataLossError that names no file. Hashing reads the split
    once, so it is done once per version of a shard: its size and mtime, once verified, are noted
    in this process and in `$XDG_CACHE_HOME/tfcap/verified/` (skipped where that is unwritable).

    Raises TfcapError naming the first missing or damaged shard.
    """
    manifest = read_manifest(records_dir)
    if split not in manifest["splits"]:
        raise TfcapError(f"no split {split!r} in {records_dir}; it has {', '.join(manifest['splits'])}")
    stamp_file, stamps, verified = _stamp_file(records_dir), None, {}
    rebuild = "rebuild the records with tfcap build-records"
    for shard in manifest["splits"][split]["shards"]:
        path = Path(records_dir) / shard["file"]
        try:
            stat = path.stat()
        except OSError as e:
            raise TfcapError(f"{path}: records shard unreadable ({e.strerror}); {rebuild}") from None
        key, version = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, shard["sha256"]]
        if _VERIFIED.get(key) == version:
            continue
        if stamps is None:
            try:
                stamps = json.loads(stamp_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                stamps = {}
        if stamps.get(key) != version:
            if "bytes" in shard and stat.st_size != shard["bytes"]:
                raise TfcapError(f"{path} is damaged: {stat.st_size:,} bytes where {MANIFEST} says "
                                 f"{shard['bytes']:,}; {rebuild}")
            if sha256_file(path) != shard["sha256"]:
                raise TfcapError(f"{path} is damaged: its sha256 differs from the one in {MANIFEST}; {rebuild}")
            verified[key] = version
        _VERIFIED[key] = version
    if verified:
        try:
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stamp_file, json.dumps({**stamps, **verified}) + "\n")
        except OSError:
            pass  # no writable cache folder: verified again by the next process


def load_vocabulary(records_dir: Path) -> text.Vocabulary:
    """The records' vocabulary, checked against the manifest (`verify_vocabulary`)."""
    return text.Vocabulary(verify_vocabulary(records_dir))


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


def without_autotuning(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's autotuning off, for it and every dataset built on it.

    At the end of an autotuned pipeline the iterator sometimes waits seconds for the autotuner's
    thread: on 2 cores, ~5 s at the end of a 160-image caption-dir (4 of 10 runs), 1.5-2.2 s at
    the end of a training epoch over cached features (3 of 6 epochs); never with autotuning off.
    Without it, AUTOTUNE parallelism is one call per core and prefetch buffers grow while the
    consumer waits, which is all these pipelines need.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def load_split(records_dir: Path, split: str, *, shuffle_shards: bool = False, seed: int | None = None,
               parse: bool = True) -> tf.data.Dataset:
    """A tf.data.Dataset over one split's records, shards read in parallel, after `verify_shards` and
    `verify_vocabulary` (every file the manifest fingerprints is checked before use).

    Elements are dicts as from `parse_example` (or serialized tf.string scalars if not `parse`),
    in a deterministic order (shards interleaved) unless `shuffle_shards`.
    """
    manifest = read_manifest(records_dir)
    verify_vocabulary(records_dir)
    verify_shards(records_dir, split)
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
    return without_autotuning(dataset)


def iterate_examples(records_dir: Path, split: str) -> Iterator[dict]:
    """Parsed records of a split as Python values (bytes, ints, caption_ids as lists), for tests and tools."""
    for example in load_split(records_dir, split):
        values = {k: v.numpy() for k, v in example.items() if k != "caption_ids"}
        values["captions"] = values["captions"].tolist()
        values["caption_ids"] = example["caption_ids"].to_list()
        yield values
