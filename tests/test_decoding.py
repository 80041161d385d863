"""Beam search and greedy decoding against exhaustive search and NumPy rollouts on a tiny RNN "model"."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tfcap.decoding import beam_search, greedy_search
from tfcap.errors import TfcapError
from tfcap.text import END_ID, PAD_ID, START_ID, UNK_ID

V, H, D, REGIONS = 7, 6, 4, 2  # vocabulary: <pad> <unk> <start> <end> and words 4, 5, 6
WORDS = [4, 5, 6]  # tokens a caption may contain besides <end> (never <unk>)


class TinyModel:
    """A random RNN decoder in pure TF, so next-token distributions depend on the image and on history.

    State {"h": [N, H], "step": [N, 1]}; context {"features": [G, REGIONS, D], "end_bias": [G]}, one row per
    image, shared by its N / G consecutive hypotheses (the `tfcap.decoding` step contract), where end_bias
    is added to the `<end>` logit (-inf: this image never ends).
    """

    def __init__(self, seed=0, scale=2.0, forbidden_bias=0.0):
        rng = np.random.default_rng(seed)
        normal = lambda *shape: tf.constant(rng.normal(size=shape), tf.float32)
        self.emb, self.u, self.wc, self.wi, self.ws, self.wo = (
            normal(V, H), normal(H, H), normal(D, H), normal(D, H), normal(1, H), normal(H, V) * scale)
        # forbidden_bias makes <pad>/<unk>/<start> the model's favourites, to check they are never generated.
        self.bias = tf.constant([forbidden_bias, forbidden_bias, forbidden_bias, 0, 0, 0, 0], tf.float32)

    def initial_state(self, features):
        return {"h": tf.tanh(tf.reduce_mean(features, axis=1) @ self.wi), "step": tf.zeros([tf.shape(features)[0], 1])}

    def step(self, tokens, state, context):
        context = per_row(context, tokens)
        h = tf.tanh(tf.gather(self.emb, tokens) + state["h"] @ self.u
                    + tf.reduce_mean(context["features"], axis=1) @ self.wc + state["step"] * self.ws)
        logits = h @ self.wo + self.bias
        logits = tf.where(tf.range(V) == END_ID, logits + context["end_bias"][:, None], logits)
        return tf.nn.log_softmax(logits), {"h": h, "step": state["step"] + 1}


def per_row(context, tokens):
    """A step's context [G, ...] repeated to its N hypothesis rows (N / G consecutive rows per image)."""
    rows = tf.shape(tokens)[0] // tf.maximum(tf.shape(tf.nest.flatten(context)[0])[0], 1)  # 0 images: 0 rows
    return tf.nest.map_structure(lambda x: tf.repeat(x, rows, axis=0), context)


def images(count, seed=1, end_bias=None):
    rng = np.random.default_rng(seed)
    features = tf.constant(rng.normal(size=(count, REGIONS, D)), tf.float32)
    end_bias = tf.zeros([count]) if end_bias is None else tf.constant(end_bias, tf.float32)
    return features, end_bias


def decoder(model, search, **options):
    """search(model) inside one tf.function, traced once for any batch size."""

    @tf.function(input_signature=[tf.TensorSpec([None, REGIONS, D]), tf.TensorSpec([None])])
    def run(features, end_bias):
        context = {"features": features, "end_bias": end_bias}
        return search(model.step, model.initial_state(features), context, **options)

    return lambda features, end_bias: [x.numpy() for x in run(features, end_bias)]


def sequence_log_probs(model, features, end_bias, captions):
    """Summed log-probs of captions [M, T] (padded; length up to <end>, else T) by teacher forcing.

    features [M, REGIONS, D] and end_bias [M] are the images the captions belong to.
    """
    captions = np.asarray(captions, np.int32)
    m, steps = captions.shape
    context = {"features": tf.convert_to_tensor(features), "end_bias": tf.convert_to_tensor(end_bias, tf.float32)}
    state = model.initial_state(context["features"])
    tokens, total, alive = np.full(m, START_ID, np.int32), np.zeros(m, np.float64), np.ones(m, bool)
    for t in range(steps):
        log_probs, state = model.step(tf.constant(tokens), state, context)
        total += np.where(alive, log_probs.numpy()[np.arange(m), captions[:, t]], 0.0)
        alive &= captions[:, t] != END_ID
        tokens = captions[:, t]
    return total


