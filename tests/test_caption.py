"""`tfcap caption-dir`, `caption` and `export` on generated files and a tiny trained model (conftest's tiny_run)."""

from __future__ import annotations

import csv
import io
import json
import os
import runpy
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from conftest import ok
from tfcap.cli import main


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height; its pixel data is absent (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\0" * 64


@pytest.fixture
def zoo(tmp_path) -> tuple[Path, dict[str, str | None]]:
    """Files of every kind caption-dir meets, and the error expected for each (None: captioned)."""
    root = tmp_path / "zoo"
    (root / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
    files = {
        "plain.jpg": encoded(rgb, "JPEG"),
        "UPPER.JPEG": encoded(rgb, "JPEG"),
        "gray.png": encoded(rgb.convert("L"), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encoded(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        "animated.gif": encoded(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)]),
        "bitmap.bmp": encoded(rgb, "BMP"),
        "lossy.webp": encoded(rgb, "WEBP"),
        "sub/nested.png": encoded(rgb, "PNG"),
        "sub/deeper/deep.jpg": encoded(rgb, "JPEG"),
        "empty.jpg": b"",
        "truncated.jpg": encoded(rgb, "JPEG")[:300],
        "text.png": b"definitely not an image\n" * 10,
        "bomb.png": huge_png_header(60000, 60000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not a candidate: wrong extension")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop must not hang the walk
    expected = {name: None for name in files}
    expected.update({"empty.jpg": "empty", "truncated.jpg": "truncated or corrupt", "text.png": "not an image",
                     "bomb.png": "too large", "dangling.jpg": "missing"})
    return root, expected


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def caption_dir(*args, ok=True):
    result = CliRunner().invoke(main, ["caption-dir", *map(str, args), "--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_every_candidate_gets_one_row_in_walk_order_with_the_right_error(zoo, tiny_run, tmp_path):
    root, expected = zoo
    out = tmp_path / "out.csv"
    result = caption_dir(root, "-o", out, "--model", tiny_run, "--batch-size", "4")
    rows = read_csv(out)
    paths = [r["path"] for r in rows]
    assert paths == sorted(expected) and len(set(paths)) == len(paths)  # the loop added nothing
    for row in rows:
        want = expected[row["path"]]
        if want is None:
            assert row["error"] == "" and row["caption"] and float(row["score"]) <= 0, row
        else:
            assert row["error"].startswith(want) and row["caption"] == "" and row["score"] == "", row
    assert "5 failed" in result.output and "images/s" in result.output


def test_no_recursive_jsonl_strict_and_refusals(zoo, tiny_run, tmp_path):
    root, expected = zoo
    out = tmp_path / "out.jsonl"
    caption_dir(root, "-o", out, "--model", tiny_run, "--no-recursive", "--format", "jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == sorted(p for p in expected if "/" not in p)
    again = caption_dir(root, "-o", out, "--model", tiny_run, ok=False)
    assert again.exit_code == 2 and "--overwrite" in again.output
    strict = caption_dir(root, "-o", out, "--model", tiny_run, "--overwrite", "--strict", ok=False)
    assert strict.exit_code == 1
    missing = caption_dir(tmp_path / "nope", "-o", tmp_path / "x.csv", "--model", tiny_run, ok=False)
    assert missing.exit_code == 2 and "is not a directory" in missing.output


def test_max_pixels_refuses_by_header(zoo, tiny_run, tmp_path):
    root, _ = zoo
    out = tmp_path / "out.csv"
    caption_dir(root, "-o", out, "--model", tiny_run, "--max-pixels", "2000", "--no-recursive")
    rows = {r["path"]: r for r in read_csv(out)}
    assert rows["plain.jpg"]["error"] == "too large (64x48 = 3072 pixels > --max-pixels 2000)"
    assert rows["sixteen.png"]["error"] == ""  # 40 x 30 = 1200 pixels


def test_killed_run_resumes_with_no_duplicate_and_no_missing_row(tiny_run, tmp_path):
    # Enough images that the kill lands mid-run: the tiny run captioned 120 between two looks at the file.
    IMAGES = 480
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(IMAGES):
        pixels = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
        (folder / f"{i:03d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    reference = tmp_path / "reference.csv"
    caption_dir(folder, "-o", reference, "--model", tiny_run, "--batch-size", "4")

    out = tmp_path / "out.csv"
    command = [sys.executable, "-m", "tfcap", "caption-dir", str(folder), "-o", str(out), "--model", str(tiny_run),
               "--batch-size", "4", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_csv(out)
    print(f"killed after {len(partial)} of {IMAGES} rows")
    assert 19 <= len(partial) < IMAGES, "the kill should land mid-run"
    assert out.read_text().endswith("\n")  # only whole rows

    caption_dir(folder, "-o", out, "--model", tiny_run, "--batch-size", "4", "--resume")
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [f"{i:03d}.png" for i in range(IMAGES)]
    assert rows == read_csv(reference)


def test_resume_drops_a_cut_off_last_row(tiny_run, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(np.full((8, 8, 3), i * 80, np.uint8)).numpy())
    out = tmp_path / "out.csv"
    out.write_text("path,caption,score,error\n0.png,a cat,-1.0,\n1.png,a d")  # killed mid-row
    caption_dir(folder, "-o", out, "--model", tiny_run, "--resume")
    rows = read_csv(out)
    assert [r["path"] for r in rows] == ["0.png", "1.png", "2.png"] and rows[0]["caption"] == "a cat"


def test_resume_refuses_a_foreign_csv_without_touching_it(tiny_run, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "0.png").write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    out = tmp_path / "mine.csv"
    out.write_text("name,value\nkeep,this")  # someone else's file, no trailing newline
    result = caption_dir(folder, "-o", out, "--model", tiny_run, "--resume", ok=False)
    assert result.exit_code == 2 and "not a caption-dir CSV" in result.output
    assert out.read_text() == "name,value\nkeep,this"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_resume_completes_a_file_written_before_labels_in_its_own_columns(tiny_run, tmp_path, fmt):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(np.full((8, 8, 3), i * 80, np.uint8)).numpy())
    out = tmp_path / f"out.{fmt}"
    old = ("path,caption,score,error\n0.png,a cat,-1.0000,\n" if fmt == "csv"
           else '{"path": "0.png", "caption": "a cat", "score": -1.0, "error": ""}\n')
    out.write_text(old)
    result = caption_dir(folder, "-o", out, "--model", tiny_run, "--resume")
    assert f"{out} has no confidence, in_domain, typicality, labels column" in result.stderr
    text = out.read_text()
    assert text.startswith(old)
    found = read_csv(out) if fmt == "csv" else [json.loads(line) for line in text.splitlines()]
    assert [r["path"] for r in found] == ["0.png", "1.png", "2.png"]
    assert all(list(r) == ["path", "caption", "score", "error"] for r in found)  # no row of another layout
    assert all(r["caption"] for r in found)


def test_resume_refuses_a_file_with_a_column_this_tfcap_does_not_write(tiny_run, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "0.png").write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    out = tmp_path / "newer.csv"
    out.write_text("path,caption,score,rating,labels,error\n1.png,a cat,-1.0000,0.5000,,\n")
    before = out.read_bytes()
    result = caption_dir(folder, "-o", out, "--model", tiny_run, "--resume", ok=False)
    assert result.exit_code == 2 and result.output.count("Error:") == 1
    assert "has columns this tfcap does not write (rating)" in result.output
    assert out.read_bytes() == before


def test_caption_prints_path_tab_caption(zoo, tiny_run):
    root, _ = zoo
    result = CliRunner().invoke(main, ["caption", str(root / "plain.jpg"), str(root / "gray.png"),
                                       "--model", str(tiny_run), "--beam-size", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip("\n").splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(root / "plain.jpg"), str(root / "gray.png")]
    assert all(line.split("\t")[1] for line in lines)
    # Then the other fields as caption-dir's CSV writes them: the score, confidence, in_domain and
    # typicality (none: no fitted confidence), the labels (none: no classifier).
    assert all(len(line.split("\t")) == 7 and float(line.split("\t")[2]) <= 0 and line.endswith("\t" * 4)
               for line in lines)
    bad = CliRunner().invoke(main, ["caption", str(root / "text.png"), "--model", str(tiny_run)])
    assert bad.exit_code == 1 and "not an image" in bad.output


def serve_without_tfcap(saved: Path, files: list[Path], expression: str, folder: Path):
    """`expression` (JSON-able Python over `out`, the outputs of the SavedModel's serving_default on the
    bytes of `files`), computed in a fresh process that never imports tfcap."""
    script = (
        "import sys, json, tensorflow as tf\n"
        f"model = tf.saved_model.load({str(saved)!r})\n"
        f"data = [open(name, 'rb').read() for name in {[str(f) for f in files]!r}]\n"
        "out = model.signatures['serving_default'](images=tf.constant(data))\n"
        "assert 'tfcap' not in sys.modules\n"
        f"print(json.dumps({expression}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=folder, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_round_trip_in_a_fresh_process_and_same_captions_as_the_run(zoo, tiny_run, tmp_path):
    root, expected = zoo
    saved = tmp_path / "saved"
    result = CliRunner().invoke(main, ["export", str(tiny_run), "-o", str(saved)])
    assert result.exit_code == 0, result.output
    from_run, from_saved = tmp_path / "run.csv", tmp_path / "saved.csv"
    caption_dir(root, "-o", from_run, "--model", tiny_run)
    caption_dir(root, "-o", from_saved, "--model", saved)
    assert read_csv(from_run) == read_csv(from_saved)

    captions = serve_without_tfcap(saved, [root / "plain.jpg", root / "rgba.png"],
                                   "[c.decode() for c in out['captions'].numpy()]", tmp_path)
    rows = {r["path"]: r["caption"] for r in read_csv(from_run)}
    assert captions == [rows["plain.jpg"], rows["rgba.png"]]
    beam_clash = caption_dir(root, "-o", tmp_path / "x.csv", "--model", saved, "--beam-size", "5", ok=False)
    assert beam_clash.exit_code == 2 and "exported with beam size 3" in beam_clash.output


def test_savedmodel_without_encode_and_decode_still_captions(zoo, tiny_run, tmp_path):
    """SavedModels exported before `encode`/`decode` existed: caption_pixels runs the whole way."""
    from tfcap import export

    root, _ = zoo
    module = export.serving_module(tiny_run, export.Decoding(beam_size=3), precision=None)
    saved = tf.Module()  # what such a SavedModel holds: the serving module without encode and decode
    for name in ("captioner", "preprocess", "caption_pixels", "assess", "serve", "get_settings"):
        setattr(saved, name, getattr(module, name))
    old = tmp_path / "old"
    tf.saved_model.save(saved, str(old), signatures={"serving_default": module.serve})
    predictor = export.load_predictor(old)
    assert not predictor.split
    from_run, from_old = tmp_path / "run.csv", tmp_path / "old.csv"
    caption_dir(root, "-o", from_run, "--model", tiny_run)
    caption_dir(root, "-o", from_old, "--model", old)
    assert read_csv(from_run) == read_csv(from_old)


def test_encode_then_decode_is_caption_pixels(tiny_run, tmp_path):
    from tfcap import export

    predictor = export.load_predictor(tiny_run, beam_size=2)
    assert predictor.split
    rng = np.random.default_rng(2)
    pixels = tf.stack([predictor.preprocess_bytes(tf.io.encode_png((rng.random((20, 30, 3)) * 255).astype(np.uint8)))
                       for _ in range(5)])
    features = predictor.encode(pixels)
    assert set(features) == {"pooled"} and features["pooled"].shape[0] == 5  # only what the merge decoder reads
    got, want = predictor.decode(features), predictor.caption_pixels(pixels)
    assert set(got) == set(want) == {"captions", "scores"}  # the random-init tiny convnet has no classifier
    assert got["captions"].numpy().tolist() == want["captions"].numpy().tolist()
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-6)


def test_attention_run_and_its_savedmodel_give_the_same_captions(zoo, overfitted, tmp_path):
    from tfcap import export

    root, _ = zoo
    tiny_attention_run = overfitted("attention")
    saved = export.export(tiny_attention_run, tmp_path / "saved", beam_size=3)
    assert set(export.load_predictor(saved).encode(tf.zeros([1, 32, 32, 3]))) == {"grid"}
    from_run, from_saved = tmp_path / "run.csv", tmp_path / "saved.csv"
    caption_dir(root, "-o", from_run, "--model", tiny_attention_run, "--batch-size", "3")
    caption_dir(root, "-o", from_saved, "--model", saved, "--batch-size", "3")
    rows = read_csv(from_run)
    assert rows == read_csv(from_saved) and sum(1 for r in rows if r["caption"]) == 12


def test_the_decoder_precision_is_recorded_kept_on_resume_and_fixed_in_a_savedmodel(zoo, overfitted, tmp_path,
                                                                                    monkeypatch):
    """An attention run on a CPU with bfloat16 instructions: caption-dir's auto is bfloat16, recorded beside
    the output; --resume keeps it and refuses float32; export fixes it in the SavedModel, which refuses another."""
    from tfcap import caption, encoder, export
    from tfcap.errors import TfcapError

    monkeypatch.setattr(encoder, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # emulated elsewhere: still right
    monkeypatch.setattr(encoder, "gpu_visible", lambda: False)
    root, _ = zoo
    run = overfitted("attention")
    out, full = tmp_path / "out.csv", tmp_path / "float32.csv"
    caption_dir(root, "-o", out, "--model", run, "--batch-size", "3")
    assert json.loads(caption.settings_path(out).read_text())["decoder_precision"] == "bfloat16"
    caption_dir(root, "-o", full, "--model", run, "--batch-size", "3", "--decoder-precision", "float32")
    assert json.loads(caption.settings_path(full).read_text())["decoder_precision"] == "float32"
    assert [r["caption"] for r in read_csv(out)] == [r["caption"] for r in read_csv(full)]
    result = caption_dir(root, "-o", out, "--model", run, "--resume", "--decoder-precision", "float32", ok=False)
    assert result.exit_code == 2 and "Error: --decoder-precision float32 differs from the bfloat16" in result.output

    saved = tmp_path / "saved"
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(saved), "--beam-size", "3"])
    assert result.exit_code == 0 and "decoder matmuls in bfloat16) in" in result.output, result.output
    assert export.load_predictor(saved).settings["decoder_precision"] == "bfloat16"
    with pytest.raises(TfcapError, match="exported with decoder precision bfloat16; re-export to use float32"):
        export.load_predictor(saved, decoder_precision="float32")
    assert export.load_predictor(saved, decoder_precision="auto").settings["decoder_precision"] == "bfloat16"
    result = caption_dir(root, "-o", tmp_path / "merge.csv", "--decoder-precision", "bfloat16", "--model",
                         overfitted("merge"), ok=False)
    assert result.exit_code == 2 and "is for the attention decoder; this model's is merge" in result.output
    result = CliRunner().invoke(main, ["export", str(overfitted("merge")), "-o", str(tmp_path / "no"),
                                       "--decoder-precision", "bfloat16"])
    assert result.exit_code == 2 and "this model's is merge" in result.output and not (tmp_path / "no").exists()


def test_bfloat16_encoder_at_caption_time_and_its_savedmodel(zoo, tiny_run, tmp_path):
    """--precision mixed_bfloat16 runs the encoder in bfloat16 (features float32, close to float32's);
    a SavedModel keeps the precision it was exported with and refuses another."""
    from tfcap import encoder, export
    from tfcap.errors import TfcapError

    try:
        encoder.resolve_precision("mixed_bfloat16")
    except TfcapError as e:
        pytest.skip(str(e))
    root, expected = zoo
    full, half = export.load_predictor(tiny_run), export.load_predictor(tiny_run, precision="mixed_bfloat16")
    assert (full.settings["encoder_precision"], half.settings["encoder_precision"]) == ("float32", "mixed_bfloat16")
    assert half._owner.captioner.encoder.model.layers[-1].compute_dtype == "bfloat16"
    rng = np.random.default_rng(3)
    pixels = tf.stack([full.preprocess_bytes(tf.io.encode_png((rng.random((40, 40, 3)) * 255).astype(np.uint8)))
                       for _ in range(6)])
    want, got = full.encode(pixels)["pooled"], half.encode(pixels)["pooled"]
    assert got.dtype == tf.float32
    # bfloat16 keeps 8 mantissa bits; through a random-init network that still tracks float32 closely.
    assert np.corrcoef(want.numpy().ravel(), got.numpy().ravel())[0, 1] > 0.95
    assert not np.array_equal(want.numpy(), got.numpy())  # really computed in bfloat16

    out = tmp_path / "half.csv"
    caption_dir(root, "-o", out, "--model", tiny_run, "--precision", "mixed_bfloat16")
    rows = read_csv(out)
    assert [r["error"] == "" for r in rows] == [expected[r["path"]] is None for r in rows]
    assert all(r["caption"] for r in rows if not r["error"])
    saved = tmp_path / "saved"
    result = CliRunner().invoke(main, ["export", str(tiny_run), "-o", str(saved), "--precision", "mixed_bfloat16"])
    assert result.exit_code == 0, result.output
    assert export.load_predictor(saved).settings["encoder_precision"] == "mixed_bfloat16"
    clash = caption_dir(root, "-o", tmp_path / "x.csv", "--model", saved, "--precision", "float32", ok=False)
    assert clash.exit_code == 2 and "exported with encoder precision mixed_bfloat16" in clash.output


def test_no_repeat_ngram_from_decoding_json_the_options_and_a_savedmodel(tiny_run, tiny_records, tmp_path):  # noqa: F811
    import shutil

    from tfcap import export

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "decoding.json").write_text('{"beam_size": 2, "length_penalty": 0.5, "no_repeat_ngram": 3}\n')
    assert export.run_decoding(run) == export.Decoding(beam_size=2, length_penalty=0.5, no_repeat_ngram=3)
    assert export.run_decoding(run, no_repeat_ngram=0) == export.Decoding(2, 0.5, 0)  # the option wins
    saved = tmp_path / "saved"
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(saved)])
    assert result.exit_code == 0, result.output
    assert "no repeated 3-grams, 0 labels" in result.stderr  # the random-init tiny convnet has no classifier
    assert export.load_predictor(saved, no_repeat_ngram=3).settings["no_repeat_ngram"] == 3
    photos = tmp_path / "photos"  # an image to caption: a folder without one is done before the model loads
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    for command in (["caption-dir", str(photos), "-o", str(tmp_path / "x.csv"), "--model", str(saved)],
                    ["evaluate", "--model", str(saved), str(tiny_records), "--split", "val", "--no-meteor",
                     "-o", str(tmp_path / "e")]):
        refused = CliRunner().invoke(main, [*command, "--no-repeat-ngram", "2"])
        assert refused.exit_code == 2 and "exported with no repeat ngram 3; re-export to use 2" in refused.output


def test_choose_decoding_tries_n_gram_blocking_and_prints_the_decoding_json(tiny_run, tiny_records, tiny_features,
                                                                              capsys, monkeypatch):  # noqa: F811
    """The tool as a script, in this process (its imports are this suite's: no second TensorFlow start)."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "choose_decoding.py"
    monkeypatch.setattr(sys, "argv", [str(tool), str(tiny_run), str(tiny_records), "--beams", "1", "2", "--penalties",
                                      "0", "--no-repeat-ngrams", "0", "2", "--cache-dir", str(tiny_features)])
    runpy.run_path(str(tool), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    settings = [line.split(":")[0] for line in lines[:-1]]
    assert settings == [f"beam {b} length penalty 0 no repeated {n}-grams" for b in (1, 2) for n in (0, 2)]
    assert all("repeating a 2-gram" in line for line in lines[:-1])
    chosen = json.loads(lines[-1].split("decoding.json: ")[1])
    assert set(chosen) == {"beam_size", "length_penalty", "no_repeat_ngram"} and chosen["no_repeat_ngram"] in (0, 2)


def test_a_process_loads_a_model_once_until_its_files_change(tiny_run, tmp_path, monkeypatch):
    from collections import OrderedDict
    from types import SimpleNamespace

    from tfcap import export

    monkeypatch.setattr(export, "_LOADED", OrderedDict())
    loads = []

    def fake_module(run_dir, decoding, precision, labels=None, decoder_precision=None):
        loads.append((run_dir.name, decoding.beam_size, precision, labels, decoder_precision))
        return SimpleNamespace(settings=json.dumps({"labels": 0}))

    monkeypatch.setattr(export, "serving_module", fake_module)
    runs = []
    for name in "abcde":
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        runs.append(tmp_path / name)
    first = export.load_predictor(runs[0])
    assert export.load_predictor(runs[0])._owner is first._owner and len(loads) == 1  # the same model, once
    assert export.load_predictor(runs[0], decoder_precision="auto")._owner is first._owner  # auto: the default
    export.load_predictor(runs[0], decoder_precision="float32")
    assert loads.pop() == ("a", 3, None, None, "float32") and len(loads) == 1
    export.load_predictor(runs[0], beam_size=1)
    export.load_predictor(runs[0], labels=2)
    export.load_predictor(runs[0], precision="mixed_bfloat16")
    assert loads[1:] == [("a", 1, None, None, None), ("a", 3, None, 2, None), ("a", 3, "mixed_bfloat16", None, None)]
    (runs[0] / "decoding.json").write_text('{"beam_size": 2}')  # a file more: loaded anew, its decoding read
    assert export.load_predictor(runs[0])._owner is not first._owner and loads[-1] == ("a", 2, None, None, None)
    export._LOADED.clear()
    export.load_predictor(runs[0])
    (runs[0] / "config.json").write_text("{}")  # rewritten with the same bytes: loaded anew, in the old one's place
    export.load_predictor(runs[0])
    assert len(loads) == 7 and len(export._LOADED) == 1
    export.load_predictor(runs[0])
    assert len(loads) == 7

    def unlistable(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    with monkeypatch.context() as patched:  # files readable by name in a folder that cannot be listed
        patched.setattr(export.os, "scandir", unlistable)
        export._LOADED.clear()
        export.load_predictor(runs[0])
        export.load_predictor(runs[0])
    assert len(loads) == 9 and not export._LOADED  # loaded each time, as before the cache
    export._LOADED.clear()
    del loads[:]
    for run in runs[:4]:
        export.load_predictor(run)
    export.load_predictor(runs[0])  # kept; now the last asked for
    export.load_predictor(runs[4])  # a fifth model: the one asked for longest ago (b) goes
    export.load_predictor(runs[0])
    assert [name for name, *_ in loads] == ["a", "b", "c", "d", "e"] and len(export._LOADED) == 4
    export.load_predictor(runs[1])
    assert [name for name, *_ in loads][-1] == "b" and len(loads) == 6

    # A real run and its SavedModel: one copy each, exported anew -> loaded anew.
    monkeypatch.undo()
    monkeypatch.setattr(export, "_LOADED", OrderedDict())
    run = export.load_predictor(tiny_run)
    assert export.load_predictor(tiny_run)._owner is run._owner
    ok("export", tiny_run, "-o", tmp_path / "sm")
    saved = export.load_predictor(tmp_path / "sm")
    assert export.load_predictor(tmp_path / "sm")._owner is saved._owner
    ok("export", tiny_run, "-o", tmp_path / "sm", "--overwrite", "--beam-size", "1")
    again = export.load_predictor(tmp_path / "sm")
    assert again._owner is not saved._owner and again.settings["beam_size"] == 1
