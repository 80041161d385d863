"""Captioning whole directories: the library behind `tfcap caption-dir` and `tfcap caption`.

One tf.data pipeline reads, checks the header size of, decodes and preprocesses files in
parallel, batches them and runs the encoder on each batch; beam search and detokenization run on
the encoded batches as they come, so the pipeline encodes batch k+1 while batch k is decoded. A
file that fails (missing, empty, not an image, truncated, too many pixels) drops out of the
pipeline and gets an error row in its place; the batch goes on.

Output rows (CSV or JSON Lines, `tfcap.rows`): path (relative to the images folder; a name that is
not UTF-8 spelled as `tfcap.names` says), the captioner's per-image outputs (caption, score: the
mean log-probability per token, labels: the top ImageNet classes, ...), error (empty when fine),
one per candidate file in walk order. Each batch's rows are appended with one checked write
(`outputs.append_whole`: all of them, or on a full disk none), so a killed run leaves only whole
rows, and `resume` appends exactly the missing ones, in the columns of the file it completes (a
row cut by a kill is dropped first: `complete_length`). The decoding an output was begun with
(`SETTINGS`) is recorded beside it, in the hidden `.NAME.settings.json`, and `resume` refuses
another one, so one file never mixes two decodings.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Iterator

import tensorflow as tf

from tfcap import images, names, records, rows as row_fields
from tfcap.errors import Interrupted, TfcapError
from tfcap.outputs import Output, append_whole, claimed, write_text_atomic
from tfcap.progress import Stopwatch, progress_bar, summary
from tfcap.rows import COLUMNS, format_rows  # noqa: F401  (caption-dir's columns and writer, as before)


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How images are captioned."""

    beam_size: int = 3
    length_penalty: float = 0.0
    batch_size: int = 64  # decoding's steps cost less per image in larger batches; the encoder's do not
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # refuse larger images by their header, before decoding
    recursive: bool = True
    min_confidence: float | None = None  # leave out captions less trusted (rows.withhold); None: keep all


def is_image_name(name: str) -> bool:
    """Whether a file name is a caption-dir candidate: an image extension (`images.EXTENSIONS`) in
    any case. Hidden files count: a name's leading dot says nothing about its contents."""
    return name.lower().endswith(images.EXTENSIONS)


def find_images(root: Path, recursive: bool = True) -> list[str]:
    """Image files under `root` (by extension, any case), as sorted relative POSIX paths, spelled as
    outputs hold them (`names.to_text`: a name that is not UTF-8 has its odd bytes as `\\xHH`).

    Symlinked folders are followed once each: a folder already visited (same device and inode)
    is not entered again, so symlink loops end.
    """
    root = Path(root)
    if not root.is_dir():
        raise TfcapError(f"{root} is not a directory")
    found, visited = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        try:
            stat = os.stat(folder)
        except OSError:
            subfolders[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in visited:
            subfolders[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        relative = Path(folder).relative_to(root)
        found.extend(names.to_text((relative / f).as_posix()) for f in files if is_image_name(f))
        subfolders.sort()
        if not recursive:
            subfolders[:] = []
    return sorted(found)


def _too_large_check(data: tf.Tensor, max_pixels: int) -> tf.Tensor:
    shape = images.header_shape(data)
    return tf.debugging.assert_less_equal(shape[0] * shape[1], tf.constant(max_pixels, tf.int64),
                                          message="too many pixels")


def diagnose(path: Path, max_pixels: int) -> str:
    """The error text of a file that dropped out of the pipeline."""
    reason = images.quick_check(path)
    if reason:
        return reason
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return images.open_error(e)
    return diagnose_bytes(data, max_pixels)


def diagnose_bytes(data: bytes, max_pixels: int) -> str:
    """The error text of image bytes that dropped out of the pipeline (`diagnose` without the file)."""
    reason = images.head_reason(data[:16])
    if reason:
        return reason
    try:
        shape = images.header_shape(tf.constant(data)).numpy()
    except tf.errors.OpError:  # a JPEG cut before its size marker: the full check below says why
        shape = (-1, -1)
    if shape[0] * shape[1] > max_pixels:
        return f"too large ({shape[1]}x{shape[0]} = {shape[0] * shape[1]} pixels > --max-pixels {max_pixels})"
    return images.diagnose_data(data)


def checked_pixels(data: tf.Tensor, preprocess, max_pixels: int) -> tf.Tensor:
    """`preprocess(data)` (tf.string [] -> tf.float32 [S, S, 3]) after refusing, by the header, an
    image of more than `max_pixels`: an InvalidArgumentError that tf.data's ignore_errors drops."""
    with tf.control_dependencies([_too_large_check(data, max_pixels)]):
        return preprocess(data)


def pixel_batches(root: Path, paths: list[str], preprocess, config: CaptionConfig) -> tf.data.Dataset:
    """(index tf.int64 [B], pixels tf.float32 [B, S, S, 3]) of the files that load; failures drop out."""
    def load(index, path):
        return index, checked_pixels(tf.io.read_file(path), preprocess, config.max_pixels)

    # shape=[n]: with no paths at all, an empty string vector (not a float one), so nothing to do is no error.
    # Bytes, not str: a file name need not be UTF-8.
    full = tf.constant([os.fsencode(names.join(root, p)) for p in paths], tf.string, shape=[len(paths)])
    return (records.without_autotuning(tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64),
                                                                           full)))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()
            .batch(config.batch_size)
            .prefetch(tf.data.AUTOTUNE))


