import pytest
import tensorflow as tf

from tfcap import text
from tfcap.errors import TfcapError


def test_normalize_case_unicode_punctuation_and_space():
    got = text.normalize(tf.constant(["  A man's Dog,  running!! ", "ＡＢＣ — “quick” café’s", "sisters' cats..."]))
    assert [g.decode() for g in got.numpy()] == ["a man's dog running", "abc quick café's", "sisters cats"]


def test_vocabulary_reserved_ids_frequency_order_and_min_count():
    tokens = text.tokenize(tf.constant(["b a a", "c b a", "rare"]))
    vocab = text.Vocabulary.build(tokens, min_count=2)
    assert vocab.words == ["<pad>", "<unk>", "<start>", "<end>", "a", "b"]
    assert vocab.encode(tf.constant(["a", "b", "rare", "c"])).numpy().tolist() == [4, 5, text.UNK_ID, text.UNK_ID]


def test_encode_truncates_and_flags_long_captions():
    vocab = text.Vocabulary(list(text.RESERVED) + ["one", "two", "three"])
    ids, truncated = text.encode_captions(tf.constant(["one two three", "one"]), vocab, text.TextConfig(max_length=2))
    assert ids.to_list() == [[4, 5], [4]]
    assert truncated.numpy().tolist() == [True, False]


def test_decode_stops_at_end_and_drops_pad_and_start():
    vocab = text.Vocabulary(list(text.RESERVED) + ["a", "dog"])
    ids = tf.constant([[text.START_ID, 4, 5, text.END_ID, 4], [4, text.UNK_ID, 0, 0, 0], [3, 4, 4, 4, 4]])
    assert [c.decode() for c in vocab.decode(ids).numpy()] == ["a dog", "a <unk>", ""]


def test_vocabulary_file_round_trip_and_checks(tmp_path):
    vocab = text.Vocabulary(list(text.RESERVED) + ["x", "y"])
    vocab.save(tmp_path / "vocab.txt")
    again = text.Vocabulary.load(tmp_path / "vocab.txt")
    assert again.words == vocab.words and again.sha256 == vocab.sha256
    with pytest.raises(TfcapError):
        text.Vocabulary(["x", "<pad>", "<unk>", "<start>", "<end>"])
    with pytest.raises(TfcapError):
        text.Vocabulary.load(tmp_path / "missing.txt")
