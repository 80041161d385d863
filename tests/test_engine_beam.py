"""`tfcap caption-dir --engine beam` (tfcap.engines.beam) on DirectRunner: the local engine's rows, and its edges.

One tiny trained run (conftest's `world`) and its SavedModel and a generated folder of good and bad
files serve every test; the CLI runs in process (click's CliRunner), DirectRunner's
multi-processing workers in subprocesses of it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")

from conftest import built_once, png  # noqa: E402
from test_edges import invoke, ok, one_error  # noqa: E402  (the CLI helpers of every edge test)

MULTI_PROCESS = ("--", "--direct_running_mode=multi_processing", "--direct_num_workers=2")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def beam_world(world, tmp_path_factory):
    """The edge tests' `world` run (convnet at 32 px, 1 epoch), its SavedModel, a folder of good and bad files
    and the local engine's rows of it: (run, savedmodel, photos, rows), built once per test session (conftest's
    `built_once`). Training and export are most of these tests' time; every test only reads what is here."""
    root = built_once(tmp_path_factory, "engine-beam-world", lambda root: build_world(root, world.run))
    return world.run, root / "savedmodel", root / "photos", read_csv(root / "local.csv")


def build_world(root: Path, run: Path) -> None:
    ok("export", run, "-o", root / "savedmodel")

    photos = root / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((40, 56, 3)) * 255).astype("uint8"))
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    files = {
        **{f"{i}.png": png(i) for i in range(6)},
        "noise.jpg": encoded(noise, "JPEG"), "UPPER.JPEG": encoded(noise, "JPEG"), "gray.gif": encoded(noise, "GIF"),
        "sub/.hidden.webp": encoded(noise, "WEBP"), "sub/deeper/bitmap.bmp": encoded(noise, "BMP"),
        "sub/a, b.png": png(7),  # a comma: CSV quoting
        "empty.jpg": b"", "text.png": b"not an image at all\n" * 4,
        "sub/truncated.jpg": encoded(noise, "JPEG")[:300],
        "bomb.png": b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + b"\0" * 64,
    }
    for name, data in files.items():
        (photos / name).write_bytes(data)
    (photos / "notes.txt").write_text("not a candidate\n")
    ok("caption-dir", photos, "-o", root / "local.csv", "--model", run, "--batch-size", "4", "--quiet")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parts(out: Path, suffix: str = "csv") -> list[Path]:
    found = sorted(out.iterdir())
    count = len(found)
    assert [p.name for p in found] == [f"part-{k:05d}-of-{count:05d}.{suffix}" for k in range(count)], found
    return found


def assert_same_rows(beam_rows: list[dict], local_rows: list[dict]) -> None:
    """The same rows, whatever their order; numbers equal to their last decimal (give or take one: the
    engines batch images differently, and a batch's arithmetic can move a float's last bits)."""
    from tfcap import rows

    by_path = {r["path"]: r for r in beam_rows}
    assert len(by_path) == len(beam_rows)  # nothing doubled
    assert sorted(by_path) == sorted(r["path"] for r in local_rows)  # nothing lost
    for want in local_rows:
        got = by_path[want["path"]]
        assert list(got) == list(want) == list(rows.COLUMNS), (got, want)
        assert (got["caption"], got["error"]) == (want["caption"], want["error"]), (got, want)
        if want["score"] in ("", None):
            assert got["score"] in ("", None), got
        else:
            assert abs(float(got["score"]) - float(want["score"])) <= 1e-4, (got, want)
        labels = [rows.parse_value(rows.BY_COLUMN["labels"], r["labels"], r["path"]) or [] for r in (got, want)]
        assert [name for name, _ in labels[0]] == [name for name, _ in labels[1]], (got, want)
        tolerance = 0.011 if isinstance(want["labels"], str) else 1.1e-4  # CSV: 2 decimals; JSON Lines: 4
        np.testing.assert_allclose([p for _, p in labels[0]], [p for _, p in labels[1]], atol=tolerance)


@pytest.mark.parametrize("mode", ["in-process, run directory exported on the fly",
                                  "two worker processes, SavedModel"])