def feature_batches(root: Path, paths: list[str], captioner, config: CaptionConfig) -> tf.data.Dataset:
    """(index tf.int64 [B], features) of the files that load, encoded inside the pipeline.

    `captioner.encode` runs in the pipeline's own thread, one batch ahead of the consumer: the
    encoder of the next batch overlaps the beam search of this one.
    """
    options = tf.data.Options()
    # tf.data runs its functions with an intra-op parallelism of 1 by default: the encoder's
    # convolutions would use one core. 0 is all of them, as outside tf.data.
    options.threading.max_intra_op_parallelism = 0
    return (pixel_batches(root, paths, captioner.preprocess_bytes, config)
            .map(lambda index, pixels: (index, captioner.encode(pixels)))
            .prefetch(1)
            .with_options(options))


class BytesCaptioner:
    """Captions of a batch of image bytes in hand (files read elsewhere: the Beam engine reads them
    through Beam's file systems), with the checks and error texts of `caption_directory`.

    Decoding, the header size check and preprocessing run in one tf.function over the whole batch
    (a tf.data pipeline inside it drops the images that fail, as `pixel_batches` does for files),
    then one `encode` and one `decode` of the images that loaded. Only a failed image costs Python
    work of its own: `diagnose_bytes` says why it failed.
    """

    def __init__(self, captioner, max_pixels: int = images.DEFAULT_MAX_PIXELS, min_confidence: float | None = None):
        self.captioner, self.max_pixels, self.min_confidence = captioner, max_pixels, min_confidence
        self._load = tf.function(self._pixels, input_signature=[tf.TensorSpec([None], tf.string)])

    def _pixels(self, data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """tf.string [B] -> (kept tf.int64 [K], pixels tf.float32 [K, S, S, 3]): the images that load."""
        count = tf.shape(data, out_type=tf.int64)[0]
        size = self.captioner.settings["image_size"]
        loaded = (records.without_autotuning(tf.data.Dataset.from_tensor_slices((tf.range(count), data)))
                  .map(lambda k, d: (k, checked_pixels(d, self.captioner.preprocess_bytes, self.max_pixels)),
                       num_parallel_calls=tf.data.AUTOTUNE)
                  .ignore_errors()
                  .batch(tf.maximum(count, 1)))
        # One batch of all that loaded, or, when none did, an empty one (get_single_element needs one).
        nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0, size, size, 3], tf.float32)))
        return loaded.concatenate(nothing).take(1).get_single_element()

    def __call__(self, data: list[bytes]) -> list[dict]:
        """The row of each of `data` but its path ({column: value}: `rows.COLUMNS` less path), in
        order; a failure's is `rows.failed(reason)`."""
        results: list[dict | None] = [None] * len(data)
        if data:
            kept, pixels = self._load(tf.constant(data, tf.string, shape=[len(data)]))
            if len(kept):
                values = row_fields.from_outputs(self.captioner.decode(self.captioner.encode(pixels)))
                for k, value in zip(kept.numpy(), values):
                    results[k] = row_fields.withhold({**value, "error": ""}, self.min_confidence)
        return [r or row_fields.failed(diagnose_bytes(d, self.max_pixels)) for r, d in zip(results, data)]


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def output_format(out: Path, fmt: str | None = None) -> str:
    """"csv" or "jsonl": `fmt` if given, else from the suffix of `out` (.jsonl, .ndjson, .json: JSON
    Lines; anything else: CSV). An explicit format that contradicts a .csv or JSON Lines suffix is an error."""
    suffix = Path(out).suffix.lower()
    by_suffix = "jsonl" if suffix in JSONL_SUFFIXES else "csv" if suffix == ".csv" else None
    if fmt is None:
        return by_suffix or "csv"
    if fmt not in ("csv", "jsonl"):
        raise TfcapError(f"--format must be csv or jsonl, not {fmt}")
    if by_suffix and fmt != by_suffix:
        raise TfcapError(f"--format {fmt} contradicts the name {out} ({by_suffix}); rename it or drop --format")
    return fmt


