"""The training loop behind `tfcap train`: cached features (or images) in, a run directory out.

One `tf.function` train step does teacher forcing on whole padded captions (every position in one
pass), masked sparse cross-entropy, loss scaling under float16, global-norm gradient clipping and
an LR schedule. Each epoch ends with the validation loss; every `eval_every` epochs and after the
last, batched greedy decoding of the validation images gives BLEU-4, which picks the best weights
and stops early.

By default the encoder is frozen and its features are computed once (the feature cache). With
`train_encoder` the CNN is trained with the decoder, as im2txt's `train_inception` does: images are
decoded every epoch and batched by image with all their captions, so each image is encoded once per
step. A CNN trained from scratch (weights "none") uses batch statistics in BatchNorm; a pretrained
one keeps its moving statistics (Keras' fine-tuning advice: small batches would wreck them).

Resuming is exact: batches are a pure function of (seed, epoch), dropout is seeded by the global
step, and the checkpoint records the step within the epoch (counted inside the train step's graph,
with the update) and the epoch's running loss, token and time sums, so an interrupted run continues
with the very batch it would have trained on next and its epoch's metrics line covers the whole epoch.

Under a tf.distribute strategy (`tfcap.distribute`: mirrored, multi-worker) the same step runs per
replica on a slice of the same global batch, with the loss normalized by the global token count and
the gradients summed over replicas before clipping, so it computes the one-device update; the
counters are updated once per step in cross-replica context. Only the chief writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import click
import keras
import numpy as np
import tensorflow as tf

from tfcap import (decoder as decoders, distribute, encoder as encoders, features, inputs, metrics, model as models,
                   records, scst, text)
from tfcap.errors import Interrupted, TfcapError
from tfcap.outputs import Output, append_to, weights_bytes, write_files_atomic, write_text_atomic
from tfcap.progress import Stopwatch, summary

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOGS = "logs"
# none | flip: the training images mirrored left-right, each with probability 1/2, drawn anew each
# epoch (a picture mirrored is still described by its captions; Flickr8k's rarely say left or right).
AUGMENTATIONS = ("none", "flip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the decoder is trained. Saved in config.json; a resumed run must use the same (but for
    epochs, strategy and devices)."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # cosine (to 10% over the run, after warmup) | constant
    warmup_steps: int = 100
    clip_norm: float = 5.0
    captions_per_image: str = "all"  # one (a random caption per image per epoch) | all
    augment: str = "none"  # none | flip: each training image mirrored left-right with probability 1/2 per epoch
    eval_every: int = 1  # epochs between validation BLEU-4 evaluations, and the last epoch; 0: never
    eval_images: int = 0  # validation images decoded for BLEU-4; 0: all
    patience: int = 3  # evaluations without BLEU-4 improvement before stopping early; 0: never stop
    seed: int = 0
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    train_encoder: bool = False  # train the CNN too; then batch_size counts images, each with all its captions
    objective: str = "xe"  # xe: cross-entropy (teacher forcing) | scst: self-critical, CIDEr-D reward (tfcap.scst)
    init: str = ""  # scst: the run directory whose model and best weights it starts from
    samples: int = 5  # scst: captions sampled per image (batch_size counts images)
    baseline: str = "mean"  # scst: mean (of the image's other samples) | greedy (the greedy caption's reward)
    select: str = "bleu4"  # validation metric that picks the best weights and stops early: bleu4 | cider
    # Epochs the LR schedule spans; None: `epochs`. `--resume --epochs N` keeps the original span, so
    # the epochs trained so far are unchanged and those beyond it run at the cosine's floor.
    schedule_epochs: int | None = None
    # Where it trains (tfcap.distribute): auto | one-device | mirrored | multi-worker, and the devices
    # of one-device or mirrored ("GPU:0,GPU:1"; "": all GPUs). --resume may change them: a run may move.
    strategy: str = "auto"
    devices: str = ""

    def __post_init__(self):
        if self.captions_per_image not in ("one", "all"):
            raise TfcapError("--captions-per-image must be one or all")
        if self.augment not in AUGMENTATIONS:
            raise TfcapError(f"--augment must be one of {', '.join(AUGMENTATIONS)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise TfcapError("--lr-schedule must be cosine or constant")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise TfcapError("--epochs, --batch-size and --learning-rate must be positive")
        if self.objective not in ("xe", "scst"):
            raise TfcapError("--objective must be xe or scst")
        if self.select not in ("bleu4", "cider"):
            raise TfcapError("--select must be bleu4 or cider")
        if self.objective == "scst":
            if not self.init:
                raise TfcapError("--objective scst needs --init RUN_DIR: a run trained with cross-entropy to start from")
            if self.train_encoder:
                raise TfcapError("--objective scst trains the decoder only: drop --train-encoder")
            if self.baseline not in scst.BASELINES:
                raise TfcapError(f"--baseline must be one of {', '.join(scst.BASELINES)}")
            if self.samples < (2 if self.baseline == "mean" else 1):
                raise TfcapError("--samples must be at least 2 with --baseline mean (1 with greedy)")
        if self.schedule_epochs is not None and self.schedule_epochs < 1:
            raise TfcapError("schedule_epochs must be positive")
        if self.strategy not in distribute.STRATEGIES:
            raise TfcapError(f"--strategy must be one of {', '.join(distribute.STRATEGIES)}")
        if self.strategy in distribute.DISTRIBUTED and (self.objective == "scst" or self.train_encoder):
            # SCST rewards its samples in NumPy between two graphs, and a trained encoder's batches are
            # by image with BatchNorm statistics per batch: neither is split over replicas (yet).
            raise TfcapError(f"--strategy {self.strategy} trains the decoder by cross-entropy only: "
                             + ("--objective scst" if self.objective == "scst" else "--train-encoder")
                             + " runs with --strategy one-device (auto)")


def masked_cross_entropy_sum(targets: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed cross-entropy over non-pad targets.

    Args:
      targets: tf.int32 [B, T]; logits: tf.float32 [B, T, V] (B may be 0: a replica's empty slice).
    Returns:
      (sum of the token losses tf.float32 [], number of target tokens tf.float32 []).
    """
    mask = tf.cast(tf.not_equal(targets, text.PAD_ID), tf.float32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(losses * mask), tf.reduce_sum(mask)


def masked_cross_entropy(targets: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean cross-entropy over non-pad targets: (mean loss tf.float32 [], target tokens tf.float32 []),
    shapes as in `masked_cross_entropy_sum`."""
    total, tokens = masked_cross_entropy_sum(targets, logits)
    return total / tf.maximum(tokens, 1.0), tokens


def _clip_by_global_norm(gradients: list, clip_norm) -> list:
    """Gradients (dense tensors or None) scaled by min(1, clip_norm / their global L2 norm); NaN where
    that norm is not finite. The arithmetic of Keras' `global_clipnorm`, which clips one device's
    gradients, so that a distributed run computes what one device does."""
    norm = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in gradients if g is not None])))
    scale = clip_norm * tf.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)  # + (norm - norm): inf, NaN -> NaN
    return [None if g is None else g * scale for g in gradients]


class _SummedGradientsAdam(keras.optimizers.Adam):
    """Adam for gradients that the train step has already summed over the replicas and clipped.

    Keras' optimizer sums the replicas' gradients itself, but only after clipping each replica's
    own (`global_clipnorm` would then bound the wrong norm); so the trainer all-reduces, clips the
    sum like one device, and this optimizer applies it as it is. On one device there is nothing to sum.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars


def _schedule(config: TrainConfig, total_steps: int):
    if config.lr_schedule == "constant":
        return config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps // 10, 1))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.1, decay_steps=max(total_steps - warmup, 1), alpha=0.1,
        warmup_target=config.learning_rate, warmup_steps=warmup)


def _images_per_step(manifest: dict, config: TrainConfig, decoder_config: decoders.DecoderConfig,
                     distributed: bool) -> int:
    """Images per training step when the batches are of images with all their captions; 0 when of captions.

    --train-encoder and SCST: batch_size images. The attention decoder with a projected grid
    (context_dim) on one device: as many images as hold about batch_size captions, so that each
    image's grid is projected once per step for all its captions. Attention runs from before
    context_dim keep the caption batches they were trained on, so that they resume exactly.
    """
    if config.captions_per_image != "all":
        return 0
    if config.train_encoder or config.objective == "scst":
        return config.batch_size
    if decoders.needs_grid(decoder_config) and decoder_config.context_dim and not distributed:
        split = manifest["splits"]["train"]
        return max(1, round(config.batch_size * split["images"] / max(split["captions"], 1)))
    return 0


def _steps_per_epoch(manifest: dict, split: str, config: TrainConfig, images_per_step: int) -> int:
    if images_per_step:
        return max(1, math.ceil(manifest["splits"][split]["images"] / images_per_step))
    n = manifest["splits"][split]["images" if config.captions_per_image == "one" else "captions"]
    return max(1, math.ceil(n / config.batch_size))


class _Trainer:
    """State and compiled steps of one run; `fit` is the epoch loop."""

    def __init__(self, captioner: models.Captioner, train_config: TrainConfig, total_steps: int, run_dir: Path,
                 reward: metrics.TokenCiderD | None = None, placement: distribute.Placement | None = None,
                 images_per_step: int | None = None):
        """Under `placement`'s strategy scope when it is given (its variables are then the strategy's).
        images_per_step: see `_images_per_step`; None: batch_size with --train-encoder or SCST, else 0."""
        self.captioner, self.config, self.run_dir = captioner, train_config, run_dir
        if images_per_step is None:
            by_image = train_config.train_encoder or train_config.objective == "scst"
            images_per_step = train_config.batch_size if by_image else 0
        self.images_per_step = images_per_step
        self.placement = placement or distribute.Placement(tf.distribute.get_strategy(), "one-device")
        self.decoder, self.encoder = captioner.decoder, captioner.encoder
        self.train_encoder = train_config.train_encoder
        self.batch_norm_training = self.train_encoder and captioner.config.encoder.weights == "none"
        self.keys = ("image",) if self.train_encoder else models.feature_keys(captioner.config.decoder)
        self.variables = self.decoder.trainable_variables + (
            self.encoder.model.trainable_variables if self.train_encoder else [])
        # Distributed: clipped in apply_gradients, after the sum over replicas. One device: by Keras,
        # as before tf.distribute (its dense norm of the embedding's IndexedSlices costs 2-3% of a step).
        optimizer = _SummedGradientsAdam(_schedule(train_config, total_steps), name="adam", global_clipnorm=(
            None if self.placement.distributed else train_config.clip_norm))
        if captioner.config.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # float16 gradients underflow otherwise
        self.optimizer = optimizer
        self.optimizer.build(self.variables)
        self.epoch = tf.Variable(0, dtype=tf.int64, name="epoch")  # completed epochs
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, name="step_in_epoch")
        self.global_step = tf.Variable(0, dtype=tf.int64, name="global_step")
        self.best_score = tf.Variable(-np.inf, dtype=tf.float64, name="best_score")
        self.bad_evals = tf.Variable(0, dtype=tf.int64, name="bad_evals")
        # The epoch's running sums, checkpointed so that a resumed epoch's metrics cover all of it.
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, name="loss_sum")  # sum of loss * tokens
        self.token_sum = tf.Variable(0.0, dtype=tf.float64, name="token_sum")
        self.first_loss = tf.Variable(np.nan, dtype=tf.float64, name="first_loss")
        self.epoch_seconds = tf.Variable(0.0, dtype=tf.float64, name="epoch_seconds")  # training time so far
        self.train_step, self._step_graph, self.batch_spec = self._train_step_graph, None, None
        self._val_pipelines: dict[str, tuple[tf.data.Dataset, tf.data.Dataset]] = {}
        self.self_critical = None
        if train_config.objective == "scst":
            self.self_critical = scst.SelfCritical(self, reward, train_config.samples, train_config.baseline)
            self.train_step = self.self_critical.step
        trained = {"decoder": self.decoder, **({"encoder": self.encoder.model} if self.train_encoder else {})}
        if self.self_critical:  # its running reward sums, like the loss sums
            trained["self_critical_sums"] = self.self_critical.sums
        self.checkpoint = tf.train.Checkpoint(**trained, optimizer=self.optimizer, epoch=self.epoch,
                                              step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                                              best_score=self.best_score, bad_evals=self.bad_evals,
                                              loss_sum=self.loss_sum, token_sum=self.token_sum,
                                              first_loss=self.first_loss, epoch_seconds=self.epoch_seconds)
        # What checkpoints of tfcap before the running sums hold (they still resume).
        self.checkpoint_without_sums = tf.train.Checkpoint(
            **trained, optimizer=self.optimizer, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            global_step=self.global_step, best_score=self.best_score, bad_evals=self.bad_evals)
        # Every worker saves (saving may create variables, collectively under multi-worker), but only
        # the chief into the run directory: the others into a scratch directory deleted after each save.
        # Named, not created: the first save creates it, so a worker that never saves leaves nothing.
        self.scratch = (None if self.placement.is_chief
                        else Path(tempfile.gettempdir()) / f"tfcap-worker-{uuid.uuid4().hex}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.scratch or run_dir / CHECKPOINTS),
                                                  max_to_keep=2)
        # The save counter is created on first use, collectively under multi-worker: create it here,
        # on every worker, so that a save on one worker alone (Ctrl-C) does not wait for the others.
        self.checkpoint.save_counter  # noqa: B018
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)
        self.decode_step = tf.function(
            lambda feats: captioner.generate(self._features(feats), beam_size=1)[0], reduce_retracing=True)

    def _features(self, feats, training: bool = False) -> dict[str, tf.Tensor]:
        """Decoder features of a batch: the cached ones, or the encoder's on images (train_encoder)."""
        if self.train_encoder:
            feats = self.captioner.features(feats["image"], training=training and self.batch_norm_training)
        return feats

    def _train_step_graph(self, *batch):
        """`_train_step` as one graph for every batch and caption length, traced once from
        `batch_spec`: the training batches' element spec (per-replica under a distributed strategy),
        set by `fit`. Without it (a caller of its own), traced from the first batch and relaxed on
        the second's shapes, as `reduce_retracing` does."""
        if self._step_graph is None:
            self._step_graph = tf.function(self._train_step, **(
                {"reduce_retracing": True} if self.batch_spec is None else {"input_signature": tuple(self.batch_spec)}))
        return self._step_graph(*batch)

    def _train_step(self, feats, inputs_, targets, owners=None):
        """One step on a global batch (per-replica slices under a distributed strategy, see
        `distribute.replica_batches`): returns (token-mean loss tf.float32 [], tokens tf.float32 [])."""
        strategy = self.placement.strategy
        loss_sum, tokens = strategy.run(self._replica_step, (feats, inputs_, targets, owners))
        loss_sum, tokens = (strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in (loss_sum, tokens))
        loss = loss_sum / tf.maximum(tokens, 1.0)
        self.count_step(loss, tokens)  # cross-replica: counted once per step, from the summed values
        return loss, tokens

    def _replica_step(self, feats, inputs_, targets, owners):
        """A replica's share: its loss is its summed token losses over the GLOBAL token count (and its
        rows' share of the attention penalty, a mean over the batch), so that the replicas' gradients
        sum to the one-device gradient of the whole batch. Returns (summed loss, tokens) of its slice."""
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), self.global_step])
        rows = tf.cast(tf.shape(targets)[0], tf.float32)
        local_tokens = tf.reduce_sum(tf.cast(tf.not_equal(targets, text.PAD_ID), tf.float32))
        all_tokens, all_rows = self._sum_over_replicas([local_tokens, rows])
        with tf.GradientTape() as tape:
            logits, penalty = self.decoder(self._features(feats, training=True), inputs_, seed=seed, owners=owners)
            loss_sum, tokens = masked_cross_entropy_sum(targets, logits)
            # multiply_no_nan: an empty slice's penalty is a mean over no rows (NaN), its share 0.
            total = loss_sum / tf.maximum(all_tokens, 1.0) + tf.math.multiply_no_nan(penalty, rows / all_rows)
            scaled = self.optimizer.scale_loss(total)
        self.apply_gradients(tape.gradient(scaled, self.variables))
        return loss_sum, tokens

    def _sum_over_replicas(self, values: list) -> list:
        """All-reduced sums (identity on one device); values: tensors, None passed through."""
        if not self.placement.distributed:
            return values
        present = [v for v in values if v is not None]
        summed = iter(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present))
        return [None if v is None else next(summed) for v in values]

    def apply_gradients(self, gradients: list) -> None:
        """Sum the gradients over the replicas, clip them by global norm and apply them (also SCST's).

        Args:
          gradients: of `self.optimizer.scale_loss(loss)` w.r.t. `self.variables` (None where unused).
        """
        if not self.placement.distributed:  # nothing to sum; the optimizer clips (global_clipnorm)
            self.optimizer.apply(gradients, self.variables)
            return
        # Dense: the embedding's gradient comes as IndexedSlices, one row per word of the batch,
        # repeated words apart; the norm is the dense gradient's (as Keras' global_clipnorm has it).
        gradients = self._sum_over_replicas([None if g is None else tf.convert_to_tensor(g) for g in gradients])
        if self.config.clip_norm > 0:
            # A LossScaleOptimizer's gradients are of the scaled loss: clip at the scaled norm (it
            # unscales them in apply); non-finite ones stay non-finite, so it still skips the step.
            scale = getattr(self.optimizer, "dynamic_scale", None)
            gradients = _clip_by_global_norm(
                gradients, self.config.clip_norm * (1.0 if scale is None else tf.cast(scale, tf.float32)))
        self.optimizer.apply(gradients, self.variables)

    def count_step(self, loss: tf.Tensor, tokens: tf.Tensor) -> None:
        """The step and the epoch's running sums, inside the train step's graph (also SCST's).

        Counted in the same graph as the update: Ctrl-C reaches Python only between steps, so a
        checkpoint never holds an applied batch that is not counted (--resume would train it twice).
        """
        loss64, tokens64 = tf.cast(loss, tf.float64), tf.cast(tokens, tf.float64)
        self.first_loss.assign(tf.where(self.step_in_epoch == 0, loss64, self.first_loss))
        self.loss_sum.assign_add(loss64 * tokens64)
        self.token_sum.assign_add(tokens64)
        self.step_in_epoch.assign_add(1)
        self.global_step.assign_add(1)

    def _eval_step(self, feats, inputs_, targets, owners=None):
        logits, _ = self.decoder(self._features(feats), inputs_, owners=owners)
        loss, tokens = masked_cross_entropy(targets, logits)
        return loss * tokens, tokens

    def batches(self, data: tf.data.Dataset, *, shuffle: bool, epoch: int = 0, captions_per_image: str = "all"):
        """Training or validation batches: (features, inputs, targets[, owners]), see `tfcap.inputs`."""
        if self.images_per_step and captions_per_image == "all":
            # Cross-entropy by image (the attention decoder): images of similar longest captions.
            by_length = shuffle and not (self.train_encoder or self.self_critical)
            return inputs.image_caption_batches(data, batch_size=self.images_per_step, feature_keys=self.keys,
                                                shuffle=shuffle, seed=self.config.seed, epoch=epoch,
                                                by_length=by_length)
        return inputs.caption_batches(data, batch_size=self.config.batch_size, feature_keys=self.keys,
                                      captions_per_image=captions_per_image, shuffle=shuffle,
                                      seed=self.config.seed, epoch=epoch)

    def augmented(self, train_features: tf.data.Dataset, epoch: int) -> tf.data.Dataset:
        """An epoch's training examples under `config.augment`: for "flip", the examples are
        (features, mirrored features) pairs (or decoded images, with train_encoder), each resolved
        to one view per image by `inputs.mirrored_half`."""
        if self.config.augment == "none":
            return train_features
        mirror = inputs.mirror_image if self.train_encoder else inputs.mirror_features
        return inputs.mirrored_half(train_features, mirror, seed=self.config.seed, epoch=epoch)

    def save_best(self) -> None:
        """The trained weights (decoder, and the encoder when it is trained) into the run directory,
        each written to a hidden name, then both renamed (`outputs.write_files_atomic`)."""
        pairs = [(self.decoder, models.DECODER_WEIGHTS)]
        if self.train_encoder:
            pairs.insert(0, (self.encoder.model, models.ENCODER_WEIGHTS))
        write_files_atomic({self.run_dir / name: weights_bytes(model) for model, name in pairs})

    def learning_rate(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def _val_pipeline(self, kind: str, val_features: tf.data.Dataset, build) -> tf.data.Dataset:
        """The validation batches of `kind`, built once per validation dataset: they are the same every
        epoch, and building a pipeline traces its map functions (a quarter of a tiny run's time)."""
        cached = self._val_pipelines.get(kind)
        if cached is None or cached[0] is not val_features:
            cached = self._val_pipelines[kind] = (val_features, build())
        return cached[1]

    def validation_loss(self, val_features) -> float:
        total, count = 0.0, 0.0
        for batch in self._val_pipeline("loss", val_features, lambda: self.batches(val_features, shuffle=False)):
            loss_sum, tokens = self.eval_step(*batch)
            total, count = total + float(loss_sum), count + float(tokens)
        return total / max(count, 1.0)

    def val_scores(self, val_features) -> dict[str, float]:
        """Corpus BLEU-4 and CIDEr-D of greedy captions of the validation images (coco-caption's definitions):
        {"val_bleu4", "val_cider"}."""
        data = val_features.take(self.config.eval_images) if self.config.eval_images else val_features
        batches = self._val_pipeline("scores", val_features, lambda: inputs.image_feature_batches(
            data, batch_size=128, feature_keys=self.keys))
        references, hypotheses = {}, {}
        for feats, captions, image_ids in batches:
            decoded = self.captioner.vocab.decode(self.decode_step(feats)).numpy()
            for image_id, hypothesis, refs in zip(image_ids.numpy(), decoded, captions.to_list()):
                references[image_id] = [r.decode("utf-8") for r in refs]
                hypotheses[image_id] = hypothesis.decode("utf-8")
        references = {k: [metrics.ptb_tokenize(r) for r in v] for k, v in references.items()}
        hypotheses = {k: metrics.ptb_tokenize(v) for k, v in hypotheses.items()}
        return {"val_bleu4": metrics.score_bleu(references, hypotheses)[0][3],
                "val_cider": metrics.score_cider_d(references, hypotheses)[0]}

    def save_checkpoint(self) -> str:
        """A checkpoint of the whole state; returns its path (a non-chief worker's is already deleted)."""
        path = self.manager.save(checkpoint_number=int(self.global_step.numpy()))
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return path

    def fit(self, train_features, val_features, steps_per_epoch: int, show_progress: bool) -> dict:
        """The epoch loop; under multi-worker, a lost worker ends it with TfcapError (restart all with --resume)."""
        try:
            return self._fit(train_features, val_features, steps_per_epoch, show_progress)
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.AbortedError, tf.errors.InternalError, tf.errors.FailedPreconditionError) as e:
            if self.placement.name != "multi-worker":
                raise
            # The message's first line is often a frame ("Graph execution error:"): name the abort instead.
            lines = [re.sub(r"^\{\{.*?\}\}\s*", "", line).strip() for line in (e.message or str(e)).splitlines()]
            cause = next((line for line in lines if "abort" in line.lower()),
                         next((line for line in lines if line and not line.endswith(":")), type(e).__name__))[:160]
            raise TfcapError(f"multi-worker training stopped, a worker is gone ({cause}); start every worker again "
                             f"with --resume to continue from the last checkpoint") from None

    def _fit(self, train_features, val_features, steps_per_epoch: int, show_progress: bool) -> dict:
        chief = self.placement.is_chief
        writer = tf.summary.create_file_writer(str(self.run_dir / LOGS)) if chief else tf.summary.create_noop_writer()
        clock, last = Stopwatch(), {}
        while int(self.epoch.numpy()) < self.config.epochs:
            epoch, skip = int(self.epoch.numpy()), int(self.step_in_epoch.numpy())
            batches = distribute.replica_batches(self.placement, lambda: self.batches(
                self.augmented(train_features, epoch), shuffle=True, epoch=epoch,
                captions_per_image=self.config.captions_per_image).skip(skip))
            self.batch_spec = self.batch_spec or batches.element_spec  # the same every epoch
            epoch_clock, session_tokens = Stopwatch(), 0.0
            label = f"epoch {epoch + 1}/{self.config.epochs}"
            bar = click.progressbar(length=steps_per_epoch, label=label, file=sys.stderr, show_pos=True,
                                    item_show_func=lambda s: s, width=24) if show_progress else None
            try:
                if bar:
                    bar.__enter__()
                    bar.update(skip)
                for batch in batches:
                    loss, tokens = self.train_step(*batch)
                    if bar and self.self_critical:
                        bar.update(1, f"reward {self.self_critical.stats()['reward']:.3f}")
                    elif bar:
                        session_tokens += float(tokens)
                        bar.update(1, f"loss {float(loss):.3f} {session_tokens / epoch_clock.seconds:,.0f} tok/s")
            except KeyboardInterrupt:
                self.epoch_seconds.assign_add(epoch_clock.seconds)
                path = self.save_checkpoint()
                if not self.placement.is_chief:
                    raise Interrupted("interrupted: a worker keeps no checkpoint of its own (the chief's count); "
                                      "continue every worker with --resume") from None
                raise Interrupted(f"interrupted: checkpoint {path} saved at epoch {epoch + 1}, step "
                                  f"{int(self.step_in_epoch.numpy())}; continue with --resume") from None
            finally:
                if bar:
                    bar.__exit__(None, None, None)
            seconds = float(self.epoch_seconds.numpy()) + epoch_clock.seconds  # over all sessions of this epoch
            token_sum, first_loss = float(self.token_sum.numpy()), float(self.first_loss.numpy())
            record = {"epoch": epoch + 1, "loss": float(self.loss_sum.numpy()) / max(token_sum, 1.0),
                      "first_batch_loss": None if math.isnan(first_loss) else first_loss,
                      "val_loss": self.validation_loss(val_features), "learning_rate": self.learning_rate(),
                      "tokens_per_s": token_sum / max(seconds, 1e-9), "epoch_seconds": seconds,
                      "steps": int(self.step_in_epoch.numpy())}
            if self.self_critical:  # "loss" is the policy-gradient surrogate; tokens_per_s counts samples
                record.update({"samples_per_s": record.pop("tokens_per_s"), **self.self_critical.stats()})
            improved = False
            # The last epoch is always evaluated: a run shorter than eval_every still picks its best weights.
            if self.config.eval_every and ((epoch + 1) % self.config.eval_every == 0
                                           or epoch + 1 == self.config.epochs):
                record.update(self.val_scores(val_features))
                score = record[f"val_{self.config.select}"]
                improved = score > float(self.best_score.numpy())
            elif not self.config.eval_every:
                improved = -record["val_loss"] > float(self.best_score.numpy())  # no BLEU: best by validation loss
                score = -record["val_loss"]
            if improved:
                self.best_score.assign(score)
                self.bad_evals.assign(0)
                if chief:
                    self.save_best()
            elif f"val_{self.config.select}" in record:
                self.bad_evals.assign_add(1)
            record["best"] = improved
            if chief:  # the whole line or none (a full disk): resume reads every line
                append_to(self.run_dir / METRICS, (json.dumps(record) + "\n").encode())
            with writer.as_default(step=epoch + 1):
                for key in ("loss", "val_loss", "val_bleu4", "val_cider", "learning_rate", "tokens_per_s",
                            "samples_per_s", "reward", "greedy_cider"):
                    if key in record:
                        tf.summary.scalar(key, record[key])
            rate = (f"{record['samples_per_s']:,.0f} samples/s" if self.self_critical
                    else f"{record['tokens_per_s']:,.0f} tokens/s")
            click.echo(f"epoch {epoch + 1}: loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}"
                       + (f", reward {record['reward']:.4f}, greedy CIDEr-D {record['greedy_cider']:.4f}"
                          if self.self_critical else "")
                       + (f", val BLEU-4 {record['val_bleu4']:.4f}, val CIDEr-D {record['val_cider']:.4f}"
                          if "val_bleu4" in record else "")
                       + f", {rate}, {seconds:.1f} s" + (" (best)" if improved else ""), err=True)
            self.epoch.assign_add(1)
            self.step_in_epoch.assign(0)
            for total in (self.loss_sum, self.token_sum, self.epoch_seconds,
                          *(self.self_critical.sums.values() if self.self_critical else ())):
                total.assign(tf.zeros_like(total))
            self.first_loss.assign(np.nan)
            self.save_checkpoint()
            last = record
            if self.config.patience and int(self.bad_evals.numpy()) >= self.config.patience:
                click.echo(f"early stop: no {'BLEU-4' if self.config.select == 'bleu4' else 'CIDEr-D'} improvement "
                           f"in {self.config.patience} evaluations", err=True)
                break
        writer.close()
        return {"epochs": int(self.epoch.numpy()), "seconds": clock.seconds,
                "best_score": float(self.best_score.numpy()), **last}


