"""caption-dir's rows: a captioner's per-image outputs as columns, written as CSV or JSON Lines.

A captioner's `decode(features)` returns a dict of tensors, one entry per image along the first
axis (`model.Captioner.describe` makes it; over a SavedModel its `decode`, `caption_pixels` and
`serving_default` return it):

  captions     tf.string [B]      the caption
  scores       tf.float32 [B]     its mean log-probability per token
  confidence   tf.float32 [B]     how likely the caption is right, in [0, 1] (with a fitted confidence:
                                  tfcap.confidence)
  in_domain    tf.bool [B]        whether the image is like the training images
  typicality   tf.float32 [B]     in (0, 1]: the share of validation images at least as far from them
  labels       tf.string [B, K]   the K most probable ImageNet classes (with a classifier: tfcap.labels)
  label_probs  tf.float32 [B, K]  their probabilities

Each `Field` of FIELDS makes one column of one or more of those outputs; a row is `path`, the
fields in the order of FIELDS, then `error` (COLUMNS). A field whose outputs a captioner does not
return (a SavedModel exported before the field existed, an encoder without a classifier,
`--no-labels`) is None in the row: empty in CSV, null in JSON Lines. Everything that writes or
shows rows (caption-dir's local and Beam engines, `tfcap caption`, the gallery) goes through
FIELDS: a new per-image output is its tensor in `Captioner.describe` and one Field here.

A field's value by kind: in a row (Python) / in CSV / in JSON Lines:
  text    str / as is / a string
  number  float or None / 4 decimals, or empty / a number rounded to 4 decimals, or null (also
          for a value that is not finite, which JSON cannot hold)
  flag    bool or None / true or false, or empty / true or false, or null
  labels  [(name, probability), ...] or None / "tabby 0.62; tiger cat 0.21", or empty /
          [{"name": "tabby", "probability": 0.6213}, ...], or null
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any, Iterable

import numpy as np

from tfcap.errors import TfcapError
from tfcap.reading import excerpt

TEXT, NUMBER, FLAG, LABELS = "text", "number", "flag", "labels"


@dataclasses.dataclass(frozen=True)
class Field:
    """One column of caption-dir's rows and the captioner outputs it is made of."""

    column: str  # the CSV column and JSON Lines key
    kind: str  # TEXT, NUMBER, FLAG or LABELS (the module docstring)
    outputs: tuple[str, ...]  # the tensors of `decode`'s dict it reads: one, or (names, probabilities) for LABELS
    title: str  # what the gallery calls it


FIELDS = (
    Field("caption", TEXT, ("captions",), "caption"),
    Field("score", NUMBER, ("scores",), "score (mean log-probability per token)"),
    Field("confidence", NUMBER, ("confidence",), "confidence"),
    Field("in_domain", FLAG, ("in_domain",), "in domain"),
    Field("typicality", NUMBER, ("typicality",), "typicality"),
    Field("labels", LABELS, ("labels", "label_probs"), "ImageNet labels"),
)
COLUMNS = ("path", *(f.column for f in FIELDS), "error")
BY_COLUMN = {f.column: f for f in FIELDS}