def test_beam_gives_the_rows_of_the_local_engine(beam_world, tmp_path, mode, monkeypatch):
    run, savedmodel, photos, local_rows = beam_world
    assert {r["error"].split(" (")[0] for r in local_rows} == {"", "empty", "not an image", "truncated or corrupt",
                                                              "too large"}  # the folder holds each kind
    exports, written = [], []

    def export_copy(run_dir, out, **kwargs):
        """The fixture's SavedModel, exported from the same run with the same settings, in place of a
        second export (the slowest step here: tracing beam search); `export` itself is tested in test_caption."""
        exports.append((Path(run_dir), kwargs))
        written.append(Path(out))
        shutil.copytree(savedmodel, out)
        return Path(out)

    monkeypatch.setattr("tfcap.export.export", export_copy)
    out = tmp_path / "out"
    extra = ("--model", savedmodel, *MULTI_PROCESS) if "two" in mode else ("--model", run)
    result = ok("caption-dir", photos, "-o", out, "--engine", "beam", "--batch-size", "4", *extra)
    if "two" in mode:
        assert exports == []
    else:  # exported with the local engine's decoding, into a temporary folder that is gone afterwards
        assert exports == [(run, {"beam_size": 3, "length_penalty": 0.0, "no_repeat_ngram": 0, "labels": None,
                                  "precision": None, "decoder_precision": None})]
        assert not written[0].exists()
    rows = [row for part in parts(out) for row in read_csv(part)]
    assert_same_rows(rows, local_rows)
    if "two" in mode:
        assert len(parts(out)) == 2  # each worker wrote its own shard
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"caption-dir: {len(local_rows)} images (") and "images/s" in summary, summary


def test_jsonl_parts_replace_an_existing_out_only_with_overwrite(beam_world, tmp_path):
    _, savedmodel, photos, local_rows = beam_world
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000-of-00003.jsonl").write_text("stale\n")
    refused = invoke("caption-dir", photos, "-o", out, "--engine", "beam", "--model", savedmodel,
                     "--format", "jsonl")
    one_error(refused, out, "--overwrite")
    assert (out / "part-00000-of-00003.jsonl").read_text() == "stale\n"
    ok("caption-dir", photos, "-o", out, "--engine", "beam", "--model", savedmodel, "--format", "jsonl",
       "--overwrite")
    rows = [json.loads(line) for part in parts(out, "jsonl") for line in part.read_text().splitlines()]
    assert all(isinstance(r["score"], float) if not r["error"] else r["score"] is None for r in rows)
    assert_same_rows(rows, local_rows)


def test_beam_rows_carry_the_labels_of_the_local_engine(world, tmp_path):
    """A SavedModel whose captioner has a classifier (known weights, tests/test_labels.py): both engines
    write the same labels, and --labels 1 trims them on the workers."""
    import tensorflow as tf

    from test_labels import labelled_module

    photos = world.photos
    module = labelled_module(world.run, count=2)
    saved = tmp_path / "labelled"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    local, out = tmp_path / "local.jsonl", tmp_path / "out"
    ok("caption-dir", photos, "-o", local, "--model", saved, "--batch-size", "4", "--quiet")
    local_rows = [json.loads(line) for line in local.read_text().splitlines()]
    assert all(len(r["labels"]) == 2 for r in local_rows if not r["error"])
    ok("caption-dir", photos, "-o", out, "--engine", "beam", "--model", saved, "--format", "jsonl", "--batch-size", "4")
    assert_same_rows([json.loads(line) for part in parts(out, "jsonl") for line in part.read_text().splitlines()],
                     local_rows)
    ok("caption-dir", photos, "-o", out, "--engine", "beam", "--model", saved, "--overwrite", "--labels", "1")
    one = [row for part in parts(out) for row in read_csv(part)]
    assert all(row["labels"].count(";") == 0 and row["labels"] for row in one if not row["error"])
    assert {row["path"]: row["labels"].rsplit(" ", 1)[0] for row in one if not row["error"]} == \
        {row["path"]: row["labels"][0]["name"] for row in local_rows if not row["error"]}