def _init_model(init_dir: Path, vocab: text.Vocabulary, records_dir: Path):
    """(ModelConfig, EncoderConfig) of the run that self-critical training starts from.

    The encoder is built from the weights the init run was built from, not its copy in
    encoder.weights.h5, so that the feature cache is shared; unless the init run trained its encoder.
    """
    saved = models.read_run_config(init_dir)
    model_config = models.ModelConfig.from_dict(saved["model"])
    if model_config.vocab_sha256 != vocab.sha256:
        raise TfcapError(f"{records_dir} has a different vocabulary from the one {init_dir} was trained on "
                         f"({vocab.sha256[:12]} vs {model_config.vocab_sha256[:12]})")
    if not (init_dir / models.DECODER_WEIGHTS).is_file():
        raise TfcapError(f"{init_dir} has no {models.DECODER_WEIGHTS} to start from")
    encoder_config = model_config.encoder
    if saved.get("train", {}).get("train_encoder"):
        encoder_config = dataclasses.replace(encoder_config, weights=str(init_dir / models.ENCODER_WEIGHTS))
    return model_config, encoder_config


def _resumed_encoder(config: encoders.EncoderConfig, precision: str, saved_weights: dict | None) -> encoders.Encoder:
    """The run's encoder from RUN_DIR/encoder.weights.h5. While that file is the one training
    started with (sha256 in config.json), its weights are the original ones, so it keeps their id
    and the feature cache built from them serves (a copy has another sha256, the same features)."""
    return models.with_original_weights_id(encoders.build_encoder(config, precision), Path(config.weights),
                                           saved_weights)


