"""Reading users' files (issue 23): datasets, records, predictions and references that are damaged, of the
wrong shape, repeated or in another layout give the right result or one bounded `Error:` line.

Each test is the case of a defect that gave a traceback, a silent wrong result or an unbounded line;
commands run in process through click's CliRunner on small generated files.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import invoke, ok, png
from test_edges import one_error as edges_one_error

LONGEST = 600  # characters of an Error line, paths included


def one_error(result, *names) -> str:
    """`test_edges.one_error`, and the line shorter than LONGEST characters."""
    line = edges_one_error(result, *names)
    assert len(line) < LONGEST, line[:300]
    return line


CAPTIONS = {f"{i}.png": [f"a {w} {animal}" for w in ("red", "blue")]
            for i, animal in enumerate(["cat", "dog", "cat", "bird", "dog", "cat"])}


def predictions_csv(path: Path, rows: list[tuple], bom: bool = False) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "caption", "score", "error"])
    writer.writerows(rows)
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8")
    return path


def scores(folder: Path) -> dict:
    return json.loads((folder / "scores.json").read_text())


def evaluate(predictions, references, out, *extra):
    return invoke("evaluate", "--predictions", predictions, "--references", references, "-o", out, "--no-meteor",
                  "--quiet", *extra)


# --- Karpathy and COCO JSON of the wrong types ---------------------------------------------------

def karpathy(root: Path, change=None) -> Path:
    """dataset_flickr8k.json of the 6 images (in root/Images), changed by `change(entries)`."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, captions) in enumerate(CAPTIONS.items()):
        (root / "Images" / name).write_bytes(png(i))
        entries.append({"filename": name, "split": "train" if i < 4 else "test",
                        "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
    if change:
        change(entries)
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": entries}))
    return path


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> Path:
    """Records of the 6 images of `karpathy` (4 train, 2 test)."""
    root = tmp_path_factory.mktemp("readers")
    ok("build-records", karpathy(root), "-o", root / "records", "--min-count", "1", "--quiet")
    return root / "records"


def _set(key, value):
    return lambda entries: entries[1].__setitem__(key, value)


@pytest.mark.parametrize("change, says", [
    (_set("split", ["train"]), "images[1]: split must be one of train, val, test, restval, got a list"),
    (_set("filename", ["1.png"]), "images[1]: filename"),
    (lambda entries: entries.append(dict(entries[0], split="test")), "images[6]: image '0.png' is already listed"),
    (_set("split", "x" * 100_000), "images[1]: split must be one of"),
], ids=["split is a list", "filename is a list", "an image twice", "a split of 100 KB"])
def test_karpathy_entries_of_the_wrong_types_are_one_line_or_skipped_and_counted(tmp_path, change, says):
    path = karpathy(tmp_path / "k", change)
    one_error(invoke("build-records", path, "-o", tmp_path / "rec", "--min-count", "1", "--quiet"), path, says)
    ok("build-records", path, "-o", tmp_path / "rec", "--min-count", "1", "--quiet", "--skip-bad-lines")
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert len(manifest["bad_lines"]) == 1 and says in manifest["bad_lines"][0]
    assert len(manifest["bad_lines"][0]) < LONGEST


def coco(root: Path, change=None) -> Path:
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (name, captions) in enumerate(CAPTIONS.items()):
        (root / "train2014" / name).write_bytes(png(i))
        images.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "id": 10 * i + k, "caption": c} for k, c in enumerate(captions)]
    data = {"images": images, "annotations": annotations}
    if change:
        change(data)
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("change, says", [
    (lambda d: d["images"][1].__setitem__("id", [1]), "images[1]: expected an object with an integer id"),
    (lambda d: d["annotations"][2].__setitem__("image_id", [1]),
     "annotation 10: image_id must be an integer, got a list"),
    (lambda d: d["annotations"][2].update(id=["x" * 100_000], image_id="nope"),
     "annotations[2]: image_id 'nope' is not in images[]"),
    (lambda d: d["images"].append({"id": 1, "file_name": "0.png"}), "images[6]: id 1 is already the id of images[1]"),
    (lambda d: d["annotations"][2].__setitem__("caption", {"text": "a cat"}),
     "annotation 10: caption must be a string"),
], ids=["image id is a list", "image_id is a list", "annotation id of 100 KB", "an id twice", "caption is an object"])
def test_coco_entries_of_the_wrong_types_are_one_line_or_skipped_and_counted(tmp_path, change, says):
    data = coco(tmp_path / "coco", change)
    one_error(invoke("build-records", data, "-o", tmp_path / "rec", "--min-count", "1", "--quiet"),
              "captions_train2014.json", says)
    ok("build-records", data, "-o", tmp_path / "rec", "--min-count", "1", "--quiet", "--skip-bad-lines")
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["bad_lines"] and says in manifest["bad_lines"][0]