@pytest.mark.parametrize("case", ["empty folder", "images only in a subfolder, --no-recursive"])
def test_nothing_to_caption_exits_0_with_one_header_only_part(beam_world, tmp_path, case):
    _, savedmodel, _, _ = beam_world
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "notes.txt").write_text("no image here\n")
    extra = []
    if "subfolder" in case:
        (tmp_path / "in" / "sub" / "0.png").write_bytes(png(0))
        extra = ["--no-recursive"]
    out = tmp_path / "out"
    result = ok("caption-dir", tmp_path / "in", "-o", out, "--engine", "beam", "--model", savedmodel, *extra)
    assert "0 images to caption" in result.stderr.strip().splitlines()[-1]
    assert [p.read_text() for p in parts(out)] == ["path,caption,score,confidence,in_domain,typicality,labels,error\n"]  # as the local engine's empty CSV


def test_without_apache_beam_the_message_names_the_extra(beam_world, tmp_path, monkeypatch):
    run, _, photos, _ = beam_world
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` raises ImportError
    monkeypatch.delitem(sys.modules, "tfcap.engines.beam", raising=False)
    result = invoke("caption-dir", photos, "-o", tmp_path / "out", "--engine", "beam", "--model", run)
    assert one_error(result) == "Error: the beam engine needs Apache Beam: pip install 'tfcap[beam]'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bundled", [False, True])
def test_a_remote_runner_refuses_a_run_directory_with_the_export_command(beam_world, tmp_path, bundled, monkeypatch):
    run, _, _, _ = beam_world
    import apache_beam

    def no_run(self, *args, **kwargs):
        raise AssertionError("the pipeline was started")

    monkeypatch.setattr(apache_beam.Pipeline, "run", no_run)
    model = () if bundled else ("--model", run)
    result = invoke("caption-dir", "gs://bucket/photos", "-o", "gs://bucket/out", "--engine", "beam",
                    "--runner", "DataflowRunner", *model, "--", "--project", "p", "--region", "r",
                    "--temp_location", "gs://bucket/tmp")
    line = one_error(result, "DataflowRunner", "-o gs://.../model' and pass --model gs://.../model")
    assert ("run 'tfcap export -o" in line) == bundled and (str(run) in line) != bundled


def test_refusals_of_options_that_do_not_go_with_the_engine(beam_world, tmp_path):
    run, savedmodel, photos, _ = beam_world
    base = ("caption-dir", photos, "-o", tmp_path / "out", "--model", savedmodel)
    one_error(invoke(*base, "--engine", "beam", "--resume"), "--resume", "--engine beam")
    one_error(invoke(*base, "--engine", "beam", "--gallery", tmp_path / "g.html"), "--gallery")
    one_error(invoke(*base, "--runner", "DirectRunner"), "--runner", "--engine beam")
    one_error(invoke(*base, "--", "--direct_num_workers=2"), "--direct_num_workers=2", "--engine beam")
    one_error(invoke(*base, "--engine", "beam", "--runner", "DirectRunner", "--", "--runner=FlinkRunner"),
              "contradicts")
    one_error(invoke("caption-dir", "gs://bucket/photos", "-o", tmp_path / "o.csv", "--model", run),
              "gs://bucket/photos", "--engine beam")
    one_error(invoke("caption-dir", tmp_path / "nope", "-o", tmp_path / "out", "--engine", "beam",
                     "--model", savedmodel), "is not a directory")
    one_error(invoke(*base, "--engine", "beam", "--beam-size", "5"), "beam size 3", "re-export")
    one_error(invoke("caption-dir", photos, "-o", "nofs://bucket/out", "--engine", "beam", "--model", savedmodel),
              "nofs://bucket/out", "Unable to get filesystem")  # a scheme no Beam file system serves
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_out(beam_world, tmp_path, monkeypatch):
    _, savedmodel, photos, _ = beam_world
    import apache_beam

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apache_beam.Pipeline, "run", interrupted)
    out = tmp_path / "out"
    result = invoke("caption-dir", photos, "-o", out, "--engine", "beam", "--model", savedmodel)
    assert result.exit_code == 130 and "Aborted" not in result.output and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"interrupted: nothing written to {out}")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
