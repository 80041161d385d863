"""Every command at its edges: empty, missing, unreadable, unwritable, damaged, already done, interrupted.

Each case asserts the exit code, exactly one `Error: ...` line on stderr naming the thing (for exit
code 2), no traceback, and nothing half-written. Commands run in process through click's CliRunner;
one tiny trained run (conftest's session fixture `world`) serves every case.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import invoke, ok
from tfcap import evaluate, export, model, text, train
from tfcap.errors import TfcapError

ROOT = Path(__file__).resolve().parent.parent


def one_error(result, *names, code=2) -> str:
    """The single `Error:` line of a failed command, after checking that it names each of `names`."""
    assert result.exit_code == code, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_work(monkeypatch):
    """Every command's real work raises: an output must be checked before any of it starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for target in ("tfcap.datasets.read_source", "tfcap.records.build_records", "tfcap.train.train",
                   "tfcap.export.load_predictor", "tfcap.export.export", "tfcap.gallery.write_gallery",
                   "tfcap.evaluate.run_model", "tfcap.evaluate.references_from", "tfcap.demo.run_demo",
                   "tfcap.model.load_model"):
        monkeypatch.setattr(target, refuse)


# ---------------------------------------------------------------------------------------------
# Nothing to do (issue 15, item 2) and JSON Lines (item 12)

@pytest.mark.parametrize("case", ["empty folder", "no image files", "finished csv", "finished jsonl"])
def test_caption_dir_with_nothing_to_do_exits_0_and_changes_nothing(world, tmp_path, case):
    folder, extra = tmp_path / "in", []
    folder.mkdir()
    if case == "no image files":
        (folder / "notes.txt").write_text("hello\n")
        (folder / "data.bin").write_bytes(b"\0\1")
    out = tmp_path / ("out.jsonl" if "jsonl" in case else "out.csv")
    if case.startswith("finished"):
        folder, extra = world.photos, ["--resume"]  # no --format even for .jsonl
        shutil.copy(world.jsonl if "jsonl" in case else world.csv, out)
    before = out.read_bytes() if out.exists() else None  # none found: no file made (issue 23)
    result = ok("caption-dir", folder, "-o", out, "--model", world.run, *extra)
    assert "0 images to caption" in result.stderr and "captioning" not in result.stderr
    assert (out.read_bytes() if out.exists() else None) == before


def test_jsonl_from_the_suffix_with_numbers_and_null(world, tmp_path):
    rows = [json.loads(line) for line in world.jsonl.read_text().splitlines()]
    assert [r["path"] for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "broken.png"]
    assert all(isinstance(r["score"], float) and r["score"] <= 0 and not r["error"] for r in rows[:6])
    assert rows[6]["score"] is None and rows[6]["error"] == "empty"
    csv_rows = list(csv.DictReader(open(world.csv)))
    assert [float(r["score"]) for r in csv_rows[:6]] == [r["score"] for r in rows[:6]] and csv_rows[6]["score"] == ""
    # An explicit --format that contradicts the name is refused before anything is written.
    result = invoke("caption-dir", world.photos, "-o", tmp_path / "x.csv", "--model", world.run, "--format", "jsonl")
    one_error(result, "--format jsonl", "x.csv")
    assert listing(tmp_path) == []
    # Readers take the numbers: gallery and evaluate.
    ok("gallery", world.jsonl, "--images", world.photos, "-o", tmp_path / "g.html", "--quiet")
    ok("evaluate", "--predictions", world.jsonl, "--references", world.records, "--no-meteor", "-o", tmp_path / "e")


# ---------------------------------------------------------------------------------------------
# Unwritable outputs (item 6)

