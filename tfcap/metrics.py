"""Caption quality metrics, computed exactly as coco-caption (pycocoevalcap 1.2) computes them.

BLEU-1..4, ROUGE-L and CIDEr-D are pure Python/NumPy re-implementations of pycocoevalcap's
`bleu_scorer.py`, `rouge.py` and `cider_scorer.py`: same n-gram order, same constants, same
floating-point operations, so scores agree bit for bit when fed the same tokens. METEOR has no
such port; it runs pycocoevalcap's Java jar when Java and pycocoevalcap are installed, and is
otherwise reported as unavailable, with the reason.

`score_captions` is the entry point: it tokenizes raw captions with `ptb_tokenize` (a Python
mimic of coco-caption's Stanford PTB tokenizer step) and runs every scorer. The `score_*`
functions take captions that are already tokenized (tokens joined by single spaces).

Images are scored if they have a hypothesis. Every hypothesis needs references (else
TfcapError); references of images without a hypothesis are ignored, also by CIDEr-D's
document frequencies (coco-caption requires equal image sets, so this is the same thing).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np

from tfcap.errors import TfcapError

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = BLEU_KEYS + ("METEOR", "ROUGE-L", "CIDEr-D")

# ---------------------------------------------------------------------------------------------
# Tokenization: a Python mimic of `java edu.stanford.nlp.process.PTBTokenizer -preserveLines
# -lowerCase` (CoreNLP 3.4.1) followed by pycocoevalcap's punctuation filter.

# pycocoevalcap's filter list, verbatim. It runs *after* -lowerCase, so the upper-case bracket
# names never match: "(" scores as the word "-lrb-" in coco-caption, and does here too.
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])
SPECIAL_TOKENS = ("<start>", "<end>", "<pad>")  # decoder bookkeeping, never scored

_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
# PTB's normalizations of typographic characters (curly quotes, dashes, ellipsis).
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                             "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ", "\u00a0": " ",
                             "\u00bc": " 1/4 ", "\u00bd": " 1/2 ", "\u00be": " 3/4 "})
_BRACKETS = {"(": " -LRB- ", ")": " -RRB- ", "[": " -LSB- ", "]": " -RSB- ", "{": " -LCB- ", "}": " -RCB- "}
_HELD_PERIOD = "\x00"  # a period that must not be split off; restored at the end
_BRACKET_TOKENS = frozenset(t.strip() for t in _BRACKETS.values())
_SPLITS = [  # (characters that trigger the rule, pattern, replacement), applied in order
    ("()[]{}", re.compile(r"[()\[\]{}]"), lambda m: _BRACKETS[m.group()]),
    (".", re.compile(r"(?<![\w.'])([A-Za-z])\.(?=\.)"), r"\1" + _HELD_PERIOD),  # "A... boy": "a."
    (".", re.compile(r"(?i)(?<=\w)\.(?='(s|re|ve|ll|d|m)\b)"), " "),  # "pool.'s"
    (".`", re.compile(r"`|\.{2,}"), " "),  # quotes and ellipses: their tokens are all filtered out
    ('"', re.compile(r"\""), " `` "),  # a quote token (filtered); it still ends a word ("P." stays)
    (".", re.compile(r"(?<=\w)\.(?=[,;:])"), _HELD_PERIOD),  # "etc.," keeps its period
    ("!?*+=_~^|\\<>%$;#/", re.compile(r"[!?]+|[*+=_~^|\\<>%$;]|#(?![^\W\d_])|/(?!\w)"), r" \g<0> "),  # "#tag", "and/or"
    (",:", re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), " "),  # "10,000" and "3:30" stay whole
    ("&", re.compile(r"(?<![A-Z])&|&(?![A-Z])"), " & "),  # "AT&T" stays whole, "at&t" does not
    ("'", re.compile(r"(?i)(?<=\w)'n'(?=\w)"), " 'n' "),  # rock'n'roll
    ("'", re.compile(r"(?i)('s|'re|'ve|'ll|'d|'m|n't)-(?=\w)"), r" \1 - "),  # ant's-eye-view
    ("'", re.compile(r"(?<=\w)-(?='\d)"), " - "),  # mid-'90s
    ("'", re.compile(r"(?i)\b(y')(?=[a-z])"), r"\1 "),  # y'all
    ("-", re.compile(r"(?<=\S)--+|--+(?=\S)"), " -- "),
]
_CLITIC = re.compile(r"(?i)^(.*\w)('s|'re|'ve|'ll|'d|'m)$")
_NEGATION = re.compile(r"(?i)^(.*[a-mo-z])(n't)$")  # PTB: not after an "n" ("inn't")
_FUSED_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_FUSED = re.compile(r"(?i)^(can)(not)$|^(gon)(na)$|^(got)(ta)$|^(lem)(me)$|^(gim)(me)$|^(wan)(na)$")
_QUOTE_WORD = re.compile(r"(?i)^'(s|re|ve|ll|d|m|n'?|\d+s?|em|till?|cause|twas)$")  # 's, '90s, 'n'
_KEEP_TRAILING_QUOTE = frozenset(["ol'", "somethin'", "dunkin'", "y'"])
_ACRONYM = re.compile(r"[A-Za-z](\.[A-Za-z])*")  # u.s, e.g, a.k.a, and single letters
# Abbreviations that keep their period (CoreNLP 3.4.1 lists, checked against the jar).
_ABBREVIATIONS = frozenset("""
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla
    penn tenn va vt wis wisc wyo
    mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev
    maj sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mt ft
    mme mmes mlle mlles
    inc co cos corp pty ptys ltd plc bancorp dept bhd assn univ intl sys invt elec natl mfg mtg
    tel est ext sq nos prop ph jr sr bros blvd rd esq etc al seq vs alex wm jos cie cf treas""".split())
_CASED_ABBREVIATIONS = frozenset("Ark Del Ill La Mass Miss Ore Pa Tex Wash MM".split())
# A lone letter before one of these words ends a sentence ("letter A. Then"); case-sensitive.
_SENTENCE_STARTS = frozenset("""About According Additionally After An A As At But Earlier He Her Here
    However If In It Last Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The
    Their Then There These They This We When While What Yet You""".split())


def _keeps_period(core: str, following: str) -> bool:
    """Whether PTB keeps the final period of `core + "."` (an abbreviation) or splits it off."""
    if _ACRONYM.fullmatch(core):
        return len(core) > 1 or following not in _SENTENCE_STARTS
    if core.lower() == "no":  # "no. 5", but "the answer is no."
        return following[:1].isdigit()
    return core.lower() in _ABBREVIATIONS or core in _CASED_ABBREVIATIONS


def _split_chunk(chunk: str, following: str) -> list[str]:
    """PTB tokens of one whitespace-free chunk; `following` is the next chunk (for periods)."""
    if (chunk.isalnum() and chunk.lower() not in _FUSED_WORDS) or chunk in _BRACKET_TOKENS:
        return [chunk]  # the common case, fast
    # Trailing and leading quotes, dashes and periods are their own (filtered) tokens, except
    # in abbreviations ("st."), clitics ("'s"), decades ("'90s"), "'n'" and numbers ("-5").
    tail: list[str] = []
    while len(chunk) > 1 and chunk[-1] in ".'-":
        if chunk[-1] == "." and _keeps_period(chunk[:-1], following):
            break
        if chunk[-1] == "'" and (_QUOTE_WORD.match(chunk) or chunk.lower() in _KEEP_TRAILING_QUOTE):
            break
        tail.insert(0, chunk[-1])
        chunk = chunk[:-1]
    head: list[str] = []
    while len(chunk) > 1 and chunk[0] in "'-":
        if chunk[0] == "'" and (_QUOTE_WORD.match(chunk) or chunk.lower() == "'tis"):
            break
        if chunk[0] == "-" and chunk[1].isdigit():
            break
        head.append(chunk[0])
        chunk = chunk[1:]
    if chunk.lower() == "'tis":
        return head + [chunk[:2], chunk[2:]] + tail
    words = [chunk]
    for pattern in (_FUSED, _NEGATION, _CLITIC):
        match = pattern.match(chunk)
        if match:
            words = [g for g in match.groups() if g]
            break
    return head + words + tail


def ptb_tokenize(caption: str) -> str:
    """Tokenize one caption for scoring, as coco-caption's PTBTokenizer does (without Java).

    Splits clitics ("man's" -> "man 's", "don't" -> "do n't", "cannot" -> "can not"), keeps
    hyphenated words, numbers ("10,000", "5.5") and abbreviations ("st.", "u.s.") whole,
    lower-cases, and drops the punctuation tokens coco-caption drops. `<start>`, `<end>` and
    `<pad>` are removed first. Matches the Java tokenizer on all Flickr8k captions (see the
    tests); known gaps are rare forms: URLs, e-mail addresses, SGML tags, "word.Word".

    Args:
      caption: raw caption text.
    Returns:
      The tokens joined by single spaces ("" if none are left).
    """
    text = _SPECIAL.sub(" ", caption).translate(_TYPOGRAPHY)
    present = set(text)
    for triggers, pattern, replacement in _SPLITS:
        if not present.isdisjoint(triggers):  # skip rules that cannot match (speed)
            text = pattern.sub(replacement, text)
    chunks = text.split()
    tokens = []
    for i, chunk in enumerate(chunks):
        # PTB looks past the end of the caption into the next line of its input file, which in
        # coco-caption is the next caption, most often starting with "A" ("... letter b." -> "b").
        following = chunks[i + 1] if i + 1 < len(chunks) else "A"
        tokens += [t.replace(_HELD_PERIOD, ".").lower() for t in _split_chunk(chunk, following)]
    return " ".join(t for t in tokens if t not in COCO_PUNCTUATION)


# ---------------------------------------------------------------------------------------------
# Scorers on tokenized captions. Each mirrors its pycocoevalcap counterpart operation by
# operation (including its quirks, flagged below) so the floats come out identical.

def _pairs(references: Mapping[Hashable, Sequence[str]],
           hypotheses: Mapping[Hashable, str]) -> list[tuple[str, list[str]]]:
    """(hypothesis, references) per image, in `hypotheses` order, after checking the inputs."""
    if not hypotheses:
        raise TfcapError("no hypotheses to score")
    pairs = []
    for image, hypothesis in hypotheses.items():
        if not isinstance(hypothesis, str):
            raise TfcapError(f"hypothesis for image {image!r} must be one string, got {type(hypothesis).__name__}")
        refs = references.get(image)
        if refs is None:
            raise TfcapError(f"hypothesis for image {image!r} has no references")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise TfcapError(f"references for image {image!r} must be a non-empty list of strings")
        pairs.append((hypothesis, list(refs)))
    return pairs


def _ngram_counts(words: list[str], n: int) -> Counter:
    """Counts of all 1..n-grams, in pycocoevalcap's order (which fixes float summation order)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def repeats_a_phrase(caption: str, n: int) -> bool:
    """Whether a caption (words separated by spaces) holds some n-gram twice: what decoding with
    `no_repeat_ngram=n` rules out ("a man wearing a hat is wearing a hat" repeats a 3-gram)."""
    words = caption.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def score_bleu(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
               n: int = 4) -> tuple[list[float], np.ndarray]:
    """Corpus BLEU-1..n as coco-caption's Bleu: clipped n-gram counts summed over the corpus,
    brevity penalty against the closest reference length (ties: the shorter one).

    Args:
      references: image -> list of tokenized reference captions.
      hypotheses: image -> one tokenized hypothesis caption.
    Returns:
      ([BLEU-1, ..., BLEU-n] for the corpus, per-image BLEU float64 [images, n]).
    """
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's guards: 0 matches give ~0, never a 0/0
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image = []
    for hypothesis, refs in _pairs(references, hypotheses):
        words = hypothesis.split()
        max_ref_counts: dict = {}
        for ref in refs:
            for ngram, count in _ngram_counts(ref.split(), n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
        test_len = len(words)
        ref_len = min((abs(len(r.split()) - test_len), len(r.split())) for r in refs)[1]  # closest
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
        per_image.append(_bleu_from_counts(correct, guess, test_len, ref_len, small, tiny))
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, small, tiny)
    return corpus, np.array(per_image, dtype=np.float64)


