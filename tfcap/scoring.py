"""`tfcap score`: the confidence of given image-caption pairs, a reference-free caption metric.

Pairs come from a CSV (a header naming an image column, `path`, `image`, `file` or `filename`, and
a `caption` column) or JSON Lines (objects with the same keys). Image paths are relative to
`--images`, else to the folder of the pairs file. Every input row comes back, in order, with all
its fields and `score` (the captioner's mean log-probability per token of the caption),
`confidence`, `in_domain`, `typicality` (tfcap.confidence; empty for a model without a fitted
confidence) and `error`: a missing or broken image, or an empty caption, is an error row, never a
stopped run.

Each image is read, decoded and encoded once however many captions it has (one tf.data pipeline,
as caption-dir's), then its captions are assessed in batches in one graph call each.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcap import caption
from tfcap.errors import Interrupted, TfcapError
from tfcap.outputs import Output, claimed
from tfcap.progress import Stopwatch, progress_bar, summary
from tfcap.reading import csv_rows, describe, excerpt, parse_json, read_text

IMAGE_COLUMNS = ("path", "image", "file", "filename")
ADDED = ("score", "confidence", "in_domain", "typicality", "error")


def read_pairs(path: Path) -> tuple[list[dict], list[str], str]:
    """(rows as dicts of strings or JSON values, their field names in order, "csv" or "jsonl") of a pairs
    file, through `tfcap.reading` (a byte order mark dropped, errors naming the file and line)."""
    path = Path(path)
    text = read_text(path, "pairs file")
    fmt = caption.output_format(path) if path.suffix.lower() in (".csv", *caption.JSONL_SUFFIXES) else (
        "jsonl" if text.lstrip().startswith("{") else "csv")
    rows: list[dict] = []
    if fmt == "jsonl":
        fields: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = parse_json(line, f"{path}:{number}", with_line=False)
                if not isinstance(row, dict):
                    raise TfcapError(f"{path}:{number}: expected a JSON object, got {describe(row)}")
                rows.append(row)
                fields += [k for k in row if k not in fields]
    else:
        lines = csv_rows(io.StringIO(text, newline=""), str(path))
        _, _, fields = next(lines, (1, 1, []))
        for start, _, values in lines:
            if values and len(values) != len(fields):
                raise TfcapError(f"{path}:{start}: expected {len(fields)} fields ({excerpt(','.join(fields))}), "
                                 f"got {len(values)}")
            if values:
                rows.append(dict(zip(fields, values)))
    image_column = next((c for c in IMAGE_COLUMNS if c in fields), None)
    if image_column is None or "caption" not in fields:
        raise TfcapError(f"{path} needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption column; "
                         f"it has {excerpt(', '.join(map(str, fields)) or 'none')}")
    return rows, list(fields), fmt


def _text(value) -> str:
    return "" if value is None else str(value)


def format_rows(rows: list[dict], fields: list[str], fmt: str) -> str:
    """Scored rows (floats, None, booleans in the added fields) as CSV or JSON Lines text (a float that
    is not finite: "-inf" in CSV, null in JSON Lines)."""
    if fmt == "jsonl":  # JSON has no infinity (a score without a finite log-probability): null
        return "".join(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                   for k, v in row.items()}, ensure_ascii=False) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.4f}" if isinstance(v, float) else
                             str(v).lower() if isinstance(v, bool) else v) for k, v in row.items()})
    return buffer.getvalue()


def score_pairs(predictor, pairs_file: Path, out: Path | Output, *, images_dir: Path | None = None, batch_size: int = 32,
                max_pixels: int | None = None, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Score every pair of `pairs_file` with `predictor` (export.Predictor) into `out`; return counts.

    The output has the input's fields, then `ADDED`; its format follows `out`'s suffix (CSV unless
    .jsonl, .ndjson, .json), the input's when `out` has none of these. `out` may be an `outputs.Output`
    the caller claimed; it is written whole when every pair is scored.
    """
    pairs_file, target, out = Path(pairs_file), out, Path(out)
    rows, fields, in_fmt = read_pairs(pairs_file)
    suffix = out.suffix.lower()
    fmt = caption.output_format(out) if suffix in (".csv", *caption.JSONL_SUFFIXES) else in_fmt
    image_column = next(c for c in IMAGE_COLUMNS if c in fields)
    root = Path(images_dir) if images_dir is not None else pairs_file.resolve().parent
    config = caption.CaptionConfig(batch_size=batch_size, **({"max_pixels": max_pixels} if max_pixels else {}))

    images: list[str] = []  # distinct image paths, first-seen order
    owner = np.full(len(rows), -1)
    index_of: dict[str, int] = {}
    results: list[dict] = [{} for _ in rows]
    for k, row in enumerate(rows):
        name, text = _text(row.get(image_column)).strip(), _text(row.get("caption")).strip()
        if not name:
            results[k] = {"error": f"no {image_column}"}
        elif not text:
            results[k] = {"error": "empty caption"}
        else:
            owner[k] = index_of.setdefault(name, len(images))
            if owner[k] == len(images):
                images.append(name)
    captions_of = [[] for _ in images]
    for k in np.flatnonzero(owner >= 0):
        captions_of[owner[k]].append(int(k))

    clock, done = Stopwatch(), np.zeros(len(images), bool)
    inputs = {"pairs file": pairs_file, "images folder": images_dir}
    with claimed(target, overwrite=overwrite, inputs=inputs) as output:
        try:
            full = [str((root / name).resolve()) if not Path(name).is_absolute() else name for name in images]
            with progress_bar(len(rows), "scoring", show_progress and bool(rows)) as advance:
                for indices, features in caption.feature_batches(Path("/"), full, predictor, config):
                    indices = indices.numpy()
                    members = [k for i in indices for k in captions_of[i]]
                    positions = np.concatenate([[j] * len(captions_of[i]) for j, i in enumerate(indices)]).astype(np.int32)
                    texts = tf.constant([_text(rows[k]["caption"]) for k in members], tf.string, shape=[len(members)])
                    picked = {key: tf.gather(value, positions) for key, value in features.items()}
                    assessed = {key: value.numpy() for key, value in predictor.assess(picked, texts).items()}
                    for j, k in enumerate(members):
                        results[k] = {key: value[j].item() for key, value in assessed.items()}
                    done[indices] = True
                    advance(len(members))
                for i in np.flatnonzero(~done):
                    reason = caption.diagnose(Path(full[i]), config.max_pixels)
                    for k in captions_of[i]:
                        results[k] = {"error": reason}
                advance(int((owner < 0).sum()) + sum(len(captions_of[i]) for i in np.flatnonzero(~done)))
            scored = [{**row, **{key: results[k].get(key) for key in ADDED}} for k, row in enumerate(rows)]
            for row in scored:
                row["error"] = row["error"] or ""
                for key in ("score", "confidence", "typicality"):
                    if isinstance(row[key], float):
                        row[key] = round(row[key], 4) if fmt == "jsonl" else row[key]
            all_fields = [f for f in fields if f not in ADDED] + list(ADDED)
            output.write_text(format_rows(scored, all_fields, fmt))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: nothing written to {out}") from None
    failed = sum(1 for row in scored if row["error"])
    summary(f"score: {len(rows)} pairs ({len(rows) - failed} scored, {failed} failed) of {len(images)} images "
            f"in {clock.seconds:.1f} s, {len(rows) / max(clock.seconds, 1e-9):.1f} pairs/s -> {out}")
    return {"pairs": len(rows), "ok": len(rows) - failed, "failed": failed, "images": len(images),
            "seconds": clock.seconds}
