"""Batched beam search and greedy decoding as plain TensorFlow ops.

Both run inside `tf.function` with a dynamic batch size (one trace serves every batch size) and
export in a SavedModel. They drive any decoder exposed as one step function:

    step_fn(tokens, state, context) -> (log_probs, new_state)
      tokens:    tf.int32 [N]       previous token of each hypothesis (`<start>` at the first step)
      state:     nested structure of tensors, each [N, ...]; reordered by parent beam between steps
      context:   nested structure of tensors, each [N, ...] (e.g. image features); never reordered
      log_probs: float [N, V]       log-softmax over the vocabulary for the next token (values <= 0)

N is B (greedy) or B * beam_size (beam search, the beams of image b in rows b*K .. b*K + K-1).

What is searched: captions y_1 .. y_n (n <= max_length) that end with `<end>`, or that reach
max_length without it (truncated). `<pad>` and `<start>` are never generated, and `<end>` is not
allowed first, so every caption has at least one word. The model's log-probs are used as they are
(not renormalized after forbidding tokens). n counts the `<end>` token when there is one.

  - Ranking: sum_logp / n ** length_penalty (0: raw sum, favours short captions; 1: mean log-prob).
  - Returned score: sum_logp / n, the mean log-prob per token, whatever the ranking penalty.
  - If no caption has a finite log-prob (the model gives -inf to every allowed first token: it puts
    all mass on an immediate `<end>`), the caption is empty: `<end>` alone, length 1, scored with the
    log-prob of `<end>` at the first step. Otherwise every image gets a non-empty caption.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from tfcap.errors import TfcapError
from tfcap.text import END_ID, PAD_ID, START_ID

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
    start_id: int = START_ID,
    end_id: int = END_ID,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Best caption per image by beam search.

    At each step the K alive beams propose K*V extensions and the top K (by summed log-prob) are
    kept; those ending in `<end>` (and, at the last step, all of them) move to a finished set of the
    K best by rank (see the module docstring), where they keep competing with later ones. Beams that
    moved out leave their slot to the next step's candidates. The loop stops early once no alive
    beam can still beat the best finished caption of its image; that bound is exact, so the result
    equals exhaustive search whenever K is at least the number of candidates per step. With K=1 this
    is greedy decoding.

    Args:
      step_fn: the decoder step (module docstring).
      initial_state: nested structure of tensors, each [B, ...]; tiled to [B*K, ...] once.
      context: nested structure of tensors, each [B, ...]; tiled to [B*K, ...] once, never gathered.
      beam_size: K, static.
      max_length: maximum caption length in tokens, `<end>` included; static.
      length_penalty: alpha >= 0 in sum_logp / n ** alpha, used to rank finished captions.
    Returns:
      tokens: tf.int32 [B, max_length], caption without `<start>`, then `<end>` (unless truncated),
        then `<pad>`.
      scores: tf.float32 [B], mean log-prob per token of the caption (`<end>` included).
      lengths: tf.int32 [B], tokens in the caption, `<end>` included.
    """
    _check(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
    k, steps = beam_size, max_length
    batch = _batch_size(initial_state, context)
    # Image b's beams sit in rows b*K .. b*K + K-1, so reordering stays inside one image.
    state = tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), initial_state)
    context = tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), context)
    positions = tf.range(steps)
    row_offsets = k * tf.range(batch)[:, None]  # [B, 1]

    def rank(sums, lengths):
        return sums / tf.cast(lengths, tf.float32) ** length_penalty

    # The K copies of each image are identical at first: only beam 0 is alive, so the first step
    # proposes V distinct candidates instead of K copies of each.
    alive_sum = tf.tile(tf.where(tf.range(k) == 0, 0.0, _NEG_INF)[None, :], [batch, 1])  # [B, K]
    alive_seq = tf.fill([batch, k, steps], PAD_ID)  # [B, K, T]
    fin_seq = tf.fill([batch, k, steps], PAD_ID)
    fin_sum = tf.fill([batch, k], _NEG_INF)  # -inf marks an empty slot
    fin_len = tf.ones([batch, k], tf.int32)
    fin_rank = tf.fill([batch, k], _NEG_INF)  # sorted best first
    end_first = tf.zeros([batch])  # log-prob of <end> as first token, for the empty-caption fallback
    tokens = tf.fill([batch * k], start_id)

    def cond(t, tokens, state, alive_seq, alive_sum, fin_seq, fin_sum, fin_len, fin_rank, end_first):
        # Extending a caption never raises its sum (log-probs <= 0) and n <= max_length, so an alive
        # beam can at best reach best_alive / max_length**alpha (alpha >= 0).
        best_alive = tf.reduce_max(alive_sum, axis=1)
        settled = (best_alive == _NEG_INF) | (rank(best_alive, steps) < fin_rank[:, 0])
        return (t < steps) & ~tf.reduce_all(settled)

    def body(t, tokens, state, alive_seq, alive_sum, fin_seq, fin_sum, fin_len, fin_rank, end_first):
        log_probs, state = step_fn(tokens, state, context)
        log_probs = tf.cast(log_probs, tf.float32)
        vocab = tf.shape(log_probs)[1]
        end_first = tf.where(t == 0, log_probs[::k, end_id], end_first)
        log_probs = _forbid(log_probs, t, start_id, end_id)

        candidates = alive_sum[:, :, None] + tf.reshape(log_probs, [batch, k, vocab])
        top_sum, top_index = tf.math.top_k(tf.reshape(candidates, [batch, k * vocab]), k=k)  # [B, K]
        parent, token = top_index // vocab, top_index % vocab
        state = tf.nest.map_structure(lambda s: tf.gather(s, tf.reshape(parent + row_offsets, [-1])), state)
        seq = tf.gather(alive_seq, parent, batch_dims=1)
        seq = tf.where(positions == t, token[:, :, None], seq)

        # Captions that just ended (or hit max_length) join the finished set; old ones come first in
        # the merge so ties keep the earlier caption (top_k prefers lower indices).
        ended = (top_sum > _NEG_INF) & ((token == end_id) | (t == steps - 1))
        new_len = tf.fill([batch, k], t + 1)
        new_rank = tf.where(ended, rank(top_sum, new_len), _NEG_INF)
        fin_rank, pick = tf.math.top_k(tf.concat([fin_rank, new_rank], axis=1), k=k)
        fin_seq = tf.gather(tf.concat([fin_seq, seq], axis=1), pick, batch_dims=1)
        fin_sum = tf.gather(tf.concat([fin_sum, top_sum], axis=1), pick, batch_dims=1)
        fin_len = tf.gather(tf.concat([fin_len, new_len], axis=1), pick, batch_dims=1)

        alive_sum = tf.where(token == end_id, _NEG_INF, top_sum)
        return (t + 1, tf.reshape(token, [-1]), state, seq, alive_sum, fin_seq, fin_sum, fin_len, fin_rank,
                end_first)

    loop_vars = (tf.constant(0), tokens, state, alive_seq, alive_sum, fin_seq, fin_sum, fin_len, fin_rank, end_first)
    *_, fin_seq, fin_sum, fin_len, _, end_first = tf.while_loop(cond, body, loop_vars, maximum_iterations=steps)
    return _finish(fin_seq[:, 0], fin_sum[:, 0], fin_len[:, 0], end_first, end_id)