@pytest.mark.parametrize("layout", ["karpathy", "coco"])
@pytest.mark.parametrize("skip", [[], ["--skip-bad-lines"]], ids=["", "skip-bad-lines"])
def test_json_nested_200000_deep_is_one_line(tmp_path, layout, skip):
    deep = "[" * 200_000 + "]" * 200_000
    if layout == "karpathy":
        data = karpathy(tmp_path / "k")
        data.write_text('{"images": ' + deep + "}")
    else:
        data = coco(tmp_path / "coco")
        (data / "annotations" / "captions_train2014.json").write_text('{"images": [], "annotations": ' + deep + "}")
    one_error(invoke("build-records", data, "-o", tmp_path / "rec", "--quiet", *skip), "nested too deeply")


def test_a_captions_csv_header_of_125_kb_is_quoted_in_80_characters(tmp_path):
    (tmp_path / "c.csv").write_text("image," + "x" * 125_000 + "\na.png,a cat\n")
    (tmp_path / "img").mkdir()
    line = one_error(invoke("build-records", "--captions", tmp_path / "c.csv", "--images", tmp_path / "img",
                            "-o", tmp_path / "rec"), "c.csv:1: header must name")
    assert line.endswith("x" * 70 + "…") and "x" * 81 not in line


# --- Records: manifest.json and vocab.txt ---------------------------------------------------------

@pytest.mark.parametrize("manifest, says", [
    ("[]", "expected an object, got a list"),
    ('{"splits": []}', "splits: expected an object"),
    ('{"splits": {"test": {"shards": "x"}}}', "splits: missing 'train'"),
    (None, "splits.test.shards[0].file: expected a file name in the records folder"),
    (None, "splits.train.images"),
], ids=["a list", "splits a list", "no train split", "a shard outside the folder", "images a string"])
def test_a_manifest_of_the_wrong_shape_is_one_line_in_evaluate_and_train(rec, tmp_path, manifest, says):
    damaged = tmp_path / "records"
    shutil.copytree(rec, damaged)
    if manifest is None:
        content = json.loads((rec / "manifest.json").read_text())
        if "file" in says:
            content["splits"]["test"]["shards"][0]["file"] = "../" + content["splits"]["test"]["shards"][0]["file"]
        else:
            content["splits"]["train"]["images"] = "4"
        manifest = json.dumps(content)
    (damaged / "manifest.json").write_text(manifest)
    predictions = predictions_csv(tmp_path / "p.csv", [("0.png", "a red cat", "-1", "")])
    one_error(evaluate(predictions, damaged, tmp_path / "e"), "manifest.json", says)
    one_error(invoke("train", damaged, "-o", tmp_path / "run", "--quiet"), "manifest.json", says)


@pytest.mark.parametrize("damage", ["cut short", "two lines swapped", "not UTF-8"])
def test_a_damaged_vocab_is_refused_by_train_and_evaluate(rec, tmp_path, damage):
    damaged = tmp_path / "records"
    shutil.copytree(rec, damaged)
    words = (rec / "vocab.txt").read_text().splitlines()
    if damage == "cut short":
        (damaged / "vocab.txt").write_text("\n".join(words[:5]) + "\n")
    elif damage == "two lines swapped":
        words[4], words[5] = words[5], words[4]
        (damaged / "vocab.txt").write_text("\n".join(words) + "\n")
    else:
        (damaged / "vocab.txt").write_bytes(b"\xff\xfe<pad>\n")
    says = "not UTF-8" if damage == "not UTF-8" else "where manifest.json says"
    one_error(invoke("train", damaged, "-o", tmp_path / "run", "--encoder", "convnet", "--encoder-weights", "none",
                     "--image-size", "32", "--units", "8", "--embed-dim", "8", "--epochs", "1", "--quiet"),
              "vocab.txt", says)
    assert not (tmp_path / "run").exists()
    predictions = predictions_csv(tmp_path / "p.csv", [("0.png", "a red cat", "-1", "")])
    one_error(evaluate(predictions, damaged, tmp_path / "e"), "vocab.txt", says)


