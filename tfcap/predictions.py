"""Reading captions that caption-dir wrote, for `evaluate --predictions` and `gallery`: every row checked.

The input is a caption-dir output in any of its forms:
- a CSV file with a header naming at least `path` and `caption` (`score`, `error` and other columns,
  such as later versions add, are optional), a byte order mark allowed (spreadsheets write one);
- a JSON Lines file: one object per line with `path` and `caption` (strings), `score` (a number,
  null or a numeric string) and `error` (a string or null), other keys ignored;
- a Beam OUT folder: its parts `part-SSSSS-of-NNNNN.csv` (or `.jsonl`), every one of them, read in order.

Within a CSV, a row equal to the header is not a prediction: `cat OUT/part-*.csv` repeats the
header of each part, and such rows are skipped and counted (`Predictions.header_rows`). Paths are
taken exactly as written (`tfcap.names` spelling, no stripping: a file name may end in a space).
A row that is not of this shape is one error line naming the file and line, and quoting at most a
short excerpt of it. Rows naming one path more than once are kept, in file order, and reported by
`Predictions.repeated`: each caller decides what a repeat means.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

from tfcap.errors import TfcapError
from tfcap.rows import FIELDS, parse_value
from tfcap.reading import Object, Optional, Rule, check_shape, csv_rows, describe, excerpt, parse_json, read_text

REQUIRED_COLUMNS = ("path", "caption")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PART = re.compile(r"part-(\d+)-of-(\d+)\.(csv|jsonl)")

_TEXT_OR_NULL = (str, type(None))
_ROW = Object({"path": Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string"),
               "caption": _TEXT_OR_NULL,
               "score": Optional((int, float, str, type(None))),
               "error": Optional(_TEXT_OR_NULL)})


SHOWN = tuple(f for f in FIELDS if f.column != "caption")  # the fields read into `values`


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One row of caption-dir output: `values` holds its other fields (`rows.FIELDS`: score, confidence,
    labels, ...), None where empty or absent; `where` (FILE:LINE) says where it was read."""

    path: str
    caption: str
    error: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: str = dataclasses.field(default="", compare=False)

    @property
    def score(self) -> float | None:
        return self.values.get("score")


@dataclasses.dataclass
class Predictions:
    """The rows of one caption-dir output (a file or a Beam OUT folder), in file order."""

    rows: list[Prediction]
    files: list[Path]
    header_rows: int = 0  # rows equal to the header inside a CSV (concatenated parts), skipped

    def repeated(self) -> dict[str, list[Prediction]]:
        """Path -> its rows, for the paths that have more than one row."""
        by_path: dict[str, list[Prediction]] = {}
        for row in self.rows:
            by_path.setdefault(row.path, []).append(row)
        return {path: rows for path, rows in by_path.items() if len(rows) > 1}


def _prediction(record: dict, where: str) -> Prediction:
    # A number that is not finite (nan, inf) reads as None: it would break a mean and sorting.
    return Prediction(path=record["path"], caption=record.get("caption") or "", error=record.get("error") or "",
                      values={f.column: parse_value(f, record.get(f.column), where) for f in SHOWN}, where=where)


def is_jsonl(path: Path, text: str) -> bool:
    """JSON Lines by the suffix (.jsonl, .ndjson, .json), CSV by .csv, .tsv, .txt; else by the content."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return True
    if suffix in (".csv", ".tsv", ".txt"):
        return False
    return text.lstrip().startswith("{")


def _jsonl_rows(path: Path, text: str) -> list[Prediction]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json(line, where, with_line=False)
        if not isinstance(record, dict):
            raise TfcapError(f"{where}: expected a JSON object with \"path\" and \"caption\", got {describe(record)}")
        rows.append(_prediction(check_shape(record, _ROW, where), where))
    return rows


def _csv_rows(path: Path, text: str) -> tuple[list[Prediction], int]:
    """(the rows, the rows equal to the header that were skipped)."""
    lines = csv_rows(io.StringIO(text, newline=""), str(path))
    _, _, header = next(lines, (1, 1, []))
    columns = [c.strip().lower() for c in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise TfcapError(f"{path} is not caption-dir output: missing column(s) {', '.join(missing)} (header "
                         f"{excerpt(','.join(header))})")
    rows, header_rows = [], 0
    for start, _, fields in lines:
        if not fields:
            continue  # a blank line
        where = f"{path}:{start}"
        if [f.strip().lower() for f in fields] == columns:
            header_rows += 1
            continue
        if len(fields) != len(columns):
            raise TfcapError(f"{where}: expected {len(columns)} fields ({','.join(columns)}), got {len(fields)}")
        record = dict(zip(columns, fields))
        if not record["path"]:
            raise TfcapError(f"{where}: empty path")
        rows.append(_prediction(record, where))
    return rows, header_rows


def read_file(path: Path) -> Predictions:
    """The rows of one caption-dir output file (CSV or JSON Lines)."""
    path = Path(path)
    text = read_text(path, "predictions file")
    if is_jsonl(path, text):
        return Predictions(_jsonl_rows(path, text), [path])
    rows, header_rows = _csv_rows(path, text)
    return Predictions(rows, [path], header_rows)


def parts(folder: Path) -> list[Path]:
    """The parts of a Beam OUT folder, in order; an error if there are none, two kinds, or one is missing."""
    found: dict[str, dict[int, Path]] = {}
    counts: set[tuple[str, int]] = set()
    for entry in sorted(Path(folder).iterdir()):
        match = _PART.fullmatch(entry.name)
        if match and entry.is_file():
            found.setdefault(match.group(3), {})[int(match.group(1))] = entry
            counts.add((match.group(3), int(match.group(2))))
    if not found:
        raise TfcapError(f"{folder} is a folder without part-*.csv or part-*.jsonl files: give a caption-dir "
                         "output file, or the OUT folder of caption-dir --engine beam")
    if len(found) > 1:
        raise TfcapError(f"{folder} holds both part-*.csv and part-*.jsonl files: give one of them")
    (kind, by_index), = found.items()
    if len(counts) > 1:
        raise TfcapError(f"{folder} holds parts of {len(counts)} different runs (part-*-of-N with several N)")
    (_, total), = counts
    absent = [i for i in range(total) if i not in by_index]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise TfcapError(f"{folder} lacks part-{absent[0]:05d}-of-{total:05d}.{kind}{more}: an unfinished or "
                         "damaged output")
    return [by_index[i] for i in range(total)]


def read(path: Path) -> Predictions:
    """Every row of a caption-dir output: a CSV or JSON Lines file, or a Beam OUT folder of parts."""
    path = Path(path)
    if path.is_dir():
        each = [read_file(part) for part in parts(path)]
        return Predictions([row for p in each for row in p.rows], [f for p in each for f in p.files],
                           sum(p.header_rows for p in each))
    if not path.is_file():
        raise TfcapError(f"predictions file {path} does not exist")
    return read_file(path)
