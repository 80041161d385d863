"""Caption decoders: the classic `merge` model and Show, Attend and Tell `attention`.

Both take image features from the encoder and word ids, and offer two views of one set of weights:

- `__call__(features, tokens)`: teacher forcing on whole padded captions in one call (training).
- `initial_state(features)` + `step(tokens, state, context)`: one word at a time (beam search,
  greedy decoding, export), with the step contract of `tfcap.decoding`.

Features are a dict: `pooled` tf.float32 [B, C] (spatial mean of the encoder grid) and, for the
attention decoder, `grid` [B, L, C] (L = h*w locations; float16 in the cache, cast here).
Dropout is stateless and seeded by the caller, so a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfcap.errors import TfcapError

DECODERS = ("merge", "attention")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and size of the decoder. Saved in every run's config.json."""

    kind: str = "merge"  # merge | attention
    units: int = 256  # LSTM units (and the merge model's hidden size)
    embed_dim: int = 256  # word embedding size
    dropout: float = 0.5
    attention_dim: int = 256  # attention MLP size (attention decoder)
    attention_penalty: float = 1.0  # weight of the doubly stochastic attention penalty

    def __post_init__(self):
        if self.kind not in DECODERS:
            raise TfcapError(f"--decoder must be one of {', '.join(DECODERS)}, not {self.kind!r}")
        if not 0 <= self.dropout < 1 or self.units < 1 or self.embed_dim < 1:
            raise TfcapError("--dropout must be in [0, 1), --units and --embed-dim at least 1")


def _dropout(x: tf.Tensor, rate: float, seed: tf.Tensor | None, salt: int) -> tf.Tensor:
    """Stateless dropout: active when a seed (tf.int64 [2]) is given, identity otherwise."""
    if seed is None or rate == 0:
        return x
    return tf.nn.experimental.stateless_dropout(x, rate, seed=seed + tf.constant([0, salt], seed.dtype))


class _Decoder(keras.Model):
    """Shared by both decoders: no Keras auto-generated SavedModel signature.

    Keras traces a `serving_default` for every model that `tf.saved_model.save` meets, calling it
    with one input; a decoder takes (features, tokens), and `tfcap export` defines its own signatures.
    """

    @property
    def _default_save_signature(self):
        return None