def exhaustive_best(model, features, end_bias, max_length, length_penalty):
    """(caption, sum_logp, length) maximizing sum_logp / length**length_penalty over every valid caption."""
    captions = [words + (END_ID,) for n in range(1, max_length) for words in itertools.product(WORDS, repeat=n)]
    captions += list(itertools.product(WORDS, repeat=max_length))  # cut at max_length, no <end>
    lengths = np.array([len(c) for c in captions])
    padded = np.array([c + (PAD_ID,) * (max_length - len(c)) for c in captions])
    count = len(captions)
    sums = sequence_log_probs(model, tf.repeat(features[None], count, axis=0), tf.fill([count], end_bias), padded)
    rank = sums / lengths.astype(np.float64) ** length_penalty
    order = np.argsort(-rank)
    assert rank[order[0]] - rank[order[1]] > 1e-4, "fixture has a near tie; pick another seed"
    return padded[order[0]], sums[order[0]], lengths[order[0]]


def check_valid(tokens, lengths, max_length):
    """Non-empty words, then <end> unless cut at max_length, then <pad>; never <pad>/<unk>/<start> inside."""
    for row, n in zip(tokens, lengths):
        assert 2 <= n <= max_length
        words = row[: n - 1] if row[n - 1] == END_ID else row[:n]
        assert n == max_length or row[n - 1] == END_ID
        assert set(words.tolist()) <= set(WORDS)
        assert (row[n:] == PAD_ID).all()


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search(length_penalty):
    model, max_length = TinyModel(), 4
    features, end_bias = images(6)
    # V**(L-1) beams hold every candidate of every step: nothing is ever pruned.
    run = decoder(model, beam_search, beam_size=V ** (max_length - 1), max_length=max_length,
                  length_penalty=length_penalty)
    tokens, scores, lengths = run(features, end_bias)
    assert tokens.shape == (6, max_length) and tokens.dtype == np.int32
    assert scores.dtype == np.float32 and lengths.dtype == np.int32
    for b in range(6):
        caption, total, length = exhaustive_best(model, features[b], 0.0, max_length, length_penalty)
        assert tokens[b].tolist() == caption.tolist()
        assert lengths[b] == length
        assert scores[b] == pytest.approx(total / length, abs=1e-5)
    assert len({tuple(t) for t in tokens}) > 1, "context must change the caption"


def table_step(probabilities):
    """A step function reading next-token probabilities from a table indexed by the previous token."""
    log_table = tf.math.log(tf.constant(probabilities, tf.float32))
    return lambda tokens, state, context: (tf.gather(log_table, tokens), state)


def test_length_penalty_choice_and_exact_early_stop():
    #  <pad> <unk> <start> <end>  a     b
    p = np.array([
        [0, .25, 0, .25, .25, .25],   # after <pad> (never used)
        [0, .25, 0, .25, .25, .25],   # after <unk>
        [0, .05, 0, .05, .46, .44],   # first word
        [0, .25, 0, .25, .25, .25],   # after <end> (never used)
        [0, .05, 0, .10, .80, .05],   # after a: mostly a
        [0, .05, 0, .90, .025, .025],  # after b: mostly <end>
    ])
    step, context = table_step(p), tf.zeros([2, 1])
    # Raw sum: "b <end>" (log .44 + log .9) beats everything longer.
    tokens, scores, lengths = beam_search(step, (), context, beam_size=2, max_length=4)
    assert tokens.numpy().tolist() == [[5, END_ID, PAD_ID, PAD_ID]] * 2 and lengths.numpy().tolist() == [2, 2]
    np.testing.assert_allclose(scores, [np.log(.44 * .9) / 2] * 2, rtol=1e-5)
    # Mean log-prob: the truncated "a a a a" wins, found only because the search does not stop while an
    # alive beam could still overtake "b <end>" once divided by its final length.
    tokens, scores, lengths = beam_search(step, (), context, beam_size=2, max_length=4, length_penalty=1.0)
    assert tokens.numpy().tolist() == [[4, 4, 4, 4]] * 2 and lengths.numpy().tolist() == [4, 4]
    np.testing.assert_allclose(scores, [np.log(.46 * .8 ** 3) / 4] * 2, rtol=1e-5)
    greedy = greedy_search(step, (), context, max_length=4)
    assert greedy[0].numpy().tolist() == [[4, 4, 4, 4]] * 2


