"""The frozen CNN encoder: architectures, preprocessing, weights sources, precision."""

from __future__ import annotations

import functools
import inspect
import os
import re
import urllib.error
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcap.outputs import sha256_file
from tfcap import encoder as enc
from tfcap.encoder import EncoderConfig, build_encoder, preprocess_images, resolve_precision
from tfcap.errors import TfcapError

# Keras' MobileNet-0.25 ImageNet file (mobilenet_2_5_224_tf_no_top.h5), named by the variable the README asks for.
MOBILENET_FILE = Path(os.environ.get("TFCAP_MOBILENET_WEIGHTS", "/nonexistent/mobilenet_2_5_224_tf_no_top.h5"))
needs_mobilenet_file = pytest.mark.skipif(
    not MOBILENET_FILE.is_file(),
    reason="TFCAP_MOBILENET_WEIGHTS is not set to Keras' mobilenet_2_5_224_tf_no_top.h5"
    if "TFCAP_MOBILENET_WEIGHTS" not in os.environ else f"TFCAP_MOBILENET_WEIGHTS: no file {MOBILENET_FILE}")

# (name, small size, grid at that size, channels)
SMALL = [("xception", 71, (3, 3), 2048), ("inception_v3", 75, (1, 1), 2048),
         ("mobilenet", 64, (2, 2), 1024), ("vgg16", 64, (2, 2), 512), ("convnet", 64, (4, 4), 256),
         ("efficientnet_lite0", 64, (2, 2), 1280), ("efficientnet_lite2", 65, (3, 3), 1280)]  # 65: SAME pads 33, 17, 9, 5, 3
KERAS_PREPROCESS = {"xception": keras.applications.xception.preprocess_input,
                    "inception_v3": keras.applications.inception_v3.preprocess_input,
                    "mobilenet": keras.applications.mobilenet.preprocess_input,
                    "vgg16": keras.applications.vgg16.preprocess_input}


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@functools.cache
def built(config: EncoderConfig):
    """`build_encoder(config)`, built once per process for the tests that only read it (Xception and
    Inception-v3 are seconds to build)."""
    return build_encoder(config)


def same_weights(a: keras.Model, b: keras.Model) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