# Settings whose option is not "--" + the field name with dashes.
_OPTION_NAMES = {"encoder.name": "--encoder", "encoder.weights": "--encoder-weights", "decoder.kind": "--decoder"}


def _resumed_train_config(run_dir: Path, saved: dict, given: dict) -> TrainConfig:
    """The run's saved TrainConfig, extended to `given["train.epochs"]` if that is given.

    Args:
      saved: the run's config.json.
      given: the settings given again with --resume, as "section.field" -> value, section one of
        encoder, decoder, train (e.g. {"decoder.kind": "merge"}). train.strategy and train.devices
        replace the saved ones; any other but train.epochs that differs from the saved one raises
        TfcapError naming its option.
    """
    train_config = TrainConfig(**saved["train"])
    sections = {"encoder": saved["model"]["encoder"],
                "train": dataclasses.asdict(train_config),  # with the fields added since, as the decoder's
                "decoder": dataclasses.asdict(decoders.DecoderConfig.from_dict(saved["model"]["decoder"]))}
    for key, value in given.items():
        section, field = key.split(".")
        had = sections[section].get(field)
        if key in ("train.epochs", "train.strategy", "train.devices") or value == had:
            continue
        if key == "encoder.image_size" and had is None and value == encoders.EncoderConfig(**sections["encoder"]).size:
            continue
        if key == "train.precision" and value == saved["model"]["precision"]:  # "auto" resolved to it
            continue
        if key == "encoder.weights" and Path(str(value)).is_file() and Path(str(had)).is_file() \
                and Path(str(value)).resolve() == Path(str(had)).resolve():
            continue
        option = _OPTION_NAMES.get(key, "--" + field.replace("_", "-"))
        raise TfcapError(f"{option} {value} differs from the {had} that {run_dir} was trained with: --resume keeps "
                         "a run's settings but --epochs; train a new run (another -o) to change it")
    placement = {field: given[f"train.{field}"] for field in ("strategy", "devices") if f"train.{field}" in given}
    if placement:  # where a run trains is no part of what it learns
        train_config = dataclasses.replace(train_config, **placement)
    epochs = given.get("train.epochs", train_config.epochs)
    if epochs != train_config.epochs:
        train_config = dataclasses.replace(train_config, epochs=epochs,
                                           schedule_epochs=train_config.schedule_epochs or train_config.epochs)
    return train_config


