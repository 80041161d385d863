"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format into NumPy, without torch.

The legacy format is five things one after another in one file: three small pickles (a magic number,
the protocol version 1001, and a dict describing the saving machine), the state dict itself as a
pickle whose tensors refer to storages by persistent id, a pickle of the storage keys in the order
they follow, and then for each key its raw bytes (an int64 element count, then the elements).

A pickle can name any Python callable and make the reader call it, so `torch.load` of a file from
elsewhere can run code. This reader cannot: its unpickler resolves only the handful of globals a
state dict of tensors needs (`collections.OrderedDict`, torch's tensor rebuild functions and storage
types), each mapped to a harmless stand-in of ours, and refuses every other name before anything runs.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from tfcap.errors import TfcapError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch storage class name -> the NumPy dtype of its elements (little-endian).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    """Stand-in for a `torch.XStorage` class named in the pickle: it only carries the element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A storage referred to by persistent id; its bytes are read after the state dict's pickle."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.dtype, self.key, self.numel = storage_type.dtype, key, numel
        self.array: np.ndarray | None = None


class _Tensor:
    """Stand-in for `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: a strided view,
    made into an array once the storages are read."""

    def __init__(self, storage, offset, size, stride, *_):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor must be built on a storage")
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        data = self.storage.array
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if extent > data.size or self.offset < 0 or min(self.stride, default=0) < 0:
            raise TfcapError(f"tensor of shape {self.size} reaches past its storage of {data.size} elements")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=tuple(s * itemsize for s in self.stride), writeable=False)
        return np.array(view)  # contiguous copy: the storage may be laid out in any order (e.g. HWIO)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_):
    """`torch._utils._rebuild_parameter(tensor, ...)`: a Parameter is just its tensor here."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_tensor"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED`; everything else is refused before it can run."""

    def __init__(self, file, storages: dict[str, _Storage] | None):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of a tensor "
                                         "state dict") from None

    def persistent_load(self, pid):
        if self.storages is None or not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or view is not None:
            raise pickle.UnpicklingError(f"unsupported storage reference {str(pid)[:80]}")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, int(numel))
        return self.storages[key]


def _load_plain(file) -> object:
    """One pickle that must hold no globals and no storages (the header pickles, the key list)."""
    return _RestrictedUnpickler(file, None).load()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A legacy-format PyTorch state dict as {name: np.ndarray} in torch's layout (e.g. conv [O, I, kh, kw]).

    Raises TfcapError (one line) for a file that is not such a state dict: another format, a
    truncated file, or a pickle naming anything beyond tensors, storages and OrderedDict.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TfcapError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:2] == b"PK":
        raise TfcapError(f"{path} is a zip-format PyTorch file; only the legacy format is read here")
    file = io.BytesIO(data)
    try:
        if _load_plain(file) != _MAGIC_NUMBER:
            raise TfcapError(f"{path} is not a PyTorch state dict (bad magic number)")
        if _load_plain(file) != _PROTOCOL_VERSION:
            raise TfcapError(f"{path}: unsupported PyTorch serialization protocol")
        system = _load_plain(file)
        if not isinstance(system, dict) or not system.get("little_endian", False):
            raise TfcapError(f"{path}: only little-endian PyTorch files are supported")
        storages: dict[str, _Storage] = {}
        state = _RestrictedUnpickler(file, storages).load()
        keys = _load_plain(file)
        if not isinstance(state, dict) or not isinstance(keys, list) or set(keys) != set(storages):
            raise TfcapError(f"{path}: not a state dict of tensors")
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", file.read(8))
            nbytes = numel * storage.dtype.itemsize
            raw = file.read(nbytes)
            if numel != storage.numel or len(raw) != nbytes:
                raise TfcapError(f"{path} is truncated or damaged (storage {key})")
            storage.array = np.frombuffer(raw, dtype=storage.dtype)
        result = {}
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, _Tensor):
                raise TfcapError(f"{path}: entry {str(name)[:60]} is not a tensor")
            result[name] = value.to_numpy()
        return result
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as e:
        raise TfcapError(f"{path} is not a readable PyTorch state dict: {str(e)[:160]}") from None
