"""The confidence (tfcap.confidence) and `tfcap score`: fitted on a tiny run, measured, written back."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import CAPTIONS, built_once, flickr8k, needs_flickr8k, tile
from tfcap import confidence, model as models
from tfcap.cli import main
from tfcap.datasets.flickr8k import read_expert_judgments
from tfcap.errors import TfcapError

# Two val images only: their typicality p-values are 1/3, 2/3 or 1, so 0.5 is the cut here. One neighbour:
# the val images are copies of two training images (distance 0), so any other image is farther than both.
TINY = confidence.ConfidenceConfig(embed_dim=16, units=32, joint_dim=32, dropout=0.0, epochs=10, batch_size=8,
                                   bank_size=100, neighbours=1, min_typicality=0.5)


@pytest.fixture(scope="session")
def fitted_run(tiny_records, tiny_features, overfitted, tmp_path_factory) -> Path:
    """A copy of the merge run that reproduces its training captions, with a confidence fitted: built once
    per test session (`built_once`), only read by the tests."""
    def build(root: Path) -> None:
        shutil.copytree(overfitted("merge"), root / "run")
        confidence.fit(root / "run", tiny_records, TINY, cache_dir=tiny_features, show_progress=False)

    return built_once(tmp_path_factory, "confidence-fitted-run", build) / "run"


def brute_tau_c(x, y):
    concordance = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(len(x)) for j in range(i))
    m = min(len(set(x)), len(set(y)))
    return 2 * concordance / (len(x) ** 2 * (m - 1) / m)


def test_kendall_tau_c_and_auroc_equal_their_definitions_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=120).round(1), rng.integers(1, 5, 120)  # rounding makes ties in x
    assert confidence.kendall_tau_c(x, y) == pytest.approx(brute_tau_c(x, y), abs=1e-12)
    assert confidence.kendall_tau_c(y * 2.0, y) == pytest.approx(brute_tau_c(y * 2.0, y))
    positive, negative = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 60).round(1)
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    assert confidence.auroc(positive, negative) == pytest.approx(np.mean(pairs))


def test_logistic_regression_recovers_known_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(x @ [2.0, -1.0, 0.0] + 0.5)))).astype(float)
    np.testing.assert_allclose(confidence.fit_logistic(x, y), [2.0, -1.0, 0.0, 0.5], atol=0.2)


def test_confidence_ranks_an_images_own_caption_above_the_others(fitted_run, tiny_records):
    captioner = models.load_model(fitted_run)
    assert captioner.assessor is not None
    saved = json.loads((fitted_run / confidence.CONFIG).read_text())
    assert saved["config"] == {**saved["config"], "units": 32, "epochs": 10} and len(saved["coefficients"]) == 4
    pixels = tf.stack([captioner.preprocess_bytes(tf.constant(tile(i))) for i in range(len(CAPTIONS))])
    features = captioner.features(pixels)
    n = len(CAPTIONS)
    owners = np.repeat(np.arange(n), n)  # every image with every caption
    ids = captioner.word_ids(tf.constant([CAPTIONS[j] for j in range(n)] * n))
    picked = {"pooled": tf.gather(features["pooled"], owners)}
    result = {k: v.numpy() for k, v in captioner.assess(picked, ids).items()}
    table = result["confidence"].reshape(n, n)  # [image, caption]
    assert ((table >= 0) & (table <= 1)).all()
    assert (table.argmax(axis=1) == np.arange(n)).sum() >= n - 2  # own caption first for most images
    assert np.diag(table).mean() > table[~np.eye(n, dtype=bool)].mean() + 0.3
    assert result["in_domain"].all() and (result["typicality"] > 0).all()  # the training images themselves


def test_an_attention_run_gets_a_confidence_with_one_grid_row_per_caption(overfitted, tiny_records, tiny_features,
                                                                           tmp_path, monkeypatch):
    """The attention decoder's recurrence runs on as many rows as it attends with: the image pass (one
    caption per image) and the average image's pass (one image, B captions) must not be one call, where
    every image would get B slots (B x (B + 1) rows: the bundled attention model's fit ran out of 24 GB)."""
    from tfcap import decoder

    run = tmp_path / "run"
    shutil.copytree(overfitted("attention"), run)
    confidence.fit(run, tiny_records, TINY, cache_dir=tiny_features, show_progress=False)
    captioner = models.load_model(run)
    pixels = tf.stack([captioner.preprocess_bytes(tf.constant(tile(i))) for i in range(len(CAPTIONS))])
    features = captioner.features(pixels)
    ids = captioner.word_ids(tf.constant(CAPTIONS))
    rows, recur = [], decoder.AttentionDecoder._recur
    monkeypatch.setattr(decoder.AttentionDecoder, "_recur", lambda self, words, h, *rest: rows.append(
        int(tf.shape(h)[0])) or recur(self, words, h, *rest))
    signals = captioner.assessor.signals(features, ids).numpy()
    assert rows and max(rows) <= len(CAPTIONS)  # B captions at most, never (B + 1) images x B
    own = confidence.caption_log_probs(captioner.decoder, features, ids)  # the image pass alone
    np.testing.assert_allclose(signals[:, confidence.FEATURES.index("log_prob")], (own[0] / own[1]).numpy(), rtol=1e-5)
    trust = captioner.assess(features, ids)["confidence"].numpy()
    assert ((trust >= 0) & (trust <= 1)).all()


def test_an_image_unlike_the_training_images_is_out_of_domain_and_trusted_less(fitted_run):
    captioner = models.load_model(fitted_run)
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[::2] = 255  # nothing like the flat colour tiles it was trained on
    pixels = tf.stack([captioner.preprocess_bytes(tf.constant(tile(0))),
                       captioner.preprocess_bytes(tf.io.encode_png(stripes))])
    result = captioner.assess(captioner.features(pixels), captioner.word_ids(tf.constant([CAPTIONS[0]] * 2)))
    typicality, trust = result["typicality"].numpy(), result["confidence"].numpy()
    assert typicality[1] < captioner.assessor.config.min_typicality <= typicality[0]
    assert list(result["in_domain"].numpy()) == [True, False]
    assert trust[1] < trust[0]


def test_a_run_without_confidence_still_scores_and_damaged_files_are_one_line(fitted_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in fitted_run.iterdir():
        if f.is_file() and not f.name.startswith("confidence"):
            (bare / f.name).write_bytes(f.read_bytes())
    captioner = models.load_model(bare)
    assert captioner.assessor is None
    features = captioner.features(tf.stack([captioner.preprocess_bytes(tf.constant(tile(0)))]))
    assert set(captioner.assess(features, captioner.word_ids(tf.constant([CAPTIONS[0]])))) == {"score"}
    (bare / confidence.CONFIG).write_text("{}")
    (bare / confidence.WEIGHTS).write_bytes(b"not hdf5")
    with pytest.raises(TfcapError, match="damaged.*fit-confidence"):
        models.load_model(bare)


def write_pairs(path: Path, images: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "note"])
        writer.writerows([image, text, f"n{k}"] for k, (image, text) in enumerate(rows))


def test_score_writes_every_row_back_with_errors_in_their_rows(fitted_run, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(tile(i))
    (images / "broken.png").write_bytes(tile(3)[:40])
    rows = [("0.png", CAPTIONS[0]), ("0.png", CAPTIONS[1]), ("1.png", CAPTIONS[1]), ("missing.png", CAPTIONS[0]),
            ("broken.png", CAPTIONS[3]), ("2.png", "  "), ("2.png", CAPTIONS[2]), ("1.png", "a zebra flies")]
    write_pairs(tmp_path / "pairs.csv", images, rows)
    out = tmp_path / "scored.csv"
    result = CliRunner().invoke(main, ["score", str(tmp_path / "pairs.csv"), "--images", str(images), "-o", str(out),
                                       "--model", str(fitted_run), "--quiet"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        scored = list(csv.DictReader(f))
    assert [(r["image"], r["caption"], r["note"]) for r in scored] == [(i, c, f"n{k}") for k, (i, c) in enumerate(rows)]
    assert list(scored[0]) == ["image", "caption", "note", "score", "confidence", "in_domain", "typicality", "error"]
    errors = [r["error"] for r in scored]
    assert errors[3] == "missing" and errors[4].startswith("truncated") and errors[5] == "empty caption"
    good = [r for r in scored if not r["error"]]
    assert len(good) == 5 and all(0 <= float(r["confidence"]) <= 1 and r["in_domain"] in ("true", "false") for r in good)
    assert float(scored[0]["confidence"]) > float(scored[1]["confidence"])  # its own caption above another's
    again = CliRunner().invoke(main, ["score", str(tmp_path / "pairs.csv"), "--images", str(images), "-o", str(out),
                                      "--model", str(fitted_run), "--quiet"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_score_reads_json_lines_relative_to_the_pairs_file_and_refuses_a_file_without_columns(fitted_run, tmp_path):
    (tmp_path / "0.png").write_bytes(tile(0))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"path": "0.png", "caption": CAPTIONS[0], "id": 7}) + "\n")
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(main, ["score", str(tmp_path / "pairs.jsonl"), "-o", str(out),
                                       "--model", str(fitted_run), "--quiet"])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["id"] == 7 and row["error"] == "" and isinstance(row["confidence"], float) and row["in_domain"] is True
    (tmp_path / "bad.csv").write_text("picture,text\na.png,a dog\n")
    bad = CliRunner().invoke(main, ["score", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "x.csv"),
                                    "--model", str(fitted_run)])
    assert bad.exit_code == 2 and "needs an image column" in bad.output and not (tmp_path / "x.csv").exists()


def test_expert_judgments_leave_out_the_images_own_captions(tmp_path):
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog runs\nb.jpg#0\ta cat sits\nb.jpg#1\ta cat naps\n")
    (text / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#1\t1\t2\t1\na.jpg\ta.jpg#0\t4\t4\t4\n")
    assert read_expert_judgments(tmp_path) == [("a.jpg", "a cat naps", (1, 2, 1))]
    assert len(read_expert_judgments(tmp_path, keep_own=True)) == 2
    (text / "ExpertAnnotations.txt").write_text("a.jpg\tb.jpg#1\t1\t2\n")
    with pytest.raises(TfcapError, match="ExpertAnnotations.txt:1"):
        read_expert_judgments(tmp_path)


@needs_flickr8k
def test_bundled_confidence_ranks_flickr8k_expert_judgments_beyond_cider(tmp_path):
    """Kendall tau-c of the bundled model's confidence on Flickr8k-Expert, the judged pairs of the first 300
    of its 1,000 images by name (1,736 pairs; on them 46.7, on all 47.0: tools/bench_confidence.py measures
    all), through the path users take: `tfcap score` from the images. CIDEr's tau-c on all is 43.9."""
    pairs = read_expert_judgments(flickr8k())
    first = set(sorted({image for image, _, _ in pairs})[:300])
    pairs = [pair for pair in pairs if pair[0] in first]
    write_pairs(tmp_path / "pairs.csv", flickr8k() / "Images", [(image, caption) for image, caption, _ in pairs])
    result = CliRunner().invoke(main, ["score", str(tmp_path / "pairs.csv"), "--images", str(flickr8k() / "Images"),
                                       "-o", str(tmp_path / "out.csv"), "--quiet"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    judged = np.array([j for _, _, j in pairs]).reshape(-1)
    tau_c = {column: 100 * confidence.kendall_tau_c(np.repeat([float(r[column]) for r in rows], 3), judged)
             for column in ("confidence", "score")}
    assert tau_c["confidence"] >= 45 and tau_c["confidence"] >= tau_c["score"] + 10, tau_c


def test_the_same_confidence_from_caption_dir_both_engines_score_caption_and_the_savedmodel(fitted_run, tmp_path):
    """One image, one caption, five ways: the confidence of caption-dir's own caption, local and Beam,
    of `tfcap caption`, of `tfcap score` given that caption back, and of the exported SavedModel
    called without tfcap."""
    from test_caption import serve_without_tfcap

    images = tmp_path / "img"
    images.mkdir()
    for i in (0, 3, 5):
        (images / f"{i}.png").write_bytes(tile(i))
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(main, [str(a) for a in args] + ["--quiet"] * (args[0] not in ("caption", "export")))
        assert result.exit_code == 0, result.output
        return result

    ok("caption-dir", images, "-o", tmp_path / "local.csv", "--model", fitted_run)
    with open(tmp_path / "local.csv", newline="") as f:
        local = {r["path"]: r for r in csv.DictReader(f)}
    assert all(r["confidence"] and r["in_domain"] == "true" and r["typicality"] for r in local.values())

    ok("caption-dir", images, "-o", tmp_path / "beam", "--engine", "beam", "--model", fitted_run)
    with open(next((tmp_path / "beam").glob("part-*.csv")), newline="") as f:
        beam = {r["path"]: r for r in csv.DictReader(f)}

    printed = ok("caption", *(images / p for p in sorted(local)), "--model", fitted_run).stdout.splitlines()
    by_caption = {Path(line.split("\t")[0]).name: line.split("\t") for line in printed}

    write_pairs(tmp_path / "pairs.csv", images, [(p, r["caption"]) for p, r in sorted(local.items())])
    ok("score", tmp_path / "pairs.csv", "--images", images, "-o", tmp_path / "scored.csv", "--model", fitted_run)
    with open(tmp_path / "scored.csv", newline="") as f:
        scored = {r["image"]: r for r in csv.DictReader(f)}

    ok("export", fitted_run, "-o", tmp_path / "saved")
    names = sorted(local)
    served = serve_without_tfcap(tmp_path / "saved", [images / n for n in names],
                                 "[out['confidence'].numpy().tolist(), out['captions'].numpy().astype(str).tolist()]",
                                 tmp_path)
    for k, name in enumerate(names):
        want = float(local[name]["confidence"])
        assert served[1][k] == local[name]["caption"] == beam[name]["caption"] == scored[name]["caption"]
        for got in (beam[name]["confidence"], by_caption[name][3], scored[name]["confidence"], served[0][k]):
            assert float(got) == pytest.approx(want, abs=2e-4)
        assert float(scored[name]["score"]) == pytest.approx(float(local[name]["score"]), abs=2e-4)


def test_min_confidence_leaves_out_the_less_trusted_captions_with_the_reason(fitted_run, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(tile(i))
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[::2] = 255
    (images / "stripes.png").write_bytes(tf.io.encode_png(stripes).numpy())  # out of domain: trusted less
    (images / "bad.png").write_bytes(b"not an image")
    runner = CliRunner()
    result = runner.invoke(main, ["caption-dir", str(images), "-o", str(tmp_path / "all.csv"), "--model",
                                  str(fitted_run), "--quiet"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "all.csv", newline="") as f:
        everything = {r["path"]: r for r in csv.DictReader(f)}
    trusts = sorted(float(r["confidence"]) for r in everything.values() if r["confidence"])
    cut = next((a + b) / 2 for a, b in zip(trusts[1:], trusts[2:]) if b - a > 2e-4)  # clear of CSV's rounding
    below = sum(t < cut for t in trusts)
    assert below >= 2
    result = runner.invoke(main, ["caption-dir", str(images), "-o", str(tmp_path / "kept.csv"), "--model",
                                  str(fitted_run), "--min-confidence", str(cut), "--strict"])
    with open(tmp_path / "kept.csv", newline="") as f:
        kept = {r["path"]: r for r in csv.DictReader(f)}
    assert result.exit_code == 1 and f"{below} captions withheld below --min-confidence" in result.stderr  # bad.png
    for path, row in kept.items():
        full = everything[path]
        if path == "bad.png":
            assert row == full
        elif float(full["confidence"]) < cut:
            assert row["caption"] == "" and row["error"].startswith("withheld: confidence")
            assert row["confidence"] == full["confidence"] and row["labels"] == full["labels"]
        else:
            assert row == full
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in fitted_run.iterdir():
        if f.is_file() and not f.name.startswith("confidence"):
            (bare / f.name).write_bytes(f.read_bytes())
    refused = runner.invoke(main, ["caption-dir", str(images), "-o", str(tmp_path / "x.csv"), "--model", str(bare),
                                   "--min-confidence", "0.5"])
    assert refused.exit_code == 2 and "no fitted confidence" in refused.output and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("kind", ["merge", "attention"])
def test_log_probs_given_one_image_by_steps_equal_teacher_forcing(kind):
    """The average image's pass steps once per distinct prefix (captions that begin alike share
    steps): the same log-probabilities as teacher forcing every caption against a copy of the one image."""
    from tfcap import decoder

    config = decoder.DecoderConfig(kind=kind, units=16, embed_dim=8, attention_dim=8, dropout=0.0)
    dec = decoder.build_decoder(11, config)
    rng = np.random.default_rng(0)
    one = {"pooled": tf.constant(rng.normal(size=(1, 6)), tf.float32),
           "grid": tf.constant(rng.normal(size=(1, 4, 6)), tf.float32)}
    ids = tf.constant([[4, 5, 0, 0, 0], [6, 7, 8, 9, 10], [4, 0, 0, 0, 0], [5, 6, 7, 0, 0], [8, 9, 10, 4, 0],
                       [6, 7, 8, 0, 0], [4, 5, 0, 0, 0]])  # prefixes shared, a caption twice, one inside another
    dec(one, tf.ones([1, 2], tf.int32))  # build
    want = confidence.caption_log_probs(dec, one, ids, owners=tf.zeros([7], tf.int32))
    got = confidence.log_probs_given_one_image(dec, one, ids)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_array_equal(got[1], [3, 6, 2, 4, 5, 4, 3])


def test_a_score_that_is_not_finite_is_null_in_json_lines_and_the_lines_stay_strict_json():
    """A caption without a finite log-probability scores -inf: JSON has no infinity (Python writes
    -Infinity, which strict readers refuse), so caption-dir's and score's JSON Lines hold null."""
    from tfcap import rows, scoring

    def strict(line: str) -> dict:
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))

    caption_row = {**rows.failed(""), "path": "a.jpg", "caption": "a dog", "score": float("-inf")}
    assert strict(rows.format_rows([caption_row], "jsonl"))["score"] is None
    assert rows.format_rows([caption_row], "csv").split(",")[rows.COLUMNS.index("score")] == "-inf"
    scored = {"path": "a.jpg", "caption": "a dog", "score": float("-inf"), "confidence": 0.0}
    assert strict(scoring.format_rows([scored], list(scored), "jsonl")) == {**scored, "score": None}