# --- evaluate --predictions and --references ------------------------------------------------------

@pytest.mark.parametrize("line, says", [
    ('"a caption"', "p.jsonl:2: expected a JSON object"),
    ('["1.png", "a dog"]', "p.jsonl:2: expected a JSON object"),
    ('{"path": "1.png"}', "p.jsonl:2: missing 'caption'"),
    ('{"path": "1.png", "caption": ["a", "dog"]}', "p.jsonl:2: caption: expected a string or null"),
    ('{"path": {"x": 1}, "caption": "a dog"}', "p.jsonl:2: path: expected a non-empty string"),
], ids=["a string", "an array", "no caption", "caption a list", "path an object"])
def test_jsonl_predictions_of_the_wrong_shape_are_one_line(rec, tmp_path, line, says):
    (tmp_path / "p.jsonl").write_text('{"path": "0.png", "caption": "a red cat", "score": -1, "error": ""}\n'
                                      + line + "\n")
    one_error(evaluate(tmp_path / "p.jsonl", rec, tmp_path / "e"), says)
    one_error(invoke("gallery", tmp_path / "p.jsonl", "--images", tmp_path, "-o", tmp_path / "g.html"), says)


def test_a_predictions_csv_with_a_byte_order_mark_is_read(rec, tmp_path):
    predictions = predictions_csv(tmp_path / "p.csv", [(name, c[0], "-1", "") for name, c in CAPTIONS.items()],
                                  bom=True)
    ok("evaluate", "--predictions", predictions, "--references", rec, "-o", tmp_path / "e", "--no-meteor", "--quiet")
    assert scores(tmp_path / "e")["images_scored"] == 6


def test_different_predictions_for_one_image_are_an_error_naming_both_lines(rec, tmp_path):
    predictions = predictions_csv(tmp_path / "p.csv", [("0.png", "a red cat", "-1", ""), ("1.png", "a dog", "-1", ""),
                                                       ("0.png", "a blue cat", "-2", "")])
    one_error(evaluate(predictions, rec, tmp_path / "e"), "p.csv:4", "'0.png'", "p.csv:2")
    # The same image twice by two spellings that both match one reference: as ambiguous.
    predictions = predictions_csv(tmp_path / "q.csv", [("a/0.png", "a red cat", "-1", ""),
                                                       ("b/0.png", "a blue cat", "-1", "")])
    one_error(evaluate(predictions, rec, tmp_path / "e"), "a/0.png", "b/0.png", "different captions")


def test_repeated_identical_predictions_are_scored_once_with_a_warning_and_a_count(rec, tmp_path):
    rows = [(name, c[0], "-1", "") for name, c in CAPTIONS.items()]
    once = ok("evaluate", "--predictions", predictions_csv(tmp_path / "once.csv", rows), "--references", rec,
              "-o", tmp_path / "once", "--no-meteor", "--quiet")
    twice = ok("evaluate", "--predictions", predictions_csv(tmp_path / "twice.csv", rows + rows[:2]), "--references",
               rec, "-o", tmp_path / "twice", "--no-meteor", "--quiet")
    assert "warning: 2 prediction rows repeat" in twice.stderr and "warning" not in once.stderr
    assert scores(tmp_path / "twice")["repeated_predictions"] == 2
    assert scores(tmp_path / "twice")["scores"] == scores(tmp_path / "once")["scores"]


def beam_out(folder: Path, rows: list[tuple], parts: int, fmt: str = "csv") -> Path:
    """A caption-dir --engine beam OUT folder: `rows` dealt into `parts` parts, each CSV with its header."""
    folder.mkdir()
    for k in range(parts):
        mine = rows[k::parts]
        name = folder / f"part-{k:05d}-of-{parts:05d}.{fmt}"
        if fmt == "csv":
            predictions_csv(name, mine)
        else:
            name.write_text("".join(json.dumps({"path": p, "caption": c, "score": float(s), "error": e}) + "\n"
                                    for p, c, s, e in mine))
    return folder


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_beam_out_folder_is_read_as_predictions_every_part(rec, tmp_path, fmt):
    rows = [(name, c[0], "-1", "") for name, c in CAPTIONS.items()]
    ok("evaluate", "--predictions", predictions_csv(tmp_path / "one.csv", rows), "--references", rec,
       "-o", tmp_path / "one", "--no-meteor", "--quiet")
    out = beam_out(tmp_path / "OUT", rows, 3, fmt)
    ok("evaluate", "--predictions", out, "--references", rec, "-o", tmp_path / "beam", "--no-meteor", "--quiet")
    assert scores(tmp_path / "beam")["scores"] == scores(tmp_path / "one")["scores"]
    assert scores(tmp_path / "beam")["images_scored"] == 6
    (out / f"part-00001-of-00003.{fmt}").unlink()
    one_error(evaluate(out, rec, tmp_path / "e"), f"lacks part-00001-of-00003.{fmt}")
    shutil.rmtree(out)
    out.mkdir()
    one_error(evaluate(out, rec, tmp_path / "e"), "without part-*.csv")


