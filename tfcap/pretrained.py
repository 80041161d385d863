"""The captioners shipped inside the package, so that `tfcap caption-dir photos/ -o out.csv` works
right after install, offline, with no --model.

Each lives in `tfcap/models/NAME/` as a run directory (config.json, vocab.txt, best.weights.h5,
metrics.jsonl) plus `card.json`: what it was trained on, its test scores, licence and how it was
made. A bundled model whose encoder kept its ImageNet weights has no encoder.weights.h5: those
weights come from an installed dependency (its config.json says `"encoder_weights": {"from": "imagenet"}`,
and `model.load_model` then builds the encoder with `weights="imagenet"`),
and the decoder's weights are stored in float16 to keep the wheel small.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfcap.errors import TfcapError

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT = "flickr8k-lite2-attention"
CARD = "card.json"
DECODING = "decoding.json"  # export.DECODING, read here without importing TensorFlow


def names() -> list[str]:
    """The bundled models, default first."""
    found = sorted(p.name for p in MODELS_DIR.iterdir() if (p / CARD).is_file()) if MODELS_DIR.is_dir() else []
    return sorted(found, key=lambda name: name != DEFAULT)


def path(name: str = DEFAULT) -> Path:
    """The run directory of a bundled model; TfcapError when it is not in this installation."""
    folder = MODELS_DIR / name
    if not (folder / CARD).is_file():
        have = ", ".join(names()) or "none"
        raise TfcapError(f"no bundled model {name!r} in this tfcap installation (bundled: {have}); "
                         "pass --model RUN_DIR or SAVEDMODEL")
    return folder


def resolve(model: Path | None) -> Path:
    """--model as given, or the default bundled model when it is not given."""
    return Path(model) if model is not None else path(DEFAULT)


def card(name: str = DEFAULT) -> dict:
    return json.loads((path(name) / CARD).read_text(encoding="utf-8"))


def decoding(name: str = DEFAULT) -> dict:
    """The decoding settings a bundled model captions with by default ({"beam_size": 3, "length_penalty": 1.0}:
    its decoding.json, chosen on val); {} without one."""
    file = path(name) / DECODING
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def is_bundled(model: Path) -> bool:
    try:
        return Path(model).resolve().parent == MODELS_DIR
    except OSError:
        return False


def store_float16(source: Path, target: Path) -> None:
    """Copy a Keras .weights.h5 with every float32 array stored as float16 (half the bytes).

    Keras casts on load (the variables stay float32), so the model computes in float32 with
    weights rounded to float16: captions checked equal before bundling (tools/build_default_model.sh).
    """
    import h5py  # here, not at the top: `tfcap models` and the CLI's option help read this module
    import numpy as np

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        def copy(name, item):
            if isinstance(item, h5py.Dataset):
                data = item[()]
                if data.dtype == np.float32:
                    data = data.astype(np.float16)
                dst.create_dataset(name, data=data)
            else:
                dst.require_group(name)
            for key, value in item.attrs.items():
                dst[name].attrs[key] = value

        for key, value in src.attrs.items():
            dst.attrs[key] = value
        src.visititems(copy)
