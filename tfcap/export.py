"""Export to SavedModel, and one predictor interface over run directories and SavedModels.

The SavedModel holds the whole path from bytes to words: decoding, resizing, the encoder, beam
search and detokenization (the vocabulary table is a SavedModel resource), and the encoder's
ImageNet classifier where it has one. It loads with `tf.saved_model.load` alone, no tfcap import:

    model = tf.saved_model.load("captioner/")
    out = model.signatures["serving_default"](images=tf.constant([open("a.jpg", "rb").read()]))
    out["captions"], out["scores"]        # tf.string [B], tf.float32 [B]
    out["labels"], out["label_probs"]     # tf.string [B, K], tf.float32 [B, K]: with a classifier only

Its outputs are the per-image outputs of `model.Captioner.describe` (listed in `tfcap.rows`): every
key of that dict is an output of the signature, so a new per-image output is exported as soon as
`describe` returns it. It also keeps the parts as functions: `preprocess(bytes) -> [S, S, 3]`,
`encode([B, S, S, 3]) -> features` (a dict: `pooled` [B, C] for the merge decoder and for labels,
`grid` [B, L, C] for attention), `decode(features) -> the outputs` (beam search, detokenization,
labels), and `caption_pixels`, the two together. That is how `caption-dir` drives it: the same
tf.data pipeline and batching as for a run directory, with the encoder inside the pipeline, so both
give the same captions. SavedModels exported before `encode`/`decode` existed still work through
`caption_pixels`, and those exported before an output existed work without it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import threading
from pathlib import Path

import tensorflow as tf

from tfcap import labels as imagenet_labels, model as models, pretrained, text
from tfcap.errors import TfcapError
from tfcap.outputs import Output, claimed


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How captions are searched for (`decoding.beam_search`): the defaults come from a run's
    decoding.json (chosen on val), a SavedModel fixes them at export."""

    beam_size: int = 3
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0  # no n-gram twice in a caption; 0: off


class ServingModule(tf.Module):
    """A captioner with fixed decoding settings and label count, as traced functions (what `export` saves).

    labels: ImageNet labels per image in the outputs (None: `labels.DEFAULT_COUNT`, 0: none); more than
    the captioner's classifier has, or any without one, gives what it has.
    """

    def __init__(self, captioner: models.Captioner, decoding: Decoding = Decoding(), labels: int | None = None):
        super().__init__(name="tfcap_serving")
        if decoding.beam_size < 1:
            raise TfcapError("--beam-size must be at least 1")
        self.captioner, self.decoding = captioner, decoding
        self._labels = captioner.label_count(labels)
        size = captioner.encoder.size
        self.settings = json.dumps({**dataclasses.asdict(decoding), "labels": self._labels,
                                    "classifier": captioner.classifier is not None,
                                    "confidence": captioner.assessor is not None, "image_size": size,
                                    "encoder_precision": captioner.encoder.precision,
                                    "decoder_precision": captioner.decoder.precision,
                                    "model": captioner.config.to_dict()})
        self._feature_keys = captioner.output_feature_keys(self._labels)
        grid_h, grid_w = captioner.encoder.grid_shape
        channels = captioner.encoder.feature_dim
        specs = {"pooled": tf.TensorSpec([None, channels], tf.float32),
                 "grid": tf.TensorSpec([None, grid_h * grid_w, channels], tf.float32)}
        self.preprocess = tf.function(captioner.preprocess_bytes, input_signature=[tf.TensorSpec([], tf.string)])
        self.encode = tf.function(self._encode, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        self.decode = tf.function(self._decode, input_signature=[{key: specs[key] for key in self._feature_keys}])
        self.caption_pixels = tf.function(self._caption_pixels, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32)])
        self.assess = tf.function(self._assess, input_signature=[
            {key: specs[key] for key in self._feature_keys},
            tf.TensorSpec([None, captioner.config.text.max_length], tf.string)])
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        self.get_settings = tf.function(lambda: tf.constant(self.settings), input_signature=[])

    def _encode(self, pixels):
        features = self.captioner.features(pixels)
        return {key: features[key] for key in self._feature_keys}  # only what decode reads

    def _decode(self, features):
        return self.captioner.describe(features, **dataclasses.asdict(self.decoding), labels=self._labels)

    def _assess(self, features, words):
        """Given captions of the images as words (tf.string [B, max_length], "" past the end:
        text.caption_words) -> {score, and confidence, in_domain, typicality where the run has a fitted
        confidence}, each [B] (model.Captioner.assess)."""
        return self.captioner.assess(features, self.captioner.ids_of_words(words))

    def _caption_pixels(self, pixels):
        # Through the tf.functions, not their Python bodies: caption_pixels and serve call the graphs of
        # encode and decode, traced once, instead of tracing the encoder and the search three times each.
        return self.decode(self.encode(pixels))

    def _serve(self, images):
        size = self.captioner.encoder.size
        count = tf.shape(images)[0]
        # The encoder's convolutions refuse a batch of none: an empty batch decodes one blank image, cut off.
        pixels = tf.cond(count > 0, lambda: tf.map_fn(
            self.captioner.preprocess_bytes, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            parallel_iterations=8), lambda: tf.zeros([1, size, size, 3]))
        return {key: value[:count] for key, value in self._caption_pixels(pixels).items()}


