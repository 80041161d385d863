"""The one way an output is written (`tfcap.outputs.Output` and its checked writes) and how caption-dir's
rows survive a cut: the pieces every command's writing rests on (issue 23), tested without a model.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tfcap import caption, outputs
from tfcap.errors import TfcapError
from tfcap.outputs import Output


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_all_continues_a_short_write_and_a_write_that_makes_no_progress_is_enospc(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    real, calls = os.write, []

    def short(fd_, data):  # a disk that takes 3 bytes at a time
        calls.append(len(data))
        return real(fd_, bytes(data[:3]))

    monkeypatch.setattr(os, "write", short)
    outputs.write_all(fd, b"0123456789")
    assert calls == [10, 7, 4, 1] and (tmp_path / "f").read_bytes() == b"0123456789"
    monkeypatch.setattr(os, "write", lambda fd_, data: 0)
    with pytest.raises(OSError) as raised:
        outputs.write_all(fd, b"x")
    assert raised.value.errno == errno.ENOSPC
    os.close(fd)


def test_append_whole_appends_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"header\nrow 1\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    real = os.write

    def full_after_5(fd_, data):  # 5 more bytes fit, then the disk is full
        room = 5 + 13 - os.fstat(fd_).st_size
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd_, bytes(data[:room]))

    monkeypatch.setattr(os, "write", full_after_5)
    with pytest.raises(OSError, match="No space left on device") as raised:
        outputs.append_whole(fd, b"row 2\nrow 3\n", path)
    assert raised.value.filename == str(path)
    assert path.read_bytes() == b"header\nrow 1\n"  # cut back: never part of a row
    os.close(fd)


def test_output_is_claimed_in_order_and_written_under_a_private_name(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(TfcapError, match="would replace the dataset"):
        Output(tmp_path, overwrite=True, inputs={"dataset": tmp_path / "data"})
    with pytest.raises(TfcapError, match="would replace the --init run"):
        Output(tmp_path / "nest", overwrite=True, inputs={"--init run": tmp_path / "nest" / "xe"})
    # Leftovers of a killed writer (its private names, and the shared names of tfcap before them) go;
    # another output's scratch, whose name ends like this one's, stays.
    for name in (".tfcap-123-0123abcd.out", ".out.partial", ".out.old", ".tfcap-9-0123abcd.a.out"):
        (tmp_path / name).mkdir()
    with Output(tmp_path / "out") as output:
        assert listing(tmp_path) == [".out.lock", ".tfcap-9-0123abcd.a.out", "data"]
        with pytest.raises(TfcapError, match=rf"out is in use by another tfcap process \(pid {os.getpid()}\)"):
            Output(tmp_path / "out")
        with output.directory() as scratch:
            assert scratch.parent == tmp_path and scratch.name.startswith(f".tfcap-{os.getpid()}-")
            assert outputs._scratch_name(output.path) != scratch  # private to this claim, not to the output
            (scratch / "a").write_text("1")
    assert listing(tmp_path) == [".tfcap-9-0123abcd.a.out", "data", "out"] and listing(tmp_path / "out") == ["a"]


def test_an_output_that_appears_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    """The lock keeps other tfcap processes out; something else may still make the output: the
    rename at the end checks again instead of replacing it."""
    with Output(tmp_path / "out") as output:
        with pytest.raises(TfcapError, match="appeared while it was written"):
            with output.directory() as scratch:
                (scratch / "new").write_text("new")
                (tmp_path / "out").mkdir()
                (tmp_path / "out" / "theirs").write_text("theirs")
        with pytest.raises(TfcapError, match="appeared while it was written"):
            Output.write_text(output, "page")
    assert listing(tmp_path / "out") == ["theirs"] and listing(tmp_path) == ["out"]
    with Output(tmp_path / "out", overwrite=True) as output, output.directory() as scratch:
        (scratch / "new").write_text("new")
    assert listing(tmp_path / "out") == ["new"] and listing(tmp_path) == ["out"]


def test_a_full_disk_in_a_library_writer_is_named_as_the_output(tmp_path):
    """TensorFlow's writers say a full disk in their own exception, naming a scratch file that is gone."""
    with Output(tmp_path / "sm") as output:
        with pytest.raises(OSError) as raised:
            with output.directory() as scratch:
                raise RuntimeError(f"{scratch}/variables/part-0; No space left on device")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "sm"))
    assert listing(tmp_path) == []


