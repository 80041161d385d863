"""Caption metrics: small generated cases everywhere; exact agreement with pycocoevalcap, nltk and
the Java PTB tokenizer on real Flickr8k captions (TFCAP_FLICKR8K) and when Java is installed."""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tfcap import metrics
from tfcap.errors import TfcapError

FLICKR8K = os.environ.get("TFCAP_FLICKR8K")
needs_flickr8k = pytest.mark.skipif(not FLICKR8K, reason="TFCAP_FLICKR8K (Flickr8k folder) is not set")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH")


@pytest.mark.parametrize("raw, tokens", [
    ("A man's dog, don't run.", "a man 's dog do n't run"),
    ("Two dogs play tug-of-war in the snow.", "two dogs play tug-of-war in the snow"),
    ("He cannot go; it's 10,000 feet!", "he can not go it 's 10,000 feet"),
    ('A sign that says "St. Louis" (U.S.A.) here', "a sign that says st. louis -lrb- u.s.a. -rrb- here"),
    ("The dogs' owner... waves \u2014 happily!!!", "the dogs owner waves happily !!!"),  # "!!!" is kept, as in Java
    ("Player #23 wears a #1 jersey at 3:30 p.m. in the U.S.", "player # 23 wears a # 1 jersey at 3:30 p.m. in the u.s."),
    ("I'm sure they're gonna win the kids' race", "i 'm sure they 're gon na win the kids race"),
    ("<start> a dog runs <end> <pad> <pad>", "a dog runs"),
    (" . ", ""),
])
def test_ptb_tokenize_examples(raw, tokens):  # all checked against the Java tokenizer
    assert metrics.ptb_tokenize(raw) == tokens


REFS = {
    "dog": ["a brown dog runs on the green grass", "a dog is running across a lawn", "the brown dog runs fast"],
    "kids": ["two children play in the sand at the beach", "kids playing on a sandy beach", "two kids dig in sand"],
    "bike": ["a man rides a red bike down the street", "a cyclist on a city street", "a man is riding his bicycle"],
}


def test_perfect_hypotheses_score_one():
    hyps = {image: refs[0] for image, refs in REFS.items()}
    bleu, per_image = metrics.score_bleu(REFS, hyps)
    assert bleu == pytest.approx([1.0] * 4, abs=1e-9)  # coco's tiny/small guards: 1 - O(1e-10)
    assert per_image == pytest.approx(np.ones((3, 4)), abs=1e-9)
    rouge, per_image = metrics.score_rouge_l(REFS, hyps)
    assert rouge == 1.0 and list(per_image) == [1.0] * 3


def test_disjoint_hypotheses_score_zero():
    hyps = {image: "purple elephants juggle seven umbrellas" for image in REFS}
    assert metrics.score_bleu(REFS, hyps)[0] == pytest.approx([0.0] * 4, abs=1e-9)
    assert metrics.score_rouge_l(REFS, hyps)[0] == 0.0
    assert metrics.score_cider_d(REFS, hyps)[0] == 0.0


def test_cider_d_sanity():
    # A hypothesis equal to each of its (identical) references: cosine 1 for n = 1..4, times 10.
    same = {image: [refs[0]] * 3 for image, refs in REFS.items()}
    cider, per_image = metrics.score_cider_d(same, {image: refs[0] for image, refs in same.items()})
    assert cider == pytest.approx(10.0) and per_image == pytest.approx([10.0] * 3)
    # Scores fall as the hypothesis drifts; a length change is penalized even with every word right.
    hyps = [{"dog": "a brown dog runs on the green grass"}, {"dog": "a brown dog runs on the grass"},
            {"dog": "a dog sleeps on the sofa"}, {"dog": "a brown dog runs on the green grass " * 2}]
    refs = {"dog": REFS["dog"], "kids": REFS["kids"]}
    scores = [metrics.score_cider_d(refs, dict(h, kids=REFS["kids"][1]))[1][0] for h in hyps]
    assert scores[0] > scores[1] > scores[2] > 0 and scores[3] < scores[0]
    # With one image every n-gram has idf log(1) - log(1) = 0: CIDEr-D is 0 whatever the caption.
    assert metrics.score_cider_d({"dog": REFS["dog"]}, {"dog": REFS["dog"][0]})[0] == 0.0


