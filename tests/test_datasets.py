"""Layouts beyond Flickr8k on generated data: Karpathy JSON, COCO captions, Kaggle's Flickr30k; their
defects; image ids normalized and duplicates merged; the streaming write pass chunk by chunk."""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

from click.testing import CliRunner

from conftest import captions_for, make_image_bytes
from test_build_records import all_examples as examples, manifest
from tfcap import datasets, records
from tfcap.cli import main


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, ["build-records", *map(str, args), "--quiet", "--min-count", "1"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def write_jpegs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).write_bytes(make_image_bytes(k))


# --- Karpathy JSON -------------------------------------------------------------------------------

KARPATHY_SPLITS = ["train"] * 5 + ["restval"] * 2 + ["val"] * 2 + ["test"]


def karpathy_dataset(root: Path, filepath: str | None = None) -> Path:
    """dataset_flickr8k.json (or, with filepath, COCO-like entries) and the images it names."""
    names = [f"k{i}.jpg" for i in range(len(KARPATHY_SPLITS))]
    write_jpegs(root / (filepath or "Images"), names)
    entries = []
    for i, (name, split) in enumerate(zip(names, KARPATHY_SPLITS)):
        sentences = [{"raw": c, "tokens": ["not", "these"], "imgid": i, "sentid": 5 * i + k}
                     for k, c in enumerate(captions_for(i))]
        entry = {"filename": name, "imgid": i, "split": split, "sentences": sentences, "sentids": [0]}
        if filepath:
            entry["filepath"] = filepath
        entries.append(entry)
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}, indent=1))
    return path


def test_karpathy_json_splits_as_given_restval_into_train_captions_from_raw(tmp_path):
    path = karpathy_dataset(tmp_path / "k")
    out = tmp_path / "rec"
    run(tmp_path / "k", "-o", out)  # the folder: its one dataset_*.json is found
    m = manifest(out)
    assert m["source"]["layout"] == "karpathy" and m["source"]["split_source"] == "karpathy"
    assert {s: m["splits"][s]["images"] for s in datasets.SPLITS} == {"train": 7, "val": 2, "test": 1}
    found = examples(out)
    assert {i: ex["split"] for i, ex in found.items()} == {
        f"k{i}.jpg": {"restval": "train"}.get(s, s) for i, s in enumerate(KARPATHY_SPLITS)}
    assert [c.decode() for c in found["k3.jpg"]["captions"]] == captions_for(3)
    vocab = (out / "vocab.txt").read_text().split()
    assert "these" not in vocab and "circle" in vocab  # from raw, normalized by tfcap, not Karpathy's tokens

    run(path, "-o", tmp_path / "norestval", "--no-restval")  # the file itself as DATA
    m = manifest(tmp_path / "norestval")
    assert m["splits"]["train"]["images"] == 5 and m["unsplit_images"] == 2


def test_karpathy_json_with_filepath_finds_images_in_subfolders(tmp_path):
    karpathy_dataset(tmp_path / "coco", filepath="val2014")
    out = tmp_path / "rec"
    run(tmp_path / "coco", "-o", out)
    assert sorted(examples(out)) == [f"val2014/k{i}.jpg" for i in range(10)]
    assert Path(manifest(out)["source"]["images_dir"]) == (tmp_path / "coco").resolve()


