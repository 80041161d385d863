"""Captioning throughput: encoder alone vs `caption-dir` vs the notebook way, in one run.

    python tools/bench_caption.py speed IMAGES [--images 200] [--notebook-images 20] [--repeats 3]
    python tools/bench_caption.py rss IMAGES --model RUN_DIR [--small 500] [--large 5000]

speed: on the first --images files of IMAGES (sorted), with a model whose encoder is Xception at
299 with random weights (made here on the fly: records from a generated dataset, one epoch of a
merge decoder), measures images/s of
  (a) the encoder alone, batched through tf.data (read, decode, resize, preprocess, encode);
  (b) `tfcap caption-dir` end to end (walk, pipeline, encoder, beam search 3, CSV), library call;
  (c) the notebook way: PIL open + resize, one encoder `model.predict` per image, then one decoder
      `model.predict` per generated word (greedy), with the same decoder weights.
Warm-up runs (tracing) are excluded. Prints each run, medians and the ratios (b)/(a), (b)/(c).

rss: peak RSS (from /usr/bin/time) of the `tfcap caption-dir` CLI on --small and on --large
images with RUN_DIR, and their ratio: nothing may accumulate per image.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def link_images(source: Path, count: int, folder: Path) -> list[Path]:
    from tfcap.caption import find_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = find_images(source)
    if len(paths) < count:
        sys.exit(f"{source} has only {len(paths)} images, {count} wanted")
    for i in range(count):  # cycle names if needed; symlinks, so nothing is copied
        (folder / f"{i:06d}{Path(paths[i]).suffix}").symlink_to((source / paths[i]).resolve())
    return sorted(folder.iterdir())


def make_xception_run(work: Path) -> Path:
    """A merge captioner over random-init Xception at 299, trained one epoch on a generated dataset."""
    from click.testing import CliRunner

    from tfcap import synthetic
    from tfcap.cli import main

    data = work / "scenes"
    synthetic.write_scenes(data, synthetic.SceneConfig(images=64, seed=0))
    for args in (["build-records", "--captions", str(data / "captions.csv"), "--images", str(data / "images"),
                  "-o", str(work / "records"), "--min-count", "1", "--quiet"],
                 ["train", str(work / "records"), "-o", str(work / "run"), "--encoder", "xception",
                  "--encoder-weights", "none", "--epochs", "1", "--eval-every", "0", "--quiet"]):
        result = CliRunner().invoke(main, args)
        if result.exit_code:
            sys.exit(result.output)
    return work / "run"


def notebook_models(captioner):
    """Encoder and a functional notebook decoder (whole padded prefix in, next word out), same weights."""
    import keras

    decoder, config = captioner.decoder, captioner.config
    max_len = config.max_caption_tokens
    image = keras.Input((captioner.encoder.feature_dim,))
    sequence = keras.Input((max_len,))
    image_dense = keras.layers.Dense(config.decoder.units, activation="relu")
    fe = image_dense(image)
    embedding = keras.layers.Embedding(config.vocab_size, config.decoder.embed_dim, mask_zero=True)
    lstm = keras.layers.LSTM(config.decoder.units)
    se = lstm(embedding(sequence))
    hidden = keras.layers.Dense(config.decoder.units, activation="relu")
    out = keras.layers.Dense(config.vocab_size, activation="softmax")
    model = keras.Model([image, sequence], out(hidden(keras.layers.add([fe, se]))))
    for mine, theirs in ((image_dense, decoder.image_dense), (embedding, decoder.embedding), (lstm, decoder.lstm),
                         (hidden, decoder.hidden), (out, decoder.logits)):
        mine.set_weights(theirs.get_weights())
    pooled = keras.Sequential([captioner.encoder.model, keras.layers.GlobalAveragePooling2D()])
    return pooled, model, max_len


def notebook_caption(files, captioner, pooled_model, decoder_model, max_len) -> list[str]:
    import keras
    from PIL import Image

    from tfcap import encoder as encoders, text

    size = captioner.encoder.size
    preprocess = getattr(keras.applications, {"xception": "xception", "mobilenet": "mobilenet",
                                              "inception_v3": "inception_v3", "vgg16": "vgg16"}[
        captioner.config.encoder.name]).preprocess_input
    captions = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((size, size))
        x = preprocess(np.asarray(image, dtype="float32")[None])
        feature = pooled_model.predict(x, verbose=0)
        words = [text.START_ID]
        for _ in range(max_len):
            seq = keras.utils.pad_sequences([words], maxlen=max_len)
            word = int(np.argmax(decoder_model.predict([feature, seq], verbose=0)[0]))
            if word == text.END_ID:
                break
            words.append(word)
        captions.append(" ".join(captioner.vocab.words[w] for w in words[1:]))
    del encoders
    return captions


def speed(args) -> None:
    import tensorflow as tf

    from tfcap import caption, export, images, model

    work = Path(tempfile.mkdtemp(prefix="tfcap-bench-caption-"))
    try:
        run = Path(args.model) if args.model else make_xception_run(work)
        files = link_images(Path(args.images_dir), args.images, work / "images")
        captioner = model.load_model(run)
        predictor = export.load_predictor(run, beam_size=3)
        encoder = captioner.encoder
        print(f"model: {captioner.config.encoder.name} at {encoder.size}, {len(files)} images", flush=True)

        def encoder_alone(paths) -> float:
            dataset = (tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
                       .map(lambda p: encoder.preprocess(images.decode_rgb(tf.io.read_file(p))),
                            num_parallel_calls=tf.data.AUTOTUNE)
                       .batch(32).prefetch(tf.data.AUTOTUNE))
            start = time.perf_counter()
            for batch in dataset:
                encoder(batch).numpy()
            return len(paths) / (time.perf_counter() - start)

        def caption_dir(folder) -> float:
            out = work / "out.csv"
            start = time.perf_counter()
            caption.caption_directory(predictor, folder, out, overwrite=True, show_progress=False)
            seconds = time.perf_counter() - start
            with open(out) as f:
                assert sum(1 for row in csv.DictReader(f) if not row["error"]) == len(list(folder.iterdir()))
            return len(list(folder.iterdir())) / seconds

        warm = work / "warm"
        link_images(Path(args.images_dir), 8, warm)
        encoder_alone(sorted(warm.iterdir()))
        caption_dir(warm)
        pooled_model, decoder_model, max_len = notebook_models(captioner)
        notebook_caption(sorted(warm.iterdir())[:1], captioner, pooled_model, decoder_model, max_len)

        a, b, c = [], [], []
        for r in range(args.repeats):
            a.append(encoder_alone(files))
            b.append(caption_dir(work / "images"))
            start = time.perf_counter()
            notebook_caption(files[: args.notebook_images], captioner, pooled_model, decoder_model, max_len)
            c.append(args.notebook_images / (time.perf_counter() - start))
            print(f"run {r + 1}: (a) encoder alone {a[-1]:.2f} images/s, (b) caption-dir {b[-1]:.2f} images/s, "
                  f"(c) notebook {c[-1]:.3f} images/s", flush=True)
        ma, mb, mc = statistics.median(a), statistics.median(b), statistics.median(c)
        print(f"median of {args.repeats}: (a) {ma:.2f}, (b) {mb:.2f}, (c) {mc:.3f} images/s; "
              f"(b)/(a) = {mb / ma:.2f} (target >= 0.9), (b)/(c) = {mb / mc:.1f}x (target >= 8)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peak_rss(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="tfcap-bench-rss-"))
    try:
        results = {}
        for count in (args.small, args.large):
            folder = work / f"images{count}"
            link_images(Path(args.images_dir), count, folder)
            out = work / f"out{count}.csv"
            proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M", "tfcap", "caption-dir", str(folder),
                                   "-o", str(out), "--model", args.model, "--quiet"],
                                  capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            results[count] = int(re.search(r"PEAK_RSS_KB (\d+)", proc.stderr).group(1)) / 1024
            summary = [line for line in proc.stderr.splitlines() if line.startswith("caption-dir:")]
            print(f"{count} images: peak RSS {results[count]:.0f} MB; {summary[-1] if summary else ''}", flush=True)
        print(f"peak RSS {args.large} / {args.small} images = {results[args.large] / results[args.small]:.2f} "
              f"(target <= 1.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "rss"])
    parser.add_argument("images_dir", metavar="IMAGES")
    parser.add_argument("--model", help="run directory (speed: default makes an Xception-299 one)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--notebook-images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    args = parser.parse_args()
    if args.mode == "rss" and not args.model:
        parser.error("rss needs --model RUN_DIR")
    speed(args) if args.mode == "speed" else peak_rss(args)


if __name__ == "__main__":
    main()
