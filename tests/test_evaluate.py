"""`tfcap evaluate`: model mode, predictions mode, human baseline, honest bookkeeping."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from conftest import CAPTIONS
from tfcap.cli import main


def evaluate(*args, ok=True):
    result = CliRunner().invoke(main, ["evaluate", *map(str, args), "--quiet", "--no-meteor"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_predictions_mode_scores_matches_and_reports_the_rest(tiny_records, tmp_path):
    predictions = tmp_path / "out.csv"
    with open(predictions, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "score", "error"])
        for i, caption in enumerate(CAPTIONS):
            w.writerow([f"{i}.png", caption.upper() + ".", "-0.5", ""])  # case and punctuation are not scored
        w.writerow(["stranger.png", "a thing", "-1", ""])
        w.writerow(["broken.png", "", "", "not an image"])
    result = evaluate("--predictions", predictions, "--references", tiny_records, "--split", "train",
                      "-o", tmp_path / "eval")
    assert "BLEU-4" in result.stdout and "predictions without references: 1" in result.stdout
    assert "failed images (not scored): 1" in result.stdout
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["images_scored"] == 8 and scores["split"] == "train"
    assert scores["scores"]["BLEU-4"] == pytest.approx(1.0) and scores["scores"]["ROUGE-L"] == pytest.approx(1.0)
    assert scores["scores"]["METEOR"] is None and scores["scores"]["meteor_unavailable"]
    assert scores["without_references"] == ["stranger.png"] and scores["failed"] == {"broken.png": "not an image"}
    coco = json.loads((tmp_path / "eval" / "captions_coco.json").read_text())
    assert coco[0] == {"image_id": "0.png", "caption": CAPTIONS[0].upper() + "."} and len(coco) == 8


def test_wrong_captions_score_low_and_references_from_a_dataset_folder(kaggle_dataset, tmp_path):
    predictions = tmp_path / "out.csv"
    predictions.write_text("path,caption,score,error\n"
                           + "".join(f"Images/img{i:03d}.jpg,zebra quagga okapi,-3,\n" for i in range(0, 20, 5)))
    result = evaluate("--predictions", predictions, "--references", kaggle_dataset, "--split", "train")
    scores = json.loads((tmp_path / "out.eval" / "scores.json").read_text())["scores"]
    assert scores["BLEU-1"] < 1e-6 and scores["CIDEr-D"] == 0.0
    assert "images scored" in result.stdout


def test_human_baseline_and_model_mode(tiny_records, tiny_run, tmp_path):
    evaluate("--human-baseline", "--references", tiny_records, "--split", "train", "-o", tmp_path / "human")
    human = json.loads((tmp_path / "human" / "scores.json").read_text())
    assert human["scores"]["BLEU-4"] == pytest.approx(1.0)  # both references of each image are equal

    evaluate("--model", tiny_run, tiny_records, "--split", "val", "--beam-size", "2", "-o", tmp_path / "model")
    model = json.loads((tmp_path / "model" / "scores.json").read_text())
    assert model["images_scored"] == 2 and model["settings"]["beam_size"] == 2
    assert model["settings"]["model"]["decoder"]["kind"] == "merge"
    assert 0 <= model["scores"]["BLEU-1"] <= 1


def test_usage_errors_are_one_line(tiny_records, tmp_path):
    both = evaluate("--predictions", tmp_path / "a.csv", "--human-baseline", ok=False)
    assert both.exit_code == 2 and "exactly one of" in both.output
    missing = evaluate("--predictions", tmp_path / "a.csv", "--references", tiny_records, ok=False)
    assert missing.exit_code == 2 and "does not exist" in missing.output
