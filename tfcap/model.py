"""The captioner: encoder + decoder + vocabulary, rebuilt from a run directory alone.

A run directory holds `config.json` (the `ModelConfig` and the training settings), `vocab.txt`,
`encoder.weights.h5` (the encoder's weights, so the run does not depend on the Keras cache or the
original weights file; with `--train-encoder`, its best trained weights) and `best.weights.h5`
(the decoder's best weights).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import tensorflow as tf

import tfcap
from tfcap import confidence, decoder as decoders, decoding, encoder as encoders, images, labels, text
from tfcap.errors import TfcapError
from tfcap.outputs import sha256_file, weights_bytes, write_bytes_atomic, write_text_atomic

CONFIG = "config.json"
VOCAB = "vocab.txt"
ENCODER_WEIGHTS = "encoder.weights.h5"
DECODER_WEIGHTS = "best.weights.h5"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the captioner's graph (weights aside)."""

    encoder: encoders.EncoderConfig
    decoder: decoders.DecoderConfig
    text: text.TextConfig
    precision: str  # resolved dtype policy: float32 | mixed_float16 | mixed_bfloat16
    vocab_size: int
    vocab_sha256: str

    @property
    def max_caption_tokens(self) -> int:
        """Longest caption the decoder generates: max_length words plus `<end>`."""
        return self.text.max_length + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(encoder=encoders.EncoderConfig(**d["encoder"]),
                   decoder=decoders.DecoderConfig.from_dict(d["decoder"]),
                   text=text.TextConfig(**d["text"]), precision=d["precision"], vocab_size=d["vocab_size"],
                   vocab_sha256=d["vocab_sha256"])


def build_decoder(config: ModelConfig, feature_dim: int, grid_locations: int) -> keras.Model:
    """The decoder with its variables created (one dummy call), under the run's precision."""
    with encoders.dtype_policy(config.precision):
        model = decoders.build_decoder(config.vocab_size, config.decoder)
    dummy = {"pooled": tf.zeros([1, feature_dim]), "grid": tf.zeros([1, grid_locations, feature_dim])}
    model(dummy, tf.zeros([1, 2], tf.int32))
    return model


def feature_keys(config: decoders.DecoderConfig) -> tuple[str, ...]:
    return ("grid",) if decoders.needs_grid(config) else ("pooled",)


