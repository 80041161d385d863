"""Property tests of the readers of users' files: a file of the right syntax and the wrong shape is read,
or refused with one short `TfcapError` line; never a traceback.

Each valid base file (Karpathy JSON, COCO annotations, a records manifest, caption-dir JSON Lines,
and the CSV-like files: a captions CSV, Flickr30k's results.csv, Flickr8k's token file, caption-dir
CSV) has a value substituted at every position of its tree (every object value, list item, the
root; every CSV cell), drawn by a seeded generator of nested lists, objects, strings, numbers,
null and booleans that favours the keys and values the readers look for. A hand-written
generator, not hypothesis: the positions to try are the file's own, enumerated exhaustively, and
the values need no shrinking to be read in a failure message (the case prints its path and value).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from tfcap import evaluate, predictions, records, text
from tfcap.datasets import coco, flickr8k, flickr30k, karpathy
from tfcap.errors import TfcapError

SEED = 23
KEYS = ["raw", "tokens", "sentid", "filename", "filepath", "sentences", "split", "images", "annotations", "id",
        "image_id", "file_name", "caption", "path", "score", "error", "splits", "shards", "file", "sha256",
        "records", "text", "x"]
STRINGS = ["", "x", "train", "restval", "val", "test", "a.jpg", "../a.jpg", "a\nb", "\x00", "\ufeff", "\ud83d",
           "caf\u00e9", "y" * 5000, "NaN", "-1.5", "0", "a,b\"c", "NFC", "gzip", "0" * 64]
NUMBERS = [0, 1, -1, 2 ** 70, 1.5, -0.0, 1e308, float("nan"), float("inf"), 10 ** 60]


def random_value(rng: random.Random, depth: int = 0):
    """A JSON value: scalars, and lists and objects nested up to 3 deep (or one 40 deep)."""
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind in (1, 2):
        return rng.choice(NUMBERS)
    if kind in (3, 4, 5):
        return rng.choice(STRINGS)
    if kind == 6:
        deep: list = []
        for _ in range(40):
            deep = [deep]
        return deep
    if kind in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def positions(value, at=()):
    """The path (keys and indices) of every node of a parsed JSON value, the root first."""
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from positions(item, at + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from positions(item, at + (index,))


def substituted(document, at: tuple, value):
    if not at:
        return value
    changed = copy.deepcopy(document)
    node = changed
    for step in at[:-1]:
        node = node[step]
    node[at[-1]] = value
    return changed


def variants(document, per_position: int, seed: int):
    """(position, value, document with value at position) for every position, `per_position` values each."""
    rng = random.Random(seed)
    for at in list(positions(document)):
        for _ in range(per_position):
            value = random_value(rng)
            yield at, value, substituted(document, at, value)


def read_or_one_line(read, case: str) -> None:
    """`read()` returns, or raises TfcapError with one short line; anything else fails naming `case`."""
    try:
        read()
    except TfcapError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, (case, message)
        assert len(message) < 600, (case, len(message), message[:300])
    except Exception as e:  # noqa: BLE001 - the property under test
        pytest.fail(f"{type(e).__name__}: {str(e)[:300]} for {case}")


def shown(at, value) -> str:
    return f"position {at!r}, value {json.dumps(value)[:200]}"


# --- JSON readers ---------------------------------------------------------------------------------

KARPATHY = {"images": [
    {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]},
                                                          {"raw": "a dog", "sentid": 1}]},
    {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "a bird", "tokens": []}]},
], "dataset": "flickr8k"}

COCO = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A cat. \n"},
                        {"image_id": 2, "id": 11, "caption": "a dog"},
                        {"image_id": 1, "id": 12, "caption": "a cat"}]}


def test_karpathy_json_of_any_shape_reads_or_is_one_line(tmp_path):
    path = tmp_path / "dataset_flickr8k.json"
    cases = 0
    for at, value, document in variants(KARPATHY, 2, SEED):
        path.write_text(json.dumps(document))
        for skip in (False, True):
            read_or_one_line(lambda: karpathy.read(path, tmp_path, skip), f"Karpathy {shown(at, value)}, skip {skip}")
        read_or_one_line(lambda: karpathy.read_splits(path), f"Karpathy splits {shown(at, value)}")
        cases += 1
    assert cases > 40


def test_coco_annotations_of_any_shape_read_or_are_one_line(tmp_path):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2014.json"
    cases = 0
    for at, value, document in variants(COCO, 2, SEED + 1):
        path.write_text(json.dumps(document))
        for skip in (False, True):
            read_or_one_line(lambda: coco.read(tmp_path, tmp_path, skip), f"COCO {shown(at, value)}, skip {skip}")
        cases += 1
    assert cases > 40


def manifest_folder(folder: Path) -> dict:
    """A records folder's manifest and vocab.txt, consistent with each other (no shards needed to read them)."""
    words = ["<pad>", "<unk>", "<start>", "<end>", "cat", "dog"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / records.VOCAB).write_text("\n".join(words) + "\n")
    split = {"images": 2, "captions": 4, "shards": [{"file": "s-0.tfrecord", "records": 2, "sha256": "a" * 64,
                                                      "bytes": 10}]}
    return {"schema_version": 1, "splits": {"train": split, "val": {"images": 0, "captions": 0, "shards": []},
                                            "test": copy.deepcopy(split)},
            "vocab_size": len(words), "vocab_sha256": text.words_sha256(words),
            "text": {"normalization": "NFKC", "lowercase": True, "strip_punctuation": True, "max_length": 30},
            "compression": None}


