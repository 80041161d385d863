"""One way to read a user's file: text, JSON and CSV, checked for type and shape, errors in one short line.

Every reader of a file tfcap did not just write itself (captions, annotations, a records manifest,
predictions) goes through here, so that a damaged or foreign file is always one `TfcapError` line
naming the file and the entry (`FILE:LINE`, `FILE: images[3].split`) and saying what was expected
and what was found, never a traceback. Such a line quotes at most `EXCERPT` characters of the file
(`excerpt`): a file's first line can be megabytes long (a Karpathy JSON is one line).

- Text is UTF-8; a byte order mark (spreadsheet exports) is dropped.
- JSON: parse errors name line and column; nesting too deep to parse (json's recursion limit) is
  an error, not a RecursionError. `check_shape` then holds a parsed value against a small schema
  (`Object`, `Optional`, `Each`, `ListOf`, `Rule`, types); it walks the schema, never the value, so
  a value of any depth is checked in bounded time and stack.
- CSV: `csv_rows` gives each row with the line it starts on; malformed CSV names that line.
- `bad_line` is the `--skip-bad-lines` policy: an error naming the entry, or, with the option, the
  entry listed (and so counted) and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tfcap.errors import TfcapError

EXCERPT = 80  # characters of the user's text quoted in one error line


def clip(text: str, limit: int = EXCERPT) -> str:
    """`text` cut to `limit` characters with an ellipsis, for a message that must stay one short line."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """`text` quoted (repr), cut to about `limit` characters with an ellipsis: safe to put in one line."""
    text = str(text)
    if len(text) > limit:
        return repr(text[:limit]) + "…"
    return repr(text)


def describe(value: object) -> str:
    """A few words on what a parsed JSON value is (`a list of 3 items`, `the string 'x'`), never its whole
    text: a value may be megabytes long or nested a thousand deep (repr would recurse)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}" if len(str(value)) <= 20 else "a long number"
    if isinstance(value, str):
        return f"the string {excerpt(value, 40)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} key{'s' if len(value) != 1 else ''}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return type(value).__name__


def bad_line(where: str, reason: str, skip: bool, bad: list[str]) -> None:
    """A line (or entry) that cannot be read: an error naming it, or listed in `bad` with `skip`."""
    message = f"{where}: {reason}"
    if not skip:
        raise TfcapError(f"{message} (pass --skip-bad-lines to skip such lines)")
    bad.append(message)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> TfcapError:
    return TfcapError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")