def greedy_search(
    step_fn: StepFn,
    initial_state: Any,
    context: Any,
    *,
    max_length: int,
    start_id: int = START_ID,
    end_id: int = END_ID,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Most likely next token at each step; the same result as `beam_search(..., beam_size=1)`.

    Args:
      step_fn: the decoder step (module docstring), called with N = B.
      initial_state: nested structure of tensors, each [B, ...].
      context: nested structure of tensors, each [B, ...].
      max_length: maximum caption length in tokens, `<end>` included; static.
    Returns:
      tokens tf.int32 [B, max_length], scores tf.float32 [B], lengths tf.int32 [B], as `beam_search`.
    """
    _check(beam_size=1, max_length=max_length, length_penalty=0.0)
    steps = max_length
    batch = _batch_size(initial_state, context)
    positions = tf.range(steps)

    def cond(t, tokens, state, seq, sums, lengths, done, end_first):
        return (t < steps) & ~tf.reduce_all(done)

    def body(t, tokens, state, seq, sums, lengths, done, end_first):
        log_probs, state = step_fn(tokens, state, context)
        log_probs = tf.cast(log_probs, tf.float32)
        end_first = tf.where(t == 0, log_probs[:, end_id], end_first)
        log_probs = _forbid(log_probs, t, start_id, end_id)
        token = tf.argmax(log_probs, axis=1, output_type=tf.int32)
        live = ~done  # finished rows still run through step_fn (batched) but change nothing
        seq = tf.where(live[:, None] & (positions == t), token[:, None], seq)
        sums = tf.where(live, sums + tf.reduce_max(log_probs, axis=1), sums)
        lengths = tf.where(live, t + 1, lengths)
        # A -inf sum means no allowed token had a finite log-prob: the caption falls back to empty.
        done = done | (token == end_id) | (sums == _NEG_INF)
        return t + 1, token, state, seq, sums, lengths, done, end_first

    loop_vars = (tf.constant(0), tf.fill([batch], start_id), initial_state, tf.fill([batch, steps], PAD_ID),
                 tf.zeros([batch]), tf.ones([batch], tf.int32), tf.zeros([batch], tf.bool), tf.zeros([batch]))
    *_, seq, sums, lengths, _, end_first = tf.while_loop(cond, body, loop_vars, maximum_iterations=steps)
    return _finish(seq, sums, lengths, end_first, end_id)


def _check(*, beam_size: int, max_length: int, length_penalty: float) -> None:
    if not isinstance(beam_size, int) or beam_size < 1:
        raise TfcapError(f"beam size must be a positive integer, got {beam_size!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise TfcapError(f"maximum caption length must be a positive integer, got {max_length!r}")
    if not length_penalty >= 0:
        raise TfcapError(f"length penalty must be >= 0, got {length_penalty!r}")


def _batch_size(initial_state: Any, context: Any) -> tf.Tensor:
    leaves = tf.nest.flatten((initial_state, context))
    if not leaves:
        raise TfcapError("decoding needs at least one state or context tensor")
    return tf.shape(leaves[0])[0]


def _forbid(log_probs: tf.Tensor, t: tf.Tensor, start_id: int, end_id: int) -> tf.Tensor:
    """log_probs [N, V] with -inf for `<pad>`, `<start>`, and `<end>` at the first step (t == 0)."""
    ids = tf.range(tf.shape(log_probs)[1])
    forbidden = (ids == PAD_ID) | (ids == start_id) | ((ids == end_id) & (t == 0))
    return tf.where(forbidden, _NEG_INF, log_probs)


def _finish(seq, sums, lengths, end_first, end_id):
    """(tokens, scores, lengths) of the chosen captions; `<end>` alone where none had a finite log-prob."""
    empty = sums == _NEG_INF
    empty_caption = tf.where(tf.range(tf.shape(seq)[1]) == 0, end_id, PAD_ID)
    tokens = tf.where(empty[:, None], empty_caption[None, :], seq)
    sums = tf.where(empty, end_first, sums)
    lengths = tf.where(empty, 1, lengths)
    return tokens, sums / tf.cast(lengths, tf.float32), lengths