def test_write_files_atomic_renames_the_set_only_when_every_file_is_written(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data) if len(data) < 100 else 0)  # b does not fit
    with pytest.raises(OSError, match="No space left on device") as raised:
        outputs.write_files_atomic({tmp_path / "a": b"new a", tmp_path / "b": b"x" * 100})
    assert raised.value.filename == str(tmp_path / "b")
    assert listing(tmp_path) == ["a", "b"] and (tmp_path / "a").read_bytes() == b"old a"
    monkeypatch.setattr(os, "write", real)
    outputs.write_files_atomic({tmp_path / "a": b"new a", tmp_path / "b": b"new b"})
    assert [(tmp_path / n).read_bytes() for n in "ab"] == [b"new a", b"new b"] and listing(tmp_path) == ["a", "b"]


def test_keras_weights_are_made_in_memory_and_load_back(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    outputs.write_bytes_atomic(tmp_path / "m.weights.h5", outputs.weights_bytes(model))
    again = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    again.load_weights(str(tmp_path / "m.weights.h5"))
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# A caption-dir output cut anywhere: the whole rows before the cut, never a row nobody wrote

COLUMNS = ("path", "caption", "score", "error")  # a file written before labels and confidence: fewer columns
ROWS = [{"path": "a.png", "caption": "a cat", "score": -1.0, "error": ""},
        {"path": 'b, "quoted".png', "caption": "a dog", "score": -2.0, "error": ""},
        {"path": "two\nlines.png", "caption": "", "score": None, "error": "empty"},
        {"path": "c\r\n\nd.png", "caption": "a \"big\"\nbird", "score": -0.5, "error": ""},
        {"path": "e.png", "caption": "a cat", "score": -3.0, "error": ""}]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_cut_anywhere_keeps_exactly_the_whole_rows_before_it(fmt):
    header = "path,caption,score,error\n" if fmt == "csv" else ""
    text = header + caption.format_rows(ROWS, fmt, COLUMNS)
    ends = [len((header + caption.format_rows(ROWS[:k], fmt, COLUMNS)).encode()) for k in range(len(ROWS) + 1)]
    data = text.encode()
    for cut in range(len(header), len(data) + 1):
        whole = max(k for k in range(len(ROWS) + 1) if ends[k] <= cut)
        assert caption.complete_length(data[:cut], fmt) == ends[whole], cut
        rows = caption.parse_rows(data[:cut].decode("utf-8", "ignore"), fmt)
        assert [r["path"] for r in rows] == [r["path"] for r in ROWS[:whole]], cut


def test_resume_continues_with_the_recorded_decoding_and_refuses_another(tmp_path):
    out = tmp_path / "out.csv"
    assert caption.resumed_settings(out, {"beam_size": 1}) == {"beam_size": 1}  # nothing recorded: as given
    recorded = {"model": "/m", "beam_size": 3, "length_penalty": 0.0, "no_repeat_ngram": 2, "precision": "float32",
                "labels": 3, "max_pixels": 100, "min_confidence": None}
    caption.settings_path(out).write_text(json.dumps(recorded))
    given = dict.fromkeys(caption.SETTINGS)
    assert caption.resumed_settings(out, given) == {**recorded, "decoder_precision": "float32"}
    assert caption.resumed_settings(out, {**given, "beam_size": 3}) == {**recorded, "decoder_precision": "float32"}
    for name, value, option in [("beam_size", 1, "--beam-size 1"), ("length_penalty", 0.5, "--length-penalty 0.5"),
                                ("model", "/other", "--model /other"), ("max_pixels", 5, "--max-pixels 5"),
                                ("no_repeat_ngram", 0, "--no-repeat-ngram 0"), ("labels", 0, "--labels 0"),
                                ("min_confidence", 0.5, "--min-confidence 0.5")]:
        with pytest.raises(TfcapError, match=f"^{option} differs from the .* that {out} was begun with"):
            caption.resumed_settings(out, {**given, name: value})
    assert caption.settings_path(out).name == ".out.csv.settings.json"
    # begun before the decoder's precision was recorded: its rows are float32's, and so are the rest
    assert caption.resumed_settings(out, given)["decoder_precision"] == "float32"
    with pytest.raises(TfcapError, match="^--decoder-precision bfloat16 differs from the float32"):
        caption.resumed_settings(out, {**given, "decoder_precision": "bfloat16"})


def test_rows_cut_on_disk_parse_as_csv_does_after_resume(tmp_path):
    """The CSV module agrees: what complete_length keeps parses to whole rows with the csv reader."""
    text = ("path,caption,score,error\n" + caption.format_rows(ROWS, "csv", COLUMNS)).encode()
    cut = text.index(b"two\n") + 4  # inside the quoted name, just after its newline
    keep = caption.complete_length(text[:cut], "csv")
    assert [r["path"] for r in csv.DictReader(io.StringIO(text[:keep].decode()))] == ["a.png", 'b, "quoted".png']