@pytest.fixture
def locked(tmp_path):
    """An immutable folder (chattr +i: even root cannot create files in it), or a read-only one."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        pytest.skip("chattr +i is unavailable here, and root writes into read-only folders")


COMMANDS = {  # command -> (arguments with OUT, the name OUT gets)
    "build-records": (lambda w, out: ["build-records", "--captions", w.captions, "--images", w.images, "-o", out],
                      "records"),
    "train": (lambda w, out: ["train", w.records, "-o", out], "run"),
    "export": (lambda w, out: ["export", w.run, "-o", out], "savedmodel"),
    "gallery": (lambda w, out: ["gallery", w.csv, "--images", w.photos, "-o", out], "g.html"),
    "evaluate --model": (lambda w, out: ["evaluate", "--model", w.run, w.records, "-o", out], "eval"),
    "evaluate --predictions": (lambda w, out: ["evaluate", "--predictions", w.csv, "--references", w.records,
                                               "-o", out], "eval"),
    "demo": (lambda w, out: ["demo", "-o", out], "demo"),
    "caption-dir": (lambda w, out: ["caption-dir", w.photos, "-o", out, "--model", w.run], "out.csv"),
    "caption-dir --gallery": (lambda w, out: ["caption-dir", w.photos, "-o", out.parent.parent / "fine.csv",
                                              "--model", w.run, "--gallery", out], "g.html"),
}


@pytest.mark.parametrize("where", ["immutable folder", "parent is a file", "/proc"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unwritable_outputs_fail_first_in_one_line(world, tmp_path, no_work, command, where, request):
    args, name = COMMANDS[command]
    if where == "immutable folder":
        out = request.getfixturevalue("locked") / name
    elif where == "parent is a file":
        (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
        out = tmp_path / "photo.jpg" / name
    else:
        out = Path("/proc") / name
    before = listing(tmp_path)
    error = one_error(invoke(*args(world, out)), f"cannot write {out}:")
    if where == "parent is a file":
        assert "photo.jpg is not a directory" in error
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["caption-dir", "evaluate"])
def test_write_errors_during_the_run_are_one_line(world, tmp_path, monkeypatch, command):
    out = tmp_path / "out.csv"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    if command == "caption-dir":
        monkeypatch.setattr("tfcap.caption.format_rows", disk_full)
        result = invoke("caption-dir", world.photos, "-o", out, "--model", world.run, "--quiet")
    else:
        monkeypatch.setattr("tfcap.evaluate.claimed", disk_full)
        result = invoke("evaluate", "--predictions", world.csv, "--references", world.records, "--no-meteor",
                        "-o", out)
    one_error(result, f"{out}: No space left on device")


# ---------------------------------------------------------------------------------------------
# <unk> is never generated (item 8)

@pytest.fixture(scope="module")
def unk_run(world, tmp_path_factory) -> Path:
    """The world's run with the decoder's output bias for <unk> at +100: it says <unk> to everything."""
    run = tmp_path_factory.mktemp("unk") / "run"
    shutil.copytree(world.run, run)
    captioner = model.load_model(run)
    bias = captioner.decoder.logits.bias
    bias.assign(tf.tensor_scatter_nd_update(bias, [[text.UNK_ID]], [100.0]))
    captioner.decoder.save_weights(str(run / model.DECODER_WEIGHTS))
    return run


def test_unk_is_never_generated_by_run_directories_or_exports(world, unk_run, tmp_path):
    out = tmp_path / "out.csv"
    ok("caption-dir", world.photos, "-o", out, "--model", unk_run, "--quiet")
    captions = [r["caption"] for r in csv.DictReader(open(out)) if not r["error"]]
    assert len(captions) == 6 and all(c and "<" not in c for c in captions), captions
    greedy = ok("caption", world.photos / "0.png", "--model", unk_run, "--beam-size", "1")
    assert "<" not in greedy.stdout and greedy.stdout.split("\t")[1].strip()

    ok("export", unk_run, "-o", tmp_path / "sm", "--beam-size", "2")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    served = loaded.signatures["serving_default"](images=tf.constant([(world.images / "0.png").read_bytes()]))
    assert all(c and b"<" not in c for c in served["captions"].numpy())
    # Its evaluation goes beside the SavedModel, not into it (item 10).
    ok("evaluate", "--model", tmp_path / "sm", world.records, "--no-meteor", "--quiet")
    assert (tmp_path / "sm.eval-test" / "scores.json").is_file() and not (tmp_path / "sm" / "eval-test").exists()


# ---------------------------------------------------------------------------------------------
# evaluate: its default folders (item 10) and captions files given directly (item 11)

def test_evaluate_refuses_to_overwrite_its_default_folders(world, tmp_path, monkeypatch):
    predictions = tmp_path / "p.csv"
    shutil.copy(world.csv, predictions)
    ok("evaluate", "--predictions", predictions, "--references", world.records, "--no-meteor")
    scores = (tmp_path / "p.eval" / "scores.json").read_bytes()
    one_error(invoke("evaluate", "--predictions", predictions, "--references", world.records, "--no-meteor"),
              tmp_path / "p.eval", "--overwrite")
    assert (tmp_path / "p.eval" / "scores.json").read_bytes() == scores
    ok("evaluate", "--predictions", predictions, "--references", world.records, "--no-meteor", "--overwrite")

    monkeypatch.chdir(tmp_path)
    ok("evaluate", "--human-baseline", "--references", world.records, "--split", "train", "--no-meteor")
    one_error(invoke("evaluate", "--human-baseline", "--references", world.records, "--split", "train"),
              "human-baseline-train", "--overwrite")

    # With a model, refused before it loads: RUN_DIR/eval-SPLIT, and SAVEDMODEL.eval-SPLIT beside a SavedModel.
    monkeypatch.setattr("tfcap.export.load_predictor", lambda *a, **k: pytest.fail("loaded the model"))
    fake_run, fake_saved = tmp_path / "run", tmp_path / "sm"
    (fake_run / "eval-test").mkdir(parents=True)
    fake_saved.mkdir()
    (fake_saved / "saved_model.pb").write_bytes(b"")
    (tmp_path / "sm.eval-test").mkdir()
    one_error(invoke("evaluate", "--model", fake_run, world.records), fake_run / "eval-test")
    one_error(invoke("evaluate", "--model", fake_saved, world.records), "sm.eval-test")
    assert evaluate.default_output(model_path=fake_saved, split="val") == tmp_path / "sm.eval-val"


def test_predictions_scored_against_a_captions_file_use_every_image_unless_split(tmp_path):
    with open(tmp_path / "captions.csv", "w", newline="") as f:  # no split column: a hashed split
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([f"{i}.jpg", f"a {w} dog number {i}"] for i in range(20) for w in ("red", "blue"))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "score", "error"])
        writer.writerows([f"{i}.jpg", f"a red dog number {i}", "-1.0", ""] for i in range(20))
    ok("evaluate", "--predictions", tmp_path / "p.csv", "--references", tmp_path / "captions.csv", "--no-meteor",
       "-o", tmp_path / "all")
    scores = json.loads((tmp_path / "all" / "scores.json").read_text())
    assert scores["images_scored"] == 20 and scores["without_references"] == [] and scores["split"] is None
    ok("evaluate", "--predictions", tmp_path / "p.csv", "--references", tmp_path / "captions.csv", "--no-meteor",
       "--split", "test", "-o", tmp_path / "test")
    assert json.loads((tmp_path / "test" / "scores.json").read_text())["images_scored"] == 2


# ---------------------------------------------------------------------------------------------
# Messages (item 13)

def test_ctrl_c_in_caption_dir_is_one_line_with_the_resume_hint_and_exit_130(world, tmp_path, monkeypatch):
    real = export.load_predictor

    def interrupting(*args, **kwargs):
        predictor, calls = real(*args, **kwargs), []
        decode = predictor.decode

        def decode_then_interrupt(features):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return decode(features)

        predictor.decode = decode_then_interrupt
        return predictor

    out = tmp_path / "out.csv"
    monkeypatch.setattr(export, "load_predictor", interrupting)
    result = invoke("caption-dir", world.photos, "-o", out, "--model", world.run, "--batch-size", "2", "--quiet")
    assert result.exit_code == 130 and "Aborted" not in result.output
    assert result.stderr.strip().splitlines()[-1] == f"interrupted: 2 of 7 images written to {out}; continue with --resume"
    assert len(out.read_text().splitlines()) == 3
    monkeypatch.setattr(export, "load_predictor", real)
    ok("caption-dir", world.photos, "-o", out, "--model", world.run, "--resume", "--quiet")
    assert out.read_text() == world.csv.read_text()


def test_ctrl_c_in_train_is_one_line_and_exit_130(world, tmp_path, monkeypatch):
    real_init = train._Trainer.__init__

    def init_with_interrupt(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def interrupt(*step_args):
            raise KeyboardInterrupt

        self.train_step = interrupt

    monkeypatch.setattr(train._Trainer, "__init__", init_with_interrupt)
    result = invoke("train", world.records, "-o", tmp_path / "run", "--encoder", "convnet", "--encoder-weights",
                    "none", "--image-size", "32", "--units", "8", "--embed-dim", "8", "--epochs", "1", "--quiet")
    assert result.exit_code == 130 and "Aborted" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: checkpoint ") and last.endswith("; continue with --resume")


def test_unclosed_quote_is_reported_at_the_line_where_it_opens(tmp_path):
    lines = ["image,caption"] + [f"{i}.png,a cat" for i in range(2, 5)] + ['5.png,"a cat that never closes']
    lines += [f"{i}.png,a dog" for i in range(6, 9)] + ['9.png,a "quoted" bird'] + ["10.png,a fish"]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "img").mkdir()
    result = invoke("build-records", "--captions", tmp_path / "c.csv", "--images", tmp_path / "img",
                    "-o", tmp_path / "rec")
    one_error(result, f"{tmp_path / 'c.csv'}:5: unclosed quote")


def test_offline_imagenet_weights_print_only_tfcaps_line(monkeypatch, capsys):
    import keras

    from tfcap import encoder

    def offline(fname, origin, **kwargs):
        print(f"Downloading data from {origin}")  # what Keras prints before it fails
        raise Exception("URL fetch failure")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(TfcapError, match="could not download ImageNet weights"):
        encoder._fetch_imagenet(encoder.EncoderConfig(name="mobilenet", alpha=0.25, image_size=224))
    captured = capsys.readouterr()
    assert "Downloading" not in captured.out + captured.err


def test_small_messages(world):
    result = evaluate.evaluate({"a": ["a red cat", "the red cat"]}, {"a": "a red cat"}, meteor=False)
    table = evaluate.table(result)
    assert "unavailable" not in table and any(line.split() == ["METEOR", "skipped"] for line in table.splitlines())
    assert "train: 1 epoch in" in world.train_stderr
    assert "tfcap-demo/" in (ROOT / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------------------------------------
# Every command at its other edges

def _foreign_csv(w, tmp):
    (tmp / "mine.csv").write_text("name,age\nbob,3\n")
    return tmp / "mine.csv"


def _damaged_jsonl(w, tmp):
    (tmp / "out.jsonl").write_text(world_jsonl_head(w) + '{"path": "1.png", "capt\n')
    return tmp / "out.jsonl"


def world_jsonl_head(w) -> str:
    return w.jsonl.read_text().splitlines(keepends=True)[0]


def _existing(name):
    def make(w, tmp):
        (tmp / name).mkdir()
        (tmp / name / "keep").write_text("mine")
        return tmp / name
    return make


def _file(name, data: bytes):
    def make(w, tmp):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _copy(what: str, name: str):
    def make(w, tmp):
        source = getattr(w, what)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp / name)
        return tmp / name
    return make


def _dataset(w, tmp):
    shutil.copytree(w.images, tmp / "data" / "img")
    shutil.copy(w.captions, tmp / "data" / "c.csv")
    return tmp / "data"


EDGES = {  # case -> (make the input: (world, tmp) -> path, arguments, what the one error line names)
    "build-records missing data": (None, lambda w, t, x: ["build-records", t / "nope", "-o", t / "rec"],
                                   ["nope does not exist"]),
    "build-records empty data": (_existing("data"), lambda w, t, x: ["build-records", x, "-o", t / "rec"],
                                 ["no known layout matches"]),
    "build-records existing out": (_existing("rec"), lambda w, t, x: [
        "build-records", "--captions", w.captions, "--images", w.images, "-o", x], ["rec already exists"]),
    "build-records captions not utf-8": (_file("c.csv", b"image,caption\n\xff\xfe.png,a\n"), lambda w, t, x: [
        "build-records", "--captions", x, "--images", w.images, "-o", t / "rec"], ["c.csv: not UTF-8"]),
    "build-records shard size 0": (None, lambda w, t, x: [
        "build-records", "--captions", w.captions, "--images", w.images, "-o", t / "rec", "--shard-mb", "0"],
        ["--shard-mb"]),
    "build-records no usable image": (_file("c.csv", b"image,caption\nmissing.png,a cat\n"), lambda w, t, x: [
        "build-records", "--captions", x, "--images", w.images, "-o", t / "rec", "--min-count", "1"],
        ["no usable image"]),
    "train missing records": (None, lambda w, t, x: ["train", t / "nope", "-o", t / "run"], ["nope"]),
    "train existing run": (_existing("run"), lambda w, t, x: ["train", w.records, "-o", x], ["run already exists"]),
    "train resume without checkpoint": (None, lambda w, t, x: ["train", w.records, "-o", t / "run", "--resume"],
                                        ["run"]),
    "caption-dir missing folder": (None, lambda w, t, x: ["caption-dir", t / "nope", "-o", t / "o.csv", "--model",
                                                          w.run], ["nope is not a directory"]),
    "caption-dir folder is a file": (_file("a.png", b""), lambda w, t, x: [
        "caption-dir", x, "-o", t / "o.csv", "--model", w.run], ["a.png is not a directory"]),
    "caption-dir missing model": (None, lambda w, t, x: ["caption-dir", w.photos, "-o", t / "o.csv", "--model",
                                                         t / "nope"], ["nope is neither"]),
    "caption-dir existing out": (_file("o.csv", b"mine\n"), lambda w, t, x: [
        "caption-dir", w.photos, "-o", x, "--model", w.run], ["o.csv already exists", "--resume"]),
    "caption-dir resume foreign csv": (_foreign_csv, lambda w, t, x: [
        "caption-dir", w.photos, "-o", x, "--model", w.run, "--resume"], ["mine.csv is not a caption-dir CSV"]),
    "caption-dir resume damaged jsonl": (_damaged_jsonl, lambda w, t, x: [
        "caption-dir", w.photos, "-o", x, "--model", w.run, "--resume"], ["out.jsonl"]),
    "caption-dir batch size 0": (None, lambda w, t, x: ["caption-dir", w.photos, "-o", t / "o.csv", "--model", w.run,
                                                        "--batch-size", "0"], ["--batch-size"]),
    "caption-dir negative length penalty": (None, lambda w, t, x: [
        "caption-dir", w.photos, "-o", t / "o.csv", "--model", w.run, "--length-penalty", "-1"],
        ["--length-penalty"]),
    "caption missing model": (None, lambda w, t, x: ["caption", w.photos / "0.png", "--model", t / "nope"],
                              ["nope is neither"]),
    "export missing run": (None, lambda w, t, x: ["export", t / "nope", "-o", t / "sm"], ["nope"]),
    "export existing out": (_existing("sm"), lambda w, t, x: ["export", w.run, "-o", x], ["sm already exists"]),
    "export damaged config": (_file("config.json", b"{not json"), lambda w, t, x: ["export", t, "-o", t / "sm"],
                              ["config.json is damaged"]),
    "export config of no model": (_file("config.json", b'{"model": {"encoder": {}}}'), lambda w, t, x: [
        "export", t, "-o", t / "sm"], ["config.json does not describe a model"]),
    "evaluate no mode": (None, lambda w, t, x: ["evaluate"], ["give exactly one of"]),  # (RECORDS alone: bundled model)
    "evaluate two modes": (None, lambda w, t, x: ["evaluate", "--model", w.run, "--human-baseline", w.records],
                           ["give exactly one of"]),
    "evaluate model without records": (None, lambda w, t, x: ["evaluate", "--model", w.run], ["RECORDS"]),
    "evaluate unknown split": (None, lambda w, t, x: ["evaluate", "--model", w.run, w.records, "--split", "bogus",
                                                      "-o", t / "e"], ["no split 'bogus'"]),
    "evaluate missing predictions": (None, lambda w, t, x: ["evaluate", "--predictions", t / "nope.csv",
                                                            "--references", w.records], ["nope.csv"]),
    "evaluate damaged predictions": (_file("p.jsonl", b"\x00\x01garbage\n"), lambda w, t, x: [
        "evaluate", "--predictions", x, "--references", w.records], ["p.jsonl"]),
    "evaluate missing references": (None, lambda w, t, x: ["evaluate", "--predictions", w.csv, "--references",
                                                           t / "nope", "-o", t / "e"], ["references", "nope do not exist"]),
    "gallery missing predictions": (None, lambda w, t, x: ["gallery", t / "nope.csv", "--images", w.photos, "-o",
                                                           t / "g.html"], ["nope.csv"]),
    "gallery missing images": (None, lambda w, t, x: ["gallery", w.csv, "--images", t / "nope", "-o", t / "g.html"],
                               ["nope"]),
    "gallery existing out": (_file("g.html", b"mine"), lambda w, t, x: ["gallery", w.csv, "--images", w.photos,
                                                                        "-o", x], ["g.html already exists"]),
    "gallery damaged predictions": (_file("p.jsonl", b'{"path": "0.png"\n'), lambda w, t, x: [
        "gallery", x, "--images", w.photos, "-o", t / "g.html"], ["p.jsonl:1"]),
    # An output that would replace an input, even with --overwrite: it would delete the input.
    "build-records out is the dataset": (_dataset, lambda w, t, x: [
        "build-records", "--captions", x / "c.csv", "--images", x / "img", "-o", x, "--overwrite"],
        ["would replace the captions file"]),
    "train out is the records": (_copy("records", "rec"), lambda w, t, x: ["train", x, "-o", x, "--overwrite"],
                                 ["would replace the records folder"]),
    "export out is the run": (_copy("run", "run"), lambda w, t, x: ["export", x, "-o", x, "--overwrite"],
                              ["would replace the run directory"]),
    "gallery out is the predictions": (_copy("csv", "p.csv"), lambda w, t, x: [
        "gallery", x, "--images", w.photos, "-o", x, "--overwrite"], ["would replace the predictions file"]),
    "caption-dir gallery is the output": (None, lambda w, t, x: [
        "caption-dir", w.photos, "-o", t / "o.csv", "--model", w.run, "--gallery", t / "o.csv"],
        ["would replace the output"]),
    "caption-dir out is the images folder": (None, lambda w, t, x: [
        "caption-dir", w.photos, "-o", w.photos, "--model", w.run, "--overwrite"], ["would replace the images"]),
    "evaluate out is the run": (_copy("run", "run"), lambda w, t, x: [
        "evaluate", "--model", x, w.records, "-o", x, "--overwrite"], ["would replace the model"]),
    "demo existing out": (_existing("demo"), lambda w, t, x: ["demo", "-o", x], ["demo already exists"]),
    "demo too few images": (None, lambda w, t, x: ["demo", "-o", t / "demo", "--images", "5"], ["--images"]),
}


@pytest.mark.parametrize("case", list(EDGES))
def test_edge(world, tmp_path, case):
    make, args, names = EDGES[case]
    made = make(world, tmp_path) if make else None
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    one_error(invoke(*args(world, tmp_path, made)), *names)
    after = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, nothing changed, nothing left behind
