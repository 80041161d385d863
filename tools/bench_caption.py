"""Captioning throughput: encoder alone vs `caption-dir` vs the notebook way, in one run.

    python tools/bench_caption.py speed IMAGES --model RUN_X [--images 200] [--notebook-images 20] [--repeats 3]
                                        [--precision P] [--beam-size K] [--decoder-precision D]
    python tools/bench_caption.py fold [--encoder xception] [--batch 32] [--repeats 5] [--precision P]
    python tools/bench_caption.py rss IMAGES --model RUN_DIR [--small 500] [--large 5000]
    python tools/bench_caption.py beam [--vocab 3000] [--batch 32] [--steps 20] [--baseline REV] [--threads N]
                                       [--no-repeat-ngram N]

speed: on the first --images files of IMAGES (sorted), with the captioner of --model RUN_DIR, measures
images/s of
  (a) the encoder alone, batched through tf.data: caption-dir's own input pipeline (read, check,
      decode, resize, preprocess) and encoder (BatchNorm folded), nothing after;
  (b) `tfcap caption-dir` end to end (walk, pipeline, encoder, decoding, confidence, labels, CSV),
      library call, with the model's own decoding as caption-dir uses it (its decoding.json; for
      the bundled model, greedy) unless --beam-size gives another beam;
  (c) the notebook way: PIL open + resize, one encoder `model.predict` per image (the stock Keras
      model), then one decoder `model.predict` per generated word (greedy), same decoder weights;
      left out with --notebook-images 0.
With --precision mixed_bfloat16, (a) and (b) run the encoder in bfloat16
(`caption-dir --precision`) while the notebook stays in float32, as notebooks do. --decoder-precision
(auto, float32, bfloat16) is (b)'s, as `caption-dir --decoder-precision` (default auto).
Warm-up runs (tracing) are excluded. Prints each run (with the mean words per caption of (b) and
(c): the notebook pays one `predict` per word), medians and the ratios (b)/(a), (b)/(c).
The run to measure is Xception at 299 trained on real captions (random encoder weights are fine
for speed), e.g. on Flickr8k's records (~20 min here, mostly encoding 7,000 images once):
    tfcap train records -o RUN_X --encoder xception --encoder-weights none --decoder merge --epochs 3 --eval-every 0
The model matters for (c): the notebook pays one `predict` per word, so a model whose captions are
nearly empty (a smoke-test run on generated scenes says 0 or 1 word) makes the notebook look 3x
to 4x faster than it is on real captions. The benchmark warns when (c)'s captions average under 3 words.

beam: beam search alone (beam 3) on a random-init merge decoder step (vocabulary --vocab, --batch
images, exactly --steps steps: `<end>` is never chosen), against the same decoder steps run without
search (argmax tokens, no reordering) and greedy decoding; with --baseline REV, also the beam search
of tfcap/decoding.py (tfcap/beam.py before it was renamed) at git revision REV, interleaved in the same process, and the speed-up over it
(its results must equal today's, bit for bit); with --no-repeat-ngram N, also beam 3 blocking repeated N-grams
(`decoding._block_repeats`) and its cost over plain beam 3.

fold: the encoder alone on one random batch (--batch, default 32) in memory, with BatchNorm as Keras
builds it against BatchNorm folded into the convolutions (what caption-dir runs), interleaved;
--encoder (default xception at its 299), --precision.

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

from tfcap.quiet import import_tensorflow


def link_images(source: Path, count: int, folder: Path) -> list[Path]:
    from tfcap.caption import find_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = find_images(source)
    if len(paths) < count:
        sys.exit(f"{source} has only {len(paths)} images, {count} wanted")
    for i in range(count):  # cycle names if needed; symlinks, so nothing is copied
        (folder / f"{i:06d}{Path(paths[i]).suffix}").symlink_to((source / paths[i]).resolve())
    return sorted(folder.iterdir())


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


def notebook_caption(files, captioner, pooled_model, decoder_model, max_len, seconds=None) -> list[str]:
    """The notebook's loop; `seconds` (a dict), if given, gets the time spent in "encoder" and "decoder"."""
    import keras
    from PIL import Image

    from tfcap import encoder as encoders, text

    size = captioner.encoder.size
    name = captioner.config.encoder.name
    if name in encoders.LITE:  # not a Keras application: its own (x - 127) / 128, in NumPy as the notebook would
        from tfcap.backbones.efficientnet_lite import preprocess
    else:
        preprocess = getattr(keras.applications, {"xception": "xception", "mobilenet": "mobilenet",
                                                  "inception_v3": "inception_v3", "vgg16": "vgg16"}[name]).preprocess_input
    captions = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((size, size))
        x = preprocess(np.asarray(image, dtype="float32")[None])
        start = time.perf_counter()
        feature = pooled_model.predict(x, verbose=0)
        middle = time.perf_counter()
        words = [text.START_ID]
        for _ in range(max_len):
            seq = keras.utils.pad_sequences([words], maxlen=max_len)
            word = int(np.argmax(decoder_model.predict([feature, seq], verbose=0)[0]))
            if word == text.END_ID:
                break
            words.append(word)
        if seconds is not None:
            seconds["encoder"] = seconds.get("encoder", 0.0) + middle - start
            seconds["decoder"] = seconds.get("decoder", 0.0) + time.perf_counter() - middle
        captions.append(" ".join(captioner.vocab.words[w] for w in words[1:]))
    del encoders
    return captions


