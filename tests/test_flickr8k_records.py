"""Real Flickr8k (run when TFCAP_FLICKR8K is set): its layouts (Kaggle, original, Karpathy JSON) give the official splits and identical records."""

import csv
import json

import pytest

from conftest import built_once, flickr8k, needs_flickr8k, ok
from tfcap import records

pytestmark = needs_flickr8k


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """Records of the Kaggle layout, which both tests compare with another layout's: built once per session."""
    build = lambda root: ok("build-records", flickr8k(), "-o", root / "kaggle", "--quiet")  # noqa: E731
    return built_once(tmp_path_factory, "flickr8k-kaggle-records", build) / "kaggle"


def test_kaggle_and_original_layouts_agree_on_splits_vocabulary_and_token_ids(kaggle, tmp_path):
    data = flickr8k()
    original = tmp_path / "original"
    ok("build-records", data / "Flickr8k_text", "--images", data / "Images", "-o", original, "--quiet")
    mk, mo = (json.loads((d / "manifest.json").read_text()) for d in (kaggle, original))
    assert mk["source"]["layout"] == "kaggle" and mo["source"]["layout"] == "original"
    for m in (mk, mo):
        assert {s: (v["images"], v["captions"]) for s, v in m["splits"].items()} == {
            "train": (6000, 30000), "val": (1000, 5000), "test": (1000, 5000)}
        assert m["unsplit_images"] == 91
    assert {s["image"]: s["reason"] for s in mo["skipped"]} == {"2258277193_586949ec62.jpg.1": "missing"}
    assert (kaggle / "vocab.txt").read_text() == (original / "vocab.txt").read_text()
    for split in ("train", "val", "test"):
        a = {ex["image_id"]: (ex["caption_ids"], ex["captions"]) for ex in records.iterate_examples(kaggle, split)}
        b = {ex["image_id"]: (ex["caption_ids"], ex["captions"]) for ex in records.iterate_examples(original, split)}
        assert a == b
        assert all(len(ids) == 5 for ids, _ in a.values())


def test_flickr8k_as_karpathy_json_gives_the_records_of_the_kaggle_layout(kaggle, tmp_path):
    """Flickr8k converted to Karpathy's dataset_flickr8k.json format (tokens deliberately not tfcap's)."""
    data = flickr8k()
    split_of = {}
    for split, name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        split_of.update({n: split for n in (data / "Flickr8k_text" / f"Flickr_8k.{name}.txt").read_text().split()})
    with open(data / "captions.txt", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    images: dict[str, list[str]] = {}
    for image, caption in rows:
        images.setdefault(image, []).append(caption)
    entries = [{"filename": image, "imgid": k, "split": split_of[image],
                "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k} for c in captions]}
               for k, (image, captions) in enumerate(images.items()) if image in split_of]
    karpathy_json = tmp_path / "dataset_flickr8k.json"
    karpathy_json.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))

    karpathy = tmp_path / "karpathy"
    ok("build-records", karpathy_json, "--images", data / "Images", "-o", karpathy, "--quiet")
    mk, mj = (json.loads((d / "manifest.json").read_text()) for d in (kaggle, karpathy))
    assert mj["source"]["layout"] == "karpathy" and mj["vocab_sha256"] == mk["vocab_sha256"]
    assert (kaggle / "vocab.txt").read_text() == (karpathy / "vocab.txt").read_text()
    for split in ("train", "val", "test"):
        assert mj["splits"][split]["images"] == mk["splits"][split]["images"]
        a = {ex["image_id"]: (ex["caption_ids"], ex["captions"]) for ex in records.iterate_examples(kaggle, split)}
        b = {ex["image_id"]: (ex["caption_ids"], ex["captions"]) for ex in records.iterate_examples(karpathy, split)}
        assert a == b