def _forget_unsaved_epochs(metrics_file: Path, completed: int) -> None:
    """Drop the metrics lines of epochs after the checkpoint's (killed between its line and its
    checkpoint): the resumed run writes them again, so each epoch has one line."""
    if not metrics_file.exists():
        return
    lines = metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["epoch"] <= completed]
    if kept != lines:
        write_text_atomic(metrics_file, "".join(kept))


def train(records_dir: Path, run_dir: Path, *, encoder_config: encoders.EncoderConfig = encoders.EncoderConfig(),
          decoder_config: decoders.DecoderConfig = decoders.DecoderConfig(),
          train_config: TrainConfig = TrainConfig(), cache_dir: Path | None = None, resume: bool = False,
          overwrite: bool = False, show_progress: bool = True, given: dict | None = None,
          cluster_timeout: float = distribute.CLUSTER_TIMEOUT) -> dict:
    """Train a captioner on RECORDS into RUN_DIR; return the final epoch's metrics and totals.

    With `resume`, the configuration saved in RUN_DIR is used (the config arguments are ignored;
    the records must be the ones it was trained on) and training continues from the last
    checkpoint. `given` holds the settings the user gave again ("section.field" -> value, see
    `_resumed_train_config`): `{"train.epochs": N}` extends (or shortens) the run, with the LR
    schedule still spanning the run's original epochs (beyond them the cosine stays at its floor,
    10% of the learning rate, instead of rising again); "train.strategy" and "train.devices" replace
    the saved ones (a resumed run may move to other devices or machines); any other that differs is refused.

    Under `train_config.strategy` multi-worker, every worker calls this with the same arguments; only
    the chief (TF_CONFIG) writes RUN_DIR, the others read it to resume. A worker waits
    `cluster_timeout` seconds at most for the others to start.

    RUN_DIR is claimed first (`outputs.Output`): locked for the whole run, and refused when it is or
    holds the records or the --init run (`overwrite` would delete them).
    """
    records_dir, run_dir = Path(records_dir), Path(run_dir)
    given = given or {}
    strategy = given.get("train.strategy", _saved_strategy(run_dir)) if resume else train_config.strategy
    inputs = {"records folder": records_dir, "--init run": None if resume else (train_config.init or None)}
    # One process per run directory, new or resumed; the other workers of a cluster only read it.
    with Output(run_dir, append=True, inputs=inputs) if distribute.is_chief(strategy) else contextlib.nullcontext():
        saved = models.read_run_config(run_dir) if resume else None
        if resume:
            train_config = _resumed_train_config(run_dir, saved, given)
        strategy = train_config.strategy
        if strategy == "auto" and (train_config.objective == "scst" or train_config.train_encoder):
            strategy = "one-device"  # not split over replicas (TrainConfig refuses them with the others)
        # Before TensorFlow runs an op: MultiWorkerMirroredStrategy sets up the runtime's collectives.
        placement = distribute.placement(strategy, train_config.devices, cluster_timeout=cluster_timeout)
        return _train_locked(records_dir, run_dir, encoder_config, decoder_config, train_config, cache_dir, resume,
                             overwrite, show_progress, saved, placement)


