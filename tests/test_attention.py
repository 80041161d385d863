"""The attention decoder's fast formulation: the same loss, gradients and captions as the plain one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from test_decoding import per_row
from tfcap import decoder, decoding, model
from tfcap.errors import TfcapError

VOCAB, LOCATIONS, CHANNELS = 40, 9, 24


def build(context_dim: int | None = 0, dropout: float = 0.0) -> decoder.AttentionDecoder:
    """A small attention decoder with its variables created, logits spread out (no near-ties in decoding)."""
    config = decoder.DecoderConfig(kind="attention", units=16, embed_dim=8, attention_dim=12, dropout=dropout,
                                   context_dim=context_dim)
    built = decoder.build_decoder(VOCAB, config)
    built({"grid": tf.zeros([1, LOCATIONS, CHANNELS])}, tf.zeros([1, 2], tf.int32))
    built.logits.kernel.assign(built.logits.kernel * 20.0)
    return built


def reference_step(dec, embedded, h, c, grid, projected):
    """Show, Attend and Tell as tfcap computed it before the fast formulation, one caption per grid
    row: the LSTM cell on [word, gated context], the deep output from the same step's word, state and
    context. Returns (logits [N, V], new h, new c, alpha [N, L])."""
    scores = dec.attend_score(tf.tanh(projected + dec.attend_state(h)[:, None, :]))[..., 0]
    alpha = tf.nn.softmax(scores, axis=-1)
    attended = dec.gate(h) * tf.reduce_sum(alpha[..., None] * grid, axis=1)
    out, (new_h, new_c) = dec.cell(tf.concat([embedded, attended], axis=-1), [h, c])
    logits = dec.logits(tf.tanh(embedded + dec.out_state(out) + dec.out_context(attended)))
    return logits, new_h, new_c, alpha


def reference_call(dec, grid, tokens):
    """Teacher forcing, one step at a time in Python: (logits [N, T, V], penalty [])."""
    grid = tf.cast(grid, tf.float32)
    mean = tf.reduce_mean(grid, axis=1)
    h, c, projected = dec.init_h(mean), dec.init_c(mean), dec.attend_features(grid)
    embedded, keep = dec.embedding(tokens), tf.cast(tokens != 0, tf.float32)
    logits, attention_sum = [], 0.0
    for t in range(tokens.shape[1]):
        step_logits, new_h, new_c, alpha = reference_step(dec, embedded[:, t], h, c, grid, projected)
        kept = keep[:, t, None]
        h, c = kept * new_h + (1 - kept) * h, kept * new_c + (1 - kept) * c
        attention_sum += alpha * kept
        logits.append(step_logits)
    penalty = tf.reduce_mean(tf.reduce_sum(tf.square(1.0 - attention_sum), axis=1))
    return tf.stack(logits, axis=1), dec.config.attention_penalty * penalty


def loss_and_gradients(dec, forward):
    """(loss = masked cross-entropy on the next tokens + penalty, the words' logits, gradients of every
    variable)."""
    with tf.GradientTape() as tape:
        logits, penalty, targets = forward()
        mask = tf.cast(targets != 0, tf.float32)
        token_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        loss = tf.reduce_sum(token_losses * mask) / tf.reduce_sum(mask) + penalty
    return loss, tf.boolean_mask(logits, mask > 0), tape.gradient(loss, dec.trainable_variables)


def assert_same(a, b):
    loss_a, logits_a, grads_a = a
    loss_b, logits_b, grads_b = b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-4, atol=1e-5)
    grads_a, grads_b = ([tf.convert_to_tensor(g).numpy() for g in grads] for grads in (grads_a, grads_b))
    scale = max(np.abs(g).max() for g in grads_a)  # attend_score's bias: 0 but for rounding (the softmax cancels it)
    for g, h in zip(grads_a, grads_b):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5 * scale)


def captions_batch(seed=0):
    """Three images' grids (float16, as the feature cache stores them), seven captions of unequal
    lengths (padded with 0), their images in no particular order and in unequal numbers."""
    rng = np.random.default_rng(seed)
    grids = tf.constant(rng.normal(size=(3, LOCATIONS, CHANNELS)), tf.float16)
    owners = tf.constant([2, 0, 0, 1, 2, 2, 0], tf.int32)
    tokens = rng.integers(4, VOCAB, size=(7, 6))
    for row, length in enumerate([6, 3, 5, 1, 6, 2, 4]):
        tokens[row, length:] = 0
    tokens = tf.constant(tokens, tf.int32)
    targets = tf.concat([tokens[:, 1:], tf.zeros([7, 1], tf.int32)], axis=1)
    return grids, owners, tokens, targets


def test_fast_formulation_gives_the_plain_one_s_loss_and_gradients():
    """context_dim 0 is the model of runs from before the fast formulation: same weights, same numbers,
    whether each caption comes with its own grid or the captions of an image share one (owners)."""
    dec = build(context_dim=0)
    grids, owners, tokens, targets = captions_batch()
    per_caption = tf.gather(grids, owners)
    plain = loss_and_gradients(dec, lambda: (*reference_call(dec, per_caption, tokens), targets))
    assert_same(plain, loss_and_gradients(dec, lambda: (*dec({"grid": per_caption}, tokens), targets)))
    assert_same(plain, loss_and_gradients(dec, lambda: (*dec({"grid": grids}, tokens, owners=owners), targets)))
    moved = [np.abs(tf.convert_to_tensor(g)).max() > 1e-4 for g, v in zip(plain[2], dec.trainable_variables)
             if "attend_score/bias" not in v.path]
    assert float(plain[0]) > 1.0 and all(moved)  # every weight takes part
    logits, _ = dec({"grid": grids}, tokens, owners=owners)
    assert not np.any(logits.numpy()[tokens.numpy() == 0])  # padded positions: 0, never computed


@pytest.mark.parametrize("seed", [None, [3, 4]])
def test_captions_sharing_their_image_s_grid_train_as_with_a_grid_each(seed):
    """Batches by image (the default projected grid, dropout on or off): the grid, its projections and
    the initial state once per image give what a copy of them per caption gives, dropout masks included."""
    dec = build(context_dim=None, dropout=0.3)
    assert dec.config.context_dim == dec.config.units
    grids, owners, tokens, targets = captions_batch(1)
    seed = None if seed is None else tf.constant(seed, tf.int64)
    shared = loss_and_gradients(dec, lambda: (*dec({"grid": grids}, tokens, seed=seed, owners=owners), targets))
    apart = loss_and_gradients(dec, lambda: (*dec({"grid": tf.gather(grids, owners)}, tokens, seed=seed), targets))
    assert_same(shared, apart)


def reference_decoder_step(dec):
    """The decoding step before the fast formulation (the `tfcap.decoding` step contract)."""
    def step(tokens, state, context):
        rows = per_row(context, tokens)  # one context row per caption, as the plain step read it
        logits, h, c, _ = reference_step(dec, dec.embedding(tokens), *state, rows["grid"], rows["projected"])
        return tf.nn.log_softmax(logits), (h, c)
    return step


def test_decoding_gives_the_captions_of_the_plain_step():
    dec = build(context_dim=0)
    grids = tf.constant(np.random.default_rng(2).normal(size=(5, LOCATIONS, CHANNELS)), tf.float16)
    state, context = dec.initial_state({"grid": grids})
    for search in (lambda step: decoding.greedy_search(step, state, context, max_length=8),
                   lambda step: decoding.beam_search(step, state, context, beam_size=3, max_length=8)):
        fast, plain = search(dec.step), search(reference_decoder_step(dec))
        np.testing.assert_array_equal(fast[0], plain[0])
        np.testing.assert_allclose(fast[1], plain[1], rtol=1e-5)
    assert len({tuple(row) for row in fast[0].numpy()}) > 1  # the images get different captions


def test_samples_of_an_image_share_its_context_in_the_step():
    """SCST's K samples per image: a context of B rows for B*K state rows, rows b*K.. b*K+K-1 reading
    image b, steps like a context copied K times."""
    dec = build()
    grids = tf.constant(np.random.default_rng(3).normal(size=(2, LOCATIONS, CHANNELS)), tf.float16)
    state, context = dec.initial_state({"grid": grids})
    tile = lambda x: tf.repeat(x, 3, axis=0)  # noqa: E731
    tokens = tf.constant([5, 6, 7, 8, 9, 10], tf.int32)
    shared_log_probs, shared_state = dec.step(tokens, tf.nest.map_structure(tile, state), context)
    copied_log_probs, copied_state = dec.step(tokens, tf.nest.map_structure(tile, state),
                                              tf.nest.map_structure(tile, context))
    np.testing.assert_allclose(shared_log_probs, copied_log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared_state[0], copied_state[0], rtol=1e-5, atol=1e-6)


def test_runs_from_before_the_projected_grid_keep_their_weights_layout():
    """A config.json without context_dim is a model attending over the grid itself, whose weights are
    the ones its best.weights.h5 holds (names and shapes of tfcap before the projected grid)."""
    saved = dict(kind="attention", units=16, embed_dim=8, dropout=0.5, attention_dim=12, attention_penalty=1.0)
    config = decoder.DecoderConfig.from_dict(json.loads(json.dumps(saved)))
    assert config.context_dim == 0
    assert decoder.DecoderConfig.from_dict({**saved, "context_dim": 32}).context_dim == 32
    dec = model.build_decoder(model.ModelConfig(encoder=None, decoder=config, text=None, precision="float32",
                                                vocab_size=VOCAB, vocab_sha256=""), CHANNELS, LOCATIONS)
    layout = [(w.path.split("/", 1)[1], tuple(w.shape)) for w in dec.weights]
    assert layout == [
        ("init_h/kernel", (24, 16)), ("init_h/bias", (16,)), ("init_c/kernel", (24, 16)), ("init_c/bias", (16,)),
        ("attend_features/kernel", (24, 12)), ("attend_features/bias", (12,)),
        ("attend_state/kernel", (16, 12)), ("attend_state/bias", (12,)),
        ("attend_score/kernel", (12, 1)), ("attend_score/bias", (1,)),
        ("gate/kernel", (16, 1)), ("gate/bias", (1,)), ("embedding/embeddings", (VOCAB, 8)),
        ("lstm_cell/kernel", (8 + 24, 64)), ("lstm_cell/recurrent_kernel", (16, 64)), ("lstm_cell/bias", (64,)),
        ("out_state/kernel", (16, 8)), ("out_state/bias", (8,)), ("out_context/kernel", (24, 8)),
        ("out_context/bias", (8,)), ("logits/kernel", (8, VOCAB)), ("logits/bias", (VOCAB,))]


def step_and_teacher_forcing(dec, grids, tokens):
    """(log-probs [N, V] and h [N, units] of one step from the initial state, logits [N, T, V] by teacher forcing)."""
    state, context = dec.initial_state({"grid": grids})
    log_probs, (h, _) = dec.step_function(context)(tokens[:, 0], state, context)
    logits, _ = dec({"grid": grids}, tokens)
    return log_probs.numpy(), h.numpy(), logits.numpy()


def test_a_frozen_decoder_captions_as_the_live_one():
    """Captioning freezes the decoder (model.load_model(inference=True)): the step's weights and the
    words' LSTM inputs are computed once, at load. In float32 that changes nothing but rounding."""
    dec = build(context_dim=None)
    grids = tf.constant(np.random.default_rng(4).normal(size=(5, LOCATIONS, CHANNELS)), tf.float16)
    tokens = tf.constant(np.random.default_rng(5).integers(4, VOCAB, size=(5, 6)), tf.int32)
    live = step_and_teacher_forcing(dec, grids, tokens)
    state, context = dec.initial_state({"grid": grids})
    searches = (lambda step: decoding.greedy_search(step, state, context, max_length=8),
                lambda step: decoding.beam_search(step, state, context, beam_size=3, max_length=8))
    live_captions = [search(dec.step_function(context)) for search in searches]
    dec.freeze("float32")
    assert dec.precision == "float32" and dec._frozen["word_inputs"].shape == (VOCAB, 4 * dec.config.units)
    for got, want in zip(step_and_teacher_forcing(dec, grids, tokens), live):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    state, context = dec.initial_state({"grid": grids})
    for search, want in zip(searches, live_captions):
        got = search(dec.step_function(context))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    with pytest.raises(TfcapError, match="does not train"):  # no dropout, no training on frozen weights
        dec({"grid": grids}, tokens, seed=tf.constant([1, 2], tf.int64))


