"""Self-critical sequence training (Rennie et al., CVPR 2017): REINFORCE with CIDEr-D as the reward.

After cross-entropy training, the decoder is fine-tuned on its own captions: for each image it
samples K captions, each is rewarded with its CIDEr-D against the image's references (document
frequencies from the training references, `metrics.TokenCiderD`), and the log-probability of each
sample is raised in proportion to its advantage, reward minus a baseline:

  - "mean": the mean reward of the image's other K-1 samples (Luo, "A Better Variant of
    Self-Critical Sequence Training", 2020): no extra decoding, and an unbiased baseline;
  - "greedy": the reward of the image's greedy caption (Rennie et al.): the model competes with
    what it would say at test time.

One step is two graphs and NumPy in between: sampling (and greedy decoding, logged either way) in
one `tf.function`, the batch's rewards vectorized in NumPy, then the policy gradient in another
`tf.function` that teacher-forces the samples through the decoder. Dropout is off throughout, so
the probabilities that are raised are the ones that were sampled from.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcap import decoding, metrics, records, text

BASELINES = ("mean", "greedy")


def training_references(records_dir, split: str = "train") -> list[list[list[int]]]:
    """Word ids of every reference caption of a split, per image: the corpus of the reward's document frequencies."""
    corpus = []
    for ids in records.load_split(records_dir, split).map(lambda e: e["caption_ids"]).ragged_batch(1024):
        corpus.extend(ids.to_list())
    return corpus


