"""Self-critical training: the batched CIDEr-D reward, sampling, and SCST raising greedy CIDEr-D."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import TINY_MOBILENET_OPTIONS, build_features, built_once, epochs_logged, fit
from tfcap import decoding, encoder, evaluate, metrics, scst, text, train
from tfcap.cli import main
from tfcap.errors import TfcapError


def random_corpus(seed: int, images: int = 40, words: int = 12):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(4, 4 + words)]  # ids 4.. as in a tfcap vocabulary

    def caption(low=0):
        return " ".join(rng.choice(vocab, size=rng.integers(low, 14)))

    references = {i: [caption(1) for _ in range(rng.integers(1, 6))] for i in range(images)}
    hypotheses = {i: caption() for i in references}  # some empty
    return vocab, references, hypotheses


@pytest.mark.parametrize("seed", [0, 1])
def test_token_cider_d_equals_coco_cider_d(seed):
    vocab, references, hypotheses = random_corpus(seed)
    ids = {w: i + 4 for i, w in enumerate(vocab)}
    to_ids = lambda caption: [ids[w] for w in caption.split()]
    # Document frequencies from the scored images' references, as coco-caption computes them.
    scorer = metrics.TokenCiderD([[to_ids(r) for r in refs] for refs in references.values()], len(vocab) + 4)
    hyp_tokens, hyp_lengths = scorer._pad([to_ids(hypotheses[i]) for i in references])
    flat = [(i, to_ids(r)) for i, refs in references.items() for r in refs]
    ref_tokens, ref_lengths = scorer._pad([r for _, r in flat])
    order = np.random.default_rng(seed).permutation(len(flat))  # references in any order
    ours = scorer(hyp_tokens, hyp_lengths, np.array(list(references)), ref_tokens[order], ref_lengths[order],
                  np.array([i for i, _ in flat])[order])
    _, coco = metrics.score_cider_d(references, hypotheses)
    np.testing.assert_allclose(ours, coco, rtol=1e-12, atol=1e-12)
    assert coco.max() > 0.5  # the corpus has real matches, not only zeros


def test_token_cider_d_corpus_document_frequencies():
    # An n-gram in every image of the corpus has idf 0; an unseen one has the largest idf.
    scorer = metrics.TokenCiderD([[[5, 6]], [[5, 7]]], vocab_size=10)
    hyp = np.array([[5, 0], [6, 0]])
    refs, ref_lengths, ref_owners = np.array([[5, 6], [6, 5]]), np.array([2, 2]), np.array([0, 1])
    scores = scorer(hyp, np.array([1, 1]), np.array([0, 1]), refs, ref_lengths, ref_owners)
    assert scores[0] == 0.0 and scores[1] > 0.0
    with pytest.raises(TfcapError):
        scorer(hyp, np.array([1, 1]), np.array([0, 2]), refs, ref_lengths, ref_owners)  # image 2 has no references


def fixed_step(log_probs):
    """A decoder step that always predicts the same distribution (log_probs [V])."""
    table = tf.constant(log_probs, tf.float32)

    def step(tokens, state, context):
        return tf.tile(table[None], [tf.shape(tokens)[0], 1]), state

    return step


def test_sample_search_is_seeded_follows_the_distribution_and_forbids_special_tokens():
    vocab = 8
    probs = np.array([0.3, 0.1, 0.1, 0.2, 0.1, 0.15, 0.05, 0.0]) + 1e-9  # pad, unk, start, end, words
    step = fixed_step(np.log(probs / probs.sum()))
    state = tf.zeros([4000, 1])
    sample = lambda seed: decoding.sample_search(step, state, {}, max_length=6, seed=tf.constant(seed, tf.int64))
    tokens, lengths = sample([1, 2])
    again, _ = sample([1, 2])
    other, _ = sample([1, 3])
    assert np.array_equal(tokens, again) and not np.array_equal(tokens, other)
    tokens, lengths = tokens.numpy(), lengths.numpy()
    assert tokens.shape == (4000, 6) and ((lengths >= 1) & (lengths <= 6)).all()
    assert not np.isin(tokens[:, 0], [text.PAD_ID, text.START_ID, text.END_ID]).any()  # no <end> first
    drawn = tokens[np.arange(6)[None, :] < lengths[:, None]]
    assert not np.isin(drawn, [text.PAD_ID, text.UNK_ID, text.START_ID]).any()
    assert (tokens[np.arange(6)[None, :] >= lengths[:, None]] == text.PAD_ID).all()
    ended = tokens[np.arange(4000), lengths - 1] == text.END_ID
    assert (ended | (lengths == 6)).all()
    # First token: the allowed ones (words 4-6) in proportion to their probabilities.
    first = np.bincount(tokens[:, 0], minlength=vocab) / 4000
    allowed = np.array([0, 0, 0, 0, 0.1, 0.15, 0.05, 0]) / 0.3
    np.testing.assert_allclose(first, allowed, atol=0.03)


def test_policy_loss_uses_the_sampling_distribution_and_never_moves_forbidden_tokens():
    """The REINFORCE loss scores samples under the distribution they were drawn from (forbidden tokens
    masked, the rest renormalized): with the plain softmax, a negative advantage pushed probability onto
    <unk>/<pad>/<start>, which sampling never draws back (how SCST collapsed on Flickr8k)."""
    rng = np.random.default_rng(0)
    vocab, steps = 9, 4
    logits = tf.constant(rng.normal(size=(3, steps, vocab)), tf.float32)
    sampled = tf.constant([[4, 5, 3, 0], [6, 7, 8, 4], [5, 3, 0, 0]], tf.int32)  # <end> = 3, then <pad>
    lengths = tf.constant([3, 4, 2], tf.int32)
    advantages = tf.constant([-1.0, -0.5, 0.25], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = scst.policy_loss(logits, sampled, lengths, advantages)
    gradient = tape.gradient(loss, logits).numpy()
    expected = 0.0
    for n in range(3):
        for t in range(int(lengths[n])):
            allowed = np.ones(vocab, bool)
            allowed[[text.PAD_ID, text.UNK_ID, text.START_ID]] = False
            allowed[text.END_ID] = t > 0
            z = logits.numpy()[n, t]
            log_p = z[sampled[n, t]] - np.log(np.exp(z[allowed]).sum())
            expected -= float(advantages[n]) * log_p
    np.testing.assert_allclose(float(loss), expected / 9, rtol=1e-5)
    assert np.isfinite(gradient).all()
    assert (gradient[:, :, [text.PAD_ID, text.UNK_ID, text.START_ID]] == 0).all()
    assert (gradient[:, 0, text.END_ID] == 0).all() and (gradient[0, 3] == 0).all()  # no <end> first; past the end
    within = np.arange(steps)[None, :] < lengths.numpy()[:, None]
    assert (np.abs(gradient[:, 1:, text.END_ID])[within[:, 1:]] > 0).all()


def greedy_train_cider(run_dir, records_dir) -> float:
    result = evaluate.run_model(run_dir, records_dir, "train", beam_size=1, length_penalty=None, batch_size=16,
                                meteor=False, show_progress=False)
    return result.scores["CIDEr-D"]


@pytest.fixture(scope="module")
def mobilenet_features(tiny_records, tmp_path_factory):
    """tiny_records' features by MobileNet-0.25 at 32 px (random init): on the tiny convnet's richer 2x2 grid
    3 epochs of cross-entropy already caption the training images (greedy CIDEr-D 1.0), leaving
    self-critical training nothing to show; on MobileNet's 1x1 grid a 3-epoch start has room to learn."""
    return built_once(tmp_path_factory, "tiny-mobilenet-features",
                      lambda root: build_features(tiny_records, root, TINY_MOBILENET_OPTIONS))