class Captioner(tf.Module):
    """Images in, captions out, all in TensorFlow graphs (the same graph that `export` saves).

    classifier: the encoder's ImageNet classifier (`tfcap.labels`), or None when it has none.
    assessor: the run's fitted confidence (`tfcap.confidence.Assessor`), or None when it has none.
    """

    def __init__(self, config: ModelConfig, encoder: encoders.Encoder, decoder: keras.Model, vocab: text.Vocabulary,
                 classifier: labels.Classifier | None = None, assessor: confidence.Assessor | None = None):
        super().__init__(name="captioner")
        self.config, self.encoder, self.decoder, self.vocab = config, encoder, decoder, vocab
        self.classifier, self.assessor = classifier, assessor

    def features(self, pixels: tf.Tensor, training: bool = False) -> dict[str, tf.Tensor]:
        """Preprocessed images tf.float32 [B, S, S, 3] -> {"pooled": [B, C], "grid": [B, L, C]} float32.

        training=True (training the encoder from scratch) runs BatchNorm on batch statistics.
        """
        grid = self.encoder.grid(pixels, training=True) if training else self.encoder(pixels)
        flat = tf.reshape(grid, [tf.shape(grid)[0], -1, self.encoder.feature_dim])
        return {"pooled": self.encoder.pool(flat), "grid": flat}

    def generate(self, features: dict[str, tf.Tensor], *, beam_size: int = 3, length_penalty: float = 0.0,
                 no_repeat_ngram: int = 0, max_tokens: int | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Decode features to token ids (no_repeat_ngram: see `decoding.beam_search`).

        Returns (tokens tf.int32 [B, T], scores tf.float32 [B] mean log-prob per token, lengths tf.int32 [B]).
        """
        state, context = self.decoder.initial_state(features)
        max_tokens = max_tokens or self.config.max_caption_tokens
        step = self.decoder.step_function(context)
        if beam_size == 1:
            return decoding.greedy_search(step, state, context, max_length=max_tokens,
                                          no_repeat_ngram=no_repeat_ngram)
        return decoding.beam_search(step, state, context, beam_size=beam_size, max_length=max_tokens,
                                    length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)

    def caption_features(self, features, **kwargs) -> tuple[tf.Tensor, tf.Tensor]:
        """Features -> (captions tf.string [B], scores tf.float32 [B])."""
        tokens, scores, _ = self.generate(features, **kwargs)
        return self.vocab.decode(tokens), scores

    def word_ids(self, captions: tf.Tensor) -> tf.Tensor:
        """Caption strings tf.string [B] -> their word ids tf.int32 [B, max_length], 0-padded (text.encode_captions)."""
        return self.ids_of_words(text.caption_words(captions, self.config.text))

    def ids_of_words(self, words: tf.Tensor) -> tf.Tensor:
        """Words tf.string [B, T], "" past each caption's end -> word ids tf.int32 [B, T], 0 there; unknown
        words are `<unk>`. Only core TensorFlow ops: a SavedModel takes words, not text, because
        normalizing text needs tensorflow-text's ops, which `tf.saved_model.load` alone does not have."""
        return tf.where(words == "", text.PAD_ID, tf.cast(self.vocab.encode(words), tf.int32))

    def assess(self, features: dict[str, tf.Tensor], ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """How far to trust captions `ids` (tf.int32 [B, T], 0-padded word ids) of the images: `score`
        (mean log-probability per token, `<end>` included) tf.float32 [B], and with a fitted confidence
        `confidence` [B], `in_domain` tf.bool [B], `typicality` [B] (see tfcap.confidence)."""
        if self.assessor is not None:
            return self.assessor.assess(features, ids)
        log_p, tokens = confidence.caption_log_probs(self.decoder, features, ids)
        return {"score": log_p / tokens}

    def output_feature_keys(self, labels: int | None = 0) -> tuple[str, ...]:
        """The features `describe` reads: the decoder's, and `pooled` for labels."""
        keys = feature_keys(self.config.decoder)
        return keys if not self.label_count(labels) or "pooled" in keys else (*keys, "pooled")

    def label_count(self, asked: int | None) -> int:
        """How many labels `describe` returns when `asked` for (None: the default): 0 without a classifier."""
        return labels.count(asked, self.classifier.count) if self.classifier is not None else 0

    def describe(self, features: dict[str, tf.Tensor], *, beam_size: int = 3, length_penalty: float = 0.0,
                 no_repeat_ngram: int = 0, labels: int | None = 0) -> dict[str, tf.Tensor]:
        """Features -> every per-image output, a dict of tensors [B, ...] (the columns they make: tfcap.rows):

          captions tf.string [B], scores tf.float32 [B] (mean log-prob per token), and with a classifier and
          `labels` = K > 0 (None: the default), labels tf.string [B, K] and label_probs tf.float32 [B, K]
          (tfcap.labels); with a fitted confidence, confidence tf.float32 [B], in_domain tf.bool [B] and
          typicality tf.float32 [B] of the caption (tfcap.confidence).

        This is the one place a new per-image output is computed: `export` serves this dict as the
        SavedModel's outputs, caption-dir and `tfcap caption` write it through `rows.FIELDS`.
        """
        tokens, scores, _ = self.generate(features, beam_size=beam_size, length_penalty=length_penalty,
                                          no_repeat_ngram=no_repeat_ngram)
        outputs = {"captions": self.vocab.decode(tokens), "scores": scores}
        if self.assessor is not None:
            words = tf.where(tf.cumsum(tf.cast(tokens == text.END_ID, tf.int32), axis=1) == 0, tokens, text.PAD_ID)
            trust = self.assessor.assess(features, words, image_score=scores)  # the search's own log-probabilities
            outputs.update({key: trust[key] for key in ("confidence", "in_domain", "typicality")})
        if self.label_count(labels):
            outputs["labels"], outputs["label_probs"] = self.classifier.top(features["pooled"], self.label_count(labels))
        return outputs

    def preprocess_bytes(self, data: tf.Tensor) -> tf.Tensor:
        """One encoded image (tf.string []) -> tf.float32 [S, S, 3], ready for `features`."""
        return self.encoder.preprocess(images.decode_rgb(data))


def write_run_files(run_dir: Path, config: ModelConfig, vocab: text.Vocabulary, encoder: encoders.Encoder,
                    extra: dict) -> None:
    """config.json, vocab.txt and the encoder's weights: what `load_model` needs besides the decoder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(run_dir / VOCAB)
    write_bytes_atomic(run_dir / ENCODER_WEIGHTS, weights_bytes(encoder.model))
    # The weights' identity (the feature cache's key) beside this file's sha256: while the file is
    # unchanged (a frozen encoder), a resumed run reuses the features of the original weights.
    weights = {"id": encoder.weights_id, "file_sha256": sha256_file(run_dir / ENCODER_WEIGHTS)}
    payload = {"tfcap_version": tfcap.__version__, "model": config.to_dict(), "encoder_weights": weights, **extra}
    write_text_atomic(run_dir / CONFIG, json.dumps(payload, indent=2) + "\n")  # last: it makes a run directory


def with_original_weights_id(encoder: encoders.Encoder, weights_file: Path, saved_weights: dict | None) -> encoders.Encoder:
    """`encoder`, built from a run's `weights_file` (RUN_DIR/encoder.weights.h5), under the id of the
    weights training started with while that file is the one training wrote (its sha256 in
    config.json's `encoder_weights`): the same features, so the feature cache built from them serves
    (a copy has another sha256, the same features)."""
    if isinstance(saved_weights, dict) and "id" in saved_weights and Path(weights_file).is_file() \
            and sha256_file(weights_file) == saved_weights.get("file_sha256"):
        return encoders.Encoder(encoder.config, encoder.model, encoder.precision, saved_weights["id"])
    return encoder


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise TfcapError(f"{run_dir} is not a tfcap run directory (no {CONFIG}); train one with tfcap train")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TfcapError(f"{path} is damaged ({e}); train again or restore it") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise TfcapError(f"{path} is damaged (no model settings); train again or restore it")
    return config


def load_vocabulary_checked(run_dir: Path, config: ModelConfig) -> text.Vocabulary:
    vocab = text.Vocabulary.load(Path(run_dir) / VOCAB)
    if vocab.sha256 != config.vocab_sha256 or len(vocab) != config.vocab_size:
        raise TfcapError(f"{Path(run_dir) / VOCAB} does not match the model ({len(vocab)} words, sha256 "
                         f"{vocab.sha256[:12]}; config.json says {config.vocab_size} words, {config.vocab_sha256[:12]})")
    return vocab


# config.json's "encoder_weights" of a bundled model (tools/bundle_model.py) whose encoder kept its
# ImageNet weights: it ships without encoder.weights.h5, and they come from the Keras cache (or the
# installed package they are converted from), as in training. Said explicitly, so that a run
# directory that lost its encoder.weights.h5 is an error, not silently another encoder.
FROM_DEPENDENCY = {"from": "imagenet"}


def encoder_from_dependency(saved: dict) -> bool:
    """Whether a run's config.json (as read) marks its encoder weights as the installed ImageNet ones."""
    return (saved.get("encoder_weights") == FROM_DEPENDENCY and saved["model"]["encoder"]["weights"] == "imagenet"
            and not saved.get("train", {}).get("train_encoder"))


def has_imagenet_classifier(saved: dict) -> bool:
    """Whether a run's config.json (as read) describes an encoder whose ImageNet classifier fits its features:
    a frozen EfficientNet-Lite with ImageNet weights (the bundled model's too; see tfcap.labels)."""
    encoder = saved["model"]["encoder"]
    return labels.has_imagenet_classifier(encoder["name"], encoder["weights"],
                                          bool(saved.get("train", {}).get("train_encoder")))


def load_model(run_dir: Path, weights: str = DECODER_WEIGHTS, encoder_precision: str | None = None, *,
               inference: bool = False, decoder_precision: str | None = None) -> Captioner:
    """Rebuild the captioner from a run directory; TfcapError on a missing file or a vocab/config mismatch.

    encoder_precision overrides the run's dtype policy for the encoder only (the weights are float32
    either way): "mixed_bfloat16" runs Xception 1.3x to 1.9x faster on CPUs with AMX or AVX512-BF16. The
    decoder keeps the run's dtype policy; for captioning, its matmuls may run in bfloat16 (below).
    inference=True builds the encoder with BatchNorm folded into its convolutions (faster, cannot train;
    see encoder.fold_batch_norm) and freezes the decoder (`AttentionDecoder.freeze`), its matmuls in
    `decoder_precision` (`decoder.resolve_precision`: None is "auto"): for captioning and export.
    """
    run_dir = Path(run_dir)
    try:
        saved = read_run_config(run_dir)
        config = ModelConfig.from_dict(saved["model"])
    except (KeyError, TypeError) as e:
        raise TfcapError(f"{run_dir / CONFIG} does not describe a model this tfcap builds ({type(e).__name__}: "
                         f"{e}); train again or restore it") from None
    vocab = load_vocabulary_checked(run_dir, config)
    matmul_precision = decoders.resolve_precision(decoder_precision, config.decoder.kind) if inference else None
    imagenet_encoder = encoder_from_dependency(saved)
    for name in ((weights,) if imagenet_encoder else (ENCODER_WEIGHTS, weights)):
        if not (run_dir / name).is_file():
            raise TfcapError(f"{run_dir} has no {name}; was training interrupted before the first epoch ended?")
    encoder_config = config.encoder if imagenet_encoder else dataclasses.replace(
        config.encoder, weights=str(run_dir / ENCODER_WEIGHTS))
    encoder = encoders.build_encoder(encoder_config, encoder_precision or config.precision, inference=inference)
    grid_h, grid_w = encoder.grid_shape
    decoder = build_decoder(config, encoder.feature_dim, grid_h * grid_w)
    try:
        decoder.load_weights(str(run_dir / weights))
    except (ValueError, KeyError) as e:
        raise TfcapError(f"{run_dir / weights} does not fit the decoder in config.json: {str(e).splitlines()[0]}") from None
    if inference:
        decoder.freeze(matmul_precision)
    classifier = labels.imagenet_classifier(config.encoder.name) if has_imagenet_classifier(saved) else None
    return Captioner(config, encoder, decoder, vocab, classifier,
                     confidence.load(run_dir, decoder, config.vocab_size, encoder.feature_dim))
