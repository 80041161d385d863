"""tf.data input pipelines: records -> images for the encoder, and features -> caption batches.

Everything stays in tf.data: parallel decode and resize, deterministic seeded shuffling (so a
resumed run sees the same batches), padded batches, prefetch.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from tfcap import images, records, text

AUTOTUNE = tf.data.AUTOTUNE
CAPTION_SHUFFLE_BUFFER = 1024
LENGTH_BUCKETS = (8, 10, 12, 14, 16, 19, 24)  # caption tokens + 1; upper bounds (exclusive) of buckets
FEATURE_KEYS = ("pooled", "grid")  # of a feature cache's elements (tfcap.features)
MIRROR_SALT = 2  # folded into the (seed, epoch, position) key: the flip draw is not the caption draw


def decoded_images(records_dir: Path, split: str, preprocess) -> tf.data.Dataset:
    """The examples of a split with their images decoded, resized and preprocessed, in parallel.

    Args:
      preprocess: maps tf.uint8 [H, W, 3] to tf.float32 [S, S, 3] (the encoder's `preprocess`).
    Yields dicts: image [S, S, 3] tf.float32, image_id [] tf.string, captions [(C)] tf.string,
      caption_ids [(C), (words)] tf.int64.
    """
    def decode(example):
        return {"image": preprocess(images.decode_rgb(example["image"])), "image_id": example["image_id"],
                "captions": example["captions"], "caption_ids": example["caption_ids"]}

    return records.load_split(records_dir, split).map(decode, num_parallel_calls=AUTOTUNE)


def image_batches(records_dir: Path, split: str, preprocess, batch_size: int) -> tf.data.Dataset:
    """`decoded_images` in batches: image [B, S, S, 3], image_id [B], captions [B, (C)], caption_ids [B, (C), (words)]."""
    return decoded_images(records_dir, split, preprocess).ragged_batch(batch_size).prefetch(AUTOTUNE)


def mirrored_half(examples: tf.data.Dataset, mirror, *, seed: int, epoch: int) -> tf.data.Dataset:
    """Each example mirrored (flipped left-right) with probability 1/2, drawn anew each epoch: the
    augmentation of `--augment flip`. The draw is a pure function of (seed, epoch, position), taken
    before any shuffling, so a resumed run sees the same images.

    Args:
      mirror: (example, flip tf.bool []) -> the example, mirrored where `flip`; e.g. `mirror_image`,
        or `mirror_features` on (features, mirrored features) pairs.
    """
    def draw(index, example):
        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.cast(seed, tf.int64) * 100_003 + epoch, index]),
                                                       MIRROR_SALT)
        return mirror(example, tf.random.stateless_uniform([], seed=key) < 0.5)

    return examples.enumerate().map(draw, num_parallel_calls=AUTOTUNE, deterministic=True)


def mirror_image(example: dict, flip: tf.Tensor) -> dict:
    """`decoded_images`' example with its image [S, S, 3] flipped left-right where `flip`."""
    image = example["image"]
    return {**example, "image": tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)}


def mirror_features(pair: tuple[dict, dict], flip: tf.Tensor) -> dict:
    """(cached features of an image, those of the image flipped left-right) -> the second's features
    where `flip`, else the first's; the captions are the first's (the two must be the same image)."""
    example, mirrored = pair
    tf.debugging.assert_equal(example["image_id"], mirrored["image_id"],
                              message="the mirrored feature cache is not in the order of the features")
    # Features both have: an entry with the grid also serves a decoder that reads the pooled vector
    # only, so one of the two may hold a grid that the other lacks (and the decoder does not read).
    keys = [k for k in FEATURE_KEYS if k in example and k in mirrored]
    chosen = tf.cond(flip, lambda: [mirrored[k] for k in keys], lambda: [example[k] for k in keys])
    return {**{k: v for k, v in example.items() if k not in FEATURE_KEYS}, **dict(zip(keys, chosen))}


