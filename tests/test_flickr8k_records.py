"""Real Flickr8k (run when TFCAP_FLICKR8K is set): both layouts give the official splits and identical records."""

import json

from click.testing import CliRunner

from conftest import flickr8k, needs_flickr8k
from tfcap import records
from tfcap.cli import main

pytestmark = needs_flickr8k


def test_kaggle_and_original_layouts_agree_on_splits_vocabulary_and_token_ids(tmp_path):
    data = flickr8k()
    kaggle, original = tmp_path / "kaggle", tmp_path / "original"
    for args, out in [([str(data)], kaggle),
                      ([str(data / "Flickr8k_text"), "--images", str(data / "Images")], original)]:
        result = CliRunner().invoke(main, ["build-records", *args, "-o", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
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