@pytest.mark.parametrize("kind", ["merge", "attention"])
def test_scst_raises_greedy_cider_d_over_its_cross_entropy_start(tiny_records, mobilenet_features, tmp_path, kind):
    # A briefly trained cross-entropy model (3 epochs), then self-critical training from it on the same images
    # (attention: its samples share their image's grid, in sampling and in the policy gradient).
    xe = tmp_path / "xe"
    fit(tiny_records, xe, mobilenet_features, kind=kind, epochs=3, learning_rate=0.005,
        encoder_config=encoder.EncoderConfig(**TINY_MOBILENET_OPTIONS))
    start = greedy_train_cider(xe, tiny_records)
    result = CliRunner().invoke(main, [
        "train", str(tiny_records), "-o", str(tmp_path / "scst"), "--objective", "scst", "--init", str(xe),
        "--epochs", "12", "--batch-size", "8", "--learning-rate", "0.005", "--lr-schedule", "constant",
        "--samples", "4", "--cache-dir", str(mobilenet_features), "--seed", "1", "--patience", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    after = greedy_train_cider(tmp_path / "scst", tiny_records)
    assert after > start + 0.5, (start, after)
    log = epochs_logged(tmp_path / "scst")
    assert {"reward", "greedy_cider", "val_cider", "val_bleu4", "samples_per_s"} <= set(log[0])
    # The logged greedy CIDEr-D of the training images rises too (one step per epoch here: noisy).
    assert np.mean([r["greedy_cider"] for r in log[-3:]]) > log[0]["greedy_cider"] + 0.3
    saved = json.loads((tmp_path / "scst" / "config.json").read_text())
    assert saved["train"]["objective"] == "scst" and saved["train"]["init"] == str(xe.resolve())
    assert saved["model"] == json.loads((xe / "config.json").read_text())["model"]


def test_scst_needs_an_init_run_with_the_same_vocabulary(tiny_records, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(tiny_records), "-o", str(tmp_path / "a"), "--objective", "scst"])
    assert result.exit_code == 2 and "needs --init" in result.output
    result = runner.invoke(main, ["train", str(tiny_records), "-o", str(tmp_path / "a"), "--objective", "scst",
                                  "--init", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a tfcap run directory" in result.output
    with pytest.raises(TfcapError, match="--samples must be at least 2"):
        train.TrainConfig(objective="scst", init="x", samples=1)