def with_start_end(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Word ids [n] -> decoder input `<start> w1..wn` and target `w1..wn <end>`, each tf.int32 [n + 1]."""
    ids = tf.cast(ids, tf.int32)
    return (tf.concat([[text.START_ID], ids], 0), tf.concat([ids, [text.END_ID]], 0))


def caption_batches(features: tf.data.Dataset, *, batch_size: int, feature_keys: tuple[str, ...],
                    captions_per_image: str = "all", shuffle: bool = False, seed: int = 0, epoch: int = 0,
                    shuffle_buffer: int = 10_000) -> tf.data.Dataset:
    """Training or validation batches from cached features.

    Args:
      features: elements with the `feature_keys` ([C] or [L, C]) and `caption_ids` tf.int64 ragged [(C), (words)].
      captions_per_image: "one" (a random caption of each image, drawn anew each epoch) or "all".
      shuffle, seed, epoch: order and caption draw are a pure function of (seed, epoch), so a
        resumed run can skip exactly the batches it already trained on.
    Yields (features dict of [B, ...], inputs tf.int32 [B, T], targets tf.int32 [B, T]), T = longest
      caption in the batch + 1, padded with `<pad>` = 0.
    """
    dataset = features.enumerate()
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)

    def one(index, element):
        count = tf.shape(element["caption_ids"].row_lengths(), out_type=tf.int64)[0]
        pick = tf.random.stateless_uniform([], seed=tf.stack([seed * 100_003 + epoch, index]), maxval=count,
                                           dtype=tf.int64)
        inputs, targets = with_start_end(element["caption_ids"][pick])
        return {k: element[k] for k in feature_keys}, inputs, targets

    def every(index, element):
        feats = {k: element[k] for k in feature_keys}
        captions = tf.data.Dataset.from_tensor_slices(element["caption_ids"])
        return captions.map(lambda ids: (feats,) + with_start_end(ids))

    if captions_per_image == "one":
        dataset = dataset.map(one, num_parallel_calls=AUTOTUNE, deterministic=True)
    elif captions_per_image == "all":
        dataset = dataset.flat_map(every)
        if shuffle:
            # The captions of one image arrive together; without mixing them, a batch would hold a
            # few images' captions each. A small buffer suffices (elements may carry large grids).
            dataset = dataset.shuffle(CAPTION_SHUFFLE_BUFFER, seed=seed * 100_003 + epoch + 1,
                                      reshuffle_each_iteration=False)
    else:
        raise ValueError(f"captions_per_image must be 'one' or 'all', not {captions_per_image!r}")
    if not shuffle:
        return dataset.padded_batch(batch_size).prefetch(AUTOTUNE)
    # Batches of captions of similar length: padding would otherwise be ~40% of the LSTM steps
    # and of the vocabulary softmax. Deterministic given the (seeded) order, so resuming stays exact.
    return dataset.bucket_by_sequence_length(
        lambda feats, inputs_, targets: tf.shape(inputs_)[0], bucket_boundaries=list(LENGTH_BUCKETS),
        bucket_batch_sizes=[batch_size] * (len(LENGTH_BUCKETS) + 1)).prefetch(AUTOTUNE)


def image_caption_batches(examples: tf.data.Dataset, *, batch_size: int, feature_keys: tuple[str, ...],
                          shuffle: bool = False, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 10_000,
                          by_length: bool = False) -> tf.data.Dataset:
    """Batches of images with all their captions: what training the encoder needs, since each image is
    then encoded once per step however many captions it has (caption-level batches encode it ~5 times),
    and what the attention decoder needs to project each image's grid once for all its captions.

    Args:
      examples: elements with the `feature_keys` and `caption_ids` tf.int64 ragged [(C), (words)].
      shuffle, seed, epoch: the image order is a pure function of (seed, epoch), as in `caption_batches`.
      by_length: batch together images whose longest captions fall in the same `LENGTH_BUCKETS`
        bucket (in the shuffled order, so still a pure function of (seed, epoch)): a batch's steps
        run to its longest caption, and random images would pad Flickr8k's to half their length.
    Yields (features dict of [B, ...], inputs tf.int32 [N, T], targets tf.int32 [N, T], owners tf.int32 [N]):
      the N captions of the B images, padded with `<pad>`; caption n belongs to image owners[n].
    """
    dataset = examples
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
    dataset = dataset.map(lambda e: {k: e[k] for k in feature_keys + ("caption_ids",)})
    if by_length:
        def bucket(element):
            tokens = tf.cast(tf.reduce_max(element["caption_ids"].row_lengths()), tf.int64) + 1  # <start> words
            return tf.reduce_sum(tf.cast(tokens >= tf.constant(LENGTH_BUCKETS, tf.int64), tf.int64))

        dataset = dataset.group_by_window(bucket, lambda _, images: images.ragged_batch(batch_size), batch_size)
    else:
        dataset = dataset.ragged_batch(batch_size)

    def flatten(element):
        ids = tf.cast(element["caption_ids"], tf.int32)  # [B, (C), (words)]
        captions = ids.values  # [N, (words)]
        column = tf.ones([captions.nrows(), 1], tf.int32)
        inputs = tf.concat([column * text.START_ID, captions], axis=1).to_tensor(text.PAD_ID)
        targets = tf.concat([captions, column * text.END_ID], axis=1).to_tensor(text.PAD_ID)
        feats = {k: element[k].to_tensor() if isinstance(element[k], tf.RaggedTensor) else element[k]
                 for k in feature_keys}
        return feats, inputs, targets, tf.cast(ids.value_rowids(), tf.int32)

    return dataset.map(flatten, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def image_feature_batches(features: tf.data.Dataset, *, batch_size: int, feature_keys: tuple[str, ...]) -> tf.data.Dataset:
    """Per-image batches for decoding and BLEU: (features dict [B, ...], captions tf.string ragged [B, (C)], image_id [B])."""
    def dense(feats, captions, image_ids):  # ragged_batch makes any dimension the spec leaves open ragged
        return {k: v.to_tensor() if isinstance(v, tf.RaggedTensor) else v for k, v in feats.items()}, captions, image_ids

    return (features.map(lambda e: ({k: e[k] for k in feature_keys}, e["captions"], e["image_id"]))
            .ragged_batch(batch_size)
            .map(dense)
            .prefetch(AUTOTUNE))
