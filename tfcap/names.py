"""File names as tfcap writes them in its outputs, and back: any name a file system allows, round-trip.

A POSIX file name is a byte string; most are UTF-8, but a name written by another system (Latin-1
`caf\\xe9.jpg`, a cut multi-byte character) need not be. Python hands such a name out with
surrogate escapes (`os.fsdecode`), which neither UTF-8 text, CSV nor JSON can carry. Outputs
(CSV and JSON Lines, local and Beam engines) hold the name as text, spelled so:

- a name that is valid UTF-8 without a backslash is written as it is (nearly every name);
- each byte that is not part of valid UTF-8 is written `\\xHH` (two lower-case hex digits);
- a backslash is written `\\\\`, so that a name really holding `\\xff` stays apart from byte 0xff.

`to_text` writes that spelling, `to_bytes` reads it back to the same bytes, and `join` gives the
path to open, so `caption-dir --resume`, `evaluate --predictions` and `gallery` find the very file.
A text that never came from `to_text` (a lone surrogate, a backslash before another character)
reads back leniently: surrogates as the bytes they escape, other backslashes as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPE = re.compile(rb"\\(\\|x[0-9a-fA-F]{2})")


def to_text(name: str | bytes | os.PathLike) -> str:
    """The output spelling of a file name (bytes, or str as Python's file functions give it)."""
    raw = os.fsencode(name)
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def to_bytes(text: str) -> bytes:
    """The bytes of the file name that `to_text` spelled as `text`."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that escapes no byte (JSON's "\ud83d"): kept as such
        raw = text.encode("utf-8", "surrogatepass")
    if b"\\" not in raw:
        return raw
    return _ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]), raw)


def join(root: str | os.PathLike, text: str) -> str:
    """The path of the file `text` names (as an output spells it) under `root`, as a str that Python's
    file functions take (undecodable bytes as surrogate escapes); `os.fsencode` of it for TensorFlow."""
    return os.path.join(os.fsdecode(root), os.fsdecode(to_bytes(text)))


def path(root: str | os.PathLike, text: str) -> Path:
    """`join` as a Path."""
    return Path(join(root, text))
