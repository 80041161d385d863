"""Caption decoders: the classic `merge` model and Show, Attend and Tell `attention`.

Both take image features from the encoder and word ids, and offer two views of one set of weights:

- `__call__(features, tokens, owners=None)`: teacher forcing on whole padded captions in one call
  (training); with `owners`, features per image, shared by its captions.
- `initial_state(features)` + `step(tokens, state, context)`: one word at a time (beam search,
  greedy decoding, export), with the step contract of `tfcap.decoding`; a step also takes a
  context of one row per r consecutive state rows (SCST's r samples of an image share it).
  A search calls `step_function(context)` once, before its loop, and steps with what it returns:
  `step` with its weights read once, not at every step.

Features are a dict: `pooled` tf.float32 [B, C] (spatial mean of the encoder grid) and, for the
attention decoder, `grid` [B, L, C] (L = h*w locations; float16 in the cache, cast here).
Dropout is stateless and seeded by the caller, so a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfcap import encoder as encoders
from tfcap.errors import TfcapError

DECODERS = ("merge", "attention")
PRECISIONS = ("auto", "float32", "bfloat16")  # of a frozen attention decoder's matmuls (`AttentionDecoder.freeze`)


def resolve_precision(name: str | None, kind: str) -> str:
    """The precision a captioning decoder's matmuls run in: "float32" (as trained) or "bfloat16".

    "auto" (or None) is bfloat16 for the attention decoder on a CPU with bfloat16 instructions and no GPU
    (its step's matmuls about 1.7x faster there, the same captions but for a few in a thousand), float32
    elsewhere: emulated bfloat16 is slower. The merge decoder's step is Keras' LSTM layer: float32 only.
    """
    name = name or "auto"
    if name not in PRECISIONS:
        raise TfcapError(f"unknown decoder precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bfloat16" if kind == "attention" and not encoders.gpu_visible() and encoders.cpu_has_bfloat16() \
            else "float32"
    if name == "bfloat16":
        if kind != "attention":
            raise TfcapError("--decoder-precision bfloat16 is for the attention decoder; this model's is merge: "
                             "use float32")
        encoders.require_bfloat16("--decoder-precision bfloat16")
    return name


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and size of the decoder. Saved in every run's config.json."""

    kind: str = "merge"  # merge | attention
    units: int = 256  # LSTM units (and the merge model's hidden size)
    embed_dim: int = 256  # word embedding size
    dropout: float = 0.5
    attention_dim: int = 256  # attention MLP size (attention decoder)
    attention_penalty: float = 1.0  # weight of the doubly stochastic attention penalty
    # Channels the attention decoder projects the grid to (linearly, once per image) before it attends
    # over it and reads it. None: as many as `units` (0 for merge); 0: none, it attends over the grid's
    # own channels, as runs from before this field do (`from_dict`).
    context_dim: int | None = None

    def __post_init__(self):
        if self.kind not in DECODERS:
            raise TfcapError(f"--decoder must be one of {', '.join(DECODERS)}, not {self.kind!r}")
        if not 0 <= self.dropout < 1 or self.units < 1 or self.embed_dim < 1:
            raise TfcapError("--dropout must be in [0, 1), --units and --embed-dim at least 1")
        if self.context_dim is None:
            object.__setattr__(self, "context_dim", self.units if self.kind == "attention" else 0)
        if self.context_dim < 0:
            raise TfcapError("context_dim must be at least 0")

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        """A saved config; one saved before `context_dim` existed attended over the grid itself (0)."""
        return cls(**{"context_dim": 0, **d})


def _matmul(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """x [..., n] @ w [n, m] in w's dtype (bfloat16 in a decoder frozen so), returned in x's dtype."""
    if x.shape.rank == 2:
        return tf.cast(tf.matmul(tf.cast(x, w.dtype), w), x.dtype)
    y = tf.matmul(tf.reshape(tf.cast(x, w.dtype), [-1, w.shape[0]]), w)
    return tf.cast(tf.reshape(y, tf.concat([tf.shape(x)[:-1], [w.shape[1]]], axis=0)), x.dtype)


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

    def call(self, features, tokens, seed=None, owners=None):
        """Teacher forcing.

        Args:
          features: dict with `pooled` [B, C]: one per caption, or one per image with `owners`.
          tokens: tf.int32 [N, T], `<start>` w1 ... (padded with 0).
          seed: tf.int64 [2] enables dropout (training), None disables it.
          owners: tf.int32 [N], the image of each caption (row of `pooled`); None: row n's is row n.
        Returns:
          (logits tf.float32 [N, T, V], penalty tf.float32 [] = 0 for this decoder).
        """
        if owners is not None:  # before dropout: each caption draws its own mask, as with a vector per caption
            features = {"pooled": tf.gather(features["pooled"], owners)}
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

    precision = "float32"  # its step is Keras' LSTM layer (`resolve_precision`)

    def freeze(self, precision: str = "float32") -> None:
        """Nothing to compute ahead for captioning (the attention decoder's `freeze`): float32 only."""
        if precision != "float32":
            raise TfcapError(f"the merge decoder computes in float32 only, not {precision!r}")

    def step_function(self, context):
        """`step` itself: its weights are the layers'."""
        return self.step

    def step(self, tokens, state, context):
        """One word for N hypotheses: tokens tf.int32 [N] -> (log_probs tf.float32 [N, V], new state).

        context: rows [N, ...], or [N / r, ...] shared by r consecutive rows (SCST's samples of an image)."""
        out, h, c = self.lstm(self.embedding(tokens[:, None]), initial_state=list(state))
        image = context["image"]
        logits = self._output(tf.repeat(image, tf.shape(out)[0] // tf.shape(image)[0], axis=0), out[:, 0], None)
        return tf.nn.log_softmax(logits), (h, c)


class AttentionDecoder(_Decoder):
    """Show, Attend and Tell (Xu et al. 2015): an LSTM with soft attention over the spatial grid.

    The initial state comes from the mean feature; each step attends over the L grid locations
    with an additive (MLP) attention, gated by a sigmoid of the previous state, and feeds
    [word embedding, context] to the LSTM. Training adds the doubly stochastic penalty
    `sum_i (1 - sum_t alpha_ti)^2`, which asks every location to be attended to over a caption.

    With `context_dim`, the grid is first projected (linearly, once per image) to that many
    channels, which the decoder then attends over and reads: the LSTM's context kernel [C, 4 units]
    is factored through them, the rest of the model keeps its reach (its maps from the context
    have rank at most attention_dim, embed_dim or units, all below context_dim by default).

    Computed at the cost of its arithmetic:
      - the grid, its projections and the initial state once per image, shared by the image's
        captions (`owners`) or samples: a step attends with one batched matmul per image, of its
        rows' weights [K, L] by its grid [L, C], instead of reading a copy of the grid per caption;
      - what does not depend on the previous state is computed for all steps at once, outside the
        recurrence: the words' share of the LSTM's input, the deep output and the logits;
      - in the recurrence, the state's three maps (attention query, gate, LSTM recurrence) are one
        matmul, on weights read once per call. The layers and their weights are Keras' (`lstm_cell`'s
        kernel rows: the word embedding's, then the context's), written out in that order.
    """

    def __init__(self, vocab_size: int, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config, self.vocab_size = config, vocab_size
        units = config.units
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c")
        if config.context_dim:
            self.project_grid = keras.layers.Dense(config.context_dim, use_bias=False, name="project_grid")
        self.attend_features = keras.layers.Dense(config.attention_dim, name="attend_features")
        self.attend_state = keras.layers.Dense(config.attention_dim, name="attend_state")
        self.attend_score = keras.layers.Dense(1, name="attend_score")
        self.gate = keras.layers.Dense(1, activation="sigmoid", name="gate")
        self.embedding = keras.layers.Embedding(vocab_size, config.embed_dim, name="embedding")
        self.cell = keras.layers.LSTMCell(units, name="lstm_cell")
        self.out_state = keras.layers.Dense(config.embed_dim, name="out_state")
        self.out_context = keras.layers.Dense(config.embed_dim, name="out_context")
        self.logits = keras.layers.Dense(vocab_size, name="logits", dtype="float32")
        self._frozen, self.precision = None, "float32"

    def freeze(self, precision: str = "float32") -> None:
        """For captioning only (the weights must not change afterwards; training never freezes): what the
        steps derive from the weights, computed once, now, instead of in every search: the recurrence's
        weights cast and concatenated (`_step_weights`), and the words' share of the LSTM input as a
        table [V, 4 units] (a row gathered per step instead of a matmul: a few ms per batch of 64).

        precision "bfloat16" (`resolve_precision`): the matmuls of the grid's projections and of the
        recurrence (state and context) take and give bfloat16, summing in float32. On the bundled model
        and Flickr8k val (1,000 images) that changed 4 greedy captions, none with beam 2, 1 with beam 3,
        and no score; attention weights, the LSTM's cell, the deep output and the logits stay float32.
        """
        if precision not in PRECISIONS[1:]:
            raise TfcapError(f"unknown decoder precision {precision!r}: choose one of {', '.join(PRECISIONS[1:])}")
        dtype = self.compute_dtype
        weights = self._step_weights(dtype, self.cell.kernel.shape[0] - self.config.embed_dim)
        matmul = tf.bfloat16 if precision == "bfloat16" else dtype
        frozen = {**weights, "word_inputs": tf.matmul(tf.cast(self.embedding.embeddings, dtype), weights["words"]),
                  "state": tf.cast(weights["state"], matmul), "context": tf.cast(weights["context"], matmul),
                  "attend_features": tf.cast(self.attend_features.kernel, matmul),
                  "attend_features_bias": tf.cast(self.attend_features.bias, dtype)}
        if self.config.context_dim:
            frozen["project_grid"] = tf.cast(self.project_grid.kernel, matmul)
        self._frozen, self.precision = frozen, precision

    def _weights(self, dtype, channels: int) -> dict:
        """The frozen weights (`freeze`), else `_step_weights`, read now."""
        return self._frozen if self._frozen is not None else self._step_weights(dtype, channels)

    def initial_state(self, features):
        """Returns (state (h, c) each [B, units], context: grid [B, L, C'] and its attention projection
        [B, L, A]); C' = context_dim, or the grid's C without it.

        `step` also takes a context shared by consecutive rows: with N = B * r state rows, rows
        b*r .. b*r + r-1 attend over image b (the r samples of an image, without r copies of its grid).
        """
        grid = tf.cast(features["grid"], self.compute_dtype)
        frozen = self._frozen
        if self.config.context_dim:
            grid = self.project_grid(grid) if frozen is None else _matmul(grid, frozen["project_grid"])
        mean = tf.reduce_mean(grid, axis=1)
        projected = (self.attend_features(grid) if frozen is None
                     else _matmul(grid, frozen["attend_features"]) + frozen["attend_features_bias"])
        context = {"grid": grid, "projected": projected}
        return (self.init_h(mean), self.init_c(mean)), context

    def _step_weights(self, dtype, channels: int) -> dict:
        """The recurrence's weights in `dtype`, read once per call (the layers built on first use):
        state [units, A + 1 + 4 units] and its bias (attention query | gate | LSTM recurrence and the
        LSTM's bias), words [E, 4 units] and context [C', 4 units] (the LSTM kernel's rows), score [A, 1]
        and its bias [1]."""
        units, embed, attention = self.config.units, self.config.embed_dim, self.config.attention_dim
        for layer, inputs in ((self.attend_state, units), (self.gate, units), (self.attend_score, attention),
                              (self.cell, embed + channels)):
            if not layer.built:
                layer.build((None, inputs))
        cast = lambda v: tf.cast(v, dtype)  # noqa: E731
        words, context = tf.split(cast(self.cell.kernel), [embed, channels])
        return {"state": tf.concat([cast(self.attend_state.kernel), cast(self.gate.kernel),
                                    cast(self.cell.recurrent_kernel)], axis=1),
                "state_bias": tf.concat([cast(self.attend_state.bias), cast(self.gate.bias), cast(self.cell.bias)], 0),
                "words": words, "context": context, "score": cast(self.attend_score.kernel),
                "score_bias": cast(self.attend_score.bias)}

    def _recur(self, words_projected, h, c, context, weights):
        """One step of the recurrence for N = G * K rows (row n attends over image n // K).

        Args:
          words_projected: [N, 4 units], the word embedding times the LSTM kernel's word rows.
          h, c: [N, units]; context: grid [G, L, C'], projected [G, L, A]; weights: `_step_weights`.
        Returns:
          (new h, new c, gated context [N, C'], attention weights alpha tf.float32 [N, L]).
        """
        grid, projected = context["grid"], context["projected"]
        attention = self.config.attention_dim
        query, gate, recurrent = tf.split(_matmul(h, weights["state"]) + weights["state_bias"],
                                          [attention, 1, 4 * self.config.units], axis=1)
        query = tf.reshape(query, [tf.shape(grid)[0], -1, attention])  # [G, K, A]
        hidden = tf.tanh(tf.expand_dims(projected, 1) + tf.expand_dims(query, 2))  # [G, K, L, A]
        scores = tf.reshape(tf.matmul(tf.reshape(hidden, [-1, attention]), weights["score"]),
                            tf.shape(hidden)[:3]) + weights["score_bias"]  # [G, K, L]
        alpha = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
        attended = tf.matmul(tf.cast(alpha, grid.dtype), grid)  # [G, K, C']
        attended = self.gate.activation(gate) * tf.reshape(attended, [-1, grid.shape[-1]])
        cell = self.cell
        i, f, g, o = tf.split(words_projected + recurrent + _matmul(attended, weights["context"]), 4, axis=1)
        c = cell.recurrent_activation(f) * c + cell.recurrent_activation(i) * cell.activation(g)
        h = cell.recurrent_activation(o) * cell.activation(c)
        return h, c, attended, tf.reshape(alpha, [-1, tf.shape(grid)[1]])

    def _output(self, embedded, out, attended, seed):
        """Deep output: logits tf.float32 [..., V] from the word [..., E], the LSTM output [..., units]
        and the context [..., C'] of the same step(s)."""
        deep = embedded + self.out_state(_dropout(out, self.config.dropout, seed, 4)) + self.out_context(attended)
        return self.logits(_dropout(tf.tanh(deep), self.config.dropout, seed, 5))

    def call(self, features, tokens, seed=None, owners=None):
        """Teacher forcing over whole captions, one tf.while_loop over time.

        Args:
          features: dict with `grid` [B, L, C]: one per caption, or one per image with `owners`.
          tokens: tf.int32 [N, T], `<start>` w1 ... (padded with 0).
          seed: tf.int64 [2] enables dropout (training), None disables it.
          owners: tf.int32 [N], the image of each caption (row of `grid`), in any order; None: row n's is row n.
        Returns:
          (logits tf.float32 [N, T, V] (0 where tokens are padding), doubly stochastic penalty tf.float32 [],
          mean over the captions).
        """
        state, context = self.initial_state(features)
        embedded = _dropout(self.embedding(tokens), self.config.dropout, seed, 2)  # [N, T, E]
        if owners is not None:  # the recurrence runs on captions in slots: K per image, consecutive
            slot_rows, row_slots = _slots(owners, tf.shape(context["grid"])[0])
            per_image = tf.shape(slot_rows)[0] // tf.shape(context["grid"])[0]
            state = tuple(tf.repeat(s, per_image, axis=0) for s in state)
            # The empty slots of images with fewer than K captions take an all-padding caption.
            slot_tokens = tf.gather(tf.pad(tokens, [[0, 1], [0, 0]]), slot_rows)
            slot_embedded = tf.gather(tf.pad(embedded, [[0, 1], [0, 0], [0, 0]]), slot_rows)
        else:
            slot_tokens, slot_embedded = tokens, embedded
        weights = self._weights(embedded.dtype, context["grid"].shape[-1])
        if self._frozen is not None:  # captioning: no dropout on the words (`freeze`)
            if seed is not None:
                raise TfcapError("a frozen decoder (for captioning) does not train")
            words_projected = tf.transpose(tf.gather(weights["word_inputs"], slot_tokens), [1, 0, 2])
        else:
            words_projected = tf.einsum("nte,ef->tnf", slot_embedded, weights["words"])  # [T, N, 4 units]
        keep = tf.transpose(tf.not_equal(slot_tokens, 0))  # [T, N]
        steps = tf.shape(tokens)[1]
        words_ta = tf.TensorArray(words_projected.dtype, size=steps).unstack(words_projected)
        keep_ta = tf.TensorArray(tf.bool, size=steps).unstack(keep)

        def body(t, h, c, attention_sum, out_ta, attended_ta):
            new_h, new_c, attended, alpha = self._recur(words_ta.read(t), h, c, context, weights)
            kept = keep_ta.read(t)[:, None]
            # Padded positions keep the previous state, so the final state is the caption's own.
            h, c = tf.where(kept, new_h, h), tf.where(kept, new_c, c)
            attention_sum += tf.where(kept, alpha, 0.0)
            return t + 1, h, c, attention_sum, out_ta.write(t, new_h), attended_ta.write(t, attended)

        # An explicit while_loop (not a Python loop over tf.range) so that Keras can also trace
        # this call outside tf.function when it builds the model.
        _, _, _, attention_sum, out_ta, attended_ta = tf.while_loop(
            lambda t, *_: t < steps, body,
            (tf.constant(0), *state, tf.zeros([tf.shape(slot_tokens)[0], tf.shape(context["grid"])[1]], tf.float32),
             tf.TensorArray(state[0].dtype, size=steps), tf.TensorArray(context["grid"].dtype, size=steps)))
        out, attended = (tf.transpose(ta.stack(), [1, 0, 2]) for ta in (out_ta, attended_ta))  # [N, T, ...]
        if owners is not None:  # back from slots to the captions' rows
            out, attended, attention_sum = (tf.gather(x, row_slots) for x in (out, attended, attention_sum))
        # The deep output and logits of the words only: a batch by image pads its captions to its
        # longest, and Flickr8k's to a third of their length. Padded positions get logits 0 (never read).
        words = tf.where(tf.not_equal(tokens, 0))  # [M, 2]
        logits = self._output(*(tf.gather_nd(x, words) for x in (embedded, out, attended)), seed)
        shape = tf.concat([tf.shape(tokens, out_type=words.dtype), [self.vocab_size]], axis=0)
        logits = tf.scatter_nd(words, logits, shape)
        penalty = tf.reduce_mean(tf.reduce_sum(tf.square(1.0 - attention_sum), axis=1))
        return logits, self.config.attention_penalty * penalty

    def step_function(self, context):
        """`step` with the recurrence's weights read (cast, concatenated) here, once, instead of at every
        step: for a search's loop, called in the same graph before it (context: as `initial_state`'s)."""
        weights = self._weights(self.compute_dtype, context["grid"].shape[-1])
        return lambda tokens, state, context: self._step(tokens, state, context, weights)

    def step(self, tokens, state, context):
        """One word for N hypotheses: tokens tf.int32 [N] -> (log_probs tf.float32 [N, V], new state).

        context: rows [N, ...], or [N / r, ...] shared by r consecutive rows (`initial_state`)."""
        return self.step_function(context)(tokens, state, context)

    def _step(self, tokens, state, context, weights):
        h, c = state
        embedded = self.embedding(tokens)
        words = (tf.gather(weights["word_inputs"], tokens) if "word_inputs" in weights
                 else tf.matmul(embedded, weights["words"]))
        h, c, attended, _ = self._recur(words, h, c, context, weights)
        return tf.nn.log_softmax(self._output(embedded, h, attended, None)), (h, c)


def _slots(owners: tf.Tensor, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Rows of G images laid out in G x K slots, K = most rows of one image: image g's in slots
    g*K .. g*K + K-1, in their order.

    Args:
      owners: tf.int32 [N], the image of each row, in any order; images: G.
    Returns:
      (slot_rows tf.int32 [G * K]: the row in each slot, N where an image has fewer than K rows;
      row_slots tf.int32 [N]: each row's slot).
    """
    one_hot = tf.one_hot(owners, images, dtype=tf.int32)  # [N, G]
    rank = tf.reduce_sum(tf.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # row's place among its image's rows
    per_image = tf.reduce_max(tf.concat([rank + 1, [0]], 0))
    row_slots = owners * per_image + rank
    rows = tf.shape(owners)[0]
    slot_rows = tf.tensor_scatter_nd_update(tf.fill([images * per_image], rows), row_slots[:, None], tf.range(rows))
    return slot_rows, row_slots


def build_decoder(vocab_size: int, config: DecoderConfig) -> keras.Model:
    cls = MergeDecoder if config.kind == "merge" else AttentionDecoder
    return cls(vocab_size, config, name=f"{config.kind}_decoder")


def needs_grid(config: DecoderConfig) -> bool:
    """Whether the decoder reads the spatial grid (otherwise the pooled vector is enough)."""
    return config.kind == "attention"