def speed(args) -> None:
    import tensorflow as tf

    from tfcap import caption, export, model

    work = Path(tempfile.mkdtemp(prefix="tfcap-bench-caption-"))
    try:
        run = Path(args.model)
        files = link_images(Path(args.images_dir), args.images, work / "images")
        # caption-dir's: the model's own decoding (its decoding.json) unless --beam-size says otherwise
        predictor = export.load_predictor(run, beam_size=args.beam_size, precision=args.precision,
                                          decoder_precision=args.decoder_precision)
        config = predictor.settings["model"]
        # The notebook (c) is the merge architecture in stock Keras layers: it has no attention decoder.
        notebook = args.notebook_images > 0 and config["decoder"]["kind"] == "merge"
        if args.notebook_images and not notebook:
            print(f"(c) skipped: the notebook's decoder is a merge LSTM, this model's is {config['decoder']['kind']}")
        captioner = model.load_model(run) if notebook else None  # the notebook's: stock Keras layers
        print(f"model: {config['encoder']['name']} at {predictor.settings['image_size']}, vocabulary "
              f"{config['vocab_size']}, {len(files)} images; (b) decodes with beam {predictor.settings['beam_size']}, "
              f"no repeated {predictor.settings.get('no_repeat_ngram', 0)}-gram; "
              f"(a) and (b) in {predictor.settings['encoder_precision']}, (b)'s decoder matmuls in "
              f"{predictor.settings['decoder_precision']}"
              + (f", (c) in {captioner.encoder.precision}" if notebook else ""), flush=True)

        def encoder_alone(paths) -> float:  # caption-dir's own input pipeline and encoder, nothing after
            start = time.perf_counter()
            for _, pixels in caption.pixel_batches(Path("/"), [str(p) for p in paths], predictor.preprocess_bytes,
                                                   caption.CaptionConfig()):
                tf.nest.map_structure(lambda t: t.numpy(), predictor.encode(pixels))
            return len(paths) / (time.perf_counter() - start)

        caption_words = []  # mean words per caption-dir caption, per run

        def caption_dir(folder) -> float:
            out = work / "out.csv"
            start = time.perf_counter()
            caption.caption_directory(predictor, folder, out, overwrite=True, show_progress=False)
            seconds = time.perf_counter() - start
            with open(out) as f:
                rows = list(csv.DictReader(f))
            assert sum(1 for row in rows if not row["error"]) == len(list(folder.iterdir()))
            caption_words.append(statistics.mean(len(row["caption"].split()) for row in rows))
            return len(rows) / seconds

        warm = work / "warm"  # a full batch and a partial one: oneDNN builds its kernels per batch shape
        link_images(Path(args.images_dir), 40, warm)
        encoder_alone(sorted(warm.iterdir()))
        caption_dir(warm)
        if notebook:
            pooled_model, decoder_model, max_len = notebook_models(captioner)
            notebook_caption(sorted(warm.iterdir())[:1], captioner, pooled_model, decoder_model, max_len)

        a, b, c, c_encoder, c_words = [], [], [], [], []
        for r in range(args.repeats):
            load = os.getloadavg()[0]
            a.append(encoder_alone(files))
            b.append(caption_dir(work / "images"))
            line = (f"run {r + 1}: (a) encoder alone {a[-1]:.2f} images/s, (b) caption-dir {b[-1]:.2f} images/s "
                    f"({caption_words[-1]:.1f} words per caption)")
            if notebook:
                start, parts = time.perf_counter(), {}
                texts = notebook_caption(files[: args.notebook_images], captioner, pooled_model, decoder_model,
                                         max_len, parts)
                c.append(args.notebook_images / (time.perf_counter() - start))
                c_encoder.append(parts["encoder"] / args.notebook_images)
                c_words.append(statistics.mean(len(t.split()) for t in texts))
                line += (f", (c) notebook {c[-1]:.3f} images/s ({c_words[-1]:.1f} words; {c_encoder[-1]:.3f} s/image "
                         "in its encoder predict)")
            print(f"{line}; load average {load:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        ma, mb = statistics.median(a), statistics.median(b)
        ratios = sorted(x / y for x, y in zip(b, a))
        # The gate: 0.9x for a merge decoder with beam 3; 0.8x for the bundled model with its confidence and labels.
        print(f"median of {args.repeats}: (a) {ma:.2f}, (b) {mb:.2f} images/s; (b)/(a) = {mb / ma:.2f} "
              f"(per run {ratios[0]:.2f}-{ratios[-1]:.2f})")
        if not notebook:
            return
        mc = statistics.median(c)
        print(f"median of {args.repeats}: (c) {mc:.3f} images/s; (b)/(c) = {mb / mc:.1f}x (target >= 8)")
        if statistics.median(c_words) < 3:
            print(f"WARNING: the notebook's captions average {statistics.median(c_words):.1f} words: it skipped "
                  "most of its per-word predicts, so (c) is far faster than on real captions; train the model "
                  "on real captions (see this script's docstring)")
        encoder_share = statistics.median(c_encoder) * mc
        print(f"the notebook spends {encoder_share:.0%} of its time in its encoder predict (batch of 1), which is "
              f"{ma * statistics.median(c_encoder):.1f}x slower per image than (a); at the encoder's speed, "
              f"caption-dir would be (a)/(c) = {ma / mc:.1f}x the notebook")
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


def fold_speed(args) -> None:
    import tensorflow as tf

    from tfcap.encoder import EncoderConfig, build_encoder

    config = EncoderConfig(args.encoder, weights="none")
    precision = args.precision or "float32"
    encoders = {"BatchNorm layers": build_encoder(config, precision),
                "BatchNorm folded": build_encoder(config, precision, inference=True)}
    pixels = tf.random.stateless_uniform([args.batch, config.size, config.size, 3], seed=[0, 0], minval=-1, maxval=1)
    outputs = {name: encoder(pixels).numpy() for name, encoder in encoders.items()}  # traces and warms up
    reference = outputs["BatchNorm layers"]
    error = np.abs(outputs["BatchNorm folded"] - reference).max() / np.abs(reference).max()
    rates, load = {name: [] for name in encoders}, os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            encoder(pixels).numpy()
            rates[name].append(args.batch / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.encoder} at {config.size}, {precision}, batch {args.batch}, median of {args.repeats}, "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}:")
    for name, rate in medians.items():
        print(f"  {name:<17} {rate:7.2f} images/s")
    print(f"  folded / layers = {medians['BatchNorm folded'] / medians['BatchNorm layers']:.2f}x; largest feature "
          f"difference {error:.1e} of the largest feature")


