"""Batched beam search and greedy decoding as plain TensorFlow ops.

Both run inside `tf.function` with a dynamic batch size (one trace serves every batch size) and
export in a SavedModel. They drive any decoder exposed as one step function:

    step_fn(tokens, state, context) -> (log_probs, new_state)
      tokens:    tf.int32 [N]       previous token of each hypothesis (`<start>` at the first step)
      state:     nested structure of tensors, each [N, ...]; reordered by parent beam between steps
      context:   nested structure of tensors, each [G, ...] (e.g. image features), one row per image
                 in play, shared by its N / G consecutive rows of tokens and state; never reordered
      log_probs: float [N, V]       log-softmax over the vocabulary for the next token (values <= 0)

N is B at the first step (G = B). Later, greedy's N is the captions still growing (rows of ended
captions leave state and context; G = N), beam search's n * beam_size for the n images still open (the
beams of the i-th of them in rows i*K .. i*K + K-1, sharing context row i: an attention decoder's grid
is not copied K times; a settled image's rows leave; G = n).

What is searched: captions y_1 .. y_n (n <= max_length) that end with `<end>`, or that reach
max_length without it (truncated). `<pad>`, `<unk>` and `<start>` are never generated (their
log-probs are set to -inf in the step, before any top-k), and `<end>` is not allowed first, so every
caption has at least one word, and a word of the vocabulary. The model's log-probs are used as they are
(not renormalized after forbidding tokens). n counts the `<end>` token when there is one.

  - Ranking: sum_logp / n ** length_penalty (0: raw sum, favours short captions; 1: mean log-prob).
  - Returned score: sum_logp / n, the mean log-prob per token, whatever the ranking penalty.
  - No repeated n-grams (no_repeat_ngram=n > 0, as `no_repeat_ngram_size` elsewhere): a token that
    would complete an n-gram the hypothesis already holds gets -inf before any top-k, so no caption
    repeats a phrase of n words ("a man wearing a hat is wearing a hat" repeats "wearing a hat", n=3).
    0 (the default) leaves the search exactly as it is without the option.
  - If no caption has a finite log-prob (the model gives -inf to every allowed first token: it puts
    all mass on an immediate `<end>`), the caption is empty: `<end>` alone, length 1, scored with the
    log-prob of `<end>` at the first step. Otherwise every image gets a non-empty caption.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from tfcap.errors import TfcapError
from tfcap.text import END_ID, PAD_ID, START_ID, UNK_ID

StepFn = Callable[[tf.Tensor, Any, Any], "tuple[tf.Tensor, Any]"]

_NEG_INF = float("-inf")


def beam_search(
    step_fn: StepFn,
    initial_state: Any,
    context: Any,
    *,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    start_id: int = START_ID,
    end_id: int = END_ID,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Best caption per image by beam search.

    At each step the K alive beams propose their extensions and the top K (by summed log-prob) are
    kept; those ending in `<end>` (and, at the last step, all of them) are finished captions, of which
    the best by rank (see the module docstring) is kept, competing with later ones. Beams that ended
    leave their slot to the next step's candidates. An image leaves the loop once no alive beam of it can
    still beat its best finished caption, and the loop stops when none is left; that bound is exact, so
    the result equals exhaustive search whenever K is at least the number of candidates per step. With
    K=1 this is greedy decoding.

    Per step, each beam's K best allowed tokens come first (a top-k over its V log-probs, `_top_k`),
    then the top K of those K*K candidates: the global top K of all K*V extensions is among them
    (adding the beam's sum keeps the order within a beam), with the same choice among equal sums
    (lower beam, then lower token id, first). Nothing of size V is touched but by that top-k. The
    first step runs on one row per image, as its K beams would be copies of one.

    Args:
      step_fn: the decoder step (module docstring).
      initial_state: nested structure of tensors, each [B, ...]; its step-0 successor is tiled to [B*K, ...].
      context: nested structure of tensors, each [B, ...]; one row per image, which its K beams share
        (never tiled); the rows of settled images leave.
      beam_size: K, static.
      max_length: maximum caption length in tokens, `<end>` included; static.
      length_penalty: alpha >= 0 in sum_logp / n ** alpha, used to rank finished captions.
      no_repeat_ngram: n >= 0, static: no n-gram twice in a caption (0: no such constraint).
    Returns:
      tokens: tf.int32 [B, max_length], caption without `<start>`, then `<end>` (unless truncated),
        then `<pad>`.
      scores: tf.float32 [B], mean log-prob per token of the caption (`<end>` included).
      lengths: tf.int32 [B], tokens in the caption, `<end>` included.
    """
    _check(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
           no_repeat_ngram=no_repeat_ngram)
    k, steps = beam_size, max_length
    batch = _batch_size(initial_state, context)
    positions = tf.range(steps)
    forbidden = tuple(sorted({PAD_ID, UNK_ID, start_id}))  # never generated; `<end>` is also forbidden first
    best_possible = tf.cast(steps, tf.float32) ** length_penalty

    def rank(sums, length):
        return sums if length_penalty == 0 else sums / tf.cast(length, tf.float32) ** length_penalty

    def record_finished(t, top_sum, token, seq, images, finished):
        """Fold the captions that end at step t (or are cut there) into each image's best finished one.

        top_sum, token [n, K], seq [n, K, T] of the n images in play, `images` [n] their indices in the
        batch; finished: (seq [B, T], sum [B], length [B], rank [B]) of the whole batch."""
        fin_seq, fin_sum, fin_len, fin_rank = finished
        ended = (token == end_id) | (t == steps - 1)
        new_rank = tf.where(ended, rank(top_sum, t + 1), _NEG_INF)  # a -inf sum ranks -inf: never taken
        best, slot = tf.math.top_k(new_rank, k=1)  # equal ranks: the lower slot, i.e. the higher sum first
        best, slot = best[:, 0], slot[:, 0]
        better = best > tf.gather(fin_rank, images)  # strictly: equal ranks keep the earlier caption
        at = tf.boolean_mask(images, better)[:, None]

        def update(whole, in_play):  # whole [B, ...] takes in_play [n, ...] where the image did better
            return tf.tensor_scatter_nd_update(whole, at, tf.boolean_mask(in_play, better))

        return (update(fin_seq, tf.gather(seq, slot, batch_dims=1)),
                update(fin_sum, tf.gather(top_sum, slot, batch_dims=1)),
                update(fin_len, tf.fill(tf.shape(better), t + 1)),
                update(fin_rank, best))

    def settled(alive_sum, images, fin_rank):
        """tf.bool [n]: images in play whose finished caption no alive beam can beat any more. Extending a
        caption never raises its sum (log-probs <= 0) and n <= max_length, so an alive beam can at best
        reach best_alive / max_length**alpha (alpha >= 0)."""
        best_alive = tf.reduce_max(alive_sum, axis=1)
        return (best_alive == _NEG_INF) | (best_alive / best_possible < tf.gather(fin_rank, images))

    finished = (tf.fill([batch, steps], PAD_ID), tf.fill([batch], _NEG_INF), tf.ones([batch], tf.int32),
                tf.fill([batch], _NEG_INF))  # -inf: no finished caption yet
    images = tf.range(batch)

    # Step 0, one row per image: the K best first words (end_first: for the empty-caption fallback).
    log_probs, state = step_fn(tf.fill([batch], start_id), initial_state, context)
    log_probs = tf.cast(log_probs, tf.float32)
    end_first = log_probs[:, end_id]
    top_sum, token = _top_k_padded(_forbid(log_probs, 0, start_id, end_id), k)  # [B, K]
    seq = tf.where(positions == 0, token[:, :, None], PAD_ID)  # [B, K, T]
    finished = record_finished(0, top_sum, token, seq, images, finished)  # only when max_length is 1
    alive_sum = tf.where(token == end_id, _NEG_INF, top_sum)
    state = tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), state)

    # The loop runs on the n images still in play, image i's beams in rows i*K .. i*K + K-1 of tokens
    # and state, its context in row i. Images leave once settled: their finished caption is final (the bound is
    # exact), and the search's cost follows the images still open (with a length penalty the bound is
    # loose: a batch of 64 Flickr8k images takes 15-16 steps, and a third of its rows were settled).
    def cond(t, tokens, state, context, images, alive_seq, alive_sum, *finished):
        return (t < steps) & (tf.size(images) > 0)

    def body(t, tokens, state, context, images, alive_seq, alive_sum, *finished):
        n = tf.size(images)
        log_probs, state = step_fn(tokens, state, context)
        log_probs = tf.cast(log_probs, tf.float32)
        if no_repeat_ngram:
            log_probs = _block_repeats(log_probs, tf.reshape(alive_seq, [-1, steps]), t, no_repeat_ngram)
        values, words = _top_allowed(log_probs, k, forbidden)  # [n*K, C] each
        per_beam = values.shape[1] or tf.shape(values)[1]
        candidates = alive_sum[:, :, None] + tf.reshape(values, [n, k, per_beam])
        top_sum, pick = tf.math.top_k(tf.reshape(candidates, [n, k * per_beam]), k=k)  # [n, K]
        parent = pick // per_beam
        token = tf.gather(tf.reshape(words, [n, k * per_beam]), pick, batch_dims=1)
        rows = tf.reshape(parent + k * tf.range(n)[:, None], [-1])
        state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
        seq = tf.where(positions == t, token[:, :, None], tf.gather(alive_seq, parent, batch_dims=1))
        finished = record_finished(t, top_sum, token, seq, images, finished)
        alive_sum = tf.where(token == end_id, _NEG_INF, top_sum)
        token = tf.reshape(token, [-1])
        keep = tf.where(~settled(alive_sum, images, finished[3]))[:, 0]
        keep_rows = tf.reshape(k * keep[:, None] + tf.range(k, dtype=keep.dtype), [-1])
        token, state = _keep_rows(keep_rows, n * k, (token, state))  # the beams' rows
        images, context, seq, alive_sum = _keep_rows(keep, n, (images, context, seq, alive_sum))  # the images'
        return (t + 1, token, state, context, images, seq, alive_sum, *finished)

    loop_vars = (tf.constant(1), tf.reshape(token, [-1]), state, context, images, seq, alive_sum, *finished)
    invariants = _rows_in_play(loop_vars, 1, 7)  # tokens .. alive_sum: the rows of the images in play
    *_, fin_seq, fin_sum, fin_len, _ = tf.while_loop(cond, body, loop_vars, shape_invariants=invariants,
                                                     maximum_iterations=steps - 1)
    return _finish(fin_seq, fin_sum, fin_len, end_first, end_id)


