"""How far to trust a caption: a confidence in [0, 1], and whether the image is like the training photos.

Three things the captioner's training data can teach, computed in TensorFlow graphs beside the
caption (caption-dir, `tfcap caption`, `tfcap score`, the SavedModel and the Beam engine all call
`Assessor.assess`):

- **Match**: a small dual encoder (`Matcher`) trained contrastively on the training split: the
  image's pooled features and the caption's words (a bidirectional GRU over the captioner's own
  vocabulary, its embedding initialised from the decoder's) into one space; the cosine of the two.
- **Pointwise mutual information** of the caption and the image under the captioner itself: its
  log-probability given the image minus given the average training image, per token. The plain
  log-probability (`score`) mostly says how ordinary a sentence is; PMI says how much the image
  raised it.
- **Typicality**: how close the image is to the training photos: the mean cosine distance of its
  pooled features to their nearest `neighbours` in a bank of training images, turned into a
  conformal p-value against the validation images' distances (the fraction of validation images
  at least as far). In-domain images are spread evenly in [0, 1]; an image unlike all of them gets
  about 1 / (validation images + 1). `in_domain` is typicality >= `min_typicality`.

The confidence is a logistic regression on (match, PMI, mean log-probability per token), fitted
on the validation split to tell each image's own captions from captions of other images (half of
them from its nearest neighbours, half at random), so that 0.5 is even odds; then, for an image
out of the domain, it is scaled down by typicality / min_typicality. Everything is fitted on the
train and validation splits (`fit`); the test split is never seen.

A run directory holds it as `confidence.json` (the `ConfidenceConfig`, the regression's weights,
what the fit measured) and `confidence.h5` (the matcher's weights, the bank, the validation
distances, the average training features).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from tfcap import text
from tfcap.errors import TfcapError
from tfcap.outputs import write_files_atomic

CONFIG = "confidence.json"
WEIGHTS = "confidence.h5"
FEATURES = ("match", "pmi", "log_prob")  # the regression's inputs, in this order


@dataclasses.dataclass(frozen=True)
class ConfidenceConfig:
    """The confidence model and how it is fitted. Saved in confidence.json."""

    embed_dim: int = 256  # word embedding of the caption tower (from the decoder's when it has this size)
    units: int = 512  # the caption tower's bidirectional GRU, both directions together
    joint_dim: int = 512  # the space images and captions are matched in
    dropout: float = 0.3
    temperature: float = 0.05  # of the contrastive softmax
    epochs: int = 10  # the best epoch by validation recall is kept
    batch_size: int = 128  # images per step, one caption each
    learning_rate: float = 1e-3
    bank_size: int = 2000  # training images kept for typicality (a seeded sample)
    neighbours: int = 10  # k of the k-nearest-neighbour distance
    min_typicality: float = 0.01  # below it an image is out of the domain (1% of in-domain images are)
    seed: int = 0


class Matcher(keras.Model):
    """Images and captions into one space, where a caption lies near the images it describes.

    `image(pooled [B, C]) -> [B, D]` and `caption(ids [B, T] int32, 0-padded word ids) -> [B, D]`,
    both L2-normalised float32, so their dot product is a cosine.
    """

    def __init__(self, vocab_size: int, config: ConfidenceConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.embedding = keras.layers.Embedding(vocab_size, config.embed_dim, mask_zero=True, name="embedding")
        self.rnn = keras.layers.Bidirectional(keras.layers.GRU(config.units // 2, return_sequences=True), name="gru")
        self.caption_out = keras.layers.Dense(config.joint_dim, name="caption_out")
        self.image_out = keras.layers.Dense(config.joint_dim, name="image_out")
        self.drop = keras.layers.Dropout(config.dropout)

    def image(self, pooled: tf.Tensor, training: bool = False) -> tf.Tensor:
        return tf.math.l2_normalize(self.image_out(self.drop(tf.cast(pooled, tf.float32), training=training)), -1)

    def caption(self, ids: tf.Tensor, training: bool = False) -> tf.Tensor:
        mask = ids > 0
        words = self.rnn(self.embedding(ids), mask=mask)
        weights = tf.cast(mask, words.dtype)[..., None]
        mean = tf.reduce_sum(words * weights, 1) / tf.maximum(tf.reduce_sum(weights, 1), 1.0)
        return tf.math.l2_normalize(self.caption_out(self.drop(mean, training=training)), -1)

    def call(self, pooled, ids, training=False):
        return self.image(pooled, training), self.caption(ids, training)

    @property
    def _default_save_signature(self):  # exported through tfcap's own signatures (as the decoders)
        return None


def _trimmed(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Word ids [B, T] cut to the longest caption's length (padding would cost decoder and GRU steps
    for nothing: captions are ~10 words of up to 30), and the lengths tf.int32 [B]."""
    ids = tf.cast(ids, tf.int32)
    lengths = tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1)
    return ids[:, : tf.reduce_max(tf.concat([lengths, [1]], axis=0))], lengths