def _bleu_from_counts(correct, guess, test_len, ref_len, small, tiny) -> list[float]:
    bleus, product = [], 1.0
    for k in range(len(guess)):
        product *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        bleus.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:  # brevity penalty
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme)."""
    row = [0] * (len(b) + 1)  # row[j]: LCS of the words of `a` so far and b[:j]
    for x in a:
        diagonal = 0  # previous row's row[j - 1]
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def score_rouge_l(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                  beta: float = 1.2) -> tuple[float, np.ndarray]:
    """ROUGE-L as coco-caption's Rouge: LCS F-measure (beta 1.2) from the best precision and the
    best recall over the references (possibly from different references), mean over images.

    Args/Returns: as `score_bleu`, but (corpus mean, per-image float64 [images]).
    """
    scores = []
    for hypothesis, refs in _pairs(references, hypotheses):
        # split(" "), not split(): an empty hypothesis is one empty token, as in rouge.py.
        candidate = hypothesis.split(" ")
        precisions, recalls = [], []
        for ref in refs:
            reference = ref.split(" ")
            lcs = _lcs_length(reference, candidate)
            precisions.append(lcs / float(len(candidate)))
            recalls.append(lcs / float(len(reference)))
        p, r = max(precisions), max(recalls)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    scores = np.array(scores)
    return float(np.mean(scores)), scores


def score_cider_d(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                  n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """CIDEr-D as coco-caption's Cider: tf-idf n-gram vectors (idf from the scored images'
    references), clipped cosine similarity, Gaussian length penalty (sigma 6), averaged over
    n = 1..4 and over references, times 10; mean over images.

    Args/Returns: as `score_bleu`, but (corpus mean, per-image float64 [images]).
    """
    pairs = _pairs(references, hypotheses)
    hyp_counts = [_ngram_counts(h.split(), n) for h, _ in pairs]
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for _, refs in pairs]
    # Document frequency: in how many images' reference sets each n-gram occurs.
    document_frequency = Counter(g for refs in ref_counts for g in {g for ref in refs for g in ref})
    log_images = np.log(float(len(pairs)))
    idf: dict = {}  # n-gram -> log(images) - log(max(1, df)), computed once per n-gram
    # Plain Python floats below: the same IEEE operations as pycocoevalcap's NumPy scalars
    # (so the same bits), several times faster.
    penalty_scale = 2 * sigma ** 2

    def vector(counts):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            if ngram not in idf:
                idf[ngram] = float(log_images - np.log(max(1.0, document_frequency[ngram])))
            k = len(ngram) - 1
            vec[k][ngram] = weight = float(tf) * idf[ngram]
            norm[k] += pow(weight, 2)
            if k == 1:  # quirk kept from cider_scorer.py: "length" counts bigrams, not words
                length += tf
        return vec, [float(np.sqrt(x)) for x in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec, norm, length = vector(hyp)
        score = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            delta = float(length - length_ref)
            penalty = np.e ** (-(delta ** 2) / penalty_scale)  # np.e ** x, as cider_scorer.py
            for k in range(n):
                val = 0.0
                for ngram, weight in vec[k].items():
                    ref_weight = vec_ref[k].get(ngram, 0.0)
                    val += min(weight, ref_weight) * ref_weight  # the "-D" clipping
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                score[k] += val * penalty
        scores.append(np.mean(np.array(score)) / len(refs) * 10.0)
    scores = np.array(scores)
    return float(np.mean(scores)), scores


class TokenCiderD:
    """CIDEr-D of token-id captions, vectorized in NumPy over a whole batch: the reward of self-critical
    training. The same formula as `score_cider_d` (clipped tf-idf cosine per n = 1..4, Gaussian length
    penalty on the bigram count, mean over n and over references, times 10), but document frequencies
    come from a fixed corpus (the training references, counted once) rather than from the scored images.

    An n-gram of word ids w_0..w_{k-1} (each in 1..V-1) is the integer sum_j w_j * V**j: its digits
    are never 0, so every order and sequence has its own integer. Captions carry no `<start>`/`<end>`.
    """

    def __init__(self, corpus: Sequence[Sequence[Sequence[int]]], vocab_size: int, n: int = 4, sigma: float = 6.0):
        """corpus: per image, its reference captions as sequences of word ids."""
        if float(vocab_size) ** n >= 2.0 ** 63:
            raise TfcapError(f"vocabulary of {vocab_size} words is too large for {n}-gram ids in int64")
        self.base, self.n, self.penalty_scale = int(vocab_size), n, 2 * sigma ** 2
        keys = []
        for refs in corpus:
            tokens, lengths = self._pad(refs)
            ids, _, _ = self._ngrams(tokens, lengths)
            keys.append(np.unique(ids))  # an n-gram counts once per image, however many references hold it
        self.df_ids, self.df_counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64),
                                                return_counts=True)
        self.log_images = float(np.log(float(len(corpus))))

    @staticmethod
    def _pad(captions: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(c) for c in captions], np.int64)
        tokens = np.zeros((len(captions), max(lengths.max(initial=0), 1)), np.int64)
        for i, c in enumerate(captions):
            tokens[i, :len(c)] = c
        return tokens, lengths

    def _ngrams(self, tokens: np.ndarray, lengths: np.ndarray):
        """All 1..n-grams of captions int [M, T] (valid up to lengths [M]) -> (ids, caption row, order index k)."""
        ids, rows, orders = [], [], []
        m, t = tokens.shape
        value = np.zeros((m, t), np.int64)
        scale = 1
        for k in range(self.n):
            if k >= t:
                break
            value = value[:, :t - k] + tokens[:, k:] * scale  # n-grams of order k + 1 starting at each position
            scale *= self.base
            valid = np.arange(t - k)[None, :] + k < lengths[:, None]
            r, _ = np.nonzero(valid)
            ids.append(value[valid])
            rows.append(r)
            orders.append(np.full(r.shape, k))
        return np.concatenate(ids), np.concatenate(rows), np.concatenate(orders)

    def _vectors(self, tokens: np.ndarray, lengths: np.ndarray):
        """tf-idf entries of captions [M, T]: (n-gram ids, caption rows, orders, weights) [E], norms [M, n]."""
        ids, rows, orders = self._ngrams(tokens, lengths)
        m = len(lengths)
        # One entry per (caption, n-gram) with its term frequency.
        order = np.lexsort((ids, rows))
        ids, rows, orders = ids[order], rows[order], orders[order]
        first = np.ones(len(ids), bool)
        first[1:] = (ids[1:] != ids[:-1]) | (rows[1:] != rows[:-1])
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, len(ids))).astype(np.float64)
        ids, rows, orders = ids[starts], rows[starts], orders[starts]
        at = np.searchsorted(self.df_ids, ids)
        found = (at < len(self.df_ids)) & (self.df_ids[np.minimum(at, len(self.df_ids) - 1)] == ids)
        df = np.where(found, self.df_counts[np.minimum(at, len(self.df_ids) - 1)], 0)
        weights = counts * (self.log_images - np.log(np.maximum(1.0, df)))
        norms = np.sqrt(np.bincount(rows * self.n + orders, weights=weights ** 2, minlength=m * self.n)).reshape(m, self.n)
        return ids, rows, orders, weights, norms

    def __call__(self, hypotheses: np.ndarray, hypothesis_lengths: np.ndarray, owners: np.ndarray,
                 references: np.ndarray, reference_lengths: np.ndarray, reference_owners: np.ndarray) -> np.ndarray:
        """CIDEr-D of each hypothesis against the references of its image.

        Args:
          hypotheses: int [M, T] word ids (no `<start>`/`<end>`; anything past hypothesis_lengths [M] ignored).
          owners: int [M], the image of each hypothesis (any ids, matched against reference_owners).
          references: int [R, T'], reference_lengths [R], reference_owners int [R]: every image in
            `owners` needs at least one reference.
        Returns:
          float64 [M].
        """
        hypotheses, references = np.asarray(hypotheses, np.int64), np.asarray(references, np.int64)
        hypothesis_lengths, reference_lengths = np.asarray(hypothesis_lengths), np.asarray(reference_lengths)
        images, owners_at = np.unique(np.concatenate([reference_owners, owners]), return_inverse=True)
        ref_image, hyp_image = owners_at[:len(reference_owners)], owners_at[len(reference_owners):]
        # Reference slot: the index of each reference among its image's references.
        order = np.argsort(ref_image, kind="stable")
        slot = np.empty(len(ref_image), np.int64)
        starts = np.searchsorted(ref_image[order], ref_image[order])
        slot[order] = np.arange(len(ref_image)) - starts
        slots = int(slot.max(initial=0)) + 1
        refs_per_image = np.bincount(ref_image, minlength=len(images))
        if (refs_per_image[hyp_image] == 0).any():
            raise TfcapError("a hypothesis has no references")

        r_ids, r_rows, r_orders, r_weights, r_norms = self._vectors(references, reference_lengths)
        # Reference weights by (image, n-gram), one column per reference slot.
        r_keys = ref_image[r_rows] * (int(self.base) ** self.n) + r_ids
        keys, key_at = np.unique(r_keys, return_inverse=True)
        table = np.zeros((len(keys), slots))
        table[key_at, slot[r_rows]] = r_weights
        norm_by_slot = np.zeros((len(images), slots, self.n))
        norm_by_slot[ref_image, slot] = r_norms
        bigrams = lambda lengths: np.maximum(lengths - 1, 0)  # coco's "length" counts bigrams
        length_by_slot = np.zeros((len(images), slots))
        length_by_slot[ref_image, slot] = bigrams(reference_lengths)
        present = np.zeros((len(images), slots), bool)
        present[ref_image, slot] = True

        h_ids, h_rows, h_orders, h_weights, h_norms = self._vectors(hypotheses, hypothesis_lengths)
        h_keys = hyp_image[h_rows] * (int(self.base) ** self.n) + h_ids
        at = np.minimum(np.searchsorted(keys, h_keys), max(len(keys) - 1, 0))
        matched = (keys[at] == h_keys) if len(keys) else np.zeros(len(h_keys), bool)
        ref_weights = np.where(matched[:, None], table[at], 0.0)  # [E, slots]
        values = np.zeros((len(hypotheses), self.n, slots))
        np.add.at(values, (h_rows, h_orders), np.minimum(h_weights[:, None], ref_weights) * ref_weights)
        denominator = h_norms[:, :, None] * norm_by_slot[hyp_image].transpose(0, 2, 1)  # [M, n, slots]
        values = np.where(denominator != 0, values / np.where(denominator != 0, denominator, 1.0), values)
        delta = bigrams(hypothesis_lengths)[:, None] - length_by_slot[hyp_image]
        penalty = np.e ** (-(delta ** 2) / self.penalty_scale) * present[hyp_image]
        per_reference = values.mean(axis=1) * penalty  # [M, slots]
        return per_reference.sum(axis=1) / refs_per_image[hyp_image] * 10.0


# ---------------------------------------------------------------------------------------------
# METEOR: only through pycocoevalcap's Java jar.

METEOR_DISABLED = "disabled by the caller"  # the reason when meteor=False: a choice, not a problem


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot run here (Java or pycocoevalcap's jar/data missing), or None."""
    if shutil.which("java") is None:
        return "java is not on PATH (METEOR runs pycocoevalcap's Java jar)"
    try:
        from pycocoevalcap.meteor import meteor as meteor_module
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    folder = Path(meteor_module.__file__).parent
    for needed in (folder / meteor_module.METEOR_JAR, folder / "data" / "paraphrase-en.gz"):
        if not needed.is_file():
            return f"pycocoevalcap's METEOR file is missing: {needed}"
    return None


def score_meteor(references: Mapping[Hashable, Sequence[str]],
                 hypotheses: Mapping[Hashable, str]) -> tuple[float | None, str | None]:
    """Corpus METEOR 1.5 via pycocoevalcap's Meteor (starts a JVM, ~10 s, 2 GB heap).

    Args: as `score_bleu` (tokenized captions).
    Returns:
      (score in [0, 1], None), or (None, reason) when METEOR is unavailable or fails.
    """
    pairs = _pairs(references, hypotheses)
    reason = meteor_unavailable_reason()
    if reason:
        return None, reason
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {str(i): refs for i, (_, refs) in enumerate(pairs)}
    res = {str(i): [hyp] for i, (hyp, _) in enumerate(pairs)}
    try:
        scorer = Meteor()
    except Exception as exc:  # noqa: BLE001  (any failure to start is reported, not raised)
        return None, f"METEOR could not start: {exc}"
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score), None
    except Exception as exc:  # noqa: BLE001
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        # Meteor.__del__ takes a lock that compute_score leaves held when it fails: free it,
        # or garbage collection would hang.
        if scorer.lock.locked():
            scorer.lock.release()
        try:
            scorer.meteor_p.stdin.close()
        except OSError:  # the JVM died: the pipe is broken
            pass
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    stderr = scorer.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()
    return None, f"METEOR failed ({failure})" + (f": {stderr[-1]}" if stderr else "")