def test_karpathy_json_defects(tmp_path):
    path = karpathy_dataset(tmp_path / "k")
    data = json.loads(path.read_text())
    data["images"][1]["split"] = "holdout"
    del data["images"][2]["filename"]
    path.write_text(json.dumps(data))
    (tmp_path / "k" / "Images" / "k4.jpg").unlink()
    result = run(path, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and f"{path}: images[1]: split must be one of" in result.output
    assert "--skip-bad-lines" in result.output and "Traceback" not in result.output
    run(path, "-o", tmp_path / "rec", "--skip-bad-lines")
    m = manifest(tmp_path / "rec")
    assert [b.split(": ")[1] for b in m["bad_lines"]] == ["images[1]", "images[2]"]
    assert m["skipped"] == [{"image": "k4.jpg", "reason": "missing"}] and m["images_written"] == 7

    path.write_text('{"images": [\n{"filename": "k0.jpg",\n')
    result = run(path, "-o", tmp_path / "rec2", ok=False)
    assert result.exit_code == 2 and f"{path}:3: not valid JSON" in result.output


def test_two_karpathy_files_in_one_folder_is_an_error_naming_both(tmp_path):
    karpathy_dataset(tmp_path / "k")
    (tmp_path / "k" / "dataset_coco.json").write_text('{"images": []}')
    result = run(tmp_path / "k", "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and "dataset_coco.json, dataset_flickr8k.json" in result.output


# --- COCO ----------------------------------------------------------------------------------------

def coco_dataset(root: Path, train: int = 8, val: int = 10) -> Path:
    for kind, count, offset in (("train", train, 0), ("val", val, 1000)):
        names = [f"COCO_{kind}2014_{offset + i:012d}.jpg" for i in range(count)]
        write_jpegs(root / f"{kind}2014", names)
        data = {"info": {"year": 2014}, "licenses": [{"id": 1, "name": "x", "url": "u"}],
                "images": [{"id": offset + i, "file_name": n, "width": 40, "height": 32, "license": 1}
                           for i, n in enumerate(names)],
                "annotations": [{"image_id": offset + i, "id": 10 * (offset + i) + k, "caption": c + " \n"}
                                for i in range(count) for k, c in enumerate(captions_for(i))]}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{kind}2014.json").write_text(json.dumps(data))
    return root


def test_coco_train_from_the_train_file_val_and_test_split_from_the_val_file(tmp_path):
    data = coco_dataset(tmp_path / "coco")
    out = tmp_path / "rec"
    run(data, "-o", out, "--test-fraction", "0.3")
    m = manifest(out)
    assert m["source"]["layout"] == "coco" and m["source"]["split_source"] == "files"
    assert {s: m["splits"][s]["images"] for s in datasets.SPLITS} == {"train": 8, "val": 7, "test": 3}
    found = examples(out)
    assert all(ex["split"] == "train" for i, ex in found.items() if i.startswith("train2014/"))
    assert all(ex["split"] in ("val", "test") for i, ex in found.items() if i.startswith("val2014/"))
    assert [c.decode() for c in found["train2014/COCO_train2014_000000000002.jpg"]["captions"]] == captions_for(2)


def test_coco_with_karpathy_json_beside_takes_its_splits(tmp_path):
    data = coco_dataset(tmp_path / "coco", train=2, val=2)
    entries = [{"filepath": "train2014", "filename": "COCO_train2014_000000000000.jpg", "split": "test"},
               {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "split": "restval"},
               {"filepath": "val2014", "filename": "COCO_val2014_000000001000.jpg", "split": "train"}]
    for e in entries:
        e["sentences"] = [{"raw": "ignored here", "tokens": []}]
    (data / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "rec"
    run(data, "-o", out)
    assert manifest(out)["source"]["split_source"] == "karpathy"
    assert {i: ex["split"] for i, ex in examples(out).items()} == {
        "train2014/COCO_train2014_000000000000.jpg": "test", "train2014/COCO_train2014_000000000001.jpg": "train",
        "val2014/COCO_val2014_000000001000.jpg": "train"}
    assert manifest(out)["unsplit_images"] == 1  # val2014/...1001 is in no Karpathy split


def test_coco_defects_unknown_image_empty_caption_and_missing_file(tmp_path):
    data = coco_dataset(tmp_path / "coco")
    path = data / "annotations" / "captions_val2014.json"
    coco = json.loads(path.read_text())
    coco["annotations"] += [{"image_id": 99999, "id": 77, "caption": "an orphan"},
                            {"image_id": 1000, "id": 78, "caption": "  "}]
    path.write_text(json.dumps(coco))
    (data / "val2014" / "COCO_val2014_000000001001.jpg").unlink()
    result = run(data, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and f"{path}: annotation 77: image_id 99999 is not in images[]" in result.output
    run(data, "-o", tmp_path / "rec", "--skip-bad-lines")
    m = manifest(tmp_path / "rec")
    assert m["bad_lines"] == [f"{path}: annotation 77: image_id 99999 is not in images[]",
                              f"{path}: annotation 78: empty caption"]
    assert m["skipped"] == [{"image": "val2014/COCO_val2014_000000001001.jpg", "reason": "missing"}]
    assert m["images_written"] == 17


def test_coco_without_image_folders_says_where_it_looked(tmp_path):
    data = coco_dataset(tmp_path / "coco", train=1, val=1)
    for kind in ("train", "val"):
        for f in (data / f"{kind}2014").iterdir():
            f.unlink()
        (data / f"{kind}2014").rmdir()
    result = run(data, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and "no train2014 or val2014/" in result.output and "--images" in result.output


# --- Flickr30k (Kaggle) --------------------------------------------------------------------------

def flickr30k_dataset(root: Path, count: int = 10) -> Path:
    names = [f"{1000 + i}.jpg" for i in range(count)]
    write_jpegs(root / "flickr30k_images" / "flickr30k_images", names)  # as the Kaggle archive unpacks
    lines = ["image_name| comment_number| comment"]
    lines += [f"{name}| {k}| {c}  " for i, name in enumerate(names) for k, c in enumerate(captions_for(i))]
    lines[7] = lines[7].replace("| 1|", '| 1| A "quoted |')
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    return root


def test_flickr30k_kaggle_layout_stray_spaces_quotes_and_nested_images(tmp_path):
    data = flickr30k_dataset(tmp_path / "f30k")
    out = tmp_path / "rec"
    run(data, "-o", out)
    m = manifest(out)
    assert m["source"]["layout"] == "flickr30k" and m["source"]["split_source"] == "hash"
    assert m["images_written"] == 10 and m["captions_written"] == 50
    found = examples(out)
    assert [c.decode() for c in found["1000.jpg"]["captions"]] == captions_for(0)
    assert found["1001.jpg"]["captions"][1].decode() == 'A "quoted | ' + captions_for(1)[1]


def test_flickr30k_malformed_line_names_file_and_line_unless_skipped(tmp_path):
    data = flickr30k_dataset(tmp_path / "f30k")
    results = data / "results.csv"
    lines = results.read_text().splitlines()
    lines[19] = "1003.jpg| 4 A dog runs across the grass ."  # the real file's defect: a separator lost
    results.write_text("\n".join(lines) + "\n")
    result = run(data, "-o", tmp_path / "rec", ok=False)
    assert result.exit_code == 2 and f"{results}:20: expected image_name| comment_number| comment" in result.output
    run(data, "-o", tmp_path / "rec", "--skip-bad-lines")
    m = manifest(tmp_path / "rec")
    assert len(m["bad_lines"]) == 1 and m["captions_written"] == 49


def test_flickr30k_with_karpathy_json_beside_takes_its_splits(tmp_path):
    data = flickr30k_dataset(tmp_path / "f30k", count=4)
    entries = [{"filename": f"{1000 + i}.jpg", "split": split, "sentences": [{"raw": "x", "tokens": ["x"]}]}
               for i, split in enumerate(["test", "train", "restval"])]
    (data / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    run(data, "-o", tmp_path / "rec", "--no-restval")
    m = manifest(tmp_path / "rec")
    assert m["source"]["split_source"] == "karpathy" and m["unsplit_images"] == 2  # 1002 (restval) and 1003
    assert {i: ex["split"] for i, ex in examples(tmp_path / "rec").items()} == {"1000.jpg": "test", "1001.jpg": "train"}


def test_layout_option_picks_one_of_several_in_a_folder(tmp_path):
    data = flickr30k_dataset(tmp_path / "both", count=4)
    karpathy_dataset(data)
    run(data, "-o", tmp_path / "auto")
    assert manifest(tmp_path / "auto")["source"]["layout"] == "flickr30k"
    run(data, "-o", tmp_path / "k", "--layout", "karpathy")
    assert manifest(tmp_path / "k")["source"]["layout"] == "karpathy"
    result = run(data, "-o", tmp_path / "c", "--layout", "coco", ok=False)
    assert result.exit_code == 2 and "the coco layout" in result.output


# --- Image ids: one image, one record ------------------------------------------------------------

def test_path_spellings_and_unicode_forms_are_one_image_with_merged_captions(tmp_path):
    """`./2-café.jpg` and `2-café.jpg` were two records of one image (leakage across a hashed split);
    a file saved in NFD and named in NFC was "missing"."""
    images = tmp_path / "img"
    nfc, nfd = unicodedata.normalize("NFC", "2-café.jpg"), unicodedata.normalize("NFD", "3-café.jpg")
    write_jpegs(images, [nfc, nfd, "plain.jpg"])
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([[f"./{nfc}", "a red circle"], [nfc, "a red circle"], [nfc, "a blue circle"],
                     [unicodedata.normalize("NFC", "3-café.jpg"), "a green square"],
                     ["plain.jpg", "a plain thing"], ["plain.jpg", "a plain thing"]])  # same spelling: kept
    out = tmp_path / "rec"
    run("--captions", tmp_path / "c.csv", "--images", images, "-o", out)
    m = manifest(out)
    found = examples(out)
    assert sorted(found) == sorted([nfc, unicodedata.normalize("NFC", "3-café.jpg"), "plain.jpg"])
    assert [c.decode() for c in found[nfc]["captions"]] == ["a red circle", "a blue circle"]
    assert found[unicodedata.normalize("NFC", "3-café.jpg")]["image"] == (images / nfd).read_bytes()
    assert len(found["plain.jpg"]["captions"]) == 2
    assert m["duplicate_captions"] == 1 and m["skipped"] == [] and m["captions_written"] == 5


def test_image_id_normalization():
    assert datasets.image_id("./a/b.jpg") == "a/b.jpg" == datasets.image_id("a//b.jpg") == datasets.image_id(
        "a/x/../b.jpg")
    assert datasets.image_id(unicodedata.normalize("NFD", "é.jpg")) == unicodedata.normalize("NFC", "é.jpg")
    assert datasets.image_id("plain_1.jpg.1") == "plain_1.jpg.1"


# --- Streaming --------------------------------------------------------------------------------

def test_records_written_chunk_by_chunk_equal_those_of_one_chunk(kaggle_dataset, tmp_path, monkeypatch):
    run(kaggle_dataset, "-o", tmp_path / "one", "--max-length", "3")
    monkeypatch.setattr(records, "_CHUNK", 3)  # 20 images: 7 chunks for the vocabulary and the write pass
    run(kaggle_dataset, "-o", tmp_path / "chunks", "--max-length", "3")
    a, b = manifest(tmp_path / "one"), manifest(tmp_path / "chunks")
    assert a["splits"] == b["splits"] and a["vocab_sha256"] == b["vocab_sha256"]
    assert a["truncated_captions"] == b["truncated_captions"] == 60


def test_a_failure_inside_the_write_pass_is_raised_not_taken_for_unreadable_images(kaggle_dataset, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(records, "_FORMATS", ())  # any bug in the chunk generator, which ignore_errors follows
    result = run(kaggle_dataset, "-o", tmp_path / "rec", ok=False)
    assert isinstance(result.exception, IndexError) and not (tmp_path / "rec").exists()


def test_a_lone_surrogate_in_json_captions_is_replaced_not_a_crash(tmp_path):
    path = karpathy_dataset(tmp_path / "k")
    path.write_text(path.read_text().replace('"raw": "A red circle."', '"raw": "A red \\ud83d circle."'))
    out = tmp_path / "rec"
    run(path, "-o", out)
    assert examples(out)["k0.jpg"]["captions"][0].decode() == "A red ? circle."