def caption_log_probs(decoder, features: dict[str, tf.Tensor], ids: tf.Tensor,
                      owners: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed log-probability of each caption under the decoder, by teacher forcing.

    Args:
      decoder: a tfcap decoder (`decoder(features, tokens, owners=) -> (logits [B, T, V], penalty)`).
      features: the decoder's features, each [B, ...], or [G, ...] with `owners`.
      ids: tf.int32 [B, T] word ids, 0-padded, without `<start>`/`<end>`.
      owners: tf.int32 [B], the image (row of `features`) of each caption; None: row b's is row b.
    Returns:
      (log p(words, `<end>`) tf.float32 [B], tokens counted tf.float32 [B]: words + 1 for `<end>`).
    """
    ids, lengths = _trimmed(ids)
    batch = tf.shape(ids)[0]
    inputs = tf.concat([tf.fill([batch, 1], text.START_ID), ids], axis=1)
    padded = tf.concat([ids, tf.zeros([batch, 1], tf.int32)], axis=1)
    targets = tf.where(tf.range(tf.shape(padded)[1])[None, :] == lengths[:, None], text.END_ID, padded)
    logits, _ = decoder(features, inputs, owners=owners)
    chosen = tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), targets, batch_dims=2)
    mask = tf.sequence_mask(lengths + 1, tf.shape(targets)[1], tf.float32)
    return tf.reduce_sum(chosen * mask, axis=1), tf.cast(lengths + 1, tf.float32)


def log_probs_given_one_image(decoder, features: dict[str, tf.Tensor], ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`caption_log_probs` of every caption given one and the same image, by the decoder's steps.

    Given one image, the next word's distribution depends on the words so far alone: captions that
    begin alike share those steps. Each step runs once per distinct prefix of the captions that have
    not ended (all begin with `<start>`; greedy captions of 64 Flickr8k images have 49 distinct
    prefixes per 100 caption-steps), on the image's context row, which every row shares.

    Args:
      decoder: a tfcap decoder (`initial_state`, `step`: the `tfcap.decoding` step contract).
      features: the decoder's features of one image, each [1, ...].
      ids: tf.int32 [B, T] word ids, 0-padded, without `<start>`/`<end>`.
    Returns:
      (log p(words, `<end>`) tf.float32 [B], tokens counted tf.float32 [B]), as `caption_log_probs`.
    """
    ids, lengths = _trimmed(ids)
    batch = tf.shape(ids)[0]
    inputs = tf.concat([tf.fill([batch, 1], text.START_ID), ids], axis=1)  # [B, T + 1]
    padded = tf.concat([ids, tf.zeros([batch, 1], tf.int32)], axis=1)
    targets = tf.where(tf.range(tf.shape(padded)[1])[None, :] == lengths[:, None], text.END_ID, padded)
    state, context = decoder.initial_state(features)  # one row: the state of the empty prefix
    vocab = tf.cast(decoder.vocab_size, tf.int64)
    step = decoder.step_function(context)

    def body(t, state, prefix, sums):
        """prefix tf.int64 [B]: each caption's row of `state`, the state after its first t tokens."""
        running = tf.where(lengths + 1 > t)[:, 0]  # captions with a token to predict at t
        token = tf.gather(inputs[:, t], running)
        # A prefix of t + 1 tokens: the row of its first t, and its last.
        extended, row = tf.unique(tf.gather(prefix, running) * vocab + tf.cast(token, tf.int64))
        log_probs, state = step(tf.cast(extended % vocab, tf.int32),
                                        tf.nest.map_structure(lambda s: tf.gather(s, extended // vocab), state),
                                        context)
        chosen = tf.gather_nd(tf.cast(log_probs, tf.float32),
                              tf.stack([row, tf.gather(targets[:, t], running)], axis=1))
        sums = tf.tensor_scatter_nd_add(sums, running[:, None], chosen)
        prefix = tf.tensor_scatter_nd_update(prefix, running[:, None], tf.cast(row, tf.int64))
        return t + 1, state, prefix, sums

    invariants = tf.nest.map_structure(lambda s: tf.TensorShape([None]).concatenate(s.shape[1:]), state)
    _, _, _, sums = tf.while_loop(
        lambda t, *_: t < tf.shape(inputs)[1], body,
        (tf.constant(0), state, tf.zeros([batch], tf.int64), tf.zeros([batch])),
        shape_invariants=(tf.TensorShape([]), invariants, tf.TensorShape([None]), tf.TensorShape([None])))
    return sums, tf.cast(lengths + 1, tf.float32)


def pooled_of(features: dict[str, tf.Tensor]) -> tf.Tensor:
    """The image vector [B, C] float32 of a decoder's features: `pooled`, or the mean of `grid` [B, L, C]."""
    if "pooled" in features:
        return tf.cast(features["pooled"], tf.float32)
    return tf.reduce_mean(tf.cast(features["grid"], tf.float32), axis=1)


def knn_distance(pooled: tf.Tensor, bank: tf.Tensor, neighbours: int) -> tf.Tensor:
    """Mean cosine distance of each of pooled [B, C] to its `neighbours` nearest rows of bank [N, C]
    (rows L2-normalised): tf.float32 [B]."""
    similarity = tf.matmul(tf.math.l2_normalize(tf.cast(pooled, tf.float32), -1), bank, transpose_b=True)
    return 1.0 - tf.reduce_mean(tf.math.top_k(similarity, k=min(neighbours, bank.shape[0])).values, axis=1)


class Assessor(tf.Module):
    """The fitted confidence of one captioner: `assess(features, ids)` in a graph."""

    def __init__(self, decoder, matcher: Matcher, config: ConfidenceConfig, coefficients: np.ndarray,
                 bank: np.ndarray, val_distances: np.ndarray, prior: dict[str, np.ndarray]):
        super().__init__(name="confidence")
        self.decoder, self.matcher, self.config = decoder, matcher, config
        self.coefficients = tf.constant(coefficients, tf.float32)  # [len(FEATURES) + 1]: weights, then bias
        self.bank = tf.constant(bank, tf.float16)  # [N, C], rows L2-normalised
        self.val_distances = tf.constant(np.sort(val_distances), tf.float32)  # [M], ascending
        self.prior = {k: tf.constant(v, tf.float32) for k, v in prior.items()}  # each [1, ...]

    def distance(self, pooled: tf.Tensor) -> tf.Tensor:
        """pooled [B, C] -> tf.float32 [B]: mean cosine distance to the `neighbours` nearest bank images."""
        return knn_distance(pooled, tf.cast(self.bank, tf.float32), self.config.neighbours)

    def typicality(self, pooled: tf.Tensor) -> tf.Tensor:
        """pooled [B, C] -> tf.float32 [B] in (0, 1]: the share of validation images at least as far from the bank."""
        distance = self.distance(pooled)
        # Validation images nearer by more than rounding: the bank is float16 (similarities to about
        # 1e-4), and features from the folded encoder at caption time and the cache's differ in the last bits.
        closer = tf.searchsorted(self.val_distances, distance - 1e-3, side="left")
        count = tf.cast(tf.shape(self.val_distances)[0], tf.float32)
        return (count - tf.cast(closer, tf.float32) + 1.0) / (count + 1.0)

    def signals(self, features: dict[str, tf.Tensor], ids: tf.Tensor,
                image_score: tf.Tensor | None = None) -> tf.Tensor:
        """The regression's inputs (`FEATURES`) tf.float32 [B, 3] for captions `ids` [B, T] of the images.

        image_score: the captions' mean log-probability per token given their images when it is known
        already (beam search computed it for its own captions: the same log-probabilities), so that
        only the average image's pass runs; None: both passes, by teacher forcing.
        """
        if image_score is None:
            log_p, tokens = caption_log_probs(self.decoder, {k: tf.cast(features[k], tf.float32) for k in self.prior}, ids)
            image_score = log_p / tokens
        # The average image is one row of features that every caption's prior pass shares: the
        # attention decoder projects its grid once, not once per caption. (Not in one call with the
        # images' pass: the attention decoder would lay out as many slots for every image as its most
        # captioned image has, here the average image's B.)
        prior_log_p, tokens = log_probs_given_one_image(self.decoder, self.prior, ids)
        match = tf.reduce_sum(self.matcher.image(pooled_of(features)) * self.matcher.caption(_trimmed(ids)[0]), axis=1)
        return tf.stack([match, image_score - prior_log_p / tokens, image_score], axis=1)

    def assess(self, features: dict[str, tf.Tensor], ids: tf.Tensor,
               image_score: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """Captions `ids` (tf.int32 [B, T], 0-padded words) of images with decoder `features` ->
        {score (mean log-probability per token) tf.float32 [B], confidence tf.float32 [B] in [0, 1],
        in_domain tf.bool [B], typicality tf.float32 [B] in (0, 1]}; image_score: as `signals`."""
        signals = self.signals(features, ids, image_score)
        odds = tf.linalg.matvec(signals, self.coefficients[:-1]) + self.coefficients[-1]
        typicality = self.typicality(pooled_of(features))
        scale = tf.minimum(1.0, typicality / self.config.min_typicality)
        return {"score": signals[:, FEATURES.index("log_prob")], "confidence": tf.sigmoid(odds) * scale,
                "in_domain": typicality >= self.config.min_typicality, "typicality": typicality}


# ---------------------------------------------------------------------------------------------
# Saving and loading

def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file() and (Path(run_dir) / WEIGHTS).is_file()


def build_matcher(vocab_size: int, config: ConfidenceConfig, feature_dim: int) -> Matcher:
    """A Matcher with its variables created."""
    matcher = Matcher(vocab_size, config, name="matcher")
    matcher(tf.zeros([1, feature_dim]), tf.ones([1, 2], tf.int32))
    return matcher


def save(run_dir: Path, matcher: Matcher, config: ConfidenceConfig, coefficients: np.ndarray, bank: np.ndarray,
         val_distances: np.ndarray, prior: dict[str, np.ndarray], report: dict) -> None:
    """confidence.h5 and confidence.json (the marker that the fit is complete), made in memory and
    written with checked writes under names private to this process, confidence.json renamed last
    (`outputs.write_files_atomic`): h5py writing a file itself crashes the interpreter on a full disk.
    Arrays are stored in float16 but the validation distances: a wheel carries the bundled model's."""
    run_dir = Path(run_dir)
    weights = io.BytesIO()
    with h5py.File(weights, "w") as f:
        for k, variable in enumerate(matcher.weights):  # by position: Keras numbers its GRU cells per process
            f.create_dataset(f"matcher/{k:03d}", data=variable.numpy().astype(np.float16))  # half the bytes
        f.create_dataset("bank", data=bank.astype(np.float16))
        f.create_dataset("val_distances", data=val_distances.astype(np.float32))
        for key, value in prior.items():
            f.create_dataset(f"prior/{key}", data=value.astype(np.float32))
    payload = {"config": dataclasses.asdict(config), "features": list(FEATURES),
               "coefficients": [float(c) for c in coefficients], **report}
    write_files_atomic({run_dir / WEIGHTS: weights.getvalue(),
                        run_dir / CONFIG: (json.dumps(payload, indent=2) + "\n").encode()})


def load(run_dir: Path, decoder, vocab_size: int, feature_dim: int) -> Assessor | None:
    """The run's Assessor, or None when it has no fitted confidence; TfcapError when its files are damaged."""
    run_dir = Path(run_dir)
    if not exists(run_dir):
        return None
    try:
        saved = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        config = ConfidenceConfig(**saved["config"])
        coefficients = np.asarray(saved["coefficients"], np.float32)
        if saved.get("features") != list(FEATURES) or coefficients.shape != (len(FEATURES) + 1,):
            raise ValueError("its features are not those this tfcap computes")
        matcher = build_matcher(vocab_size, config, feature_dim)
        with h5py.File(run_dir / WEIGHTS, "r") as f:
            if len(f["matcher"]) != len(matcher.weights):
                raise ValueError(f"{len(f['matcher'])} matcher arrays for {len(matcher.weights)} weights")
            for k, variable in enumerate(matcher.weights):
                variable.assign(f[f"matcher/{k:03d}"][()])  # a wrong shape raises ValueError
            bank, val_distances = f["bank"][()], f["val_distances"][()]
            prior = {key: f[f"prior/{key}"][()] for key in f["prior"]}
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise TfcapError(f"{run_dir / CONFIG} or {WEIGHTS} is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); fit it again with tfcap fit-confidence") from None
    return Assessor(decoder, matcher, config, coefficients, bank, val_distances, prior)


# ---------------------------------------------------------------------------------------------
# Fitting (train and validation splits only)

@dataclasses.dataclass
class _Split:
    """A split's cached features as arrays: pooled [N, C], decoder features (the grid for attention:
    [N, L, C] float16), and each image's caption word ids."""

    pooled: np.ndarray
    decoder_features: dict[str, np.ndarray]
    captions: list[list[list[int]]]


def _load_split(cached: tf.data.Dataset, feature_keys: tuple[str, ...], keep_grid: bool) -> _Split:
    pooled, grids, captions = [], [], []
    for element in cached.as_numpy_iterator():
        pooled.append(element["pooled"])
        if "grid" in feature_keys and keep_grid:
            grids.append(element["grid"])
        captions.append([list(map(int, ids)) for ids in element["caption_ids"]])
    pooled = np.stack(pooled).astype(np.float32)
    features = {"pooled": pooled} if "pooled" in feature_keys else {"grid": np.stack(grids)} if keep_grid else {}
    return _Split(pooled, features, captions)


def _padded(captions: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros([len(captions), length], np.int32)
    for k, ids in enumerate(captions):
        out[k, : min(len(ids), length)] = ids[:length]
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 50) -> np.ndarray:
    """Logistic regression by Newton's method: weights [F] then bias, for x [N, F] float, y [N] in {0, 1}."""
    design = np.concatenate([x, np.ones([len(x), 1])], axis=1).astype(np.float64)
    w = np.zeros(design.shape[1])
    ridge = l2 * np.eye(len(w))
    ridge[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        gradient = design.T @ (p - y) + ridge @ w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (the Mann-Whitney statistic)."""
    values = np.concatenate([np.asarray(positive, np.float64), np.asarray(negative, np.float64)])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mid_ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # ties share their average rank
    n_pos, n_neg = len(positive), len(negative)
    return float((mid_ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def kendall_tau_c(scores: np.ndarray, judgments: np.ndarray) -> float:
    """Kendall's tau-c of scores (any real numbers) against ordinal judgments with few levels (e.g. 1-4),
    as the captioning literature correlates metrics with people (CLIPScore's Flickr8k-Expert protocol):
    2 (concordant - discordant) / (n^2 (m - 1) / m), m the fewer distinct values of the two. O(n log n)."""
    x, y = np.asarray(scores, np.float64), np.asarray(judgments)
    levels = np.unique(y)
    m = min(len(np.unique(x)), len(levels))
    if m < 2:
        return 0.0
    balance = 0.0  # concordant - discordant pairs
    for k, low in enumerate(levels):
        below = np.sort(x[y == low])
        above = x[y > low]  # each pair of levels once: the higher level's scores against this one's
        balance += (np.searchsorted(below, above, side="left")
                    - (len(below) - np.searchsorted(below, above, side="right"))).sum()
    return float(2.0 * balance / (len(x) ** 2 * (m - 1) / m))


def _train_matcher(matcher: Matcher, train: _Split, val: _Split, config: ConfidenceConfig, length: int,
                   log) -> tuple[int, float]:
    """Contrastive training; keeps the weights of the epoch with the best validation recall.
    Returns (best epoch, its validation R@1 + R@5 + R@10 of captions retrieving their image)."""
    rng = np.random.default_rng(config.seed)
    per_image = [_padded(c, length) for c in train.captions]
    optimizer = keras.optimizers.Adam(config.learning_rate)

    @tf.function(input_signature=[tf.TensorSpec([None, train.pooled.shape[1]], tf.float32),
                                  tf.TensorSpec([None, length], tf.int32)])
    def step(pooled, ids):
        with tf.GradientTape() as tape:
            images, captions = matcher(pooled, ids, training=True)
            logits = tf.matmul(images, captions, transpose_b=True) / config.temperature
            labels = tf.range(tf.shape(logits)[0])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
                                  + tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.transpose(logits)))
        optimizer.apply_gradients(zip(tape.gradient(loss, matcher.trainable_variables), matcher.trainable_variables))
        return loss

    val_ids = [(i, ids) for i, caps in enumerate(val.captions) for ids in caps]
    val_owner = np.array([i for i, _ in val_ids])
    val_tokens = _padded([ids for _, ids in val_ids], length)

    def val_recall() -> float:
        images = matcher.image(val.pooled).numpy()
        captions = np.concatenate([matcher.caption(val_tokens[k:k + 1024]).numpy()
                                   for k in range(0, len(val_tokens), 1024)])
        similarity = captions @ images.T
        rank = (similarity > similarity[np.arange(len(similarity)), val_owner][:, None]).sum(1)
        return float(sum((rank < r).mean() for r in (1, 5, 10)))

    best, best_epoch, best_weights = -1.0, 0, None
    captions_per_image = max(len(c) for c in train.captions)
    for epoch in range(1, config.epochs + 1):
        losses = []
        for round_ in range(captions_per_image):  # every image once per round, each time another caption
            order = rng.permutation(len(train.pooled))
            for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
                batch = order[start:start + config.batch_size]
                picks = [per_image[i][(round_ + int(rng.integers(len(per_image[i])))) % len(per_image[i])]
                         for i in batch]
                losses.append(float(step(train.pooled[batch], np.stack(picks))))
        recall = val_recall()
        log(f"confidence: matcher epoch {epoch}/{config.epochs}: loss {np.mean(losses):.3f}, "
            f"val recall@1+5+10 {recall:.3f}")
        if recall > best:
            best, best_epoch, best_weights = recall, epoch, [v.numpy() for v in matcher.weights]
    for variable, value in zip(matcher.weights, best_weights):
        variable.assign(value)
    return best_epoch, best


def _calibration_pairs(val: _Split, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Validation (image index, caption ids, label): each image's own captions (1) and as many of
    other images' (0), half from its nearest neighbours by pooled features, half at random."""
    unit = val.pooled / np.linalg.norm(val.pooled, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)
    owners, captions, labels = [], [], []
    count = len(val.captions)
    for i, own in enumerate(val.captions):
        for ids in own:
            owners.append(i), captions.append(ids), labels.append(1)
        hard = len(own) // 2
        others = list(nearest[i, :hard]) + [int(j) for j in rng.choice(np.delete(np.arange(count), i),
                                                                         len(own) - hard, replace=False)]
        for j in others:
            owners.append(i)
            captions.append(val.captions[j][int(rng.integers(len(val.captions[j])))])
            labels.append(0)
    return np.array(owners), captions, np.array(labels, np.float64)


def fit(run_dir: Path, records_dir: Path, config: ConfidenceConfig = ConfidenceConfig(), *,
        cache_dir: Path | None = None, show_progress: bool = True) -> dict:
    """Fit the confidence of the captioner in RUN_DIR on RECORDS' train and val splits; write it into
    RUN_DIR (confidence.json, confidence.h5) and return what was measured on val."""
    from tfcap import features, model as models
    from tfcap.progress import Stopwatch, summary

    log = summary if show_progress else (lambda line: None)
    run_dir = Path(run_dir)
    clock = Stopwatch()
    captioner = models.load_model(run_dir)
    saved = models.read_run_config(run_dir)
    encoder = captioner.encoder
    if not models.encoder_from_dependency(saved):  # the id its training feature cache is keyed by
        encoder = models.with_original_weights_id(encoder, run_dir / models.ENCODER_WEIGHTS,
                                                  saved.get("encoder_weights"))
    keys = models.feature_keys(captioner.config.decoder)
    with_grid = "grid" in keys
    splits = {split: _load_split(features.features_for(records_dir, split, encoder, with_grid, cache_dir=cache_dir,
                                                       show_progress=show_progress), keys, keep_grid=split == "val")
              for split in ("train", "val")}
    train, val = splits["train"], splits["val"]
    if len(train.pooled) < 2 or len(val.pooled) < 2:
        raise TfcapError(f"{records_dir}: fitting a confidence needs at least 2 train and 2 val images")
    length = captioner.config.text.max_length
    matcher = build_matcher(captioner.config.vocab_size, config, train.pooled.shape[1])
    embedding = getattr(captioner.decoder, "embedding", None)
    if embedding is not None and embedding.embeddings.shape == matcher.embedding.embeddings.shape:
        matcher.embedding.embeddings.assign(tf.cast(embedding.embeddings, tf.float32))  # words Flickr already taught
    batch_config = dataclasses.replace(config, batch_size=min(config.batch_size, len(train.pooled)))
    best_epoch, recall = _train_matcher(matcher, train, val, batch_config, length, log)

    rng = np.random.default_rng(config.seed)
    bank = train.pooled[rng.permutation(len(train.pooled))[: config.bank_size]]
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    prior = _average_features(features.features_for(records_dir, "train", encoder, with_grid, cache_dir=cache_dir,
                                                    show_progress=False), keys)
    val_distances = knn_distance(tf.constant(val.pooled), tf.constant(bank), config.neighbours).numpy()
    assessor = Assessor(captioner.decoder, matcher, config, np.zeros(len(FEATURES) + 1), bank, val_distances, prior)

    owners, captions, labels = _calibration_pairs(val, rng)
    signals = []
    for start in range(0, len(owners), 512):
        chunk = owners[start:start + 512]
        feats = {k: tf.constant(v[chunk]) for k, v in val.decoder_features.items()}
        signals.append(assessor.signals(feats, tf.constant(_padded(captions[start:start + 512], length))).numpy())
    signals = np.concatenate(signals)
    coefficients = fit_logistic(signals, labels)
    confidence = 1.0 / (1.0 + np.exp(-(signals @ coefficients[:-1] + coefficients[-1])))
    report = {"fitted_on": {"records": Path(records_dir).resolve().name, "train_images": len(train.pooled),
                            "val_images": len(val.pooled)},
              "matcher": {"best_epoch": best_epoch, "val_recall_1_5_10": round(recall, 4)},
              "val": {"pairs": len(labels), "own_captions": int(labels.sum()),
                      "auroc_own_vs_other": round(auroc(confidence[labels == 1], confidence[labels == 0]), 4),
                      **{f"auroc_{name}": round(auroc(signals[labels == 1, k], signals[labels == 0, k]), 4)
                         for k, name in enumerate(FEATURES)}}}
    save(run_dir, matcher, config, coefficients, bank, val_distances, prior, report)
    log(f"confidence: fitted in {clock.seconds:.0f} s; val AUROC own vs other captions "
        f"{report['val']['auroc_own_vs_other']:.3f} -> {run_dir / CONFIG}")
    return report


def _average_features(cached: tf.data.Dataset, feature_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The average image of a split: each decoder feature's mean, [1, ...] float32 (summed as it streams:
    a split's grids are not held in memory)."""
    sums, count = {}, 0
    for element in cached.as_numpy_iterator():
        for key in feature_keys:
            value = element[key].astype(np.float64)
            sums[key] = sums.get(key, 0.0) + value
        count += 1
    return {key: (total / max(count, 1))[None].astype(np.float32) for key, total in sums.items()}