def caption_words(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Words per caption from decoded tokens int [N, T] and lengths [N] (`<end>` counted when drawn)."""
    ended = tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)] == text.END_ID
    return lengths - ended


def policy_loss(logits: tf.Tensor, sampled: tf.Tensor, lengths: tf.Tensor, advantages: tf.Tensor) -> tf.Tensor:
    """REINFORCE loss of samples: -sum(advantage * log p(token)) over the sampled tokens, per token.

    p is the distribution the samples were drawn from (`decoding.sampled_log_probs`: the forbidden tokens
    masked out). With the plain softmax, negative advantages would move probability onto `<unk>`,
    `<pad>` and `<start>`, which are never sampled and so never pushed back: a drift that grew until
    training collapsed (Flickr8k: val CIDEr-D 0.46 -> 0.39 and val loss 5 -> 33 in one epoch, after
    about 500 steps at lr 2e-5 or 150 at 1e-4).

    Args:
      logits: tf.float32 [N, T, V], teacher-forced on the samples; sampled: tf.int32 [N, T];
      lengths: tf.int32 [N] (`<end>` included when drawn); advantages: tf.float32 [N].
    Returns:
      tf.float32 [].
    """
    log_probs = decoding.sampled_log_probs(logits, sampled, lengths)
    tokens = tf.cast(tf.reduce_sum(lengths), tf.float32)  # lengths never exceed T
    return -tf.reduce_sum(advantages[:, None] * log_probs) / tf.maximum(tokens, 1.0)


class SelfCritical:
    """The SCST step of a trainer: `step(features, inputs, targets, owners)` -> (loss, samples)."""

    def __init__(self, trainer, reward: metrics.TokenCiderD, samples: int, baseline: str):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}")
        self.trainer, self.reward, self.samples, self.baseline = trainer, reward, samples, baseline
        self.max_tokens = trainer.captioner.config.max_caption_tokens
        self.sample = tf.function(self._sample, reduce_retracing=True)
        self.gradient = tf.function(self._gradient, reduce_retracing=True)
        # The epoch's running sums, updated in the gradient step's graph and checkpointed with the
        # trainer's (reset with them at the end of an epoch), so a resumed epoch's means cover all of it.
        self.sums = {key: tf.Variable(0.0, dtype=tf.float64, name=f"scst_{key}")
                     for key in ("reward", "greedy_cider", "advantage_abs", "samples", "images")}

    def stats(self) -> dict[str, float]:
        """The epoch's means: sample CIDEr-D (the reward), greedy CIDEr-D, mean |advantage|."""
        samples, images = max(float(self.sums["samples"]), 1.0), max(float(self.sums["images"]), 1.0)
        return {"reward": float(self.sums["reward"]) / samples, "greedy_cider": float(self.sums["greedy_cider"]) / images,
                "advantage_abs": float(self.sums["advantage_abs"]) / samples}

    def _sample(self, feats, seed):
        """features of B images -> samples int32 [B*K, T] and lengths [B*K], greedy [B, T] and lengths [B]."""
        decoder = self.trainer.decoder
        state, context = decoder.initial_state(feats)
        # Rows b*K .. b*K + K-1 of the state are image b's samples; they share its context row (a
        # decoder's step reads one context row per K consecutive state rows): no K copies of a grid.
        tile = lambda x: tf.repeat(x, self.samples, axis=0)  # noqa: E731
        step = decoder.step_function(context)
        sampled, lengths = decoding.sample_search(step, tf.nest.map_structure(tile, state), context,
                                                  max_length=self.max_tokens, seed=seed)
        greedy, _, greedy_lengths = decoding.greedy_search(step, state, context, max_length=self.max_tokens)
        return sampled, lengths, greedy, greedy_lengths

    def _gradient(self, feats, sampled, lengths, advantages, rewards, greedy_rewards):
        """Policy gradient: loss = -sum(advantage * log p(token) over sampled tokens) / tokens; counts the
        step (`trainer.count_step`) and adds the batch's rewards to the epoch's sums, in this one graph."""
        trainer = self.trainer
        owners = tf.repeat(tf.range(tf.shape(sampled)[0] // self.samples), self.samples)  # samples share features
        inputs = tf.concat([tf.fill([tf.shape(sampled)[0], 1], text.START_ID), sampled[:, :-1]], axis=1)
        with tf.GradientTape() as tape:
            logits, _ = trainer.decoder(feats, inputs, owners=owners)
            loss = policy_loss(tf.cast(logits, tf.float32), sampled, lengths, advantages)
            scaled = trainer.optimizer.scale_loss(loss)
        trainer.apply_gradients(tape.gradient(scaled, trainer.variables))
        count = tf.cast(tf.shape(sampled)[0], tf.float64)
        trainer.count_step(loss, count)
        for key, value in (("reward", tf.reduce_sum(rewards)), ("greedy_cider", tf.reduce_sum(greedy_rewards)),
                           ("advantage_abs", tf.reduce_sum(tf.abs(tf.cast(advantages, tf.float64)))),
                           ("samples", count), ("images", tf.cast(tf.shape(greedy_rewards)[0], tf.float64))):
            self.sums[key].assign_add(value)
        return loss

    def step(self, feats, inputs_, targets, owners):
        """One SCST step on a batch of B images with all their references (`inputs.image_caption_batches`)."""
        del inputs_
        seed = tf.stack([tf.constant(self.trainer.config.seed, tf.int64), self.trainer.global_step])
        sampled, lengths, greedy, greedy_lengths = (t.numpy() for t in self.sample(feats, seed))
        targets, owners = targets.numpy(), owners.numpy()
        reference_words = (targets != text.PAD_ID).sum(axis=1) - 1  # targets end with <end>
        images = len(greedy)
        sample_owners = np.repeat(np.arange(images), self.samples)
        rewards = self.reward(sampled, caption_words(sampled, lengths), sample_owners, targets, reference_words, owners)
        greedy_rewards = self.reward(greedy, caption_words(greedy, greedy_lengths), np.arange(images), targets,
                                     reference_words, owners)
        per_image = rewards.reshape(images, self.samples)
        if self.baseline == "mean":
            baseline = (per_image.sum(axis=1, keepdims=True) - per_image) / (self.samples - 1)
        else:
            baseline = greedy_rewards[:, None]
        advantages = (per_image - baseline).reshape(-1).astype(np.float32)
        sampled = sampled[:, :max(int(lengths.max()), 1)]  # teacher-forced to the longest sample, not max_tokens
        loss = self.gradient(feats, tf.constant(sampled), tf.constant(lengths), tf.constant(advantages),
                             tf.constant(rewards, tf.float64), tf.constant(greedy_rewards, tf.float64))
        return loss, float(len(rewards))
