"""Feature caching throughput: tfcap's feature cache against the notebook way, on the same images.

    python tools/bench_features.py IMAGES [--images 600] [--encoder mobilenet --alpha 0.25]
                                          [--encoder-weights none] [--grid] [--repeats 3]

On the first --images files of IMAGES (sorted), with the same encoder (random weights by default:
the speed is the same), measures images/s of
  (a) tfcap: `features.build_features` on records of those images (parallel read and decode in
      tf.data, batches of 32 through the encoder, `Dataset.save` of the features);
  (b) the notebook way: for each file, PIL open + resize, `preprocess_input`, one `model.predict`
      on a batch of one, the feature kept in a dict that is pickled at the end.
Warm-up (tracing) is excluded from both. Prints each run, the medians and the ratio (a)/(b).
"""

from __future__ import annotations

import argparse
import csv
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("--images", dest="count", type=int, default=600)
    parser.add_argument("--encoder", default="mobilenet")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--encoder-weights", default="none")
    parser.add_argument("--grid", action="store_true", help="also store the spatial grid (attention decoder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from tfcap import datasets, encoder, features, records
    from tfcap.caption import find_images

    paths = find_images(args.images)[: args.count]
    if len(paths) < args.count:
        raise SystemExit(f"{args.images} has only {len(paths)} images")
    enc = encoder.build_encoder(encoder.EncoderConfig(name=args.encoder, alpha=args.alpha,
                                                      weights=args.encoder_weights, image_size=args.image_size))
    work = Path(tempfile.mkdtemp(prefix="tfcap-bench-features-"))
    with open(work / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows([p, "a picture", "train"] for p in paths)
    source = datasets.read_source(None, captions_file=work / "captions.csv", images_dir=args.images)
    records.build_records(source, work / "records", records.RecordsConfig(min_count=1), show_progress=False)

    def tfcap_run(run: int) -> float:
        start = time.perf_counter()
        features.build_features(work / "records", "train", enc, args.grid, cache_dir=work / f"cache{run}",
                                show_progress=False)
        return len(paths) / (time.perf_counter() - start)

    preprocess = {"xception": "xception", "inception_v3": "inception_v3", "mobilenet": "mobilenet",
                  "vgg16": "vgg16"}[args.encoder]
    import keras
    preprocess_input = getattr(keras.applications, preprocess).preprocess_input

    def notebook_run(run: int) -> float:
        store = {}
        start = time.perf_counter()
        for p in paths:
            image = Image.open(args.images / p).convert("RGB").resize((enc.size, enc.size))
            x = preprocess_input(np.asarray(image, dtype="float32")[None])
            grid = enc.model.predict(x, verbose=0)
            store[p] = grid if args.grid else grid.mean(axis=(1, 2))
        with open(work / f"notebook{run}.pkl", "wb") as f:
            pickle.dump(store, f)
        return len(paths) / (time.perf_counter() - start)

    tfcap_run(-1)  # warm-up: tracing the encoder, first decode
    enc.model.predict(np.zeros((1, enc.size, enc.size, 3), "float32"), verbose=0)
    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(tfcap_run(r))
        theirs.append(notebook_run(r))
        print(f"run {r + 1}: tfcap {ours[-1]:.1f} images/s, notebook {theirs[-1]:.1f} images/s", flush=True)
    shutil.rmtree(work)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median of {args.repeats} ({len(paths)} images, {enc.feature_key}{', grid' if args.grid else ''}): "
          f"tfcap {a:.1f} images/s, notebook {b:.1f} images/s, ratio {a / b:.1f}x")


if __name__ == "__main__":
    main()