@pytest.fixture
def offline(monkeypatch):
    """Any download Keras attempts fails as it would without a network."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(keras.src.utils.file_utils, "urlretrieve", refuse)


def test_config_defaults_and_validation():
    assert EncoderConfig().size == 299 and EncoderConfig("inception_v3").size == 299
    assert EncoderConfig("mobilenet").size == 224 and EncoderConfig("vgg16").size == 224
    assert EncoderConfig("vgg16", image_size=32).size == 32
    bad = [dict(name="resnet"), dict(name="xception", image_size=70), dict(name="inception_v3", image_size=74),
           dict(name="mobilenet", image_size=31), dict(name="vgg16", image_size=16),
           dict(name="vgg16", image_size=64.0), dict(name="mobilenet", alpha=0),
           dict(name="mobilenet", alpha=float("nan")), dict(name="xception", alpha=0.5),
           dict(name="mobilenet", alpha=0.3),  # no ImageNet weights for alpha 0.3
           dict(name="convnet"), dict(name="convnet", weights="none", image_size=15)]  # convnet: never ImageNet
    for kwargs in bad:
        with pytest.raises(TfcapError) as info:
            EncoderConfig(**kwargs)
        assert "\n" not in str(info.value)
    EncoderConfig("mobilenet", weights="none", alpha=0.3)  # random init: any alpha


@pytest.mark.parametrize("name,size,grid,channels", SMALL)
def test_architecture_shapes(name, size, grid, channels):
    encoder = built(EncoderConfig(name, weights="none", image_size=size))
    assert (encoder.grid_shape, encoder.feature_dim, encoder.size) == (grid, channels, size)
    assert not encoder.model.trainable and not encoder.model.trainable_weights
    assert encoder.weights_id == "none"

    images = random_images((2, 37, 53, 3))  # odd size, not square
    x = encoder.preprocess(images)
    assert x.shape == (2, size, size, 3) and x.dtype == tf.float32
    assert encoder.preprocess(images[0]).shape == (size, size, 3)
    features = encoder(x)
    assert features.shape == (2, *grid, channels) and features.dtype == tf.float32
    pooled, flat = encoder.encode(images)
    assert pooled.shape == (2, channels) and flat.shape == (2, grid[0] * grid[1], channels)
    np.testing.assert_allclose(flat.numpy().reshape(features.shape), features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled.numpy(), encoder.pool(features).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder.pool(features).numpy(), features.numpy().mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,size", [("xception", 71), ("inception_v3", 75), ("mobilenet", 64), ("convnet", 32),
                                       ("efficientnet_lite1", 64)])
def test_inference_encoder_folds_batch_norm_and_keeps_features(name, size):
    config = EncoderConfig(name, weights="none", image_size=size, alpha=0.25 if name == "mobilenet" else 1.0)
    plain, folded = built(config), build_encoder(config, inference=True)
    batch_norms = [layer for layer in plain.model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms and not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.model.layers)
    removed = sum(len(bn.weights) for bn in batch_norms) - len(batch_norms)  # each BN's 3 or 4 vars -> a bias
    assert len(folded.model.weights) == len(plain.model.weights) - removed
    assert not folded.model.trainable and (folded.grid_shape, folded.feature_dim) == (plain.grid_shape, plain.feature_dim)
    x = plain.preprocess(random_images((3, size, size, 3)))
    ours, reference = folded(x).numpy(), plain(x).numpy()
    assert np.abs(reference).max() > 1e-2  # calibrated random BN: features are not vanishing
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_fold_batch_norm_every_convolution_kind_and_what_it_must_not_fold():
    rng = np.random.default_rng(0)
    x = inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=True, name="conv")(x)  # has its own bias
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="depthwise")(x)
    x = keras.layers.BatchNormalization(center=False, name="bn_depthwise")(x)
    x = keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, name="separable")(x)
    x = keras.layers.BatchNormalization(scale=False, name="bn_separable")(x)
    shared = keras.layers.Conv2D(5, 1, name="shared")(x)  # also read by the Add: must not be folded
    y = keras.layers.Add()([keras.layers.BatchNormalization(name="bn_shared")(shared), shared])
    z = keras.layers.BatchNormalization(name="bn_after_add")(y)  # after an Add: nothing to fold into
    model = keras.Model(inputs, z)
    for layer in model.layers:  # moving statistics far from (0, 1), so that a wrong fold shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 2.0, w.shape) if "variance" in w.path or "gamma" in w.path
                               else rng.normal(0, 1, w.shape) for w in layer.weights])
    folded = enc.fold_batch_norm(model)
    kept = {layer.name for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert kept == {"bn_shared", "bn_after_add"}
    images = rng.normal(0, 1, (2, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(folded(images).numpy(), model(images, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert isinstance(model.get_layer("bn_conv"), keras.layers.BatchNormalization)  # the original is untouched


def test_random_init_is_reproducible():
    config = EncoderConfig("mobilenet", weights="none", image_size=32, alpha=0.25)
    assert same_weights(build_encoder(config).model, build_encoder(config).model)


@pytest.mark.parametrize("name", ["xception", "inception_v3", "mobilenet", "vgg16"])
def test_preprocess_matches_keras(name):
    config = EncoderConfig(name, weights="none", image_size=96)
    images = random_images((3, 41, 67, 3))
    ours = preprocess_images(images, config).numpy()
    resized = tf.image.resize(images, [96, 96], method="bilinear").numpy()
    np.testing.assert_allclose(ours, KERAS_PREPROCESS[name](resized.copy()), rtol=1e-5, atol=1e-4)
    # Same-size input is only rescaled.
    square = random_images((96, 96, 3))
    np.testing.assert_allclose(preprocess_images(square, config).numpy(),
                               KERAS_PREPROCESS[name](square.astype("float32")), rtol=1e-5, atol=1e-4)


def test_preprocess_in_tf_data_and_input_checks():
    config = EncoderConfig("vgg16", weights="none", image_size=40)
    sizes = [(17, 23), (40, 40), (101, 7)]
    ds = tf.data.Dataset.from_generator(lambda: (random_images((h, w, 3), i) for i, (h, w) in enumerate(sizes)),
                                        output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    out = list(ds.map(lambda image: preprocess_images(image, config)).as_numpy_iterator())
    assert [o.shape for o in out] == [(40, 40, 3)] * 3 and all(o.dtype == np.float32 for o in out)
    with pytest.raises(TfcapError, match="uint8"):
        preprocess_images(np.zeros((8, 8, 3), np.float32), config)
    with pytest.raises(TfcapError, match="RGB"):
        preprocess_images(np.zeros((8, 8, 4), np.uint8), config)


@needs_mobilenet_file
def test_mobilenet_file_loads_by_path():
    config = EncoderConfig("mobilenet", weights=str(MOBILENET_FILE), image_size=96, alpha=0.25)
    encoder = build_encoder(config)
    reference = keras.applications.MobileNet(include_top=False, weights=str(MOBILENET_FILE), alpha=0.25,
                                             input_shape=(96, 96, 3))
    assert same_weights(encoder.model, reference)
    random_init = build_encoder(EncoderConfig("mobilenet", weights="none", image_size=96, alpha=0.25))
    assert not same_weights(encoder.model, random_init.model)
    assert encoder.weights_id == "sha256:" + sha256_file(MOBILENET_FILE)[:16]
    assert (encoder.grid_shape, encoder.feature_dim) == ((3, 3), 256)
    x = encoder.preprocess(random_images((2, 120, 80, 3)))
    np.testing.assert_allclose(encoder(x).numpy(), reference(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


@needs_mobilenet_file
def test_imagenet_from_keras_cache_without_network(tmp_path, monkeypatch, offline):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / MOBILENET_FILE.name).symlink_to(MOBILENET_FILE)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # Keras read it at import; tfcap re-reads it
    config = EncoderConfig("mobilenet", weights="imagenet", alpha=0.25)  # 224: the cached file's size
    assert enc.imagenet_weights_file(config)[0] == MOBILENET_FILE.name
    encoder = build_encoder(config)
    by_path = build_encoder(EncoderConfig("mobilenet", weights=str(MOBILENET_FILE), alpha=0.25))
    assert same_weights(encoder.model, by_path.model)
    assert encoder.weights_id == by_path.weights_id  # keyed by content, not by where it came from
    # Sizes Keras has no MobileNet file for use the 224 weights, as Keras does.
    assert enc.imagenet_weights_file(EncoderConfig("mobilenet", alpha=0.25, image_size=96))[0] == MOBILENET_FILE.name


@pytest.mark.parametrize("name", ["xception", "inception_v3", "mobilenet", "vgg16"])
def test_imagenet_offline_empty_cache_is_one_line_error(name, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    config = EncoderConfig(name, weights="imagenet")
    fname, url, _ = enc.imagenet_weights_file(config)
    with pytest.raises(TfcapError) as info:
        build_encoder(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"could not download ImageNet weights for {name}")
    assert f"put {fname} in {tmp_path / 'models'}/" in message and url in message
    assert "--encoder-weights PATH" in message and "--encoder-weights none" in message
    assert not (tmp_path / "models" / fname).exists()


@pytest.mark.parametrize("name,alpha,size", [("vgg16", 1.0, 32), ("mobilenet", 0.25, 224),
                                              ("mobilenet", 0.75, 160), ("mobilenet", 1.0, 96)])
def test_imagenet_file_table_matches_what_keras_fetches(name, alpha, size, monkeypatch):
    """Keras itself asks get_file for exactly the file, URL and hash tfcap fetches."""
    calls = []

    class Stop(Exception):
        pass

    def record(fname, origin=None, **kwargs):
        calls.append((fname, origin, kwargs.get("file_hash"), kwargs.get("cache_subdir")))
        raise Stop

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", record)
    constructor = {"vgg16": keras.applications.VGG16, "mobilenet": keras.applications.MobileNet}[name]
    kwargs = {"alpha": alpha} if name == "mobilenet" else {}
    with pytest.raises(Stop), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNet at 96: "weights for (224, 224) will be loaded"
        constructor(include_top=False, weights="imagenet", input_shape=(size, size, 3), **kwargs)
    config = EncoderConfig(name, weights="imagenet", image_size=size, alpha=alpha)
    assert calls == [(*enc.imagenet_weights_file(config), "models")]


@pytest.mark.parametrize("name", ["xception", "inception_v3", "vgg16"])
def test_imagenet_file_table_matches_keras_source(name):
    """The same, from the source, for the architectures too slow to build here just to check."""
    module = getattr(keras.src.applications, name)
    fname, url, md5 = enc.imagenet_weights_file(EncoderConfig(name))
    source = inspect.getsource(module)
    assert url == module.WEIGHTS_PATH_NO_TOP and url.endswith("/" + fname)
    call = rf'get_file\(\s*"{re.escape(fname)}",\s*WEIGHTS_PATH_NO_TOP,\s*cache_subdir="models",\s*file_hash="{md5}"'
    assert re.search(call, source)


def test_weights_path_errors(tmp_path):
    with pytest.raises(TfcapError, match="not found"):
        build_encoder(EncoderConfig("vgg16", weights=str(tmp_path / "missing.h5"), image_size=32))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(TfcapError) as info:
        build_encoder(EncoderConfig("vgg16", weights=str(junk), image_size=32))
    assert "\n" not in str(info.value) and str(junk) in str(info.value)
    wrong_suffix = tmp_path / "weights.bin"
    wrong_suffix.write_bytes(b"\0" * 10)
    with pytest.raises(TfcapError):
        build_encoder(EncoderConfig("vgg16", weights=str(wrong_suffix), image_size=32))


@needs_mobilenet_file
@pytest.mark.parametrize("name,alpha", [("mobilenet", 0.5), ("vgg16", 1.0)])
def test_incompatible_weights_file(name, alpha):
    with pytest.raises(TfcapError) as info:
        build_encoder(EncoderConfig(name, weights=str(MOBILENET_FILE), image_size=32, alpha=alpha))
    assert "\n" not in str(info.value) and "cannot load encoder weights" in str(info.value)


def test_resolve_precision(monkeypatch):
    expected_auto = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    assert resolve_precision("auto") == expected_auto
    assert resolve_precision("float32") == "float32" and resolve_precision("mixed_float16") == "mixed_float16"
    with pytest.raises(TfcapError, match="unknown precision"):
        resolve_precision("float16")
    monkeypatch.setattr(enc, "gpu_visible", lambda: False)
    monkeypatch.setattr(enc, "_cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(TfcapError, match="bfloat16 instructions"):
        resolve_precision("mixed_bfloat16")
    monkeypatch.setattr(enc, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_outputs_float32_and_keeps_global_policy(precision):
    try:
        resolve_precision(precision)
    except TfcapError as e:
        pytest.skip(str(e))
    before = keras.config.dtype_policy().name
    encoder = build_encoder(EncoderConfig("mobilenet", weights="none", image_size=32, alpha=0.25), precision)
    assert keras.config.dtype_policy().name == before
    assert encoder.precision == precision
    compute = {layer.dtype_policy.compute_dtype for layer in encoder.model.layers if layer.weights}
    assert compute == {precision.removeprefix("mixed_")}
    features = encoder(encoder.preprocess(random_images((2, 32, 32, 3))))
    assert features.dtype == tf.float32 and encoder.encode(random_images((1, 9, 9, 3)))[0].dtype == tf.float32
    assert precision in encoder.feature_key


def test_preprocess_exports_in_a_saved_model(tmp_path):
    """Preprocessing is plain TF ops, so it serves from a SavedModel. (Exporting a whole encoder works
    too, but saving even MobileNet 0.25 takes ~10 s here: left to the export tests.)"""
    config = EncoderConfig("xception", weights="none", image_size=80)
    module = tf.Module()
    module.preprocess = tf.function(lambda images: preprocess_images(images, config),
                                    input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    tf.saved_model.save(module, str(tmp_path / "saved"))
    images = random_images((2, 50, 30, 3))
    np.testing.assert_allclose(tf.saved_model.load(str(tmp_path / "saved")).preprocess(images).numpy(),
                               preprocess_images(images, config).numpy(), rtol=1e-6, atol=1e-6)