@pytest.mark.parametrize("beam_size", [2, 3, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_small_beams_return_valid_captions_with_recomputed_scores(beam_size, length_penalty):
    # The RNN state carries the history, so a wrong reordering of state by parent beam would make the
    # reported scores disagree with teacher forcing of the returned captions.
    model, max_length = TinyModel(seed=3), 5
    features, end_bias = images(8, seed=4)
    run = decoder(model, beam_search, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
    tokens, scores, lengths = run(features, end_bias)
    check_valid(tokens, lengths, max_length)
    totals = sequence_log_probs(model, features, end_bias, tokens)
    np.testing.assert_allclose(scores, totals / lengths, atol=1e-5)


def test_greedy_equals_beam_size_one_and_numpy_rollout():
    model, max_length = TinyModel(seed=7), 6
    features, end_bias = images(10, seed=8, end_bias=[0, 0, 0, 0, 0, 0, 0, 0, -np.inf, 3.0])
    greedy = decoder(model, greedy_search, max_length=max_length)(features, end_bias)
    for length_penalty in (0.0, 1.0):  # one beam: the ranking never has a choice to make
        beam = decoder(model, beam_search, beam_size=1, max_length=max_length, length_penalty=length_penalty)
        for got, want in zip(beam(features, end_bias), greedy):
            np.testing.assert_allclose(got, want, atol=1e-6)

    context = {"features": features, "end_bias": end_bias}
    state, tokens = model.initial_state(features), np.full(10, START_ID, np.int32)
    want, sums, done = np.full((10, max_length), PAD_ID), np.zeros(10), np.zeros(10, bool)
    for t in range(max_length):
        log_probs, state = model.step(tf.constant(tokens), state, context)
        log_probs = log_probs.numpy().copy()
        log_probs[:, [PAD_ID, UNK_ID, START_ID] + ([END_ID] if t == 0 else [])] = -np.inf
        tokens = log_probs.argmax(axis=1).astype(np.int32)
        want[~done, t] = tokens[~done]
        sums[~done] += log_probs.max(axis=1)[~done]
        done |= tokens == END_ID
    lengths = np.where(want[:, -1] == PAD_ID, (want != PAD_ID).sum(axis=1), max_length)
    np.testing.assert_array_equal(greedy[0], want)
    np.testing.assert_array_equal(greedy[2], lengths)
    np.testing.assert_allclose(greedy[1], sums / lengths, atol=1e-5)


@pytest.mark.parametrize("search, options", [(beam_search, {"beam_size": 3}), (greedy_search, {})])
def test_never_ending_and_mixed_batches_caption_every_image(search, options):
    model, max_length = TinyModel(seed=9), 5
    run = decoder(model, search, max_length=max_length, **options)
    tokens, scores, lengths = run(*images(4, seed=10, end_bias=[-np.inf] * 4))
    check_valid(tokens, lengths, max_length)
    assert (lengths == max_length).all() and not (tokens == END_ID).any() and np.isfinite(scores).all()

    # Mixed batch: ordinary, never-ending, and eager-to-end (stops right after the first word) images.
    features, end_bias = images(6, seed=11, end_bias=[0, -np.inf, 30.0, 0, 30.0, -np.inf])
    tokens, scores, lengths = run(features, end_bias)
    check_valid(tokens, lengths, max_length)
    assert lengths[[1, 5]].tolist() == [max_length] * 2 and lengths[[2, 4]].tolist() == [2, 2]
    for b in range(6):  # each image decodes as it would alone
        alone = run(features[b : b + 1], end_bias[b : b + 1])
        assert alone[0][0].tolist() == tokens[b].tolist() and alone[1][0] == pytest.approx(scores[b], abs=1e-5)


@pytest.mark.parametrize("search, options", [(beam_search, {"beam_size": 3}), (greedy_search, {})])
def test_pad_unk_start_and_first_end_are_never_generated(search, options):
    # The model prefers <pad>/<unk>/<start> above all and <end> strongly: captions are still one word + <end>.
    model = TinyModel(seed=12, forbidden_bias=50.0)
    features, end_bias = images(5, seed=13, end_bias=[20.0] * 5)
    tokens, scores, lengths = decoder(model, search, max_length=4, **options)(features, end_bias)
    check_valid(tokens, lengths, 4)
    assert (lengths == 2).all() and (tokens[:, 1] == END_ID).all()


@pytest.mark.parametrize("search, options", [(beam_search, {"beam_size": 2}), (greedy_search, {})])
def test_model_that_only_allows_immediate_end_gets_the_empty_caption(search, options):
    def step(tokens, state, context):
        only_end = tf.where(tf.range(V) == END_ID, 0.0, -np.inf)
        return tf.tile(only_end[None], [tf.shape(tokens)[0], 1]), state

    tokens, scores, lengths = search(step, (), tf.zeros([3, 1]), max_length=4, **options)
    assert tokens.numpy().tolist() == [[END_ID, PAD_ID, PAD_ID, PAD_ID]] * 3
    assert lengths.numpy().tolist() == [1, 1, 1] and scores.numpy().tolist() == [0.0, 0.0, 0.0]


def test_dynamic_batch_traces_once_and_exports(tmp_path):
    model = TinyModel(seed=14)

    class Captioner(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, REGIONS, D]), tf.TensorSpec([None])])
        def __call__(self, features, end_bias):
            context = {"features": features, "end_bias": end_bias}
            beam = beam_search(model.step, model.initial_state(features), context, beam_size=3, max_length=5,
                               length_penalty=1.0)
            greedy = greedy_search(model.step, model.initial_state(features), context, max_length=5)
            return beam + greedy

    captioner = Captioner()
    for count in (1, 4, 7, 0):
        outputs = captioner(*images(count, seed=count))
        assert [tuple(o.shape) for o in outputs] == [(count, 5), (count,), (count,)] * 2
    assert captioner.__call__.experimental_get_tracing_count() == 1

    tf.saved_model.save(captioner, str(tmp_path / "captioner"))
    loaded = tf.saved_model.load(str(tmp_path / "captioner"))
    features, end_bias = images(3, seed=15)
    for got, want in zip(loaded(features, end_bias), captioner(features, end_bias)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_context_is_per_image():
    model = TinyModel(seed=16)
    features, end_bias = images(6, seed=17)
    run = decoder(model, beam_search, beam_size=3, max_length=5, length_penalty=1.0)
    tokens, _, _ = run(features, end_bias)
    assert len({tuple(t) for t in tokens}) > 1
    order = [5, 3, 0, 1, 4, 2]
    shuffled, _, _ = run(tf.gather(features, order), tf.gather(end_bias, order))
    np.testing.assert_array_equal(shuffled, tokens[order])


@pytest.mark.parametrize("options", [{"beam_size": 0}, {"beam_size": 2.0}, {"max_length": 0},
                                     {"length_penalty": -0.5}])
def test_bad_settings_are_user_errors(options):
    settings = {"beam_size": 2, "max_length": 4, **options}
    with pytest.raises(TfcapError):
        beam_search(lambda t, s, c: (None, s), (), tf.zeros([1, 1]), **settings)


@pytest.mark.parametrize("vocab, chunk", [(3000, 32), (2538, 32), (97, 4), (64, 4)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_two_stage_top_k_equals_top_k_ties_included(vocab, chunk, k):
    from tfcap.decoding import _top_k

    rng = np.random.default_rng(vocab + k)
    x = rng.integers(-6, 0, size=(40, vocab)).astype(np.float32)  # few distinct values: ties everywhere
    x[0] = -np.inf  # nothing finite
    x[1, : vocab // 2] = -np.inf
    x[2] = 0.0  # all equal
    x[3] = rng.normal(size=vocab)  # distinct values
    x[4, -1] = 1.0  # the best in the padded last chunk
    x = tf.constant(x)
    want = tf.math.top_k(x, k=k)
    got = tf.function(lambda x: _top_k(x, k, chunk=chunk))(x)
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())


# --- No repeated n-grams (no_repeat_ngram) ---------------------------------------------------------------

def repeated_ngrams(row, n) -> bool:
    """Whether a caption (tokens up to `<end>` or the end of the row) holds some n-gram twice."""
    words = [int(t) for t in row if t not in (END_ID, PAD_ID)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


# "a man wearing a man wearing ...": after <start> the model says "a", then goes round the cycle
# a -> man -> wearing -> a (0.8 each step; "hat" after "a" is its second choice, then "is", back to
# "wearing"); `<end>` is unlikely (0.005), so captions run to max_length and repeat themselves.
A, MAN, WEARING, HAT, IS = 4, 5, 6, 7, 8
CYCLE = {START_ID: A, A: MAN, MAN: WEARING, WEARING: A, HAT: IS, IS: WEARING}


def phrase_table(vocab=9):
    p = np.full((vocab, vocab), 0.15 / (vocab - 4))
    p[:, [PAD_ID, START_ID]] = 0
    p[:, END_ID] = 0.005
    for token, nxt in CYCLE.items():
        p[token, nxt] += 0.8
    p[A, HAT] += 0.7  # "a" goes on to "man" first, to "hat" when "a man" is blocked
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("search, options", [(beam_search, {"beam_size": 3}), (greedy_search, {}),
                                             (beam_search, {"beam_size": 3, "length_penalty": 1.0})])
def test_a_model_that_repeats_a_phrase_repeats_none_with_blocking(search, options):
    step, context = table_step(phrase_table()), tf.zeros([2, 1])
    free = search(step, (), context, max_length=12, **options)[0].numpy()
    assert all(repeated_ngrams(row, 3) for row in free), free  # the model alone repeats "a man wearing"
    for n in (2, 3, 4):
        tokens, scores, lengths = search(step, (), context, max_length=12, no_repeat_ngram=n, **options)
        tokens, scores = tokens.numpy(), scores.numpy()
        assert not any(repeated_ngrams(row, n) for row in tokens), (n, tokens)
        assert np.isfinite(scores).all() and (lengths.numpy() >= 2).all()
        # The scores are the caption's own log-probs under the model: blocking changes the choice, not the sums.
        with np.errstate(divide="ignore"):  # log 0 = -inf: <pad> and <start>, never generated
            log_table = np.log(phrase_table())
        for row, length, score in zip(tokens, lengths.numpy(), scores):
            previous = np.concatenate([[START_ID], row[:length - 1]])
            assert score == pytest.approx(log_table[previous, row[:length]].sum() / length, abs=1e-5)
    if search is greedy_search:  # n words at a time: "a man" may come again, "a man wearing" may not
        n3 = search(step, (), context, max_length=12, no_repeat_ngram=3)[0].numpy()[0]
        assert list(n3[:5]) == [A, MAN, WEARING, A, MAN] and n3[5] != WEARING, n3


def exhaustive_without_repeats(model, features, end_bias, max_length, n, length_penalty):
    """`exhaustive_best` over the captions that hold no n-gram twice."""
    captions = [words + (END_ID,) for k in range(1, max_length) for words in itertools.product(WORDS, repeat=k)]
    captions += list(itertools.product(WORDS, repeat=max_length))
    captions = [c for c in captions if not repeated_ngrams(c, n)]
    lengths = np.array([len(c) for c in captions])
    padded = np.array([c + (PAD_ID,) * (max_length - len(c)) for c in captions])
    count = len(captions)
    sums = sequence_log_probs(model, tf.repeat(features[None], count, axis=0), tf.fill([count], end_bias), padded)
    rank = sums / lengths.astype(np.float64) ** length_penalty
    best = int(np.argmax(rank))
    return padded[best], sums[best], lengths[best]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_blocking_equals_exhaustive_search_over_captions_without_repeats(length_penalty):
    model, max_length = TinyModel(seed=5, scale=1.0), 5
    features, end_bias = images(6, seed=6, end_bias=[-3.0] * 6)  # long captions, where repeats are possible
    plain = decoder(model, beam_search, beam_size=V ** 3, max_length=max_length, length_penalty=length_penalty)
    assert any(repeated_ngrams(row, 2) for row in plain(features, end_bias)[0])  # blocking has work to do
    # 7**3 beams hold every candidate of every step (at most 3**4 prefixes of 4 words, times 4 tokens).
    run = decoder(model, beam_search, beam_size=V ** 3, max_length=max_length, length_penalty=length_penalty,
                  no_repeat_ngram=2)
    tokens, scores, lengths = run(features, end_bias)
    for b in range(6):
        caption, total, length = exhaustive_without_repeats(model, features[b], -3.0, max_length, 2, length_penalty)
        assert tokens[b].tolist() == caption.tolist() and lengths[b] == length
        assert scores[b] == pytest.approx(total / length, abs=1e-5)


def test_greedy_with_blocking_is_the_numpy_rollout_with_blocking():
    model, max_length, n = TinyModel(seed=7), 8, 2
    features, end_bias = images(10, seed=8, end_bias=[-2.0] * 10)
    tokens, scores, lengths = decoder(model, greedy_search, max_length=max_length, no_repeat_ngram=n)(features,
                                                                                                        end_bias)
    context = {"features": features, "end_bias": end_bias}
    state, previous = model.initial_state(features), np.full(10, START_ID, np.int32)
    want, done = np.full((10, max_length), PAD_ID), np.zeros(10, bool)
    for t in range(max_length):
        log_probs, state = model.step(tf.constant(previous), state, context)
        log_probs = log_probs.numpy().copy()
        log_probs[:, [PAD_ID, UNK_ID, START_ID] + ([END_ID] if t == 0 else [])] = -np.inf
        for row in range(10):  # the definition, one hypothesis and one earlier n-gram at a time
            for i in range(t - n + 1):
                if list(want[row, i:i + n - 1]) == list(want[row, t - n + 1:t]):
                    log_probs[row, want[row, i + n - 1]] = -np.inf
        previous = log_probs.argmax(axis=1).astype(np.int32)
        want[~done, t] = previous[~done]
        done |= previous == END_ID
    np.testing.assert_array_equal(tokens, want)
    assert not any(repeated_ngrams(row, n) for row in tokens)


@pytest.mark.parametrize("search, options", [(beam_search, {"beam_size": 3, "length_penalty": 1.0}),
                                             (beam_search, {"beam_size": 5}), (greedy_search, {})])
def test_blocking_with_nothing_to_block_is_bit_identical_to_no_blocking(search, options):
    """A model that never says a word twice in a row, 6 tokens, no 5-gram twice: a repeat would be 6 equal
    tokens, so the blocking runs (6 > 5) but only ever bans what is already -inf, and must not move a bit."""
    rng = np.random.default_rng(13)
    p = rng.uniform(0.1, 1, (9, 9))
    p[:, [PAD_ID, START_ID]] = 0
    p[np.arange(4, 9), np.arange(4, 9)] = 0  # never the same word twice in a row
    step = table_step(p / p.sum(axis=1, keepdims=True))
    first = tf.constant(rng.integers(4, 9, 8), tf.int32)

    def run(**blocking):  # each image's first word follows a word of its own: captions differ
        shifted = lambda t, state, context: step(tf.where(t == START_ID, per_row(context, t), t), state, context)
        return [x.numpy() for x in search(shifted, (), first, max_length=6, **blocking, **options)]

    for off, idle in zip(run(), run(no_repeat_ngram=5)):
        np.testing.assert_array_equal(off, idle)


@pytest.mark.parametrize("value", [-1, 2.0, True])
def test_bad_no_repeat_ngram_is_a_user_error(value):
    with pytest.raises(TfcapError, match="no-repeat n-gram"):
        beam_search(lambda t, s, c: (None, s), (), tf.zeros([1, 1]), beam_size=2, max_length=4, no_repeat_ngram=value)


def test_blocking_exports_in_a_savedmodel(tmp_path):
    step = table_step(phrase_table())

    class Captioner(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1])])
        def __call__(self, context):
            return beam_search(step, (), context, beam_size=3, max_length=12, no_repeat_ngram=3)

    tf.saved_model.save(Captioner(), str(tmp_path / "m"))
    tokens = tf.saved_model.load(str(tmp_path / "m"))(tf.zeros([4, 1]))[0].numpy()
    assert tokens.shape == (4, 12) and not any(repeated_ngrams(row, 3) for row in tokens)


@pytest.mark.parametrize("search, options, steps", [
    (greedy_search, {}, [4, 4, 2, 2, 2]),
    (beam_search, {"beam_size": 2}, [4, 8, 4, 4, 4]),
])
def test_decoding_steps_only_the_captions_that_may_still_change(search, options, steps):
    """Greedy: a row leaves the step once its caption has ended; beam search: an image's beams leave once
    none can beat its best finished caption. Here the two images whose `<end>` the model favours end at
    the second step (`<end>` is forbidden first); the other two run to max_length. Each image gets the
    caption it gets searched alone."""
    model, max_length = TinyModel(seed=7), 5
    features, end_bias = images(4, seed=8, end_bias=[20.0, -np.inf, 20.0, -np.inf])
    rows = []

    def step(tokens, state, context):
        rows.append(int(tf.shape(tokens)[0]))
        return model.step(tokens, state, context)

    context = {"features": features, "end_bias": end_bias}
    tokens, scores, lengths = search(step, model.initial_state(features), context, max_length=max_length, **options)
    assert rows == steps
    assert lengths.numpy().tolist() == [2, 5, 2, 5]
    totals = sequence_log_probs(model, features, end_bias, tokens.numpy())
    np.testing.assert_allclose(scores, totals / lengths.numpy(), atol=1e-5)
    for b in range(4):
        alone = search(model.step, model.initial_state(features[b:b + 1]),
                       {"features": features[b:b + 1], "end_bias": end_bias[b:b + 1]}, max_length=max_length,
                       **options)
        assert alone[0].numpy().tolist() == tokens[b:b + 1].numpy().tolist()
        np.testing.assert_allclose(alone[1], scores[b:b + 1], atol=1e-6)


def test_the_beams_of_an_image_share_its_context_row():
    """Beam search hands the step one context row per image in play, not one per beam: an attention
    decoder's grid is not copied K times (nor gathered as images settle)."""
    model, seen = TinyModel(seed=21), []

    def step(tokens, state, context):
        seen.append((tokens.shape[0], context["features"].shape[0]))
        return model.step(tokens, state, context)

    features, end_bias = images(4, seed=22)
    beam_search(step, model.initial_state(features), {"features": features, "end_bias": end_bias}, beam_size=3,
                max_length=5)
    assert seen[0] == (4, 4) and len(seen) > 1
    assert all(rows == 3 * images_ for rows, images_ in seen[1:]), seen
