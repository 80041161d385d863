"""Does the confidence say when a caption is right, and does in_domain say when an image is unlike Flickr8k?

    python tools/bench_confidence.py FLICKR8K [--model RUN_OR_SAVEDMODEL] [--records RECORDS] [--work DIR]

FLICKR8K is the Kaggle-layout folder with Flickr8k_text/ (as TFCAP_FLICKR8K). Each part runs the
tfcap commands a user runs and reads their output files; the previous `score` (mean log-probability
per token) and the new `confidence` are measured side by side:

1. Experts: Flickr8k-Expert's judged pairs (CLIPScore's protocol: the 5,664 pairs whose caption is
   not one of the image's own, each of the three judgments a data point) through
   `tfcap score pairs.csv --images FLICKR8K/Images`; Kendall tau-c of each column against the
   judgments, and a reliability table: the experts' mean judgment (1 = unrelated .. 4 = describes
   the image) in each confidence bucket. Published on this protocol (reference-based: BLEU-4 30.8,
   METEOR 41.8, CIDEr 43.9, SPICE 44.9; reference-free: CLIP-S 51.2).
2. Out of domain: the Flickr8k test images (in) and tools/ood_images.py's set (out: photos of
   things, documents, charts, spreadsheets, screens, code, textures) captioned together by
   `tfcap caption-dir`; AUROC of telling them apart from each column (typicality: lower is more
   out of domain; score and confidence: lower is more suspect), overall, per kind and for the
   photos alone; and how often `in_domain` is false on each side.
3. Repeated phrases (with --records, the records of FLICKR8K): the test images captioned with the
   model's decoding and with `--no-repeat-ngram 0`; the share of captions that repeat an n-gram
   (n = 2, 3, 4) and test BLEU-4 and CIDEr-D (`tfcap evaluate`) of both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_images import KINDS, write_ood_images  # noqa: E402

from tfcap.confidence import auroc, kendall_tau_c  # noqa: E402
from tfcap.datasets.flickr8k import OFFICIAL_SPLIT_FILES, read_expert_judgments  # noqa: E402

PUBLISHED = "published tau-c on this protocol: BLEU-4 30.8, METEOR 41.8, CIDEr 43.9, SPICE 44.9 (with references); " \
            "CLIP-S 51.2, RefCLIP-S 53.0"
BUCKETS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0001)


def tfcap(*args: str, stdout=None) -> None:
    """Run a tfcap command as a user would (its progress and summary go to this stderr)."""
    subprocess.run([sys.executable, "-m", "tfcap", *args], check=True, stdout=stdout)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def number(value: str) -> float:
    return float(value) if value not in ("", None) else float("nan")


def experts(flickr8k: Path, model: list[str], work: Path) -> None:
    pairs = read_expert_judgments(flickr8k)
    with open(work / "expert_pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "judgments"])
        writer.writerows([image, caption, " ".join(map(str, judged))] for image, caption, judged in pairs)
    tfcap("score", str(work / "expert_pairs.csv"), "--images", str(flickr8k / "Images"),
          "-o", str(work / "expert_scored.csv"), "--overwrite", *model)
    rows = read_rows(work / "expert_scored.csv")
    failed = [r for r in rows if r["error"]]
    judged = np.array([[int(j) for j in r["judgments"].split()] for r in rows if not r["error"]])
    flat = judged.reshape(-1)
    print(f"\n1. Flickr8k-Expert: {len(rows)} pairs ({len(failed)} failed), {len(flat)} judgments")
    for column in ("score", "confidence"):
        values = np.array([number(r[column]) for r in rows if not r["error"]])
        if np.isnan(values).all():
            print(f"   {column:10s}: none (the model has no fitted confidence: tfcap fit-confidence)")
            continue
        print(f"   Kendall tau-c, {column:10s}: {100 * kendall_tau_c(np.repeat(values, 3), flat):.1f}")
    print(f"   ({PUBLISHED})")
    confidence = np.array([number(r["confidence"]) for r in rows if not r["error"]])
    if not np.isnan(confidence).all():
        mean_judgment = judged.mean(axis=1)
        print("   reliability: confidence bucket | pairs | experts' mean judgment (1-4) | share judged 3 or 4")
        for low, high in zip(BUCKETS, BUCKETS[1:]):
            inside = (confidence >= low) & (confidence < high)
            if inside.any():
                print(f"   [{low:.1f}, {min(high, 1):.1f}{']' if high > 1 else ')'} | {inside.sum():5d} | "
                      f"{mean_judgment[inside].mean():.2f} | {(mean_judgment[inside] >= 3).mean():.2f}")


def out_of_domain(flickr8k: Path, model: list[str], work: Path) -> None:
    folder = work / "mixed"
    if not folder.is_dir():
        write_ood_images(folder / "ood")
        (folder / "flickr8k").mkdir()
        for name in (flickr8k / "Flickr8k_text" / OFFICIAL_SPLIT_FILES["test"]).read_text().split():
            os.symlink(flickr8k / "Images" / name, folder / "flickr8k" / name)
    tfcap("caption-dir", str(folder), "-o", str(work / "mixed.csv"), "--overwrite", *model)
    rows = [r for r in read_rows(work / "mixed.csv") if not r["error"]]
    inside = [r for r in rows if r["path"].startswith("flickr8k/")]
    outside = {kind: [r for r in rows if r["path"].startswith(f"ood/{kind}/")] for kind in KINDS}
    everything = [r for kind in KINDS for r in outside[kind]]
    print(f"\n2. Out of domain: {len(inside)} Flickr8k test images against {len(everything)} others "
          f"({', '.join(f'{kind} {len(v)}' for kind, v in outside.items())})")
    print("   AUROC of telling them apart | all | " + " | ".join(KINDS))
    for column, sign in (("typicality", -1), ("score", -1), ("confidence", -1)):
        values = lambda rs: sign * np.array([number(r[column]) for r in rs])  # noqa: E731  higher = more suspect
        if np.isnan(values(inside)).all():
            continue
        cells = [auroc(values(everything), values(inside))] + [auroc(values(outside[k]), values(inside)) for k in KINDS]
        print(f"   {column:10s} | " + " | ".join(f"{c:.3f}" for c in cells))
    if "in_domain" in rows[0] and rows[0]["in_domain"]:
        flagged = lambda rs: np.mean([r["in_domain"] == "false" for r in rs])  # noqa: E731
        print(f"   in_domain false: Flickr8k test {flagged(inside):.3f}; "
              + ", ".join(f"{kind} {flagged(outside[kind]):.2f}" for kind in KINDS))


def repeated(words: list[str], n: int) -> bool:
    grams = [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def repeated_phrases(flickr8k: Path, model: list[str], records: Path, work: Path) -> None:
    test = work / "test_images"
    if not test.is_dir():
        test.mkdir()
        for name in (flickr8k / "Flickr8k_text" / OFFICIAL_SPLIT_FILES["test"]).read_text().split():
            os.symlink(flickr8k / "Images" / name, test / name)
    print("\n3. Repeated phrases on the 1,000 test images")
    for label, extra in (("model's decoding", []), ("no blocking (--no-repeat-ngram 0)", ["--no-repeat-ngram", "0"])):
        out = work / f"test_{'blocked' if not extra else 'unblocked'}.csv"
        tfcap("caption-dir", str(test), "-o", str(out), "--overwrite", *model, *extra)
        captions = [r["caption"].split() for r in read_rows(out) if not r["error"]]
        shares = ", ".join(f"n={n} {np.mean([repeated(c, n) for c in captions]):.3f}" for n in (2, 3, 4))
        tfcap("evaluate", "--predictions", str(out), "--references", str(records), "--split", "test", "--no-meteor",
              "-o", str(out.with_suffix(".eval")), "--overwrite", "--quiet", stdout=subprocess.DEVNULL)
        scores = json.loads((out.with_suffix(".eval") / "scores.json").read_text())["scores"]
        print(f"   {label}: captions repeating an n-gram {shares}; test BLEU-4 {scores['BLEU-4']:.4f}, "
              f"CIDEr-D {scores['CIDEr-D']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flickr8k", type=Path)
    parser.add_argument("--model", help="run directory or SavedModel (default: the bundled model)")
    parser.add_argument("--records", type=Path, help="records of FLICKR8K (build-records): runs part 3")
    parser.add_argument("--work", type=Path, default=Path("bench-confidence"), help="folder for the files made")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,2")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []
    parts = set(args.parts.split(","))
    if "1" in parts:
        experts(args.flickr8k, model, args.work)
    if "2" in parts:
        out_of_domain(args.flickr8k, model, args.work)
    if "3" in parts and args.records:
        repeated_phrases(args.flickr8k, model, args.records, args.work)


if __name__ == "__main__":
    main()