class MergeDecoder(_Decoder):
    """The classic notebook captioner, trained on all positions at once.

    image vector -> Dense(relu);  caption -> Embedding -> LSTM;  add -> Dense(relu) -> Dense(vocab).
    The notebook feeds one (image, prefix) pair per word and reads the LSTM's last state; the LSTM
    output at position t *is* that state for the prefix ending at t, so one pass over the whole
    caption computes every sample at once.
    """

    def __init__(self, vocab_size: int, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config, self.vocab_size = config, vocab_size
        self.image_dense = keras.layers.Dense(config.units, activation="relu", name="image_dense")
        self.embedding = keras.layers.Embedding(vocab_size, config.embed_dim, name="embedding")
        self.lstm = keras.layers.LSTM(config.units, return_sequences=True, return_state=True, name="lstm")
        self.hidden = keras.layers.Dense(config.units, activation="relu", name="hidden")
        self.logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")

    def _image(self, features, seed):
        return self.image_dense(_dropout(tf.cast(features["pooled"], self.compute_dtype), self.config.dropout, seed, 1))

    def _output(self, image, lstm_out, seed):
        return self.logits(self.hidden(_dropout(image + lstm_out, self.config.dropout, seed, 3)))

    def call(self, features, tokens, seed=None):
        """Teacher forcing.

        Args:
          features: dict with `pooled` [B, C].
          tokens: tf.int32 [B, T], `<start>` w1 ... (padded with 0).
          seed: tf.int64 [2] enables dropout (training), None disables it.
        Returns:
          (logits tf.float32 [B, T, V], penalty tf.float32 [] = 0 for this decoder).
        """
        image = self._image(features, seed)
        mask = tf.not_equal(tokens, 0)
        embedded = _dropout(self.embedding(tokens), self.config.dropout, seed, 2)
        sequence, _, _ = self.lstm(embedded, mask=mask)
        return self._output(image[:, None, :], sequence, seed), tf.zeros([])

    def initial_state(self, features):
        """Returns (state, context) for `step`: zero LSTM state, and the projected image [B, units]."""
        image = self._image(features, None)
        zeros = tf.zeros([tf.shape(image)[0], self.config.units], image.dtype)
        return (zeros, zeros), {"image": image}

    def step(self, tokens, state, context):
        """One word for N hypotheses: tokens tf.int32 [N] -> (log_probs tf.float32 [N, V], new state)."""
        out, h, c = self.lstm(self.embedding(tokens[:, None]), initial_state=list(state))
        logits = self._output(context["image"], out[:, 0], None)
        return tf.nn.log_softmax(logits), (h, c)


class AttentionDecoder(_Decoder):
    """Show, Attend and Tell (Xu et al. 2015): an LSTM with soft attention over the spatial grid.

    The initial state comes from the mean feature; each step attends over the L grid locations
    with an additive (MLP) attention, gated by a sigmoid of the previous state, and feeds
    [word embedding, context] to the LSTM. Training adds the doubly stochastic penalty
    `sum_i (1 - sum_t alpha_ti)^2`, which asks every location to be attended to over a caption.
    """

    def __init__(self, vocab_size: int, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config, self.vocab_size = config, vocab_size
        units = config.units
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c")
        self.attend_features = keras.layers.Dense(config.attention_dim, name="attend_features")
        self.attend_state = keras.layers.Dense(config.attention_dim, name="attend_state")
        self.attend_score = keras.layers.Dense(1, name="attend_score")
        self.gate = keras.layers.Dense(1, activation="sigmoid", name="gate")
        self.embedding = keras.layers.Embedding(vocab_size, config.embed_dim, name="embedding")
        self.cell = keras.layers.LSTMCell(units, name="lstm_cell")
        self.out_state = keras.layers.Dense(config.embed_dim, name="out_state")
        self.out_context = keras.layers.Dense(config.embed_dim, name="out_context")
        self.logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")

    def initial_state(self, features):
        """Returns (state (h, c) each [B, units], context dict of grid [B, L, C] and its projection)."""
        grid = tf.cast(features["grid"], self.compute_dtype)
        mean = tf.reduce_mean(grid, axis=1)
        context = {"grid": grid, "projected": self.attend_features(grid)}
        return (self.init_h(mean), self.init_c(mean)), context

    def _attend(self, h, context):
        scores = self.attend_score(tf.tanh(context["projected"] + self.attend_state(h)[:, None, :]))[..., 0]
        alpha = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)  # [N, L]
        attended = tf.reduce_sum(tf.cast(alpha[..., None], context["grid"].dtype) * context["grid"], axis=1)
        return self.gate(h) * attended, alpha

    def _step(self, embedded, state, context, seed):
        h, c = state
        attended, alpha = self._attend(h, context)
        out, (h, c) = self.cell(tf.concat([embedded, attended], axis=-1), [h, c])
        deep = embedded + self.out_state(_dropout(out, self.config.dropout, seed, 4)) + self.out_context(attended)
        return self.logits(_dropout(tf.tanh(deep), self.config.dropout, seed, 5)), (h, c), alpha

    def call(self, features, tokens, seed=None):
        """Teacher forcing over whole captions, one tf.while_loop over time.

        Args:
          features: dict with `grid` [B, L, C].
          tokens: tf.int32 [B, T], `<start>` w1 ... (padded with 0).
          seed: tf.int64 [2] enables dropout (training), None disables it.
        Returns:
          (logits tf.float32 [B, T, V], doubly stochastic penalty tf.float32 [], mean over the batch).
        """
        state, context = self.initial_state(features)
        embedded = _dropout(self.embedding(tokens), self.config.dropout, seed, 2)
        mask = tf.cast(tf.not_equal(tokens, 0), tf.float32)
        steps = tf.shape(tokens)[1]

        def body(t, state, attention_sum, logits_ta):
            step_seed = None if seed is None else seed + tf.cast(tf.stack([0, 100 * (t + 1)]), seed.dtype)
            logits, new_state, alpha = self._step(embedded[:, t], state, context, step_seed)
            keep = mask[:, t][:, None]
            # Padded positions keep the previous state, so the final state is the caption's own.
            state = tuple(tf.cast(keep * tf.cast(n, tf.float32) + (1 - keep) * tf.cast(o, tf.float32), o.dtype)
                          for n, o in zip(new_state, state))
            return t + 1, state, attention_sum + alpha * keep, logits_ta.write(t, logits)

        # An explicit while_loop (not a Python loop over tf.range) so that Keras can also trace
        # this call outside tf.function when it builds the model.
        _, _, attention_sum, logits_ta = tf.while_loop(
            lambda t, *_: t < steps, body,
            (tf.constant(0), state, tf.zeros(tf.shape(context["grid"])[:2], tf.float32),
             tf.TensorArray(tf.float32, size=steps)))
        logits = tf.transpose(logits_ta.stack(), [1, 0, 2])
        penalty = tf.reduce_mean(tf.reduce_sum(tf.square(1.0 - attention_sum), axis=1))
        return logits, self.config.attention_penalty * penalty

    def step(self, tokens, state, context):
        """One word for N hypotheses: tokens tf.int32 [N] -> (log_probs tf.float32 [N, V], new state)."""
        logits, state, _ = self._step(self.embedding(tokens), state, context, None)
        return tf.nn.log_softmax(logits), state


def build_decoder(vocab_size: int, config: DecoderConfig) -> keras.Model:
    cls = MergeDecoder if config.kind == "merge" else AttentionDecoder
    return cls(vocab_size, config, name=f"{config.kind}_decoder")


def needs_grid(config: DecoderConfig) -> bool:
    """Whether the decoder reads the spatial grid (otherwise the pooled vector is enough)."""
    return config.kind == "attention"