def _saved_strategy(run_dir: Path) -> str:
    """The strategy in RUN_DIR's config.json, read before its lock is taken (which needs to know
    whether this process is a multi-worker cluster's chief); "auto" if there is none to read: the
    locked read then says what is wrong."""
    try:
        return str(json.loads((run_dir / models.CONFIG).read_text(encoding="utf-8"))["train"].get("strategy", "auto"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "auto"


def _train_locked(records_dir, run_dir, encoder_config, decoder_config, train_config, cache_dir, resume, overwrite,
                  show_progress, saved, placement) -> dict:
    chief = placement.is_chief
    manifest = records.read_manifest(records_dir)
    vocab = records.load_vocabulary(records_dir)
    replaced = False
    if resume:
        model_config = models.ModelConfig.from_dict(saved["model"])
        if model_config.vocab_sha256 != vocab.sha256:
            raise TfcapError(f"{records_dir} has a different vocabulary from the one {run_dir} was trained on "
                             f"({vocab.sha256[:12]} vs {model_config.vocab_sha256[:12]})")
        encoder_config = dataclasses.replace(model_config.encoder, weights=str(run_dir / models.ENCODER_WEIGHTS))
        encoder = _resumed_encoder(encoder_config, model_config.precision, saved.get("encoder_weights"))
    else:
        if chief and run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise TfcapError(f"{run_dir} already exists; pass --resume to continue it or --overwrite to replace it")
            replaced = True  # deleted once what may fail before training (weights, init run, features) is done
        if train_config.objective == "scst":  # the model is the init run's: encoder, decoder, precision
            model_config, encoder_config = _init_model(Path(train_config.init), vocab, records_dir)
            train_config = dataclasses.replace(train_config, init=str(Path(train_config.init).resolve()))
            encoder = encoders.build_encoder(encoder_config, model_config.precision)
        else:
            precision = encoders.resolve_precision(train_config.precision)
            encoder = encoders.build_encoder(encoder_config, precision)
            model_config = models.ModelConfig(encoder=encoder_config, decoder=decoder_config,
                                              text=text.TextConfig(**manifest["text"]), precision=precision,
                                              vocab_size=len(vocab), vocab_sha256=vocab.sha256)
    with_grid = decoders.needs_grid(model_config.decoder)
    if train_config.train_encoder:  # features change every step: nothing to cache, images are decoded anew
        encoder.model.trainable = True
        train_features, val_features = (inputs.decoded_images(records_dir, split, encoder.preprocess)
                                        for split in ("train", "val"))
    else:
        train_features, val_features = (
            features.features_for(records_dir, split, encoder, with_grid, cache_dir=cache_dir,
                                  show_progress=show_progress) for split in ("train", "val"))
        if train_config.augment == "flip":  # pairs: each image's features and its mirror image's
            train_features = tf.data.Dataset.zip((train_features, features.features_for(
                records_dir, "train", encoder, with_grid, cache_dir=cache_dir, show_progress=show_progress,
                mirrored=True)))
    if replaced:
        shutil.rmtree(run_dir)
    with placement.strategy.scope():  # the decoder's, the optimizer's and the trainer's variables
        return _train_in_scope(records_dir, run_dir, train_config, resume, show_progress, saved, placement, manifest,
                               vocab, model_config, encoder, train_features, val_features)


def _train_in_scope(records_dir, run_dir, train_config, resume, show_progress, saved, placement, manifest, vocab,
                    model_config, encoder, train_features, val_features) -> dict:
    chief = placement.is_chief
    grid_h, grid_w = encoder.grid_shape
    # Seeded here, after the feature cache: whether it had to be built must not change the decoder's init.
    keras.utils.set_random_seed(train_config.seed)
    decoder = models.build_decoder(model_config, encoder.feature_dim, grid_h * grid_w)
    reward = None
    if train_config.objective == "scst":
        if not resume:
            decoder.load_weights(str(Path(train_config.init) / models.DECODER_WEIGHTS))
        reward = metrics.TokenCiderD(scst.training_references(records_dir), len(vocab))
    captioner = models.Captioner(model_config, encoder, decoder, vocab)
    if chief and not resume:
        models.write_run_files(run_dir, model_config, vocab, encoder, {
            "train": dataclasses.asdict(train_config),
            "records": {"path": str(records_dir.resolve()), "vocab_sha256": manifest["vocab_sha256"],
                        "train_images": manifest["splits"]["train"]["images"]}})
    images_per_step = _images_per_step(manifest, train_config, model_config.decoder, placement.distributed)
    steps_per_epoch = _steps_per_epoch(manifest, "train", train_config, images_per_step)
    trainer = _Trainer(captioner, train_config, steps_per_epoch * (train_config.schedule_epochs or train_config.epochs),
                       run_dir, reward, placement, images_per_step)
    if resume:
        latest = tf.train.latest_checkpoint(str(run_dir / CHECKPOINTS))  # the chief's, for every worker
        if latest is None:
            raise TfcapError(f"{run_dir} has no checkpoint to resume from")
        if "loss_sum/.ATTRIBUTES/VARIABLE_VALUE" in dict(tf.train.list_variables(latest)):
            trainer.checkpoint.restore(latest).assert_existing_objects_matched()
        else:
            trainer.checkpoint_without_sums.restore(latest).assert_existing_objects_matched()
            if int(trainer.step_in_epoch.numpy()):
                click.echo("note: a checkpoint of an older tfcap, without the epoch's running sums: the metrics of "
                           f"epoch {int(trainer.epoch.numpy()) + 1} cover only the steps after step "
                           f"{int(trainer.step_in_epoch.numpy())}", err=True)
        epoch, step = int(trainer.epoch.numpy()), int(trainer.step_in_epoch.numpy())  # completed, in the next
        if chief:
            _forget_unsaved_epochs(run_dir / METRICS, epoch)
        if chief and dataclasses.asdict(train_config) != saved["train"]:  # --epochs changed: the run's config says so
            write_text_atomic(run_dir / models.CONFIG,
                              json.dumps({**saved, "train": dataclasses.asdict(train_config)}, indent=2) + "\n")
        stopped_early = train_config.patience and int(trainer.bad_evals.numpy()) >= train_config.patience
        if epoch >= train_config.epochs or stopped_early:
            summary(f"train: {run_dir} has " + (f"stopped early after {epoch} epochs" if stopped_early
                                                else f"finished its {epoch} epochs")
                    + "; nothing to train" + ("" if stopped_early else " (--epochs N continues it to N)"))
            return {"epochs": epoch, "seconds": 0.0, "best_score": float(trainer.best_score.numpy())}
        click.echo(f"resuming {run_dir} at epoch {epoch + 1}, step {step}", err=True)
    result = trainer.fit(train_features, val_features, steps_per_epoch, show_progress)
    if chief and not (run_dir / models.DECODER_WEIGHTS).exists():
        trainer.save_best()
    best = "BLEU-4" if train_config.select == "bleu4" else "CIDEr-D"
    summary(f"train: {result['epochs']} epoch{'' if result['epochs'] == 1 else 's'} in {result['seconds']:.1f} s"
            + (f", last {result.get('tokens_per_s', 0):,.0f} tokens/s" if "tokens_per_s" in result else "")
            + (f", last {result.get('samples_per_s', 0):,.0f} samples/s" if "samples_per_s" in result else "")
            + (f", best val {best} {result['best_score']:.4f}" if train_config.eval_every else "")
            + f" -> {run_dir}")
    return result
