"""File names that are not UTF-8 (issue 23): captioned or given an error row by both engines, written in
`tfcap.names`' spelling, and read back to the same bytes by --resume, evaluate and gallery."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from conftest import ok, png
from tfcap import names

# Byte names a POSIX file system allows: Latin-1, a cut UTF-8 sequence, a literal backslash escape.
ODD = {b"bad\xff.png": "bad\\xff.png", b"caf\xe9.png": "caf\\xe9.png", b"back\\xff.png": "back\\\\xff.png",
       "sn\u00f8.png".encode(): "sn\u00f8.png", b"cut\xc3.png": "cut\\xc3.png"}


def test_names_round_trip_any_bytes_and_leave_utf8_names_alone():
    for raw, spelled in ODD.items():
        assert names.to_text(raw) == spelled and names.to_bytes(spelled) == raw
        assert names.to_text(os.fsdecode(raw)) == spelled  # as os.listdir gives it
    rng = random.Random(0)
    alphabet = [0x5C, 0x78, 0x66, 0x30, 0xFF, 0xC3, 0xA9, 0x41, 0x0A, 0x2F, 0xE2, 0x82, 0xAC]
    for _ in range(5000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 10)))
        text = names.to_text(raw)
        text.encode("utf-8")  # always writable as UTF-8: no surrogate escapes
        assert names.to_bytes(text) == raw, raw
    for plain in ("a.png", "dir/sub/ü b.jpg", "new\nline.png", " space .png"):
        assert names.to_text(plain) == plain
    assert names.to_bytes("\udcff.png") == b"\xff.png"  # Python's own escape is read too


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Good PNGs under UTF-8 and undecodable names, and one empty file under an undecodable name."""
    folder = tmp_path_factory.mktemp("odd") / "photos"
    folder.mkdir()
    for i, raw in enumerate([b"0.png", *ODD]):
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(png(i))
    with open(os.path.join(os.fsencode(folder), b"empty\xfe.png"), "wb"):
        pass
    return folder


EXPECTED = sorted(["0.png", *ODD.values(), "empty\\xfe.png"])


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_local_caption_dir_writes_every_name_and_resume_reads_them_back(world, odd_folder, tmp_path,  # noqa: F811
                                                                       suffix):
    out = tmp_path / f"out.{suffix}"
    ok("caption-dir", odd_folder, "-o", out, "--model", world.run, "--quiet")
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == EXPECTED
    assert [r["path"] for r in rows if r["error"]] == ["empty\\xfe.png"]
    full = out.read_bytes()
    kept = full.splitlines(keepends=True)[:3]  # CSV: the header and 2 rows; JSON Lines: 3 rows
    out.write_bytes(b"".join(kept))
    result = ok("caption-dir", odd_folder, "-o", out, "--model", world.run, "--quiet", "--resume")
    assert "already done" in result.stderr
    assert out.read_bytes() == full  # exactly the missing rows, none twice


def test_gallery_and_evaluate_read_the_names_back_to_the_same_files(world, odd_folder, tmp_path):  # noqa: F811
    out = tmp_path / "out.csv"
    ok("caption-dir", odd_folder, "-o", out, "--model", world.run, "--quiet")
    result = ok("gallery", out, "--images", odd_folder, "-o", tmp_path / "g.html", "--quiet")
    assert f"{len(EXPECTED) - 1} ok, 1 failed (0 unreadable now)" in result.stderr  # each file found and shown
    result = ok("evaluate", "--predictions", out, "--references", world.records, "-o", tmp_path / "e", "--no-meteor",
                "--quiet")
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert scores["images_scored"] == 1 and sorted(scores["without_references"]) == sorted(
        p for p in EXPECTED if p not in ("0.png", "empty\\xfe.png"))


def test_the_beam_engine_gives_the_local_engines_rows_for_undecodable_names(world, odd_folder, tmp_path):  # noqa: F811
    pytest.importorskip("apache_beam")
    ok("caption-dir", odd_folder, "-o", tmp_path / "OUT", "--model", world.run, "--engine", "beam")
    ok("caption-dir", odd_folder, "-o", tmp_path / "local.csv", "--model", world.run, "--quiet")
    beam = [row for part in sorted((tmp_path / "OUT").iterdir()) for row in rows_of(part)]
    local = rows_of(tmp_path / "local.csv")

    def key(row):
        return row["path"], row["caption"], row["error"]

    assert sorted(map(key, beam)) == sorted(map(key, local)) and len(beam) == len(EXPECTED)
    shutil.rmtree(tmp_path / "OUT")