def test_manifests_of_any_shape_read_or_are_one_line(tmp_path):
    folder = tmp_path / "records"
    base = manifest_folder(folder)

    def use():  # what train, evaluate and the feature cache read of a manifest
        manifest = records.read_manifest(folder)
        records.verify_vocabulary(folder)
        text.TextConfig(**manifest["text"])
        for split in manifest["splits"]:
            records.shard_paths(folder, split)
            [s["sha256"] for s in manifest["splits"][split]["shards"]]
        return manifest["vocab_sha256"], manifest["splits"]["train"]["images"], manifest.get("compression")

    (folder / records.MANIFEST).write_text(json.dumps(base))
    use()  # the base is valid
    cases = 0
    for at, value, document in variants(base, 2, SEED + 2):
        (folder / records.MANIFEST).write_text(json.dumps(document))
        read_or_one_line(use, f"manifest {shown(at, value)}")
        cases += 1
    assert cases > 60


JSONL_ROWS = [{"path": "a.jpg", "caption": "a cat", "score": -0.5, "error": ""},
              {"path": "sub/b.jpg", "caption": "a dog", "score": None, "error": ""},
              {"path": "c.jpg", "caption": "", "score": None, "error": "not an image"}]


def test_jsonl_predictions_of_any_shape_read_or_are_one_line(tmp_path):
    path = tmp_path / "out.jsonl"
    references = {"a.jpg": ["a cat"], "b.jpg": ["a dog"]}

    def use():
        hypotheses, _, _ = evaluate.predictions_from(path)
        evaluate._match(hypotheses, references)

    cases = 0
    for line in range(len(JSONL_ROWS)):
        for at, value, row in variants(JSONL_ROWS[line], 3, SEED + 3 + line):
            rows = JSONL_ROWS[:line] + [row] + JSONL_ROWS[line + 1:]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            read_or_one_line(use, f"JSON Lines row {line} {shown(at, value)}")
            cases += 1
    assert cases > 40


def test_json_nested_deeper_than_python_parses_is_one_line(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / "dataset_x.json"
    path.write_text('{"images": ' + deep + "}")
    read_or_one_line(lambda: karpathy.read(path, tmp_path, True), "Karpathy 200,000 deep")
    (tmp_path / "p.jsonl").write_text('{"path": "a.jpg", "caption": ' + deep + "}\n")
    read_or_one_line(lambda: predictions.read(tmp_path / "p.jsonl"), "JSON Lines 200,000 deep")


# --- CSV-like readers -----------------------------------------------------------------------------

CELL_PARTS = ['"', ",", "\n", "\r", "|", "#", "\t", "\ufeff", "\x00", "a", "1", " ", "path", "caption", "image",
              "split", "train", "x" * 3000]


def random_cell(rng: random.Random) -> str:
    return "".join(rng.choice(CELL_PARTS) for _ in range(rng.randrange(5)))


def cell_variants(rows: list[list[str]], per_cell: int, seed: int):
    rng = random.Random(seed)
    for r, row in enumerate(rows):
        for c in range(len(row)):
            for _ in range(per_cell):
                value = random_cell(rng)
                yield (r, c), value, [list(x) for x in rows[:r]] + [row[:c] + [value] + row[c + 1:]] + rows[r + 1:]


def check_csv_like(tmp_path: Path, name: str, rows: list[list[str]], separator: str, read, seed: int) -> int:
    path = tmp_path / name
    cases = 0
    for at, value, changed in cell_variants(rows, 3, seed):
        path.write_text("\n".join(separator.join(row) for row in changed) + "\n", encoding="utf-8",
                        newline="")
        read_or_one_line(lambda: read(path), f"{name} cell {at}, value {value[:100]!r}")
        cases += 1
    return cases


def test_csv_like_files_of_any_content_read_or_are_one_line(tmp_path):
    captions = [["image", "caption", "split"], ["a.jpg", "a cat", "train"], ["b.jpg", "a dog", "val"]]
    results = [["image_name", " comment_number", " comment"], ["a.jpg", " 0", " a cat"], ["b.jpg", " 1", " a dog"]]
    tokens = [["a.jpg#0", "a cat"], ["b.jpg#1", "a dog"]]
    outputs = [["path", "caption", "score", "error"], ["a.jpg", "a cat", "-0.5", ""], ["c.jpg", "", "", "bad"]]
    cases = 0
    for skip in (False, True):
        cases += check_csv_like(tmp_path, "c.csv", captions, ",", lambda p: flickr8k.read_csv(p, skip), SEED + 10)
        cases += check_csv_like(tmp_path, "results.csv", results, "|", lambda p: flickr30k.read_results(p, skip),
                                SEED + 11)
        cases += check_csv_like(tmp_path, "Flickr8k.token.txt", tokens, "\t",
                                lambda p: flickr8k.read_token_file(p, skip), SEED + 12)
    cases += check_csv_like(tmp_path, "out.csv", outputs, ",", lambda p: evaluate.predictions_from(p), SEED + 13)
    assert cases > 150
