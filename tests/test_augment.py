"""`tfcap train --augment flip`: the training images mirrored left-right, half of them each epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from conftest import TINY_ENCODER_OPTIONS, epochs_logged, fit
from tfcap import encoder, features, inputs, model, train
from tfcap.cli import main
from tfcap.errors import TfcapError

TINY_ENCODER = encoder.EncoderConfig(**TINY_ENCODER_OPTIONS)


def test_the_mirrored_cache_holds_the_features_of_the_flipped_images_in_the_same_order(tiny_records, tmp_path):
    tiny = encoder.build_encoder(TINY_ENCODER)
    plain = features.build_features(tiny_records, "train", tiny, True, cache_dir=tmp_path, show_progress=False)
    mirrored = features.build_features(tiny_records, "train", tiny, True, cache_dir=tmp_path, show_progress=False,
                                       mirrored=True)
    # A key of its own; the unmirrored key is the one caches had before mirroring existed.
    assert plain != mirrored and plain.name == f"train-{features.cache_key(tiny_records, 'train', tiny, True)}"
    assert features.find_features(tiny_records, "train", tiny, False, tmp_path, mirrored=True) == mirrored
    cached = list(features.load_features(mirrored).as_numpy_iterator())
    assert [e["image_id"] for e in cached] == [e["image_id"] for e in features.load_features(plain).as_numpy_iterator()]
    batch = next(iter(inputs.image_batches(tiny_records, "train", tiny.preprocess, 8)))
    want = tiny(tf.image.flip_left_right(batch["image"])).numpy().reshape(8, -1, tiny.feature_dim)
    unflipped = tiny(batch["image"]).numpy().reshape(8, -1, tiny.feature_dim)
    scale = np.abs(want).max()
    for example, grid, other in zip(cached, want, unflipped):
        np.testing.assert_allclose(example["grid"], grid, rtol=0, atol=2e-3 * scale)  # float16
        np.testing.assert_allclose(example["pooled"], grid.mean(axis=0), rtol=0, atol=1e-4 * scale)
        assert np.abs(grid - other).max() > 0.05 * scale  # the tiles' noise is not symmetric: flipping shows


def _examples(count: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({"image_id": tf.strings.as_string(tf.range(count)),
                                               "grid": tf.zeros([count, 2, 3]), "pooled": tf.zeros([count, 3])})


def _mirrored_ids(seed: int, epoch: int, count: int = 400) -> np.ndarray:
    plain = _examples(count)
    flipped = plain.map(lambda e: {**e, "grid": e["grid"] + 1, "pooled": e["pooled"] + 1})
    out = inputs.mirrored_half(tf.data.Dataset.zip((plain, flipped)), inputs.mirror_features, seed=seed, epoch=epoch)
    chosen = list(out.as_numpy_iterator())
    for e in chosen:  # a whole view: the grid and the pooled vector of the same image
        assert e["grid"].min() == e["grid"].max() == e["pooled"].min() == e["pooled"].max()
    assert [e["image_id"] for e in chosen] == [str(i).encode() for i in range(count)]
    return np.array([e["pooled"][0] for e in chosen]) == 1


def test_half_of_the_images_are_mirrored_anew_each_epoch_and_the_same_on_a_rerun():
    first, again, second, other_seed = (_mirrored_ids(0, 0), _mirrored_ids(0, 0), _mirrored_ids(0, 1),
                                        _mirrored_ids(1, 0))
    assert 0.4 < first.mean() < 0.6 and 0.4 < second.mean() < 0.6
    np.testing.assert_array_equal(first, again)  # a pure function of (seed, epoch, position): resumable
    assert 0.3 < (first != second).mean() < 0.7 and 0.3 < (first != other_seed).mean() < 0.7


def test_mirrored_features_out_of_order_are_an_error_not_a_silent_mix():
    plain = _examples(4)
    out = inputs.mirrored_half(tf.data.Dataset.zip((plain, plain.skip(1))), inputs.mirror_features, seed=0, epoch=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the order"):
        list(out)


def test_a_grid_only_one_view_has_is_dropped_not_left_unmirrored():
    """A merge run reads the pooled vector: the train entry found may hold the grid (an attention run's)
    while the mirrored one, built for the merge run, does not; the grid must not pass through unmirrored."""
    plain = _examples(1).get_single_element()
    mirrored = {"image_id": plain["image_id"], "pooled": plain["pooled"] + 1}
    out = inputs.mirror_features((plain, mirrored), tf.constant(True))
    assert set(out) == {"image_id", "pooled"} and float(out["pooled"][0]) == 1.0


def test_mirror_image_flips_only_where_drawn():
    image = tf.reshape(tf.range(2 * 3 * 3, dtype=tf.float32), [2, 3, 3])
    example = {"image": image, "image_id": tf.constant("a")}
    np.testing.assert_array_equal(inputs.mirror_image(example, tf.constant(True))["image"], image.numpy()[:, ::-1])
    np.testing.assert_array_equal(inputs.mirror_image(example, tf.constant(False))["image"], image)


def test_a_flip_augmented_run_trains_saves_its_setting_and_resumes_exactly(tiny_records, tiny_features, tmp_path,
                                                                          monkeypatch):
    from test_train import interrupt_after

    kwargs = dict(epochs=2, augment="flip")  # 64 captions, 8 per step: 8 steps per epoch
    fit(tiny_records, tmp_path / "straight", tiny_features, **kwargs)
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["augment"] == "flip"
    fit(tiny_records, tmp_path / "plain", tiny_features, epochs=2)
    # The mirrored views are trained on: the losses differ from the same run without them.
    assert epochs_logged(tmp_path / "straight")[1]["loss"] != epochs_logged(tmp_path / "plain")[1]["loss"]
    interrupt_after(monkeypatch, 11)  # mid-way through epoch 2
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_records, tmp_path / "resumed", tiny_features, **kwargs)
    monkeypatch.undo()
    train.train(tiny_records, tmp_path / "resumed", resume=True, cache_dir=tiny_features, show_progress=False)
    straight, resumed = model.load_model(tmp_path / "straight"), model.load_model(tmp_path / "resumed")
    for a, b in zip(straight.decoder.weights, resumed.decoder.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert [e["loss"] for e in epochs_logged(tmp_path / "resumed")] == pytest.approx(
        [e["loss"] for e in epochs_logged(tmp_path / "straight")], rel=1e-6)
    # --resume keeps the augmentation; another one is refused in one line.
    result = CliRunner().invoke(main, ["train", str(tiny_records), "-o", str(tmp_path / "resumed"), "--cache-dir",
                                       str(tiny_features), "--quiet", "--resume", "--augment", "none"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "--augment none differs from the flip" in result.output


def test_an_unknown_augmentation_is_refused():
    with pytest.raises(TfcapError, match="--augment must be one of none, flip"):
        train.TrainConfig(augment="rotate")
    result = CliRunner().invoke(main, ["train", "records", "-o", "run", "--augment", "rotate"])
    assert result.exit_code == 2 and "'rotate' is not one of 'none', 'flip'" in result.output