def read_rows(path: Path, fmt: str | None = None) -> list[dict]:
    """Rows of an existing output (CSV or JSON Lines: `fmt`, else by suffix); a cut-off last row is ignored."""
    return parse_rows(Path(path).read_text(encoding="utf-8"), fmt or output_format(path))


def parse_rows(text: str, fmt: str) -> list[dict]:
    """Rows of caption-dir output text (CSV with its header, or JSON Lines); a cut-off last row is ignored."""
    text = text[:complete_length(text, fmt)]
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def complete_length(data: str | bytes, fmt: str) -> int:
    """The length of `data` (caption-dir output, text or bytes) up to the end of its last whole row.

    Rows end with a newline, written with the row. In JSON Lines a newline is always a row's end
    (JSON escapes those in strings). In CSV it may be inside a quoted field (a file name holding a
    newline): a newline ends a row only when the quotes before it are even in number (a quote in a
    field is written doubled, which keeps the count even), so a row cut inside quotes is found and
    dropped whole instead of being parsed into rows nobody wrote.
    """
    newline, quote = ("\n", '"') if isinstance(data, str) else (b"\n", b'"')
    end = data.rfind(newline) + 1
    if fmt != "csv":
        return end
    quotes_before = data.count(quote, 0, end)
    while end and quotes_before % 2:
        start = data.rfind(newline, 0, end - 1) + 1
        quotes_before -= data.count(quote, start, end)
        end = start
    return end


SETTINGS = ("model", "beam_size", "length_penalty", "no_repeat_ngram", "precision", "decoder_precision", "labels",
            "max_pixels", "min_confidence")  # what makes a row