# ---------------------------------------------------------------------------------------------

def score_captions(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], *,
                   meteor: bool = True) -> dict[str, float | str | None]:
    """Score raw captions as coco-caption does: PTB-tokenize both sides, then every metric.

    Args:
      references: image -> list of raw reference captions.
      hypotheses: image -> one raw generated caption. Every image named here needs references
        (else TfcapError); references of other images are ignored.
      meteor: run METEOR (needs Java; starts a JVM). False reports it as unavailable.
    Returns:
      {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D": float}. When METEOR cannot run,
      "METEOR" is None and "meteor_unavailable" holds the reason.
    """
    pairs = _pairs(references, hypotheses)  # check before the (slow) tokenization
    refs = {i: [ptb_tokenize(r) for r in rs] for i, (_, rs) in enumerate(pairs)}
    hyps = {i: ptb_tokenize(h) for i, (h, _) in enumerate(pairs)}
    scores: dict[str, float | str | None] = dict(zip(BLEU_KEYS, score_bleu(refs, hyps)[0]))
    scores["METEOR"], reason = score_meteor(refs, hyps) if meteor else (None, METEOR_DISABLED)
    scores["ROUGE-L"] = score_rouge_l(refs, hyps)[0]
    scores["CIDEr-D"] = score_cider_d(refs, hyps)[0]
    if reason:
        scores["meteor_unavailable"] = reason
    return scores