def read_text(path: Path, what: str = "file") -> str:
    """The text of a UTF-8 file, without a byte order mark; one line naming it if it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except OSError as e:
        raise TfcapError(f"cannot read {what} {path}: {e.strerror or e}") from None


def numbered_lines(path: Path, encoding: str = "utf-8-sig") -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its end) of a text file; an error naming it if not `encoding`."""
    try:
        with open(path, encoding=encoding) as f:
            for number, line in enumerate(f, start=1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def parse_json(text: str, where: str, reduce: Callable[[dict], object] | None = None, *,
               with_line: bool = True) -> object:
    """`text` parsed as JSON (`reduce` as object hook: to shrink each object as it is read); errors name
    `where` (and the line, `with_line`) and the column."""
    try:
        return json.loads(text, object_hook=reduce)
    except json.JSONDecodeError as e:
        raise TfcapError(f"{where}{f':{e.lineno}' if with_line else ''}: not valid JSON ({e.msg} at column "
                         f"{e.colno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise TfcapError(f"{where}: not readable JSON ({clip(e)})") from None
    except RecursionError:
        raise TfcapError(f"{where}: JSON nested too deeply to read") from None


def load_json(path: Path, reduce: Callable[[dict], object] | None = None) -> object:
    """A JSON file parsed with `reduce` as object hook; errors name the file and line."""
    return parse_json(read_text(path), str(path), reduce)


def csv_rows(lines: Iterable[str], where: str) -> Iterator[tuple[int, int, list[str]]]:
    """(line where the row starts, line where it ends, its fields) of CSV `lines` (a file opened with
    newline="", or `io.StringIO(text, newline="")`); malformed CSV is an error naming `where` and the line.

    A quoted field may hold line ends (a file name can), so a row may span lines.
    """
    reader = csv.reader(lines)
    start = 1
    try:
        for row in reader:
            yield start, reader.line_num, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise TfcapError(f"{where}:{start}: malformed CSV ({clip(e, 120)})") from None


def csv_file_rows(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """`csv_rows` of a UTF-8 file (a byte order mark dropped), read as it goes."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv_rows(f, str(path))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


# ---------------------------------------------------------------------------------------------
# Shapes of parsed JSON


class ShapeError(Exception):
    """A value that does not have its schema's shape: `location` (`splits.train.shards[0]`) and what was wrong."""

    def __init__(self, location: str, message: str):
        super().__init__(f"{location}: {message}" if location else message)
        self.location, self.message = location, message


@dataclasses.dataclass(frozen=True)
class Rule:
    """A value for which `test(value)` holds, described as `description` (`a sha256 in hex`)."""

    test: Callable[[object], bool]
    description: str


@dataclasses.dataclass(frozen=True)
class Optional:
    """A key of an `Object` that may be absent."""

    shape: object


@dataclasses.dataclass(frozen=True)
class Object:
    """A JSON object with these keys (`Optional` ones may be absent); other keys are allowed, refused if
    `closed`, or must have the shape `rest`."""

    fields: dict
    closed: bool = False
    rest: object = None


@dataclasses.dataclass(frozen=True)
class Each:
    """A JSON object whose every value has `shape` (keys are free: split names, file names)."""

    shape: object


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A JSON array whose every item has `shape`."""

    shape: object


def _type_names(types: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
             list: "a list", dict: "an object"}
    if float in types:  # an integer is a number
        types = tuple(t for t in types if t is not int)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: object, types: tuple) -> bool:
    if isinstance(value, bool) and bool not in types:  # JSON's true is no integer
        return False
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _at(location: str, key: object) -> str:
    if isinstance(key, int):
        return f"{location}[{key}]"
    key = str(key)
    shown = key if key.isidentifier() and len(key) <= 40 else excerpt(key, 40)
    return f"{location}.{shown}" if location else shown


def _check(value: object, shape: object, location: str) -> None:
    if isinstance(shape, type):
        shape = (shape,)
    if isinstance(shape, tuple):
        if not _is(value, shape):
            raise ShapeError(location, f"expected {_type_names(shape)}, got {describe(value)}")
    elif isinstance(shape, Rule):
        if not shape.test(value):
            raise ShapeError(location, f"expected {shape.description}, got {describe(value)}")
    elif isinstance(shape, Object):
        if not isinstance(value, dict):
            raise ShapeError(location, f"expected an object, got {describe(value)}")
        for key, field in shape.fields.items():
            if key in value:
                _check(value[key], field.shape if isinstance(field, Optional) else field, _at(location, key))
            elif not isinstance(field, Optional):
                raise ShapeError(location, f"missing {key!r}")
        others = (k for k in value if k not in shape.fields)
        if shape.closed:
            unknown = next(others, None)
            if unknown is not None:
                raise ShapeError(location, f"unknown key {excerpt(unknown, 40)}")
        elif shape.rest is not None:
            for key in others:
                _check(value[key], shape.rest, _at(location, key))
    elif isinstance(shape, Each):
        if not isinstance(value, dict):
            raise ShapeError(location, f"expected an object, got {describe(value)}")
        for key, item in value.items():
            _check(item, shape.shape, _at(location, key))
    elif isinstance(shape, ListOf):
        if not isinstance(value, list):
            raise ShapeError(location, f"expected a list, got {describe(value)}")
        for index, item in enumerate(value):
            _check(item, shape.shape, _at(location, index))
    else:
        raise TypeError(f"not a shape: {shape!r}")


def shape_error(value: object, shape: object) -> ShapeError | None:
    """The first place where `value` does not have `shape`, or None."""
    try:
        _check(value, shape, "")
    except ShapeError as e:
        return e
    return None


def check_shape(value: object, shape: object, where: str) -> object:
    """`value` if it has `shape`, else TfcapError `WHERE: LOCATION: expected ..., got ...`."""
    error = shape_error(value, shape)
    if error is not None:
        raise TfcapError(f"{where}: {error}")
    return value
