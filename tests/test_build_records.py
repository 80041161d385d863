"""`tfcap build-records` on generated data: layouts, splits, schema, round trip, bad input, safety."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import captions_for, make_image_bytes, write_images
from tfcap import records, text
from tfcap.cli import main


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, ["build-records", *map(str, args), "--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def all_examples(out: Path) -> dict[str, dict]:
    found = {}
    for split in ("train", "val", "test"):
        for ex in records.iterate_examples(out, split):
            found[ex["image_id"].decode()] = dict(ex, split=split)
    return found


def test_kaggle_layout_one_record_per_image_with_exact_bytes(kaggle_dataset, tmp_path):
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "1")
    m = manifest(out)
    assert m["source"]["layout"] == "kaggle" and m["source"]["split_source"] == "hash"
    assert {s: m["splits"][s]["images"] for s in m["splits"]} == {"train": 16, "val": 2, "test": 2}
    examples = all_examples(out)
    assert len(examples) == 20  # one record per image, not per caption
    for image_id, ex in examples.items():
        assert ex["image"] == (kaggle_dataset / "Images" / image_id).read_bytes()
        assert ex["format"].decode() == {"jpg": "jpeg"}.get(image_id.split(".")[-1], image_id.split(".")[-1])
        assert (ex["height"], ex["width"]) == (32, 40)
        index = int(image_id[3:6])
        assert [c.decode() for c in ex["captions"]] == captions_for(index)  # original text, quoted commas kept
        assert len(ex["caption_ids"]) == 5


def test_round_trip_detokenizes_to_normalized_text_with_unk(kaggle_dataset, tmp_path):
    with open(kaggle_dataset / "captions.txt", "a") as f:
        f.write('img004.webp,"A zebra, with a QUAGGA!"\n')
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "2")
    vocab = records.load_vocabulary(out)
    known = set(vocab.words)
    assert "bright" in known and "circle" in known and "zebra" not in known and "quagga" not in known
    for ex in all_examples(out).values():
        decoded = vocab.decode(tf.ragged.constant(ex["caption_ids"]).to_tensor()).numpy()
        expected = text.normalize(tf.constant(ex["captions"])).numpy()
        for got, want in zip(decoded, expected):
            want_words = [w if w in known else "<unk>" for w in want.decode().split()]
            assert got.decode() == " ".join(want_words)


def test_vocabulary_counts_only_the_train_split(tmp_path):
    root = tmp_path / "d"
    names = write_images(root / "img", 4, formats=("PNG",))
    with open(root / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for i, name in enumerate(names):
            split = "train" if i < 2 else "test"
            w.writerow([name, "train words" if split == "train" else "testonly words", split])
    out = tmp_path / "rec"
    run("--captions", root / "c.csv", "--images", root / "img", "-o", out, "--min-count", "1")
    words = (out / "vocab.txt").read_text().split()
    assert "train" in words and "testonly" not in words
    assert manifest(out)["source"]["split_source"] == "column"


def test_original_layout_official_splits_and_unsplit_images(original_dataset, tmp_path):
    out = tmp_path / "rec"
    run(original_dataset, "-o", out, "--min-count", "1")
    m = manifest(out)
    assert m["source"]["layout"] == "original" and m["source"]["split_source"] == "official"
    assert {s: m["splits"][s]["images"] for s in m["splits"]} == {"train": 8, "val": 2, "test": 1}
    assert m["unsplit_images"] == 1 and m["images_written"] == 11


def test_hash_split_is_by_image_deterministic_and_seeded(kaggle_dataset, tmp_path):
    def splits(out, *extra):
        run(kaggle_dataset, "-o", out, "--min-count", "1", *extra)
        return {i: ex["split"] for i, ex in all_examples(out).items()}

    a, b = splits(tmp_path / "a"), splits(tmp_path / "b")
    c = splits(tmp_path / "c", "--seed", "7", "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert a == b and a != c
    assert sorted(c.values()).count("val") == 5 and sorted(c.values()).count("test") == 5


def test_shards_names_counts_sha256_and_gzip(kaggle_dataset, tmp_path):
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "1", "--shards", "3", "--compression", "gzip")
    m = manifest(out)
    train = m["splits"]["train"]["shards"]
    assert [s["file"] for s in train] == [f"train-0000{i}-of-00003.tfrecord.gz" for i in range(3)]
    assert sum(s["records"] for s in train) == 16
    for split in m["splits"].values():
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert len(all_examples(out)) == 20
    assert m["config"]["compression"] == "gzip" and m["tfcap_version"]


def test_truncation_is_counted(kaggle_dataset, tmp_path):
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "1", "--max-length", "3")
    m = manifest(out)
    assert m["truncated_captions"] == 60  # the three 4-word captions of each of the 20 images
    assert max(len(c) for ex in all_examples(out).values() for c in ex["caption_ids"]) == 3


def test_bad_images_are_skipped_listed_and_counted(kaggle_dataset, tmp_path):
    images = kaggle_dataset / "Images"
    (images / "img000.jpg").write_bytes(b"")
    (images / "img001.png").write_bytes(make_image_bytes(1, "PNG")[:60])
    (images / "img002.gif").write_text("this is not an image")
    (images / "img003.bmp").unlink()
    out = tmp_path / "rec"
    result = run(kaggle_dataset, "-o", out, "--min-count", "1")
    m = manifest(out)
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    assert reasons["img000.jpg"] == "empty"
    assert reasons["img001.png"].startswith("truncated or corrupt")
    assert reasons["img002.gif"] == "not an image"
    assert reasons["img003.bmp"] == "missing"
    assert m["images_written"] == 16
    assert "4 skipped" in result.output


def test_damaged_files_are_told_apart_by_their_ends(kaggle_dataset, tmp_path):
    images = kaggle_dataset / "Images"
    jpeg = (images / "img005.jpg").read_bytes()
    (images / "img005.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # cut in the middle: no EOI
    (images / "img010.jpg").write_bytes((images / "img010.jpg").read_bytes() + b"camera trailer")
    damaged = bytearray((images / "img015.jpg").read_bytes())  # second half garbage, end intact
    damaged[len(damaged) // 2:-2] = b"\x55" * (len(damaged) // 2 - 2)
    (images / "img015.jpg").write_bytes(bytes(damaged))
    (images / "img001.png").write_bytes((images / "img001.png").read_bytes()[:-12])  # no IEND
    (images / "img002.gif").write_bytes((images / "img002.gif").read_bytes()[:-1])  # no trailer: decodes
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "1")
    m = manifest(out)
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["img001.png", "img005.jpg"]
    assert all(r.startswith("truncated or corrupt") for r in reasons.values())
    examples = all_examples(out)
    for kept in ("img010.jpg", "img015.jpg", "img002.gif"):
        assert examples[kept]["image"] == (images / kept).read_bytes()
        assert (examples[kept]["height"], examples[kept]["width"]) == (32, 40)


def test_bad_caption_line_is_an_error_naming_file_and_line_unless_skipped(original_dataset, tmp_path):
    token = original_dataset / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines.insert(3, "this line has no tab")
    token.write_text("\n".join(lines) + "\n")
    result = run(original_dataset, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2
    assert f"{token}:4:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "rec").exists()
    run(original_dataset, "-o", tmp_path / "rec", "--skip-bad-lines", "--min-count", "1")
    assert manifest(tmp_path / "rec")["bad_lines"] == [f"{token}:4: expected IMAGE#N<TAB>caption"]


def test_bad_csv_row_names_file_and_line(kaggle_dataset, tmp_path):
    with open(kaggle_dataset / "captions.txt", "a") as f:
        f.write("img000.jpg,too,many,fields\n")
    result = run(kaggle_dataset, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and "captions.txt:102:" in result.output


@pytest.mark.parametrize("args,message", [
    (["{empty}"], "no known layout matches (kaggle: captions.txt and Images/ in DATA; original: Flickr8k.token.txt"),
    (["{missing}"], "does not exist"),
    (["--captions", "{empty}/x.csv"], "needs --captions FILE.csv and --images DIR"),
    ([], "give a dataset folder"),
])
def test_unknown_layouts_are_clear_errors(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in args]
    result = run(*args, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_existing_output_is_refused_unless_overwrite(kaggle_dataset, tmp_path):
    out = tmp_path / "rec"
    out.mkdir()
    (out / "precious").write_text("keep me")
    result = run(kaggle_dataset, "-o", out, ok=False)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "precious").read_text() == "keep me"
    run(kaggle_dataset, "-o", out, "--overwrite", "--min-count", "1")
    assert not (out / "precious").exists() and (out / "manifest.json").exists()


def test_killed_run_leaves_no_partial_output_and_a_rerun_works(kaggle_dataset, tmp_path):
    out = tmp_path / "rec"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import tfcap.records as records
        real, calls = records._write_record, [0]
        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-way through writing the shards
            return real(*args, **kwargs)
        records._write_record = dying
        from tfcap.cli import main
        sys.argv = ["tfcap", "build-records", {str(kaggle_dataset)!r}, "-o", {str(out)!r}, "--quiet"]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9
    assert not out.exists()
    scratch = [p for p in tmp_path.iterdir() if p.name.startswith(".tfcap-") and p.name.endswith(".rec")]
    assert len(scratch) == 1  # the killed run's scratch, private to it, never under OUT
    run(kaggle_dataset, "-o", out, "--min-count", "1")  # it holds the lock, so it removes the leftover
    assert not scratch[0].exists() and manifest(out)["images_written"] == 20


def test_ctrl_c_removes_scratch_and_keeps_previous_output(kaggle_dataset, tmp_path, monkeypatch):
    out = tmp_path / "rec"
    run(kaggle_dataset, "-o", out, "--min-count", "1")
    before = (out / "manifest.json").read_text()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(records, "_write_record", interrupt)
    result = run(kaggle_dataset, "-o", out, "--overwrite", ok=False)
    assert result.exit_code != 0
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle", "rec"]  # no scratch left


def test_a_train_image_failing_only_the_full_decode_does_not_count_in_the_vocabulary(tmp_path):
    root = tmp_path / "d"
    names = write_images(root / "img", 3, formats=("PNG",))
    (root / "img" / names[0]).write_bytes(make_image_bytes(0, "PNG")[:80])  # right magic, truncated body
    with open(root / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerow([names[0], "zebra words", "train"])
        w.writerow([names[1], "plain words", "train"])
        w.writerow([names[2], "plain words", "test"])
    out = tmp_path / "rec"
    run("--captions", root / "c.csv", "--images", root / "img", "-o", out, "--min-count", "1")
    assert "zebra" not in (out / "vocab.txt").read_text().split()
    m = manifest(out)
    assert [s["image"] for s in m["skipped"]] == [names[0]] and m["splits"]["train"]["images"] == 1


@pytest.mark.parametrize("size", [0, 1, 110, 127, 128, 16_250, 16_383, 16_384, 2**21 + 5])
def test_records_serialized_in_tensorflow_parse_like_python_protos(size):
    """Varint lengths at their byte boundaries, around the image bytes and the messages that hold them."""
    image = bytes(range(256)) * (size // 256) + bytes(size % 256)
    features = {"image/id": tf.constant([b"a.jpg"]), "image/height": tf.constant([7], tf.int64),
                "caption/text": tf.ragged.constant([[b"two words", b"three more words"]]),
                "caption/ids": tf.ragged.constant([[4, 5, 300, 2**40]], tf.int64)}
    serialized = records._serialize_examples(tf.constant([image]), records._features_message(features))
    parsed = tf.train.Example.FromString(serialized.numpy()[0]).features.feature
    assert parsed["image/encoded"].bytes_list.value == [image]
    assert parsed["image/id"].bytes_list.value == [b"a.jpg"] and parsed["image/height"].int64_list.value == [7]
    assert parsed["caption/text"].bytes_list.value == [b"two words", b"three more words"]
    assert parsed["caption/ids"].int64_list.value == [4, 5, 300, 2**40]
    assert records._varint(tf.constant([0, 127, 128, 300, 2**63 - 1], tf.int64)).numpy().tolist() == [
        b"\x00", b"\x7f", b"\x80\x01", b"\xac\x02", b"\xff" * 8 + b"\x7f"]
