"""Export to SavedModel, and one predictor interface over run directories and SavedModels.

The SavedModel holds the whole path from bytes to words: decoding, resizing, the encoder, beam
search and detokenization (the vocabulary table is a SavedModel resource). It loads with
`tf.saved_model.load` alone, no tfcap import:

    model = tf.saved_model.load("captioner/")
    out = model.signatures["serving_default"](images=tf.constant([open("a.jpg", "rb").read()]))
    out["captions"], out["scores"]        # tf.string [B], tf.float32 [B]

It also keeps the parts as functions: `preprocess(bytes) -> [S, S, 3]`, `encode([B, S, S, 3]) ->
features` (a dict: `pooled` [B, C] for the merge decoder, `grid` [B, L, C] for attention), `decode(
features) -> {captions, scores}` (beam search and detokenization), and `caption_pixels`, the two
together. That is how `caption-dir` drives it: the same tf.data pipeline and batching as for a run
directory, with the encoder inside the pipeline, so both give the same captions. SavedModels
exported before `encode`/`decode` existed still work through `caption_pixels`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import tensorflow as tf

from tfcap import model as models, pretrained
from tfcap.errors import TfcapError
from tfcap.outputs import atomic_directory


class ServingModule(tf.Module):
    """A captioner with fixed decoding settings, as traced functions (what `export` saves)."""

    def __init__(self, captioner: models.Captioner, beam_size: int = 3, length_penalty: float = 0.0):
        super().__init__(name="tfcap_serving")
        if beam_size < 1:
            raise TfcapError("--beam-size must be at least 1")
        self.captioner = captioner
        size = captioner.encoder.size
        self.settings = json.dumps({"beam_size": beam_size, "length_penalty": length_penalty, "image_size": size,
                                    "encoder_precision": captioner.encoder.precision,
                                    "model": captioner.config.to_dict()})
        self._beam_size, self._length_penalty = beam_size, length_penalty
        self._feature_keys = models.feature_keys(captioner.config.decoder)
        grid_h, grid_w = captioner.encoder.grid_shape
        channels = captioner.encoder.feature_dim
        specs = {"pooled": tf.TensorSpec([None, channels], tf.float32),
                 "grid": tf.TensorSpec([None, grid_h * grid_w, channels], tf.float32)}
        self.preprocess = tf.function(captioner.preprocess_bytes, input_signature=[tf.TensorSpec([], tf.string)])
        self.encode = tf.function(self._encode, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        self.decode = tf.function(self._decode, input_signature=[{key: specs[key] for key in self._feature_keys}])
        self.caption_pixels = tf.function(self._caption_pixels, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32)])
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        self.get_settings = tf.function(lambda: tf.constant(self.settings), input_signature=[])

    def _encode(self, pixels):
        features = self.captioner.features(pixels)
        return {key: features[key] for key in self._feature_keys}  # only what the decoder reads

    def _decode(self, features):
        captions, scores = self.captioner.caption_features(
            features, beam_size=self._beam_size, length_penalty=self._length_penalty)
        return {"captions": captions, "scores": scores}

    def _caption_pixels(self, pixels):
        return self._decode(self._encode(pixels))

    def _serve(self, images):
        size = self.captioner.encoder.size
        pixels = tf.map_fn(self.captioner.preprocess_bytes, images,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32), parallel_iterations=8)
        return self._caption_pixels(pixels)


DECODING = pretrained.DECODING


def serving_module(run_dir: Path, beam_size: int, length_penalty: float, precision: str | None) -> ServingModule:
    """RUN_DIR's captioner for captioning only: BatchNorm folded into the encoder (encoder.fold_batch_norm)."""
    return ServingModule(models.load_model(run_dir, encoder_precision=precision, inference=True), beam_size,
                         length_penalty)


def export(run_dir: Path, out: Path | str, *, beam_size: int | None = None, length_penalty: float | None = None,
           precision: str | None = None, overwrite: bool = False) -> Path | str:
    """Write RUN_DIR's captioner as a SavedModel at `out` (atomically on a local disk); return `out`.

    `out` may be a URL TensorFlow's file systems write (gs://bucket/model), for workers elsewhere to
    load; there an existing SavedModel is refused unless `overwrite`, which deletes it first.
    beam_size, length_penalty: default as `run_decoding` (the run's decoding.json, so an export
    captions as caption-dir does with the run). precision: the encoder's dtype policy in the
    SavedModel (default: the run's; see model.load_model).
    """
    module = serving_module(run_dir, *run_decoding(run_dir, beam_size, length_penalty), precision)
    if is_url(out):
        if tf.io.gfile.exists(out):
            if not overwrite:
                raise TfcapError(f"{out} already exists; pass --overwrite to replace it")
            tf.io.gfile.rmtree(out)
        tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
        return out
    with atomic_directory(Path(out), overwrite) as scratch:
        tf.saved_model.save(module, str(scratch), signatures={"serving_default": module.serve})
    return Path(out)