def greedy_search(
    step_fn: StepFn,
    initial_state: Any,
    context: Any,
    *,
    max_length: int,
    no_repeat_ngram: int = 0,
    start_id: int = START_ID,
    end_id: int = END_ID,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Most likely next token at each step; the same result as `beam_search(..., beam_size=1)`.

    Rows leave the step once their captions have ended, so its cost follows the captions still
    growing, not the batch's longest.

    Args:
      step_fn: the decoder step (module docstring), called with N <= B: the rows still in play.
      initial_state: nested structure of tensors, each [B, ...].
      context: nested structure of tensors, each [B, ...]: one row per image (gathered with the state).
      max_length: maximum caption length in tokens, `<end>` included; static.
      no_repeat_ngram: as `beam_search`.
    Returns:
      tokens tf.int32 [B, max_length], scores tf.float32 [B], lengths tf.int32 [B], as `beam_search`.
    """
    _check(beam_size=1, max_length=max_length, length_penalty=0.0, no_repeat_ngram=no_repeat_ngram)
    steps = max_length
    batch = _batch_size(initial_state, context)
    positions = tf.range(steps)

    def cond(t, tokens, state, context, rows, seq, sums, lengths, done, end_first):
        return (t < steps) & ~tf.reduce_all(done)

    def body(t, tokens, state, context, rows, seq, sums, lengths, done, end_first):
        # The step runs on the captions still growing: `rows` [n] of the B, their tokens, state, context.
        log_probs, state = step_fn(tokens, state, context)
        log_probs = tf.cast(log_probs, tf.float32)
        at = rows[:, None]
        end_first = tf.where(t == 0, tf.tensor_scatter_nd_update(end_first, at, log_probs[:, end_id]), end_first)
        log_probs = _forbid(log_probs, t, start_id, end_id)
        row_seq = tf.gather(seq, rows)
        if no_repeat_ngram:
            log_probs = _block_repeats(log_probs, row_seq, t, no_repeat_ngram)
        token = tf.argmax(log_probs, axis=1, output_type=tf.int32)
        row_sums = tf.gather(sums, rows) + tf.reduce_max(log_probs, axis=1)
        seq = tf.tensor_scatter_nd_update(seq, at, tf.where(positions == t, token[:, None], row_seq))
        sums = tf.tensor_scatter_nd_update(sums, at, row_sums)
        lengths = tf.tensor_scatter_nd_update(lengths, at, tf.fill(tf.shape(rows), t + 1))
        # A -inf sum means no allowed token had a finite log-prob: the caption falls back to empty.
        ended = (token == end_id) | (row_sums == _NEG_INF)
        done = tf.tensor_scatter_nd_update(done, at, ended)
        # Captions end at different steps (Flickr8k's: 10 tokens on average, 13-15 for the longest of
        # 64): those that ended leave, so that the step's arithmetic follows the captions still
        # growing (greedy decoding of 64 images a quarter faster). At every step where some end: that
        # measured faster than waiting for a quarter of them, although each time copies the context
        # (an attention decoder's grid).
        token, state, context, rows = _keep_rows(tf.where(~ended)[:, 0], tf.size(rows), (token, state, context, rows))
        return t + 1, token, state, context, rows, seq, sums, lengths, done, end_first

    loop_vars = (tf.constant(0), tf.fill([batch], start_id), initial_state, context, tf.range(batch),
                 tf.fill([batch, steps], PAD_ID), tf.zeros([batch]), tf.ones([batch], tf.int32),
                 tf.zeros([batch], tf.bool), tf.zeros([batch]))
    invariants = _rows_in_play(loop_vars, 1, 5)  # tokens .. rows: the rows in play
    *_, seq, sums, lengths, _, end_first = tf.while_loop(cond, body, loop_vars, shape_invariants=invariants,
                                                         maximum_iterations=steps)
    return _finish(seq, sums, lengths, end_first, end_id)


def sample_search(
    step_fn: StepFn,
    initial_state: Any,
    context: Any,
    *,
    max_length: int,
    seed: tf.Tensor,
    start_id: int = START_ID,
    end_id: int = END_ID,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One caption per row drawn word by word from the model's distribution (self-critical training).

    The same tokens are forbidden as in `greedy_search`, so samples look like what beam search can
    produce. Stateless: the same seed gives the same samples (an exactly resumable run).

    Args:
      step_fn, initial_state, context: as `greedy_search`, N = B rows (tile them for several samples).
      max_length: maximum caption length in tokens, `<end>` included; static.
      seed: tf.int64 [2], the stateless random seed.
    Returns:
      tokens tf.int32 [B, max_length] (`<end>` included when drawn, then `<pad>`), lengths tf.int32 [B]
      (tokens drawn, `<end>` included).
    """
    _check(beam_size=1, max_length=max_length, length_penalty=0.0)
    batch = _batch_size(initial_state, context)
    positions = tf.range(max_length)
    seed = tf.cast(seed, tf.int64)

    def cond(t, tokens, state, seq, lengths, done):
        return (t < max_length) & ~tf.reduce_all(done)

    def body(t, tokens, state, seq, lengths, done):
        log_probs, state = step_fn(tokens, state, context)
        log_probs = _forbid(tf.cast(log_probs, tf.float32), t, start_id, end_id)
        step_seed = seed + tf.stack([tf.constant(0, tf.int64), tf.cast(t + 1, tf.int64) * 7919])
        token = tf.cast(tf.random.stateless_categorical(log_probs, 1, seed=step_seed)[:, 0], tf.int32)
        live = ~done
        seq = tf.where(live[:, None] & (positions == t), token[:, None], seq)
        lengths = tf.where(live, t + 1, lengths)
        return t + 1, token, state, seq, lengths, done | (token == end_id)

    loop_vars = (tf.constant(0), tf.fill([batch], start_id), initial_state, tf.fill([batch, max_length], PAD_ID),
                 tf.zeros([batch], tf.int32), tf.zeros([batch], tf.bool))
    *_, seq, lengths, _ = tf.while_loop(cond, body, loop_vars, maximum_iterations=max_length)
    return seq, lengths


def _check(*, beam_size: int, max_length: int, length_penalty: float, no_repeat_ngram: int = 0) -> None:
    if isinstance(no_repeat_ngram, bool) or not isinstance(no_repeat_ngram, int) or no_repeat_ngram < 0:
        raise TfcapError(f"no-repeat n-gram size must be an integer >= 0 (0: off), got {no_repeat_ngram!r}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise TfcapError(f"beam size must be a positive integer, got {beam_size!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise TfcapError(f"maximum caption length must be a positive integer, got {max_length!r}")
    if not length_penalty >= 0:
        raise TfcapError(f"length penalty must be >= 0, got {length_penalty!r}")


def _keep_rows(keep: tf.Tensor, count, structure: Any) -> Any:
    """`structure` (nested tensors, each [count, ...]) with only its rows `keep` (int [m], m <= count):
    what is left in play when some leave; returned as it is, without a copy, when none leaves."""
    return tf.cond(tf.size(keep, out_type=keep.dtype) < tf.cast(count, keep.dtype),
                   lambda: tf.nest.map_structure(lambda x: tf.gather(x, keep), structure), lambda: structure)


def _rows_in_play(loop_vars: tuple, first: int, end: int) -> tuple:
    """Shape invariants of a search's loop variables: those in [first, end) hold rows of what is still
    in play (captions or images that leave as they settle), any number of them; the rest keep their shape."""
    shapes = tf.nest.map_structure(lambda x: x.shape, loop_vars)
    free = tf.nest.map_structure(lambda x: tf.TensorShape([None]).concatenate(x.shape[1:]), loop_vars[first:end])
    return (*shapes[:first], *free, *shapes[end:])


def _batch_size(initial_state: Any, context: Any) -> tf.Tensor:
    leaves = tf.nest.flatten((initial_state, context))
    if not leaves:
        raise TfcapError("decoding needs at least one state or context tensor")
    return tf.shape(leaves[0])[0]


def _forbidden(vocab_size: tf.Tensor, t: tf.Tensor, start_id: int, end_id: int) -> tf.Tensor:
    """tf.bool [..., V]: `<pad>`, `<unk>`, `<start>`, and `<end>` at the first step; t int32 [] or [T, 1]."""
    ids = tf.range(vocab_size)
    return (ids == PAD_ID) | (ids == UNK_ID) | (ids == start_id) | ((ids == end_id) & (t == 0))


def _forbid(log_probs: tf.Tensor, t: tf.Tensor, start_id: int, end_id: int) -> tf.Tensor:
    """log_probs [N, V] with -inf for the tokens never generated at step t (`_forbidden`)."""
    return tf.where(_forbidden(tf.shape(log_probs)[1], t, start_id, end_id), _NEG_INF, log_probs)


def _block_repeats(log_probs: tf.Tensor, seq: tf.Tensor, t: tf.Tensor, n: int) -> tf.Tensor:
    """log_probs [N, V] with -inf for each token that would complete an n-gram already in its hypothesis.

    seq: tf.int32 [N, T], each hypothesis's tokens at positions < t (anything beyond); the token chosen
    at position t closes the n-gram seq[t-n+1 .. t-1] + token, a repeat when some earlier n-gram
    seq[i .. i+n-1] (i + n - 1 < t) starts with the same n-1 tokens: its last token, seq[i+n-1], is the
    one banned. All earlier n-grams of all rows are compared at once (T - n + 1 of them, n - 1 token
    comparisons each); the banned (row, token) pairs, at most T per row, are set by one scatter.
    """
    steps = seq.shape[1]
    if steps is None or steps <= n:  # no room for an n-gram and a later one
        return log_probs
    windows = steps - n + 1  # earlier n-grams start at i = 0 .. T-n
    match = tf.range(windows)[None, :] <= t - n  # [1, W]: the n-gram at i ends before position t
    for j in range(n - 1):  # static: compare the j-th token of every earlier n-gram with the current one
        current = tf.gather(seq, tf.maximum(t - n + 1 + j, 0), axis=1)  # [N]; clamped where nothing matches
        match = match & (seq[:, j:j + windows] == current[:, None])
    found = tf.where(match)  # [M, 2]: (row, start) of each earlier n-gram to not complete again
    banned = tf.stack([found[:, 0], tf.cast(tf.gather_nd(seq[:, n - 1:], found), tf.int64)], axis=1)
    return tf.tensor_scatter_nd_update(log_probs, banned, tf.fill(tf.shape(banned)[:1], _NEG_INF))


def sampled_log_probs(logits: tf.Tensor, tokens: tf.Tensor, lengths: tf.Tensor, start_id: int = START_ID,
                      end_id: int = END_ID) -> tf.Tensor:
    """Log-probabilities of `sample_search`'s samples from the decoder's teacher-forced logits.

    Each position's distribution is the one the sampler drew from: the softmax renormalized over the
    tokens that may be generated there, so that no gradient reaches the forbidden tokens.

    Args:
      logits: tf.float32 [N, T, V], the decoder fed `<start>` and tokens[:, :-1].
      tokens: tf.int32 [N, T] as `sample_search` returns them; lengths: tf.int32 [N].
    Returns:
      tf.float32 [N, T]: log p(tokens[n, t]) for t < lengths[n], 0 beyond.
    """
    steps = tf.range(tf.shape(logits)[1])
    forbidden = _forbidden(tf.shape(logits)[2], steps[:, None], start_id, end_id)  # [T, V]
    log_probs = tf.nn.log_softmax(tf.where(forbidden[None], _NEG_INF, logits))
    chosen = tf.gather(log_probs, tokens, batch_dims=2)
    return tf.where(steps[None, :] < lengths[:, None], chosen, 0.0)  # -inf at <pad> beyond the length


def _top_allowed(log_probs: tf.Tensor, count: int, forbidden: tuple[int, ...]) -> tuple[tf.Tensor, tf.Tensor]:
    """Each row's `count` best allowed tokens, and possibly more: (values, tokens), each [N, C].

    The top count + len(forbidden) (at most V) of each row, then the forbidden tokens among them set
    to -inf: the `count` best allowed tokens are always among the rest, with ties in token order.
    Values are not sorted.
    """
    take = count + len(forbidden)
    vocab = log_probs.shape[1]
    take = min(take, vocab) if vocab is not None else tf.minimum(take, tf.shape(log_probs)[1])
    values, tokens = _top_k(log_probs, take)
    banned = tokens == forbidden[0]
    for token in forbidden[1:]:
        banned = banned | (tokens == token)
    return tf.where(banned, _NEG_INF, values), tokens


def _top_k(x: tf.Tensor, k, chunk: int = 32) -> tuple[tf.Tensor, tf.Tensor]:
    """`tf.math.top_k(x, k)` of rows [N, V]: the same values and indices (equal values: lower index
    first), in two stages when V is large: about half the time on a CPU for V = 2,500-3,000, k = 5.

    V is cut into chunks of `chunk` columns (the last one padded with -inf); the k chunks with the
    largest maxima (equal maxima: lower chunk first) hold the top k: a chunk left out has k chosen
    chunks before it, each with an element at least as large that comes first. Those k chunks, put
    back in column order, go through an ordinary top_k, so ties still resolve by column.
    """
    vocab = x.shape[1]
    if not isinstance(k, int) or vocab is None or vocab < 4 * k * chunk:
        return tf.math.top_k(x, k=k)
    chunks = -(-vocab // chunk)
    if chunks * chunk > vocab:
        x = tf.pad(x, [[0, 0], [0, chunks * chunk - vocab]], constant_values=_NEG_INF)
    x = tf.reshape(x, [-1, chunks, chunk])
    _, best = tf.math.top_k(tf.reduce_max(x, axis=2), k=k)
    best = tf.sort(best, axis=1)
    values, at = tf.math.top_k(tf.reshape(tf.gather(x, best, batch_dims=1), [-1, k * chunk]), k=k)
    return values, tf.gather(best, at // chunk, batch_dims=1) * chunk + at % chunk


def _top_k_padded(log_probs: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """top_k of each row [N, V] -> (values, indices) [N, k]; -inf and `<pad>` past V (when V < k)."""
    vocab = log_probs.shape[1]
    if vocab is not None and vocab >= k:
        return _top_k(log_probs, k)
    take = min(k, vocab) if vocab is not None else tf.minimum(k, tf.shape(log_probs)[1])
    values, tokens = tf.math.top_k(log_probs, k=take)
    missing = k - tf.shape(values)[1]
    return (tf.pad(values, [[0, 0], [0, missing]], constant_values=_NEG_INF),
            tf.pad(tokens, [[0, 0], [0, missing]], constant_values=PAD_ID))


def _finish(seq, sums, lengths, end_first, end_id):
    """(tokens, scores, lengths) of the chosen captions; `<end>` alone where none had a finite log-prob."""
    empty = sums == _NEG_INF
    empty_caption = tf.where(tf.range(tf.shape(seq)[1]) == 0, end_id, PAD_ID)
    tokens = tf.where(empty[:, None], empty_caption[None, :], seq)
    sums = tf.where(empty, end_first, sums)
    lengths = tf.where(empty, 1, lengths)
    return tokens, sums / tf.cast(lengths, tf.float32), lengths
