"""tfcap from Python: `tfcap.Captioner` captions images in a line or two.

    import tfcap
    captioner = tfcap.Captioner()              # the bundled model; or Captioner("run/"), a SavedModel, gs://...
    print(captioner("dog.jpg"))                # a tfcap.Caption; str() is its text
    for c in captioner(["a.jpg", png_bytes, pixels, pil_image]):
        print(c.text, c.score, c.error)

Images go through the graph caption-dir runs (`caption.BytesCaptioner` over an `export.Predictor`:
header checks, decoding, preprocessing, encoder and beam search, a batch at a time), so an image
gets the same caption from both. A NumPy array or a PIL image is first encoded as PNG (lossless),
all those of a batch in one graph. A list never raises for a bad image: its Caption has the reason
in `error`, the text caption-dir writes in its error column. A single image that fails raises
TfcapError with that reason, as opening a missing file does.

Importing this module does not import TensorFlow; building a Captioner does, quietly (`tfcap.quiet`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tfcap.errors import TfcapError
from tfcap.quiet import import_tensorflow


@dataclasses.dataclass(frozen=True, repr=False)
class Caption:
    """One image's caption and the model's other outputs for it.

    text: the caption ("" when the image failed); `str(caption)` is the text.
    score: its mean log-probability per token (None when the image failed).
    error: why the image could not be captioned ("" when fine; `ok` is the same as `not error`).
    labels ((name, probability), ...), confidence (in [0, 1]: how likely the caption is right),
    in_domain (bool: whether the image is like the training photos), typicality (in (0, 1]): the outputs
    of models that give them (tfcap.labels, tfcap.confidence), None otherwise; extras: any other
    per-image output, by name.
    """

    text: str
    score: float | None = None
    error: str = ""
    labels: tuple[tuple[str, float], ...] | None = None
    confidence: float | None = None
    in_domain: bool | None = None
    typicality: float | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Caption:
        """From a caption-dir row ({caption, score, error, ...}; a path is left out): its columns by
        name, the caption as `text`, columns without a field of their own in `extras`."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"text", "extras"}
        values = {key: value for key, value in row.items() if key in fields}
        if values.get("labels") is not None:
            values["labels"] = tuple((name, probability) for name, probability in values["labels"])
        extras = {key: value for key, value in row.items() if key not in fields and key not in ("caption", "path")}
        return cls(row["caption"], **values, extras=extras)

    @property
    def ok(self) -> bool:
        return not self.error

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        if self.error:
            return f"Caption(error={self.error!r})"
        shown = [repr(self.text)] + ([f"score={self.score:.4f}"] if self.score is not None else [])
        shown += [f"{name}={getattr(self, name)!r}" for name in ("confidence", "in_domain", "typicality", "labels")
                  if getattr(self, name) is not None]
        shown += [f"{name}={value!r}" for name, value in self.extras.items() if value is not None]
        return f"Caption({', '.join(shown)})"