class Predictor:
    """A captioner in parts, over a ServingModule or a loaded SavedModel:

    - `preprocess_bytes(tf.string []) -> [S, S, 3]`
    - `encode(pixels [B, S, S, 3]) -> features` (a dict of tensors [B, ...]; graph-safe, so it can run
      inside a tf.data pipeline) and `decode(features) -> (captions tf.string [B], scores tf.float32 [B])`
    - `caption_pixels(pixels) -> (captions, scores)`, the two together;
    - called on images (paths, bytes, arrays, PIL images, or a list of them), `tfcap.Caption`s.

    Over a SavedModel exported without `encode`/`decode`, `encode` passes the pixels through and
    `decode` runs the whole `caption_pixels`.
    """

    def __init__(self, owner, settings: dict):
        self._owner, self.settings = owner, settings  # the module or loaded SavedModel, owner of the variables
        self.split = hasattr(owner, "encode") and hasattr(owner, "decode")

    def preprocess_bytes(self, data: tf.Tensor) -> tf.Tensor:
        return self._owner.preprocess(data)

    def encode(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._owner.encode(pixels) if self.split else {"pixels": pixels}

    def decode(self, features: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        out = self._owner.decode(features) if self.split else self._owner.caption_pixels(features["pixels"])
        return out["captions"], out["scores"]

    def caption_pixels(self, pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = self._owner.caption_pixels(pixels)
        return out["captions"], out["scores"]

    def __call__(self, images):
        """Caption images as `tfcap.Captioner` does: a path, image bytes, a uint8 array, a PIL image
        (a `tfcap.Caption`), or a list of them (a list of Captions)."""
        return self._captioner(images)

    @functools.cached_property
    def _captioner(self):
        from tfcap.api import Captioner

        return Captioner(self)


def is_url(location) -> bool:
    """Whether a --model, IMAGES or --out is a URL of a file system (gs://, s3://, hdfs://) rather than a local path."""
    return isinstance(location, str) and "://" in location


def run_decoding(run_dir: Path, beam_size: int | None = None, length_penalty: float | None = None) -> tuple[int, float]:
    """The beam size and length penalty to caption with from RUN_DIR: the arguments where given, else
    those of its decoding.json (a bundled model has one: chosen on val), else beam 3 and no penalty."""
    path = Path(run_dir) / DECODING
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    return (beam_size or chosen.get("beam_size", 3),
            length_penalty if length_penalty is not None else chosen.get("length_penalty", 0.0))


def load_predictor(path: Path | str | None = None, *, beam_size: int | None = None,
                   length_penalty: float | None = None, precision: str | None = None) -> Predictor:
    """A predictor over a run directory (decoding settings and the encoder's precision from the
    arguments; default as `run_decoding` and the run's precision) or an exported SavedModel, local
    or at a URL TensorFlow's file systems read (gs://; all settings fixed at export; asking for others
    is an error); with no path, over the bundled model (`tfcap.pretrained`)."""
    if path is None:
        path = pretrained.path()
    if is_url(path):
        return _saved_model_predictor(path, beam_size, length_penalty, precision)
    path = Path(path)
    if (path / models.CONFIG).is_file():
        module = serving_module(path, *run_decoding(path, beam_size, length_penalty), precision)
        return Predictor(module, json.loads(module.settings))
    if (path / "saved_model.pb").is_file():
        return _saved_model_predictor(str(path), beam_size, length_penalty, precision)
    raise TfcapError(f"{path} is neither a tfcap run directory (config.json) nor a SavedModel (saved_model.pb)")


def _saved_model_predictor(location: str, beam_size, length_penalty, precision) -> Predictor:
    loaded = tf.saved_model.load(location)
    settings = json.loads(loaded.get_settings().numpy().decode())
    settings.setdefault("encoder_precision", settings["model"]["precision"])  # exported before the option
    for name, asked in (("beam_size", beam_size), ("length_penalty", length_penalty),
                        ("encoder_precision", precision)):
        if asked is not None and asked != settings[name]:
            raise TfcapError(f"{location} was exported with {name.replace('_', ' ')} {settings[name]}; "
                             f"re-export to use {asked}")
    return Predictor(loaded, settings)
