"""Captioning whole directories: the library behind `tfcap caption-dir` and `tfcap caption`.

One tf.data pipeline reads, checks the header size of, decodes and preprocesses files in
parallel, batches them and runs the encoder on each batch; beam search and detokenization run on
the encoded batches as they come, so the pipeline encodes batch k+1 while batch k is decoded. A
file that fails (missing, empty, not an image, truncated, too many pixels) drops out of the
pipeline and gets an error row in its place; the batch goes on.

Output rows (CSV or JSON Lines): path (relative to the images folder), caption, score (mean
log-probability per token), error (empty when fine), one per candidate file in walk order. Each
batch's rows are appended with a single write and flushed, so a killed run leaves only whole
rows, and `resume` appends exactly the missing ones.
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

from tfcap import images, records
from tfcap.errors import Interrupted, TfcapError
from tfcap.outputs import OutputLock, refuse_existing
from tfcap.progress import Stopwatch, progress_bar, summary

COLUMNS = ("path", "caption", "score", "error")


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How images are captioned."""

    beam_size: int = 3
    length_penalty: float = 0.0
    batch_size: int = 32
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # refuse larger images by their header, before decoding
    recursive: bool = True


def find_images(root: Path, recursive: bool = True) -> list[str]:
    """Image files under `root` (by extension, any case), as sorted relative POSIX paths.

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
        found.extend((relative / f).as_posix() for f in files if f.lower().endswith(images.EXTENSIONS))
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
        shape = images.header_shape(tf.constant(Path(path).read_bytes())).numpy()
    except tf.errors.OpError:  # a JPEG cut before its size marker: the full check below says why
        shape = (-1, -1)
    if shape[0] * shape[1] > max_pixels:
        return f"too large ({shape[1]}x{shape[0]} = {shape[0] * shape[1]} pixels > --max-pixels {max_pixels})"
    return images.diagnose(path)


def pixel_batches(root: Path, paths: list[str], preprocess, config: CaptionConfig) -> tf.data.Dataset:
    """(index tf.int64 [B], pixels tf.float32 [B, S, S, 3]) of the files that load; failures drop out."""
    def load(index, path):
        data = tf.io.read_file(path)
        with tf.control_dependencies([_too_large_check(data, config.max_pixels)]):
            return index, preprocess(data)

    # shape=[n]: with no paths at all, an empty string vector (not a float one), so nothing to do is no error
    full = tf.constant([str(Path(root) / p) for p in paths], tf.string, shape=[len(paths)])
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


def _format_rows(rows: list[dict], fmt: str) -> str:
    """Rows with `score` a float (None on error rows) as CSV (4 decimals, empty) or JSON Lines (number, null)."""
    if fmt == "jsonl":
        return "".join(json.dumps({**r, "score": None if r["score"] is None else round(r["score"], 4)},
                                  ensure_ascii=False) + "\n" for r in rows)
    buffer = io.StringIO()
    csv.DictWriter(buffer, COLUMNS, lineterminator="\n").writerows(
        {**r, "score": "" if r["score"] is None else f"{r['score']:.4f}"} for r in rows)
    return buffer.getvalue()


def read_rows(path: Path, fmt: str | None = None) -> list[dict]:
    """Rows of an existing output (CSV or JSON Lines: `fmt`, else by suffix); a cut-off last line is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if (fmt or output_format(path)) == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def _open_output(out: Path, fmt: str, overwrite: bool, resume: bool) -> tuple[int, set[str]]:
    """Prepare `out` for appending; return (its file descriptor, paths already captioned)."""
    done: set[str] = set()
    text = out.read_bytes() if resume and out.is_file() else b""
    if text:
        # Check before changing anything: a file that is not ours is left exactly as it is.
        if fmt == "csv" and not text.startswith((",".join(COLUMNS) + "\n").encode()):
            raise TfcapError(f"{out} is not a caption-dir CSV (header is not {','.join(COLUMNS)}); cannot --resume")
        if fmt == "jsonl" and not text.lstrip().startswith(b"{"):
            raise TfcapError(f"{out} is not a caption-dir JSON Lines file; cannot --resume")
        keep = text.rfind(b"\n") + 1  # a row cut by a kill has no newline yet: drop it
        try:
            done = {r["path"] for r in read_rows(out, fmt)}
        except (ValueError, KeyError, TypeError, csv.Error) as e:
            raise TfcapError(f"{out} is damaged ({type(e).__name__}: {e}); cannot --resume") from None
        if keep < len(text):
            os.truncate(out, keep)
    else:  # new, or an empty file left by a run killed before its header (resume: nothing to keep)
        refuse_existing(out, overwrite or (resume and out.is_file()), "--overwrite (or --resume to complete it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(",".join(COLUMNS) + "\n" if fmt == "csv" else "", encoding="utf-8")
    return os.open(out, os.O_WRONLY | os.O_APPEND), done


def caption_directory(captioner, images_dir: Path, out: Path, config: CaptionConfig = CaptionConfig(), *,
                      fmt: str | None = None, overwrite: bool = False, resume: bool = False,
                      show_progress: bool = True) -> dict:
    """Caption every image under `images_dir` into `out`; return counts and timing.

    `captioner` is anything with `preprocess_bytes(tf.string []) -> [S, S, 3]`,
    `encode(pixels [B, S, S, 3]) -> features` (usable inside tf.data) and
    `decode(features) -> (captions tf.string [B], scores tf.float32 [B])`:
    a `tfcap.export.Predictor` over a run directory or an exported SavedModel. `fmt` (csv, jsonl)
    defaults to the suffix of `out` (see `output_format`).
    """
    if overwrite and resume:
        raise TfcapError("--overwrite and --resume contradict each other")
    images_dir, out = Path(images_dir), Path(out)
    fmt = output_format(out, fmt)
    all_paths = find_images(images_dir, config.recursive)
    lock = OutputLock(out)  # one writer per output: two would both append the missing rows
    try:
        fd, done = _open_output(out, fmt, overwrite, resume)
    except BaseException:
        lock.release()
        raise
    todo = [p for p in all_paths if p not in done]
    clock, counts = Stopwatch(), {"ok": 0, "failed": 0}

    def error_row(k: int) -> dict:
        return {"path": todo[k], "caption": "", "score": None, "error": diagnose(images_dir / todo[k], config.max_pixels)}

    try:
        with progress_bar(len(todo), "captioning", show_progress and bool(todo)) as advance:
            def flush(rows: list[dict]) -> None:
                os.write(fd, _format_rows(rows, fmt).encode("utf-8"))  # one write: whole rows only
                failed = sum(1 for r in rows if r["error"])
                counts["failed"] += failed
                counts["ok"] += len(rows) - failed
                advance(len(rows))

            next_index = 0  # rows are written in walk order: everything before this is written
            for indices, features in feature_batches(images_dir, todo, captioner, config):
                captions, scores = captioner.decode(features)
                rows = []
                for index, caption, score in zip(indices.numpy(), captions.numpy(), scores.numpy()):
                    rows += [error_row(k) for k in range(next_index, int(index))]  # dropped out before it
                    rows.append({"path": todo[index], "caption": caption.decode("utf-8"),
                                 "score": float(score), "error": ""})
                    next_index = int(index) + 1
                flush(rows)
            if next_index < len(todo):  # failures after the last good file
                flush([error_row(k) for k in range(next_index, len(todo))])
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {counts['ok'] + counts['failed']} of {len(todo)} images written to "
                          f"{out}; continue with --resume") from None
    finally:
        os.close(fd)
        lock.release()
    seconds, ok, failed = clock.seconds, counts["ok"], counts["failed"]
    if not todo:
        summary(f"caption-dir: 0 images to caption ({len(done)} already done) -> {out}")
        return {"images": 0, "ok": 0, "failed": 0, "skipped_done": len(done), "seconds": seconds}
    summary(f"caption-dir: {ok + failed} images ({ok} ok, {failed} failed"
            + (f", {len(done)} already done" if done else "") + f") in {seconds:.1f} s, "
            f"{(ok + failed) / max(seconds, 1e-9):.1f} images/s -> {out}")
    return {"images": ok + failed, "ok": ok, "failed": failed, "skipped_done": len(done), "seconds": seconds}


def iter_captions(captioner, paths: list[Path], config: CaptionConfig = CaptionConfig()) -> Iterator[tuple[str, str, str]]:
    """(path, caption, error) for a few image files, in the given order (`tfcap caption`)."""
    paths = [Path(p) for p in paths]
    results: dict[int, tuple[str, str]] = {}
    for indices, features in feature_batches(Path("/"), [str(p.resolve()) for p in paths], captioner, config):
        captions, _ = captioner.decode(features)
        for index, caption in zip(indices.numpy(), captions.numpy()):
            results[int(index)] = (caption.decode("utf-8"), "")
    for k, path in enumerate(paths):
        caption, error = results.get(k) or ("", diagnose(path, config.max_pixels))
        yield str(path), caption, error