class Captioner:
    """A captioner to call on images: `Captioner()(image)` is a Caption, `Captioner()([images])` a list.

    model: a run directory of `tfcap train`, a SavedModel of `tfcap export` (local or gs://), an
      `export.Predictor` already loaded, or None for the bundled model (`tfcap models`).
    beam_size, length_penalty, precision: as `tfcap caption-dir`'s options (default: the model's
      decoding.json and precision; a SavedModel's are fixed at export); further keyword arguments
      go to `export.load_predictor` too.
    batch_size: images per batch through the encoder and decoding (as caption-dir's).
    max_pixels: refuse images whose header declares more pixels (default: caption-dir's).

    An image is a local path (str or os.PathLike), the bytes of an encoded image (JPEG, PNG, GIF,
    BMP, WebP), a NumPy uint8 array [H, W], [H, W, 3] or [H, W, 4] (RGB, alpha composited over
    white as for a PNG file), or a PIL image. A list or tuple of them gives a list of Captions, one
    per image, in order, with an error in place of each image that fails; a single image that fails
    raises TfcapError.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, beam_size: int | None = None,
                 length_penalty: float | None = None, precision: str | None = None, batch_size: int = 64,
                 max_pixels: int | None = None, **options):
        import_tensorflow()
        from tfcap import caption, export, images

        if batch_size < 1:
            raise TfcapError(f"batch_size must be at least 1, not {batch_size}")
        if isinstance(model, export.Predictor):
            if any(v is not None for v in (beam_size, length_penalty, precision, *options.values())):
                raise TfcapError("an export.Predictor has its decoding settings: give them to export.load_predictor")
            self.predictor = model
        else:
            self.predictor = export.load_predictor(model, beam_size=beam_size, length_penalty=length_penalty,
                                                   precision=precision, **options)
        self.model, self.batch_size = model, batch_size
        self._bytes_captioner = caption.BytesCaptioner(self.predictor, max_pixels or images.DEFAULT_MAX_PIXELS)
        self._to_png = _png_encoder()

    @property
    def settings(self) -> dict:
        """The model's settings as captioning uses them: beam_size, length_penalty, image_size, ..."""
        return self.predictor.settings

    def __repr__(self) -> str:
        model = ("the bundled model" if self.model is None else repr(str(self.model))
                 if isinstance(self.model, (str, os.PathLike)) else "a loaded predictor")
        return (f"tfcap.Captioner({model}, beam_size={self.settings['beam_size']}, "
                f"length_penalty={self.settings['length_penalty']:g})")

    def __call__(self, images):
        """A Caption for one image, a list of Captions for a list or tuple of images (see the class)."""
        if isinstance(images, (list, tuple)):
            return self._caption(list(images))
        (result,) = self._caption([images])
        if result.error:
            where = images if isinstance(images, (str, os.PathLike)) else "image"
            raise TfcapError(f"{where}: {result.error}")
        return result

    def _caption(self, items: list) -> list[Caption]:
        results: list[Caption] = []
        for start in range(0, len(items), self.batch_size):
            data = self._encoded(items[start:start + self.batch_size])
            loadable = [d for d in data if isinstance(d, bytes)]
            rows = (_row(r) for r in self._bytes_captioner(loadable))
            results += [Caption.from_row(next(rows)) if isinstance(d, bytes) else Caption("", error=d) for d in data]
        return results

    def _encoded(self, items: list) -> list[bytes | str]:
        """Each item as encoded image bytes, or the reason it cannot be an image; arrays are encoded
        as PNG together, in one call of the graph."""
        data = [_image_data(item) for item in items]
        arrays = [k for k, d in enumerate(data) if isinstance(d, np.ndarray)]
        if arrays:
            pngs = self._to_png(np.concatenate([data[k].reshape(-1) for k in arrays]),
                                np.array([data[k].shape for k in arrays], np.int64))
            for k, png in zip(arrays, pngs.numpy()):
                data[k] = png
        return data


def _row(result) -> dict[str, Any]:
    """One result of `caption.BytesCaptioner` as a row dict: it gives (caption, score, error) tuples,
    or, with per-image outputs beyond caption and score (tfcap.rows), row dicts already."""
    if isinstance(result, dict):
        return result
    caption, score, error = result
    return {"caption": caption, "score": score, "error": error}


def _image_data(item) -> bytes | np.ndarray | str:
    """Encoded image bytes, a uint8 array [H, W, C] to encode, or why `item` cannot be an image."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        from tfcap import images

        try:
            return Path(item).read_bytes()
        except OSError as e:
            return images.open_error(e)
    pil = sys.modules.get("PIL.Image")  # a PIL image means PIL is imported: tfcap never imports it
    if pil is not None and isinstance(item, pil.Image):
        try:
            item = np.asarray(item if item.mode in ("L", "LA", "RGB", "RGBA")
                              else item.convert("RGBA" if "transparency" in item.info else "RGB"))
        except (OSError, ValueError) as e:  # a lazily loaded file that turns out damaged
            return f"unreadable ({e})"
    if isinstance(item, np.ndarray):
        return _pixels(item)
    return f"not an image: {type(item).__name__} (give a path, image bytes, a uint8 array or a PIL image)"


def _pixels(array: np.ndarray) -> np.ndarray | str:
    """A uint8 array [H, W] or [H, W, C] (C 1 to 4) as [H, W, C], or why it is not an image."""
    if array.dtype == np.uint8 and array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8 or array.ndim != 3 or not 1 <= array.shape[2] <= 4 or not array.size:
        return (f"not an image: array of {array.dtype} {list(array.shape)} (expected uint8 [H, W], [H, W, 3] "
                "or [H, W, 4])")
    return array


def _png_encoder():
    """A graph function: (uint8 [N] the arrays' pixels one after the other, int64 [K, 3] their shapes)
    -> tf.string [K], each array encoded as PNG (uncompressed: it is decoded again at once)."""
    tf = import_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.uint8), tf.TensorSpec([None, 3], tf.int64)])
    def to_png(flat, shapes):
        sizes = tf.reduce_prod(shapes, axis=1)
        ends = tf.cumsum(sizes)
        return tf.map_fn(lambda k: tf.io.encode_png(tf.reshape(flat[ends[k] - sizes[k]:ends[k]], shapes[k]),
                                                    compression=0),
                         tf.range(tf.shape(shapes, out_type=tf.int64)[0]), fn_output_signature=tf.string,
                         parallel_iterations=8)

    return to_png
