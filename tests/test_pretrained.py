"""The bundled captioner: the commands use it without --model, it is in the wheel, and it is small."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfcap import model as models, pretrained
from tfcap.cli import main
from tfcap.errors import TfcapError

REPO = Path(__file__).resolve().parents[1]
BUNDLED_FILES = ("config.json", "vocab.txt", "best.weights.h5", "metrics.jsonl", "decoding.json", "card.json")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A few photo-like images (smooth colour fields), one broken file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        coarse = rng.uniform(0, 255, (3, 3, 3)).astype("uint8")
        Image.fromarray(coarse).resize((120, 90), Image.BILINEAR).save(root / f"p{i}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bundled_model_is_there_and_small():
    folder = pretrained.path()
    assert pretrained.names()[0] == pretrained.DEFAULT
    for name in BUNDLED_FILES:
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * 2 ** 20
    card = pretrained.card()
    assert card["test_scores"]["BLEU-4"] > 0.15 and "research" in card["licence"]
    assert json.loads((folder / "config.json").read_text())["model"]["encoder"]["weights"] == "imagenet"
    assert not (folder / "encoder.weights.h5").exists()  # ImageNet weights come from a dependency


def test_a_run_directory_that_lost_its_encoder_weights_is_an_error_not_imagenet(tmp_path):
    """Only a model marked so in config.json (tools/bundle_model.py) borrows the installed ImageNet
    weights; a run directory without encoder.weights.h5 is an error even when it started from ImageNet."""
    run = tmp_path / "run"
    shutil.copytree(pretrained.path(), run)
    config = json.loads((run / "config.json").read_text())
    assert config["encoder_weights"] == models.FROM_DEPENDENCY
    config["encoder_weights"] = {"id": "sha256:0123456789abcdef", "file_sha256": "0" * 64}  # as training writes it
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(TfcapError, match="has no encoder.weights.h5"):
        models.load_model(run)


def test_models_command_without_bundled_models_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path / "absent")
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 2 and result.output == "Error: this tfcap installation has no bundled model\n"
    result = CliRunner().invoke(main, ["caption-dir", str(tmp_path), "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 2 and f"no bundled model '{pretrained.DEFAULT}'" in result.output
    assert "pass --model" in result.output and not (tmp_path / "out.csv").exists()


def test_commands_use_the_bundled_model_without_model_option(photos, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["caption-dir", str(photos), "-o", str(tmp_path / "out.csv"), "--quiet"])
    assert result.exit_code == 0, result.output
    implicit = rows(tmp_path / "out.csv")
    assert len(implicit) == 4 and [r["error"] != "" for r in implicit] == [True, False, False, False]
    assert all(len(r["caption"].split()) >= 3 for r in implicit[1:])
    result = runner.invoke(main, ["caption-dir", str(photos), "-o", str(tmp_path / "explicit.csv"), "--quiet",
                                  "--model", str(pretrained.path())])
    assert result.exit_code == 0 and rows(tmp_path / "explicit.csv") == implicit

    result = runner.invoke(main, ["caption", str(photos / "p0.jpg")])
    row = implicit[1]
    fields = ("caption", "score", "confidence", "in_domain", "typicality", "labels")
    assert result.exit_code == 0
    path, *got = result.output.strip().split("\t")
    assert path == str(photos / "p0.jpg") and len(got) == len(fields)
    for field, value in zip(fields, got):
        if field in ("score", "confidence", "typicality"):
            # One image alone against three in a batch: the decoder's bfloat16 matmuls (auto, on CPUs with
            # bfloat16 instructions) round sums that a batch's arithmetic orders differently: the last decimal.
            assert abs(float(value) - float(row[field])) <= 2e-4, (field, value, row[field])
        else:
            assert value == row[field], (field, value, row[field])
    assert row["labels"].count(";") == 2  # the bundled model's classifier: 3 labels per row

    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0 and pretrained.DEFAULT in result.output and "(default)" in result.output
    assert "BLEU-4" in result.output and "research" in result.output


def test_export_and_evaluate_without_model_option(tiny_records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["export", "-o", "saved"])
    assert result.exit_code == 0, result.output
    settings = json.loads(__import__("tensorflow").saved_model.load("saved").get_settings().numpy())
    assert settings["beam_size"] == pretrained.card()["decoding"]["beam_size"]
    result = runner.invoke(main, ["evaluate", str(tiny_records), "--split", "val", "--no-meteor", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / f"eval-{pretrained.DEFAULT}-val" / "scores.json"  # never inside the installed package
    assert json.loads(out.read_text())["images_scored"] == 2
    assert not list(pretrained.path().glob("eval-*"))


def test_float16_weights_round_trip(tmp_path):
    import keras

    make = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    model, copy = make(), make()
    model.save_weights(str(tmp_path / "a.weights.h5"))
    pretrained.store_float16(tmp_path / "a.weights.h5", tmp_path / "b.weights.h5")
    copy.load_weights(str(tmp_path / "b.weights.h5"))
    for a, b in zip(model.get_weights(), copy.get_weights()):
        assert b.dtype == np.float32 and np.array_equal(a.astype(np.float16).astype(np.float32), b)


def test_wheel_holds_the_bundled_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("tfcap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in BUNDLED_FILES:
        assert f"tfcap/models/{pretrained.DEFAULT}/{name}" in names, name
    assert "tfcap/backbones/efficientnet_lite.py" in names


def test_the_bundled_model_names_no_folder_of_the_machine_that_built_it():
    """The builder's records folder and cross-entropy run went into the wheel as absolute paths
    (/work/runs/...): only their names are kept, which is all a reader of the card can use."""
    for name in ("config.json", "card.json"):
        text = (pretrained.path() / name).read_text()
        assert '"/' not in text, (name, [line for line in text.splitlines() if '"/' in line])
    config = json.loads((pretrained.path() / "config.json").read_text())
    assert config["train"]["init"] and config["records"]["path"]
    # What tools/bundle_model.py writes when it rebuilds them:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from bundle_model import portable
    finally:
        sys.path.remove(str(REPO / "tools"))
    run = {"model": {}, "train": {"init": "/home/me/runs/xe", "epochs": 3}, "records": {"path": "/data/records"}}
    assert portable(run) == {"model": {}, "train": {"init": "xe", "epochs": 3}, "records": {"path": "records"}}
    assert run["train"]["init"] == "/home/me/runs/xe"  # the run's own config is left as it is