def test_empty_hypothesis_scores_zero_without_errors():
    hyps = {"dog": "", "kids": REFS["kids"][0], "bike": REFS["bike"][0]}
    assert metrics.score_bleu(REFS, hyps)[1][0] == pytest.approx([0.0] * 4, abs=1e-9)
    assert metrics.score_rouge_l(REFS, hyps)[1][0] == 0.0
    assert metrics.score_cider_d(REFS, hyps)[1][0] == 0.0


def test_score_captions_tokenizes_and_ignores_special_tokens():
    raw_refs = {image: [r.capitalize() + "." for r in refs] for image, refs in REFS.items()}
    plain = {image: refs[0] for image, refs in REFS.items()}
    decorated = {image: f"<start> {h.upper()} . <end> <pad> <pad>" for image, h in plain.items()}
    scores = metrics.score_captions(raw_refs, decorated, meteor=False)
    assert scores == metrics.score_captions(raw_refs, plain, meteor=False)
    assert set(scores) == set(metrics.METRIC_KEYS) | {"meteor_unavailable"}
    assert scores["BLEU-4"] == pytest.approx(1.0) and scores["ROUGE-L"] == 1.0
    assert scores["METEOR"] is None and scores["meteor_unavailable"]


@pytest.mark.parametrize("refs, hyps, message", [
    (REFS, {}, "no hypotheses"),
    (REFS, {"cat": "a cat"}, "has no references"),
    ({"dog": []}, {"dog": "a dog"}, "non-empty list"),
    ({"dog": "a dog"}, {"dog": "a dog"}, "non-empty list"),
    (REFS, {"dog": ["a dog"]}, "one string"),
])
def test_bad_inputs_raise_tfcap_error(refs, hyps, message):
    for score in (metrics.score_bleu, metrics.score_rouge_l, metrics.score_cider_d):
        with pytest.raises(TfcapError, match=message):
            score(refs, hyps)
    with pytest.raises(TfcapError, match=message):
        metrics.score_captions(refs, hyps, meteor=False)


def test_references_of_images_without_hypotheses_are_ignored():
    subset = {"dog": "a dog runs on the grass", "kids": "kids play in the sand"}
    only = {image: REFS[image] for image in subset}
    assert metrics.score_captions(REFS, subset, meteor=False) == metrics.score_captions(only, subset, meteor=False)


# --- METEOR ---------------------------------------------------------------------------------