DECODING = pretrained.DECODING


def serving_module(run_dir: Path, decoding: Decoding, precision: str | None, labels: int | None = None,
                   decoder_precision: str | None = None) -> ServingModule:
    """RUN_DIR's captioner for captioning only: BatchNorm folded into the encoder (encoder.fold_batch_norm),
    the decoder frozen, its matmuls in `decoder_precision` (None: auto; `decoder.resolve_precision`)."""
    return ServingModule(models.load_model(run_dir, encoder_precision=precision, inference=True,
                                           decoder_precision=decoder_precision), decoding, labels)


def export(run_dir: Path, out: Path | str | Output, *, beam_size: int | None = None,
           length_penalty: float | None = None, no_repeat_ngram: int | None = None, labels: int | None = None,
           precision: str | None = None, decoder_precision: str | None = None, overwrite: bool = False) -> Path | str:
    """Write RUN_DIR's captioner as a SavedModel at `out`; return its location.

    A local `out` (or an `outputs.Output` the caller claimed) is locked for the export and written
    into a scratch folder of this process, renamed into place when complete.

    `out` may be a URL TensorFlow's file systems write (gs://bucket/model), for workers elsewhere to
    load; there an existing SavedModel is refused unless `overwrite`, which deletes it first.
    beam_size, length_penalty, no_repeat_ngram: default as `run_decoding` (the run's decoding.json, so
    an export captions as caption-dir does with the run). labels: ImageNet labels per image in its
    outputs (default `labels.DEFAULT_COUNT`; 0 for none; fixed in the SavedModel, a reader may ask
    for fewer). precision: the encoder's dtype policy in the SavedModel (default: the run's; see
    model.load_model). decoder_precision: of the decoder's matmuls (`decoder.resolve_precision`; default auto,
    resolved on this machine, so that the SavedModel captions as the run does here); "float32" for a
    SavedModel to serve on machines without bfloat16 instructions, where emulated bfloat16 is slower.
    """
    module = serving_module(run_dir, run_decoding(run_dir, beam_size, length_penalty, no_repeat_ngram), precision,
                            labels, decoder_precision)
    if is_url(out):
        if tf.io.gfile.exists(out):
            if not overwrite:
                raise TfcapError(f"{out} already exists; pass --overwrite to replace it")
            tf.io.gfile.rmtree(out)
        tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
        return out
    with claimed(out, overwrite=overwrite, inputs={"run directory": run_dir}) as output, \
            output.directory() as scratch:
        tf.saved_model.save(module, str(scratch), signatures={"serving_default": module.serve})
    return output.path


