"""Caption text: normalization, tokenization and the vocabulary, all as TensorFlow ops.

The same functions serve `build-records` (tokenizing a whole caption file in one call), the
tf.data pipelines, and an exported SavedModel (detokenizing inside the serving graph), so a
caption is always processed the same way.

Token ids: `<pad>`=0, `<unk>`=1, `<start>`=2, `<end>`=3, then words by descending train
frequency (ties alphabetical). Stored captions hold word ids only; `<start>`/`<end>` are added
by the input pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from tfcap.errors import TfcapError
from tfcap.outputs import write_text_atomic
from tfcap.reading import read_text

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
RESERVED = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)

# A placeholder that is neither punctuation nor space, so an apostrophe inside a word
# ("man's") survives the punctuation strip.
_KEEP_APOSTROPHE = "\x01"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """How caption text becomes tokens. Saved in every manifest and run config."""

    normalization: str = "NFKC"  # Unicode normal form applied first
    lowercase: bool = True
    strip_punctuation: bool = True  # punctuation becomes space; apostrophes inside words stay
    max_length: int = 30  # words per caption, without <start>/<end>; longer ones are truncated


def normalize(texts: tf.Tensor, config: TextConfig = TextConfig()) -> tf.Tensor:
    """Normalize captions: Unicode form, case, punctuation, runs of whitespace.

    Args:
      texts: tf.string, any shape.
    Returns:
      tf.string, same shape: words separated by single spaces, no leading/trailing space.
    """
    texts = tf_text.normalize_utf8(texts, config.normalization)
    if config.lowercase:
        texts = tf.strings.lower(texts, encoding="utf-8")
    if config.strip_punctuation:
        texts = tf.strings.regex_replace(texts, r"([\pL\pN])['\x{2019}]([\pL\pN])", r"\1" + _KEEP_APOSTROPHE + r"\2")
        texts = tf.strings.regex_replace(texts, r"\pP+", " ")
        texts = tf.strings.regex_replace(texts, _KEEP_APOSTROPHE, "'")
    texts = tf.strings.regex_replace(texts, r"\s+", " ")
    return tf.strings.strip(texts)


def tokenize(texts: tf.Tensor, config: TextConfig = TextConfig()) -> tf.RaggedTensor:
    """Split normalized captions into words.

    Args:
      texts: tf.string [N] raw captions.
    Returns:
      tf.RaggedTensor of tf.string [N, (words)], not truncated.
    """
    return tf_text.WhitespaceTokenizer().tokenize(normalize(texts, config))


def words_sha256(words: list[str]) -> str:
    """The fingerprint of a vocabulary, as manifests and run configs hold it: sha256 of its words, one a line."""
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


def read_words(path: Path) -> list[str]:
    """The words of a vocab.txt, one a line; an error naming it if it is not UTF-8 text."""
    return read_text(path, "vocabulary").splitlines()


class Vocabulary(tf.Module):
    """Word <-> id mapping backed by a TensorFlow lookup table (so it can live in a SavedModel)."""

    def __init__(self, words: Iterable[str]):
        super().__init__(name="vocabulary")
        self.words = list(words)
        if tuple(self.words[: len(RESERVED)]) != RESERVED:
            raise TfcapError(f"vocabulary must start with {' '.join(RESERVED)}")
        if len(set(self.words)) != len(self.words):
            raise TfcapError("vocabulary has duplicate words")
        self._words = tf.constant(self.words, dtype=tf.string)
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self._words, tf.range(len(self.words), dtype=tf.int64)),
            default_value=UNK_ID,
        )

    def __len__(self) -> int:
        return len(self.words)

    @property
    def sha256(self) -> str:
        return words_sha256(self.words)

    @classmethod
    def from_counts(cls, words: np.ndarray, counts: np.ndarray, min_count: int) -> "Vocabulary":
        """Keep words seen at least `min_count` times; most frequent first, ties alphabetical."""
        kept = [(int(c), w) for w, c in zip(words, counts) if c >= min_count and w not in RESERVED]
        kept.sort(key=lambda cw: (-cw[0], cw[1]))
        return cls(list(RESERVED) + [w for _, w in kept])

    @classmethod
    def build(cls, tokens: tf.RaggedTensor, min_count: int) -> "Vocabulary":
        """Vocabulary from tokenized captions (tf.string ragged [N, (words)])."""
        words, _, counts = tf.unique_with_counts(tokens.flat_values)
        return cls.from_counts([w.decode("utf-8") for w in words.numpy()], counts.numpy(), min_count)

    def save(self, path: Path) -> None:
        write_text_atomic(path, "\n".join(self.words) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise TfcapError(f"no vocabulary at {path}")
        return cls(read_words(path))

    def encode(self, tokens: tf.RaggedTensor | tf.Tensor) -> tf.RaggedTensor | tf.Tensor:
        """Words (tf.string, any shape or ragged) -> ids (tf.int64, same shape); unknown -> <unk>."""
        if isinstance(tokens, tf.RaggedTensor):
            return tokens.with_flat_values(self._table.lookup(tokens.flat_values))
        return self._table.lookup(tokens)

    def decode(self, ids: tf.Tensor) -> tf.Tensor:
        """Token ids -> caption strings.

        Args:
          ids: integer [B, T]. Reading stops at the first <end>; <pad> and <start> are dropped.
        Returns:
          tf.string [B], words joined by single spaces.
        """
        ids = tf.cast(ids, tf.int64)
        before_end = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int64), axis=1) == 0
        keep = before_end & (ids != PAD_ID) & (ids != START_ID)
        words = tf.ragged.boolean_mask(tf.gather(self._words, ids), keep)
        return tf.strings.reduce_join(words, axis=1, separator=" ")


def caption_words(texts: tf.Tensor, config: TextConfig) -> tf.Tensor:
    """Raw captions tf.string [N] -> their words tf.string [N, max_length], truncated, "" past the end."""
    return tokenize(texts, config)[:, : config.max_length].to_tensor(default_value="", shape=[None, config.max_length])


def encode_captions(texts: tf.Tensor, vocab: Vocabulary, config: TextConfig) -> tuple[tf.RaggedTensor, tf.Tensor]:
    """Raw captions -> truncated word ids, and which captions were truncated.

    Args:
      texts: tf.string [N].
    Returns:
      ids: tf.int64 ragged [N, (<= max_length)]; truncated: tf.bool [N].
    """
    tokens = tokenize(texts, config)
    truncated = tokens.row_lengths() > config.max_length
    return vocab.encode(tokens[:, : config.max_length]), truncated