def test_a_decoder_frozen_in_bfloat16_computes_its_matmuls_in_bfloat16():
    dec = build(context_dim=None)
    grids = tf.constant(np.random.default_rng(6).normal(size=(4, LOCATIONS, CHANNELS)), tf.float16)
    tokens = tf.constant(np.random.default_rng(7).integers(4, VOCAB, size=(4, 5)), tf.int32)
    want = step_and_teacher_forcing(dec, grids, tokens)
    dec.freeze("bfloat16")
    assert dec.precision == "bfloat16"
    assert {dec._frozen[k].dtype for k in ("state", "context", "project_grid", "attend_features")} == {tf.bfloat16}
    got = step_and_teacher_forcing(dec, grids, tokens)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and not np.array_equal(g, w)  # really rounded to bfloat16 on the way
        # bfloat16 keeps 8 bits of mantissa (0.4%): within a few percent of float32's scale after a few steps
        np.testing.assert_allclose(g, w, rtol=0.03, atol=0.03 * np.abs(w).max())
    with pytest.raises(TfcapError, match="unknown decoder precision"):
        dec.freeze("float16")


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, gpu=False): the machine `decoder.resolve_precision` sees."""
    from tfcap import encoder

    def machine(flags: set[str], gpu: bool = False):
        monkeypatch.setattr(encoder, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(encoder, "gpu_visible", lambda: gpu)
    return machine


def test_auto_decoder_precision_is_bfloat16_only_for_attention_on_a_cpu_with_bfloat16_instructions(cpu):
    resolve = decoder.resolve_precision
    cpu({"avx2", "avx512f", "avx512_bf16"})
    assert [resolve(None, "attention"), resolve("auto", "attention"), resolve("auto", "merge")] == \
        ["bfloat16", "bfloat16", "float32"]
    assert resolve("float32", "attention") == "float32" and resolve("bfloat16", "attention") == "bfloat16"
    with pytest.raises(TfcapError, match="for the attention decoder; this model's is merge"):
        resolve("bfloat16", "merge")
    with pytest.raises(TfcapError, match="unknown decoder precision 'half'"):
        resolve("half", "attention")
    cpu({"avx2", "avx512f"})  # emulated bfloat16 is slower than float32
    assert resolve("auto", "attention") == "float32"
    with pytest.raises(TfcapError, match="needs a GPU or a CPU with bfloat16 instructions"):
        resolve("bfloat16", "attention")
    cpu({"avx2"}, gpu=True)  # a GPU's float32 matmuls are fast already; asked for, bfloat16 runs there
    assert resolve("auto", "attention") == "float32" and resolve("bfloat16", "attention") == "bfloat16"