class Predictor:
    """A captioner in parts, over a ServingModule or a loaded SavedModel:

    - `preprocess_bytes(tf.string []) -> [S, S, 3]`
    - `encode(pixels [B, S, S, 3]) -> features` (a dict of tensors [B, ...]; graph-safe, so it can run
      inside a tf.data pipeline) and `decode(features) -> outputs`, the per-image outputs of
      `model.Captioner.describe` (a dict of tensors [B, ...]: captions, scores, labels, ...; `tfcap.rows`
      turns them into rows), those the model has;
    - `caption_pixels(pixels) -> outputs`, the two together;
    - called on images (paths, bytes, arrays, PIL images, or a list of them), `tfcap.Caption`s.

    labels: how many labels per image `decode` returns, at most what the model returns (settings["labels"]).
    Over a SavedModel exported without `encode`/`decode`, `encode` passes the pixels through and
    `decode` runs the whole `caption_pixels`.
    """

    def __init__(self, owner, settings: dict, labels: int | None = None):
        self._owner, self.settings = owner, settings  # the module or loaded SavedModel, owner of the variables
        self.split = hasattr(owner, "encode") and hasattr(owner, "decode")
        self.labels = settings["labels"] if labels is None else min(labels, settings["labels"])

    def preprocess_bytes(self, data: tf.Tensor) -> tf.Tensor:
        return self._owner.preprocess(data)

    def encode(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._owner.encode(pixels) if self.split else {"pixels": pixels}

    def decode(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if not self.split:
            return self.caption_pixels(features["pixels"])
        return self._trimmed(self._owner.decode(features))

    def assess(self, features: dict[str, tf.Tensor], captions: tf.Tensor) -> dict[str, tf.Tensor]:
        """How far to trust given captions (tf.string [B]) of encoded images: {score [B], and confidence,
        in_domain, typicality [B] where the model has a fitted confidence} (see tfcap.confidence)."""
        if not hasattr(self._owner, "assess"):
            raise TfcapError("this SavedModel was exported before tfcap scored given captions; export it again")
        words = text.caption_words(captions, text.TextConfig(**self.settings["model"]["text"]))
        return dict(self._owner.assess(features, words))

    def caption_pixels(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._trimmed(self._owner.caption_pixels(pixels))

    def _trimmed(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The model's outputs with `self.labels` labels per image (none: without the label outputs)."""
        outputs = dict(outputs)
        for key in ("labels", "label_probs"):
            if key in outputs:
                if self.labels:
                    outputs[key] = outputs[key][:, :self.labels]
                else:
                    del outputs[key]
        return outputs

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


def run_decoding(run_dir: Path, beam_size: int | None = None, length_penalty: float | None = None,
                 no_repeat_ngram: int | None = None) -> Decoding:
    """How to caption with RUN_DIR: the arguments where given, else its decoding.json's (a bundled model
    has one: chosen on val), else `Decoding()`'s (beam 3, no length penalty, repeats allowed)."""
    path = Path(run_dir) / DECODING
    chosen = {**dataclasses.asdict(Decoding()), **(json.loads(path.read_text()) if path.is_file() else {})}
    given = {"beam_size": beam_size or None, "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram}
    return Decoding(**{name: chosen[name] if value is None else value for name, value in given.items()})


def run_labels(run_dir: Path, labels: int | None = None) -> int:
    """How many ImageNet labels per image RUN_DIR's captioner gives (its `Captioner.label_count`, without
    loading it) when asked for `labels` (None: `labels.DEFAULT_COUNT`): 0 when its encoder has no classifier."""
    if not models.has_imagenet_classifier(models.read_run_config(run_dir)):
        return 0
    return imagenet_labels.count(labels, len(imagenet_labels.class_names()))


def load_predictor(path: Path | str | None = None, *, beam_size: int | None = None, length_penalty: float | None = None,
                   no_repeat_ngram: int | None = None, labels: int | None = None,
                   precision: str | None = None, decoder_precision: str | None = None) -> Predictor:
    """A predictor over a run directory (decoding settings and the encoder's precision from the
    arguments; default as `run_decoding` and the run's precision; the decoder's matmuls in
    decoder_precision, default auto: `decoder.resolve_precision`; labels: per image, default
    `labels.DEFAULT_COUNT`, 0 for none, none either without a classifier) or an exported SavedModel,
    local or at a URL TensorFlow's file systems read (gs://; all settings fixed at export; asking for
    others, or for more labels than it has, is an error; fewer labels are fine); with no path, over the
    bundled model (`tfcap.pretrained`).

    A local model is loaded once per process: asked for again with its files unchanged and the same
    settings, this returns a predictor over the copy already loaded, its functions already traced (the
    4 models asked for last are kept)."""
    if path is None:
        path = pretrained.path()
    asked = {"beam_size": beam_size, "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram,
             "encoder_precision": precision,
             "decoder_precision": None if decoder_precision == "auto" else decoder_precision}
    if is_url(path):
        return _saved_model_predictor(path, asked, labels)
    path = Path(path)
    if (path / models.CONFIG).is_file():
        decoding = run_decoding(path, beam_size, length_penalty, no_repeat_ngram)
        module = _loaded(path, (decoding, precision, labels, decoder_precision or "auto"),
                         lambda: serving_module(path, decoding, precision, labels, decoder_precision))
        return Predictor(module, json.loads(module.settings))
    if (path / "saved_model.pb").is_file():
        return _saved_model_predictor(str(path), asked, labels)
    raise TfcapError(f"{path} is neither a tfcap run directory (config.json) nor a SavedModel (saved_model.pb)")


# Models this process loaded, newest last: loading and tracing a captioner takes ~1 s for a tiny run and
# seconds for a real one, so a process that asks for the same model again (a notebook, a service, the
# library called per folder) gets the one it has. (folder, options) -> (its files' signature, model): a
# model rewritten since (a run trained again, a SavedModel exported again) is loaded anew in its place.
_LOADED: collections.OrderedDict = collections.OrderedDict()
_LOADED_LOCK = threading.Lock()
_LOADED_KEEP = 4  # models kept (least recently asked for goes first)


def _files_signature(folder: Path) -> tuple:
    """What a model in `folder` is read from, as it is now: name, size, inode and change times of its
    files and of those in its variables/ and assets/ (a SavedModel's)."""
    entries = []
    for sub in (folder, folder / "variables", folder / "assets"):
        if sub.is_dir():
            for entry in os.scandir(sub):
                if entry.is_file():
                    stat = entry.stat()
                    entries.append((entry.path, stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(sorted(entries))


def _loaded(folder: Path, options: tuple, load):
    """`load()`, or what it returned before for the same local model folder, files and options."""
    try:
        key, signature = (str(folder.resolve()), options), _files_signature(folder)
    except OSError:  # a folder its files can be read from but not listed: loaded, not kept
        return load()
    with _LOADED_LOCK:  # one load at a time: threads asking at once for a model (Beam's DirectRunner) load it once
        kept = _LOADED.get(key)
        if kept is not None and kept[0] == signature:
            _LOADED.move_to_end(key)
            return kept[1]
        model = load()
        _LOADED[key] = (signature, model)  # replaces a copy of files since rewritten
        _LOADED.move_to_end(key)
        while len(_LOADED) > _LOADED_KEEP:
            _LOADED.popitem(last=False)
        return model


def _saved_model_predictor(location: str, asked: dict, labels: int | None) -> Predictor:
    if is_url(location):
        loaded = tf.saved_model.load(location)
    else:
        loaded = _loaded(Path(location), (), lambda: tf.saved_model.load(location))
    settings = json.loads(loaded.get_settings().numpy().decode())
    settings.setdefault("encoder_precision", settings["model"]["precision"])  # exported before the option
    settings.setdefault("no_repeat_ngram", 0)  # exported before n-gram blocking: it had none
    settings.setdefault("labels", 0)  # exported before labels: none (its "classifier" is unknown)
    settings.setdefault("decoder_precision", "float32")  # exported before the option
    for name, value in asked.items():
        if value is not None and value != settings[name]:
            raise TfcapError(f"{location} was exported with {name.replace('_', ' ')} {settings[name]}; "
                             f"re-export to use {value}")
    if labels is not None and labels > settings["labels"] and settings.get("classifier") is not False:
        raise TfcapError(f"{location} was exported with {settings['labels']} labels per image"
                         f"{'' if 'classifier' in settings else ' (by a tfcap without labels)'}; "
                         f"re-export with --labels {labels} to get {labels}")
    return Predictor(loaded, settings, labels)