def test_meteor_unavailable_without_java(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    scores = metrics.score_captions(REFS, {image: refs[1] for image, refs in REFS.items()})
    assert scores["METEOR"] is None and "java" in scores["meteor_unavailable"]
    assert scores["BLEU-1"] > 0.9  # the other metrics are still computed


def test_meteor_failure_is_reported_not_raised(tmp_path, monkeypatch):
    pytest.importorskip("pycocoevalcap")
    fake = tmp_path / "java"  # a "java" that dies at once, like a JVM that cannot get its 2 GB heap
    fake.write_text("#!/bin/sh\necho 'Could not reserve enough space for object heap' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    score, reason = metrics.score_meteor(REFS, {image: refs[1] for image, refs in REFS.items()})
    assert score is None and "METEOR failed" in reason and "object heap" in reason


@needs_java
def test_meteor_runs_with_java():
    pytest.importorskip("pycocoevalcap")
    hyps = {"dog": "a brown dog is running on grass", "kids": "children play on the beach", "bike": "a red car"}
    scores = metrics.score_captions(REFS, hyps)  # starts pycocoevalcap's METEOR jar (slow: ~10-20 s)
    assert "meteor_unavailable" not in scores, scores.get("meteor_unavailable")
    assert 0.0 < scores["METEOR"] <= 1.0


# --- Real Flickr8k captions against the reference implementations --------------------------

@pytest.fixture(scope="module")
def flickr8k_captions() -> dict[str, list[str]]:
    captions = defaultdict(list)
    with open(Path(FLICKR8K) / "captions.txt", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions[row["image"]].append(row["caption"])
    return dict(captions)


@pytest.fixture(scope="module")
def flickr8k_corpus(flickr8k_captions):
    """600 images: PTB-tokenized references and hypotheses of every kind (seeded)."""
    rng = random.Random(8)
    images = sorted(flickr8k_captions)
    rng.shuffle(images)
    scored, others = images[:600], images[600:1200]
    refs = {image: [metrics.ptb_tokenize(c) for c in flickr8k_captions[image]] for image in scored}
    pool = [metrics.ptb_tokenize(c) for image in others for c in flickr8k_captions[image]]
    hyps = {}
    for image in scored:
        words = rng.choice(refs[image]).split()
        kind = rng.randrange(8)
        if kind == 0:  # another image's caption
            words = rng.choice(pool).split()
        elif kind == 1 and len(words) > 1:  # drop a word
            del words[rng.randrange(len(words))]
        elif kind == 2 and len(words) > 1:  # swap neighbours
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 3:  # duplicate a word
            i = rng.randrange(len(words))
            words.insert(i, words[i])
        elif kind == 4:  # truncate, possibly to nothing
            words = words[:rng.randint(0, len(words))]
        elif kind == 5:  # mix two captions of the image
            other = rng.choice(refs[image]).split()
            words = words[: len(words) // 2] + other[len(other) // 2:]
        # kind 6, 7: a reference verbatim (as a very good captioner would)
        hyps[image] = " ".join(words)
    return refs, hyps


@needs_flickr8k
def test_bleu_rouge_cider_equal_pycocoevalcap(flickr8k_corpus):
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    Rouge = pytest.importorskip("pycocoevalcap.rouge.rouge").Rouge

    refs, hyps = flickr8k_corpus
    gts, res = refs, {image: [h] for image, h in hyps.items()}  # identical tokens for both
    assert any(h == "" for h in hyps.values()) and any(len(h.split()) < 4 for h in hyps.values())

    bleu, bleu_images = metrics.score_bleu(refs, hyps)
    coco_bleu, coco_bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_images = metrics.score_rouge_l(refs, hyps)
    coco_rouge, coco_rouge_images = Rouge().compute_score(gts, res)
    cider, cider_images = metrics.score_cider_d(refs, hyps)
    coco_cider, coco_cider_images = Cider().compute_score(gts, res)

    diffs = {
        "BLEU": np.max(np.abs(np.subtract(bleu, coco_bleu))),
        "BLEU per image": np.max(np.abs(bleu_images - np.array(coco_bleu_images).T)),
        "ROUGE-L": abs(rouge - coco_rouge), "ROUGE-L per image": np.max(np.abs(rouge_images - coco_rouge_images)),
        "CIDEr-D": abs(cider - coco_cider), "CIDEr-D per image": np.max(np.abs(cider_images - coco_cider_images)),
    }
    print("max |ours - pycocoevalcap|:", diffs)
    assert all(d <= 1e-6 for d in diffs.values()), diffs
    assert 0.3 < bleu[3] < 0.95 and 0.5 < cider < 5  # a non-degenerate corpus


@needs_flickr8k
def test_bleu_equals_nltk_corpus_bleu(flickr8k_corpus):
    """nltk's corpus_bleu (no smoothing) is the same formula: clipped counts summed over the
    corpus, closest reference length (ties: shorter), BP = exp(1 - r/c). Two known differences:
    nltk counts max(1, n-grams) per hypothesis in the denominator, so hypotheses shorter than n
    words lower nltk's BLEU-n; and for a zero n-gram precision nltk gives ~0 where coco gives
    (1e-15 / guesses)^(1/n). Off those regimes they agree up to coco's 1e-9/1e-15 guards."""
    corpus_bleu = pytest.importorskip("nltk.translate.bleu_score").corpus_bleu

    refs, hyps = flickr8k_corpus
    weights = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]

    def nltk_bleu(images):
        return corpus_bleu([[r.split() for r in refs[i]] for i in images], [hyps[i].split() for i in images],
                           weights=weights)

    long_enough = [i for i in hyps if len(hyps[i].split()) >= 4]
    ours = metrics.score_bleu({i: refs[i] for i in long_enough}, {i: hyps[i] for i in long_enough})[0]
    diff = np.max(np.abs(np.subtract(ours, nltk_bleu(long_enough))))
    print(f"max |ours - nltk| on {len(long_enough)} hypotheses of >= 4 words: {diff:.2e}")
    assert diff <= 1e-9

    # With short hypotheses the difference is exactly nltk's extra denominator counts: one per
    # hypothesis of fewer than k words, for each k-gram precision in the geometric mean.
    ours_all, nltk_all = metrics.score_bleu(refs, hyps)[0], nltk_bleu(list(hyps))
    lengths = np.array([len(h.split()) for h in hyps.values()])
    guesses = [np.maximum(0, lengths - k + 1).sum() for k in range(1, 5)]
    short = [(lengths < k).sum() for k in range(1, 5)]
    shrink = [np.prod([g / (g + s) for g, s in zip(guesses[:n], short[:n])]) ** (1 / n) for n in range(1, 5)]
    print(f"all {len(hyps)} hypotheses ({short[3]} under 4 words): ours {ours_all}, nltk {nltk_all}")
    assert nltk_all == pytest.approx(np.multiply(ours_all, shrink), abs=1e-9)


def _detokenize(caption: str) -> str:
    """Flickr8k captions are pre-tokenized ("dog 's ."); glue them back as people write."""
    import re
    caption = re.sub(r" ([.,;:!?])", r"\1", caption)
    caption = re.sub(r" ('s|'re|n't|'ll|'ve|'m|'d)\b", r"\1", caption)
    return re.sub(r'" ([^"]*?) "', r'"\1"', caption)


@needs_flickr8k
@needs_java
def test_ptb_tokenize_matches_java_ptbtokenizer(flickr8k_captions):
    PTBTokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer").PTBTokenizer

    captions = [c for image in sorted(flickr8k_captions) for c in flickr8k_captions[image]]
    captions += [_detokenize(c) for c in random.Random(0).sample(captions, 4000)]
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    ours = [metrics.ptb_tokenize(c) for c in captions]
    mismatches = [(c, java[str(i)][0], ours[i]) for i, c in enumerate(captions) if ours[i] != java[str(i)][0]]
    rate = 1 - len(mismatches) / len(captions)
    print(f"PTB tokenizer match rate: {rate:.5f} ({len(captions) - len(mismatches)}/{len(captions)})")
    for raw, expected, got in mismatches[:20]:
        print(f"  {raw!r}\n    java: {expected}\n    ours: {got}")
    assert rate >= 0.999, mismatches[:5]


def test_repeats_a_phrase_is_what_no_repeat_ngram_forbids():
    from tfcap.metrics import repeats_a_phrase

    assert repeats_a_phrase("a man wearing a hat is wearing a hat", 3)
    assert not repeats_a_phrase("a man wearing a hat is wearing a cap", 3)
    assert repeats_a_phrase("a man in a red shirt and a woman in a blue dress", 2)  # "in a"
    assert not repeats_a_phrase("a dog", 3) and not repeats_a_phrase("", 2)