def settings_path(out: Path) -> Path:
    """Where the decoding settings an output was begun with are kept: the hidden .NAME.settings.json beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.settings.json")


def model_location(model) -> str:
    """--model as recorded: a URL as it is, a local path resolved."""
    return model if isinstance(model, str) and "://" in model else str(Path(model).resolve())


def decoding_settings(model, predictor, config: CaptionConfig) -> dict:
    """The `SETTINGS` of a run: the model's location and the predictor's effective decoding."""
    return {"model": model_location(model), "beam_size": predictor.settings["beam_size"],
            "length_penalty": predictor.settings["length_penalty"],
            "no_repeat_ngram": predictor.settings.get("no_repeat_ngram", 0),
            "precision": predictor.settings["encoder_precision"],
            "decoder_precision": predictor.settings.get("decoder_precision", "float32"), "labels": predictor.labels,
            "max_pixels": config.max_pixels, "min_confidence": config.min_confidence}


def begun_settings(out: Path) -> dict | None:
    """The settings recorded beside `out` when it was begun; None without a record (a new output, or
    one begun by a tfcap before the record) or with a damaged one (it is written again)."""
    try:
        recorded = json.loads(settings_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def resumed_settings(out: Path, given: dict) -> dict:
    """The settings to continue `out` with: `given` ({SETTINGS name: value, None where not given})
    with the recorded ones where not given. Raises TfcapError naming the option of a given setting
    that differs from the recorded one: a file must not mix two decodings."""
    recorded = begun_settings(out) or {}
    if recorded:  # begun before the decoder's precision was an option: its rows are float32's
        recorded.setdefault("decoder_precision", "float32")
    for name, value in given.items():
        if value is not None and name in recorded and value != recorded[name]:
            raise TfcapError(f"--{name.replace('_', '-')} {value} differs from the {recorded[name]} that {out} was "
                             "begun with: --resume keeps an output's decoding; write another output (or --overwrite) "
                             "to change it")
    return {name: recorded.get(name) if value is None else value for name, value in given.items()}


def _open_output(out: Path, fmt: str, resume: bool, settings: dict | None) -> tuple[int, set[str], tuple[str, ...]]:
    """Prepare `out` (claimed by the caller) for appending; return (its file descriptor, paths already
    captioned, its columns).

    The columns are COLUMNS, or on --resume those of the file (one written by an earlier tfcap may
    lack newer columns: its rows go on without them, `rows.check_columns`).
    """
    done: set[str] = set()
    columns = COLUMNS
    text = out.read_bytes() if resume and out.is_file() else b""
    if text:
        # Check before changing anything: a file that is not ours is left exactly as it is.
        if fmt == "csv":
            header = text.split(b"\n", 1)[0].decode("utf-8", "replace").split(",")
            if header[:1] != ["path"] or b"\n" not in text:
                raise TfcapError(f"{out} is not a caption-dir CSV (header is not {','.join(COLUMNS)}); cannot --resume")
            columns = row_fields.check_columns(header, str(out))
        if fmt == "jsonl" and not text.lstrip().startswith(b"{"):
            raise TfcapError(f"{out} is not a caption-dir JSON Lines file; cannot --resume")
        keep = complete_length(text, fmt)  # a row cut by a kill: dropped
        try:
            found = parse_rows(text[:keep].decode("utf-8"), fmt)
            done = {r["path"] for r in found}
        except (ValueError, KeyError, TypeError, csv.Error) as e:
            raise TfcapError(f"{out} is damaged ({type(e).__name__}: {e}); cannot --resume") from None
        if fmt == "jsonl" and found:
            columns = row_fields.check_columns(list(found[0]), str(out))
        if settings is not None:
            resumed_settings(out, settings)  # raises for a setting that differs from the recorded one
            if begun_settings(out) is None:  # begun by a tfcap before the record: checked from now on
                _record_settings(out, settings)
        if keep < len(text):
            os.truncate(out, keep)
    else:  # new, replaced, or an empty file left by a run killed before its header: begun now
        _record_settings(out, settings)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if not text:
        os.ftruncate(fd, 0)
        append_whole(fd, (",".join(COLUMNS) + "\n").encode() if fmt == "csv" else b"", out)
    if columns != COLUMNS:
        summary(f"caption-dir: {out} has no {', '.join(c for c in COLUMNS if c not in columns)} column (written by "
                "an earlier tfcap): its new rows leave it out too")
    return fd, done, columns


def _record_settings(out: Path, settings: dict | None) -> None:
    """Record `settings` beside `out`; None (a caller that gives none) removes an old record instead."""
    if settings is not None:
        write_text_atomic(settings_path(out), json.dumps(settings) + "\n")
    else:
        settings_path(out).unlink(missing_ok=True)


def nothing_found(images_dir: Path, out) -> dict:
    """The summary and result of a folder without a single image file: the output is not touched."""
    summary(f"caption-dir: 0 images to caption: no image file ({' '.join(images.EXTENSIONS)}) in {images_dir}; "
            f"{out} left as it was")
    return {"images": 0, "ok": 0, "failed": 0, "skipped_done": 0, "seconds": 0.0}


RESUME_HINT = "--overwrite (or --resume to complete it)"


def caption_directory(captioner, images_dir: Path, out: Path | Output, config: CaptionConfig = CaptionConfig(), *,
                      fmt: str | None = None, overwrite: bool = False, resume: bool = False,
                      show_progress: bool = True, settings: dict | None = None, paths: list[str] | None = None) -> dict:
    """Caption every image under `images_dir` into `out`; return counts and timing.

    `captioner` is anything with `preprocess_bytes(tf.string []) -> [S, S, 3]`,
    `encode(pixels [B, S, S, 3]) -> features` (usable inside tf.data) and
    `decode(features) -> outputs` (a dict of tensors [B, ...]: captions, scores, ...; `tfcap.rows`):
    a `tfcap.export.Predictor` over a run directory or an exported SavedModel. `fmt` (csv, jsonl)
    defaults to the suffix of `out` (see `output_format`). `out` may be an `outputs.Output` the
    caller claimed (with append=resume). `settings` (`decoding_settings`), when given, is recorded
    beside a new output, and `resume` refuses to continue an output begun with other ones.
    A folder without an image file leaves `out` as it was (`nothing_found`). `paths`: the images as
    `find_images(images_dir, config.recursive)` lists them, when the caller has listed them already
    (a folder of many files is walked once).
    """
    if overwrite and resume:
        raise TfcapError("--overwrite and --resume contradict each other")
    images_dir = Path(images_dir)
    fmt = output_format(Path(out), fmt)
    # One writer per output (two would both append the missing rows), held to the end.
    with claimed(out, overwrite=overwrite, append=resume, hint=RESUME_HINT) as output:
        all_paths = find_images(images_dir, config.recursive) if paths is None else paths
        if not all_paths:
            return nothing_found(images_dir, output)
        fd, done, columns = _open_output(output.path, fmt, resume, settings)
        try:
            return _caption_into(fd, output.path, captioner, images_dir, all_paths, done, columns, config, fmt,
                                 show_progress)
        finally:
            os.close(fd)


def _caption_into(fd: int, out: Path, captioner, images_dir: Path, all_paths: list[str], done: set[str],
                  columns: tuple[str, ...], config: CaptionConfig, fmt: str, show_progress: bool) -> dict:
    todo = [p for p in all_paths if p not in done]
    clock, counts = Stopwatch(), {"ok": 0, "failed": 0, "withheld": 0}

    def error_row(k: int) -> dict:
        return {"path": todo[k], **row_fields.failed(diagnose(names.path(images_dir, todo[k]), config.max_pixels))}

    try:
        with progress_bar(len(todo), "captioning", show_progress and bool(todo)) as advance:
            def flush(rows: list[dict]) -> None:
                append_whole(fd, format_rows(rows, fmt, columns).encode("utf-8"), out)  # all rows or none
                failed = sum(1 for r in rows if row_fields.is_failure(r))
                counts["failed"] += failed
                counts["withheld"] += sum(1 for r in rows if r["error"]) - failed
                counts["ok"] += len(rows) - failed
                advance(len(rows))

            next_index = 0  # rows are written in walk order: everything before this is written
            for indices, features in feature_batches(images_dir, todo, captioner, config):
                rows = []
                for index, values in zip(indices.numpy(), row_fields.from_outputs(captioner.decode(features))):
                    rows += [error_row(k) for k in range(next_index, int(index))]  # dropped out before it
                    rows.append(row_fields.withhold({"path": todo[index], **values, "error": ""}, config.min_confidence))
                    next_index = int(index) + 1
                flush(rows)
            if next_index < len(todo):  # failures after the last good file
                flush([error_row(k) for k in range(next_index, len(todo))])
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {counts['ok'] + counts['failed']} of {len(todo)} images written to "
                          f"{out}; continue with --resume") from None
    except OSError as e:  # a full disk: the rows written so far are whole
        raise TfcapError(f"cannot write {out}: {e.strerror or e} after {counts['ok'] + counts['failed']} of "
                         f"{len(todo)} images; make room and continue with --resume") from None
    seconds, ok, failed = clock.seconds, counts["ok"], counts["failed"]
    if not todo:
        summary(f"caption-dir: 0 images to caption ({len(done)} already done) -> {out}")
        return {"images": 0, "ok": 0, "failed": 0, "skipped_done": len(done), "seconds": seconds}
    summary(f"caption-dir: {ok + failed} images ({ok} ok, {failed} failed"
            + (f", {counts['withheld']} captions withheld below --min-confidence {config.min_confidence:g}"
               if counts["withheld"] else "")
            + (f", {len(done)} already done" if done else "") + f") in {seconds:.1f} s, "
            f"{(ok + failed) / max(seconds, 1e-9):.1f} images/s -> {out}")
    return {"images": ok + failed, "ok": ok, "failed": failed, "skipped_done": len(done), "seconds": seconds}


def iter_captions(captioner, paths: list[Path], config: CaptionConfig = CaptionConfig()) -> Iterator[dict]:
    """The row of each of a few image files, in the given order (`tfcap caption`): `rows.COLUMNS`,
    the path as given, spelled as outputs spell names (`names.to_text`)."""
    paths = [Path(p) for p in paths]
    results: dict[int, dict] = {}
    absolute = [names.to_text(p.resolve()) for p in paths]
    for indices, features in feature_batches(Path("/"), absolute, captioner, config):
        for index, values in zip(indices.numpy(), row_fields.from_outputs(captioner.decode(features))):
            results[int(index)] = {"path": names.to_text(paths[index]), **values, "error": ""}
    for k, path in enumerate(paths):
        yield results.get(k) or {"path": names.to_text(path), **row_fields.failed(diagnose(path, config.max_pixels))}