def from_outputs(outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Each image's field values ({column: value}, every field) from one batch of `decode` outputs.

    outputs: the dict of `decode`, tensors or NumPy arrays, each [B, ...]; the fields whose outputs are
    missing are None.
    """
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    count = len(arrays["captions"])
    columns = {}
    for f in FIELDS:
        if all(name in arrays for name in f.outputs):
            columns[f.column] = _python_values(f, [arrays[name] for name in f.outputs])
        else:
            columns[f.column] = [None] * count
    return [{column: values[k] for column, values in columns.items()} for k in range(count)]


def _python_values(f: Field, arrays: list[np.ndarray]) -> list:
    if f.kind == TEXT:
        return [value.decode("utf-8") for value in arrays[0]]
    if f.kind == NUMBER:
        return [float(value) for value in arrays[0]]
    if f.kind == FLAG:
        return [bool(value) for value in arrays[0]]
    names, probabilities = arrays
    return [[(name.decode("utf-8"), float(p)) for name, p in zip(row_names, row_probabilities)]
            for row_names, row_probabilities in zip(names, probabilities)]


WITHHELD = "withheld: "  # how the error of a caption left out by --min-confidence begins


def withhold(row: dict[str, Any], min_confidence: float | None) -> dict[str, Any]:
    """`row` with its caption left out, and the reason as its error, when its confidence is below
    `min_confidence` (caption-dir --min-confidence); its other fields stay, to say why. Rows without a
    confidence (failed images, a model without one) are left as they are."""
    trust = row.get("confidence")
    if min_confidence is None or trust is None or trust >= min_confidence or row.get("error"):
        return row
    return {**row, "caption": "", "error": f"{WITHHELD}confidence {trust:.4f} < --min-confidence {min_confidence:g}"}


def is_failure(row: dict[str, Any]) -> bool:
    """Whether a row is an image that could not be captioned (not one whose caption was withheld)."""
    return bool(row.get("error")) and not str(row["error"]).startswith(WITHHELD)


def failed(error: str) -> dict[str, Any]:
    """The row of an image that failed, but its path: an empty caption, no other value, and why."""
    return {**{f.column: "" if f.kind == TEXT else None for f in FIELDS}, "error": error}


def format_value(f: Field, value, fmt: str):
    """A field's value as CSV text (fmt "csv") or as a JSON value (fmt "jsonl"); see the module docstring."""
    if value is None:
        return "" if fmt == "csv" else None
    if f.kind == TEXT:
        return value
    if f.kind == NUMBER:  # JSON has no infinity (a score without a finite log-probability): null
        return f"{value:.4f}" if fmt == "csv" else round(value, 4) if math.isfinite(value) else None
    if f.kind == FLAG:
        return ("true" if value else "false") if fmt == "csv" else bool(value)
    if fmt == "csv":
        return "; ".join(f"{name} {p:.2f}" for name, p in value)
    return [{"name": name, "probability": round(p, 4)} for name, p in value]


def format_rows(rows: Iterable[dict], fmt: str, columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows as CSV lines without the header (fmt "csv") or JSON Lines ("jsonl"), each ending in a newline.

    columns: the columns to write, in order (default COLUMNS; resuming a file written by an earlier
    tfcap, its own, see `check_columns`); a row's other keys are left out.
    """
    def formatted(row: dict) -> dict:
        return {c: format_value(BY_COLUMN[c], row[c], fmt) if c in BY_COLUMN else row[c] for c in columns}

    if fmt == "jsonl":
        return "".join(json.dumps(formatted(r), ensure_ascii=False) + "\n" for r in rows)
    buffer = io.StringIO()
    csv.DictWriter(buffer, columns, lineterminator="\n").writerows(formatted(r) for r in rows)
    return buffer.getvalue()


def tab_line(path: str, row: dict) -> str:
    """`tfcap caption`'s line: the path and every field as CSV writes it, tab-separated."""
    return "\t".join([path, *(str(format_value(f, row[f.column], "csv")) for f in FIELDS)])


def check_columns(columns: list[str] | tuple[str, ...], where: str) -> tuple[str, ...]:
    """`columns` of an existing output if they are a caption-dir layout this tfcap can append to: path
    first, error last, known fields in between in the order of FIELDS (those of an earlier tfcap, which
    may lack newer ones); else a one-line TfcapError."""
    columns = tuple(columns)
    known = [c for c in COLUMNS if c in columns]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise TfcapError(f"{where} has columns this tfcap does not write ({', '.join(unknown)}): it was written by "
                         "another program or a newer tfcap; caption into a new file, or --overwrite it")
    if len(known) != len(columns) or tuple(known) != columns or columns[:2] != ("path", "caption") \
            or columns[-1] != "error":
        raise TfcapError(f"{where} is not a caption-dir output (columns {','.join(columns)}, expected "
                         f"{','.join(COLUMNS)}); cannot --resume")
    return columns


def parse_value(f: Field, raw, where: str):
    """A field's value back from CSV text or a JSON value; None when empty; TfcapError naming `where`
    when it is not of the field's kind. A number that is not finite (nan, inf) reads as None."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "" if f.kind == TEXT else None
    if f.kind == TEXT:
        return str(raw)
    if f.kind == NUMBER:
        return _number(raw, f, where)
    if f.kind == FLAG:
        if isinstance(raw, bool) or raw in ("true", "false"):
            return raw is True or raw == "true"
        raise TfcapError(f"{where}: {f.column} {excerpt(raw, 40)} is not true or false")
    if isinstance(raw, str):
        pairs = [item.strip().rpartition(" ") for item in raw.split(";")]
        return [(name, _number(p, f, where)) for name, _, p in pairs]
    try:
        return [(str(item["name"]), _number(item["probability"], f, where)) for item in raw]
    except (TypeError, KeyError):
        raise TfcapError(f"{where}: {f.column} {excerpt(raw, 40)} is not a list of {{name, probability}}") from None


def _number(raw, f: Field, where: str) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise TfcapError(f"{where}: {f.column} {excerpt(raw, 40)} is not a number") from None
    return value if math.isfinite(value) else None