def test_concatenated_beam_parts_do_not_count_their_headers_as_images(rec, tmp_path):
    rows = [(name, c[0], "-1", "") for name, c in CAPTIONS.items()]
    out = beam_out(tmp_path / "OUT", rows, 3)
    together = tmp_path / "all.csv"
    together.write_bytes(b"".join(p.read_bytes() for p in sorted(out.iterdir())))
    assert together.read_text().count("path,caption,score,error") == 3
    result = ok("evaluate", "--predictions", together, "--references", rec, "-o", tmp_path / "e", "--no-meteor",
                "--quiet")
    assert scores(tmp_path / "e")["images_scored"] == 6 and scores(tmp_path / "e")["without_references"] == []
    assert scores(tmp_path / "e")["failed"] == {}  # a header row's "error" column is no failed image
    assert "predictions without references" not in result.stdout and "failed images" not in result.stdout


def test_references_from_a_karpathy_json_build_records_accepts(rec, tmp_path):
    path = karpathy(tmp_path / "k")
    shutil.rmtree(tmp_path / "k" / "Images")  # references need no images
    predictions = predictions_csv(tmp_path / "p.csv", [(name, c[0], "-1", "") for name, c in CAPTIONS.items()])
    ok("evaluate", "--predictions", predictions, "--references", path, "-o", tmp_path / "e", "--no-meteor", "--quiet")
    assert scores(tmp_path / "e")["images_scored"] == 6
    ok("evaluate", "--predictions", predictions, "--references", path, "--split", "test", "-o", tmp_path / "t",
       "--no-meteor", "--quiet")
    assert scores(tmp_path / "t")["images_scored"] == 2


def test_references_whose_first_line_is_125_kb_give_a_bounded_line(tmp_path):
    (tmp_path / "refs.csv").write_text("image," + "y" * 125_000 + "\n")
    predictions = predictions_csv(tmp_path / "p.csv", [("0.png", "a cat", "-1", "")])
    one_error(evaluate(predictions, tmp_path / "refs.csv", tmp_path / "e"), "refs.csv:1")
    (tmp_path / "refs.json").write_text(json.dumps({"images": [{"filename": "a" * 125_000, "split": ["x"],
                                                                "sentences": []}]}))
    one_error(evaluate(predictions, tmp_path / "refs.json", tmp_path / "e"), "refs.json: images[0]")


# --- gallery and caption --------------------------------------------------------------------------

def test_gallery_with_the_wrong_images_folder_is_one_line(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"{i}.png").write_bytes(png(i))
    predictions = predictions_csv(tmp_path / "out.csv", [(f"{i}.png", "a cat", "-1", "") for i in range(4)])
    (tmp_path / "elsewhere").mkdir()
    one_error(invoke("gallery", predictions, "--images", tmp_path / "elsewhere", "-o", tmp_path / "g.html"),
              "none of the 4 images", "elsewhere")
    for i in range(3):
        (photos / f"{i}.png").unlink()
    one_error(invoke("gallery", predictions, "--images", photos, "-o", tmp_path / "g.html"),
              "3 of the 4 images", "photos")
    assert not (tmp_path / "g.html").exists()
    (photos / "0.png").write_bytes(png(0))  # half of them missing: a page, their cards marked
    result = ok("gallery", predictions, "--images", photos, "-o", tmp_path / "g.html")
    assert "2 ok, 2 failed" in result.stderr


def test_caption_of_a_folder_points_at_caption_dir(tmp_path):
    (tmp_path / "photos").mkdir()
    one_error(invoke("caption", tmp_path / "photos", "--model", tmp_path / "no-model"),
              f"{tmp_path / 'photos'} is a folder; use tfcap caption-dir {tmp_path / 'photos'} -o captions.csv")