def beam_speed(args) -> None:
    import importlib.util

    import tensorflow as tf

    from tfcap import decoder as decoders, decoding

    vocab, batch, steps, k = args.vocab, args.batch, args.steps, 3
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.random.set_seed(0)
    dec = decoders.build_decoder(vocab, decoders.DecoderConfig(kind="merge"))
    dec({"pooled": tf.zeros([1, 64])}, tf.zeros([1, 2], tf.int32))
    pooled = tf.random.normal([batch, 64])
    end_id = decoding.END_ID

    def step(tokens, state, context):  # the real merge step, with <end> made impossible: all steps run
        log_probs, state = dec.step(tokens, state, context)
        return tf.where(tf.range(vocab) == end_id, -1e9, log_probs), state

    def load_beam(rev):
        for name in ("tfcap/decoding.py", "tfcap/beam.py"):  # beam search's module before its rename
            shown = subprocess.run(["git", "show", f"{rev}:{name}"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parent.parent)
            if shown.returncode == 0:
                break
        shown.check_returncode()
        source = shown.stdout
        path = Path(tempfile.mkdtemp(prefix="tfcap-bench-beam-")) / "beam_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("beam_baseline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def searcher(search, **options):
        @tf.function(input_signature=[tf.TensorSpec([None, 64])])
        def run(features):
            state, context = dec.initial_state({"pooled": features})
            return search(step, state, context, max_length=steps, **options)
        return run

    @tf.function(input_signature=[tf.TensorSpec([None, 64])])
    def steps_only(features):  # the decoder's own cost for B*K rows: no search around it
        state, context = dec.initial_state({"pooled": tf.repeat(features, k, axis=0)})
        tokens = tf.fill([tf.shape(features)[0] * k], decoding.START_ID)
        for _ in tf.range(steps):
            log_probs, state = step(tokens, state, context)
            tokens = tf.argmax(log_probs, axis=1, output_type=tf.int32)
        return tokens

    contenders = {"decoder steps only (B*3 rows)": steps_only,
                  "greedy": searcher(decoding.greedy_search),
                  "beam 3": searcher(decoding.beam_search, beam_size=k)}
    if args.baseline:
        contenders[f"beam 3 at {args.baseline}"] = searcher(load_beam(args.baseline).beam_search, beam_size=k)
    blocked = f"beam 3, no repeated {args.no_repeat_ngram}-gram"
    if args.no_repeat_ngram:
        contenders[blocked] = searcher(decoding.beam_search, beam_size=k, no_repeat_ngram=args.no_repeat_ngram)
    for name, fn in contenders.items():  # trace and warm up
        out = fn(pooled)
        if name.startswith("beam"):
            assert int(tf.reduce_max(out[2])) == steps, "every step must run"
    if args.baseline:
        new, old = contenders["beam 3"](pooled), contenders[f"beam 3 at {args.baseline}"](pooled)
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(new, old)), "results differ"
    times, load = {name: [] for name in contenders}, os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(5):
                tf.nest.map_structure(lambda t: t.numpy(), fn(pooled))
            times[name].append((time.perf_counter() - start) / 5)
    print(f"vocabulary {vocab}, batch {batch}, {steps} steps, {args.threads or 'default'} threads, median (min) of "
          f"{args.repeats} x 5 calls, load average {load:.2f} -> {os.getloadavg()[0]:.2f}:")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"  {name:<32} {seconds * 1e3:8.1f} ms per batch ({min(times[name]) * 1e3:.1f}), "
              f"{seconds * 1e3 / steps:.2f} ms per step")
    floor = medians["decoder steps only (B*3 rows)"]
    print(f"  beam 3 search overhead over the decoder steps: {(medians['beam 3'] - floor) * 1e3:.1f} ms per batch")
    if args.baseline:
        old = medians[f"beam 3 at {args.baseline}"]
        print(f"  beam 3 at {args.baseline} / now = {old / medians['beam 3']:.2f}x (overhead "
              f"{(old - floor) * 1e3:.1f} -> {(medians['beam 3'] - floor) * 1e3:.1f} ms per batch); minimums: "
              f"{min(times[f'beam 3 at {args.baseline}']) / min(times['beam 3']):.2f}x")
    if args.no_repeat_ngram:
        print(f"  {blocked} / beam 3 = {medians[blocked] / medians['beam 3']:.3f}x "
              f"(+{(medians[blocked] - medians['beam 3']) * 1e3:.1f} ms per batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "rss", "beam", "fold"])
    parser.add_argument("images_dir", metavar="IMAGES", nargs="?")
    parser.add_argument("--model", help="speed, rss: run directory (or SavedModel) to caption with")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--beam-size", type=int, default=None,
                        help="speed: (b)'s beam (default: the model's decoding.json, as caption-dir)")
    parser.add_argument("--notebook-images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--vocab", type=int, default=3000, help="beam: vocabulary size")
    parser.add_argument("--batch", type=int, default=32, help="beam, fold: images per batch")
    parser.add_argument("--encoder", default="xception", help="fold: encoder architecture")
    parser.add_argument("--steps", type=int, default=20, help="beam: decoding steps")
    parser.add_argument("--baseline", metavar="REV", help="beam: also time the beam search at this git revision")
    parser.add_argument("--precision", default=None, choices=["float32", "mixed_float16", "mixed_bfloat16"],
                        help="speed: the encoder's precision in (a) and (b) (default: the run's; the notebook "
                        "keeps the run's); fold: the encoders' (default float32)")
    parser.add_argument("--decoder-precision", default=None, choices=["auto", "float32", "bfloat16"],
                        help="speed: (b)'s decoder matmuls (default: auto, as caption-dir's)")
    parser.add_argument("--threads", type=int, default=0, help="beam: TensorFlow intra- and inter-op threads "
                        "(0: TensorFlow's default; 1 is steadier on a busy machine)")
    parser.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                        help="beam: also time beam 3 with no repeated N-gram")
    args = parser.parse_args()
    import_tensorflow()  # without its start-up lines
    if args.mode in ("speed", "rss") and not args.model:
        parser.error(f"{args.mode} needs --model RUN_DIR")
    if args.mode in ("speed", "rss") and not args.images_dir:
        parser.error(f"{args.mode} needs IMAGES")
    {"speed": speed, "rss": peak_rss, "beam": beam_speed, "fold": fold_speed}[args.mode](args)


if __name__ == "__main__":
    main()
