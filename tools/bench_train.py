"""Training throughput: tfcap's loop against the classic notebook way, on the same cached features.

    python tools/bench_train.py RECORDS [--encoder-weights W ...] [--seconds 30] [--repeats 3]

Both train the same merge model (image Dense + Embedding/LSTM, add, Dense, softmax; same sizes,
same vocabulary) on the same pooled features from tfcap's feature cache (built first if missing):

- tfcap: the `tf.function` train step on whole padded captions (teacher forcing on all positions).
- notebook: a Python generator yielding one (image, padded prefix) -> next word sample per word,
  batched by image as the tutorials do, fed to `model.fit` with one-hot targets.

Throughput is target tokens (= notebook samples) per second, timed after a warm-up. Prints the
median of `--repeats` runs of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def merge_model_parser(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarked model and of the timing (also `bench_strategy.py`'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("records")
    parser.add_argument("--encoder", default="mobilenet")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--encoder-weights", default="none")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="captions per tfcap step")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def cached_merge_model(args):
    """(vocabulary, encoder, the train split's cached features (built if missing), ModelConfig of a
    float32 merge decoder with `args.units` units) for the options of `merge_model_parser`."""
    from tfcap import decoder, encoder, features, model, records, text

    vocab = records.load_vocabulary(args.records)
    manifest = records.read_manifest(args.records)
    enc = encoder.build_encoder(encoder.EncoderConfig(name=args.encoder, alpha=args.alpha,
                                                      weights=args.encoder_weights, image_size=args.image_size))
    cached = features.features_for(args.records, "train", enc, with_grid=False)
    config = model.ModelConfig(encoder=enc.config, decoder=decoder.DecoderConfig(units=args.units, embed_dim=args.units),
                               text=text.TextConfig(**manifest["text"]), precision="float32",
                               vocab_size=len(vocab), vocab_sha256=vocab.sha256)
    return vocab, enc, cached, config


def main() -> None:
    parser = merge_model_parser(__doc__.splitlines()[0])
    parser.add_argument("--notebook-images", type=int, default=8, help="images per notebook batch")
    args = parser.parse_args()

    import keras

    from tfcap import inputs, model, text, train

    vocab, enc, cached, config = cached_merge_model(args)

    # ---- tfcap: the real train step on the real input pipeline --------------------------------
    captioner = model.Captioner(config, enc, model.build_decoder(config, enc.feature_dim, 1), vocab)
    trainer = train._Trainer(captioner, train.TrainConfig(batch_size=args.batch_size), total_steps=10**6,
                             run_dir=__import__("pathlib").Path("/tmp/tfcap-bench-train"))

    def tfcap_run() -> float:
        tokens, start, epoch = 0.0, None, 0
        while True:
            for feats, inputs_, targets in inputs.caption_batches(cached, batch_size=args.batch_size,
                                                                  feature_keys=("pooled",), shuffle=True, epoch=epoch):
                _, n = trainer.train_step(feats, inputs_, targets)
                if start is None:  # first step: tracing and warm-up, not timed
                    float(n)
                    start = time.perf_counter()
                    continue
                tokens += float(n)
                if time.perf_counter() - start > args.seconds:
                    return tokens / (time.perf_counter() - start)
            epoch += 1

    # ---- notebook: per-word samples from a Python generator, model.fit ------------------------
    pooled, captions = [], []
    for element in cached.as_numpy_iterator():
        pooled.append(element["pooled"])
        captions.append([list(c) for c in element["caption_ids"].to_list()] if hasattr(element["caption_ids"], "to_list")
                        else [list(c) for c in element["caption_ids"]])
    max_len = config.text.max_length + 1
    vocab_size = len(vocab)

    def notebook_model() -> keras.Model:
        image = keras.Input((enc.feature_dim,))
        fe = keras.layers.Dense(args.units, activation="relu")(keras.layers.Dropout(0.5)(image))
        sequence = keras.Input((max_len,))
        se = keras.layers.Embedding(vocab_size, args.units, mask_zero=True)(sequence)
        se = keras.layers.LSTM(args.units)(keras.layers.Dropout(0.5)(se))
        hidden = keras.layers.Dense(args.units, activation="relu")(keras.layers.add([fe, se]))
        out = keras.layers.Dense(vocab_size, activation="softmax")(hidden)
        m = keras.Model([image, sequence], out)
        m.compile(loss="categorical_crossentropy", optimizer="adam")
        return m

    sizes: list[int] = []  # samples in each batch the generator yielded, in order

    def generator():
        """The tutorial generator: for each image, for each caption, one sample per word."""
        while True:
            x1, x2, y = [], [], []
            for count, k in enumerate(np.random.permutation(len(pooled)), start=1):
                for caption in captions[k]:
                    seq = [text.START_ID] + [int(t) for t in caption] + [text.END_ID]
                    for i in range(1, len(seq)):
                        prefix = keras.utils.pad_sequences([seq[:i]], maxlen=max_len)[0]
                        x1.append(pooled[k])
                        x2.append(prefix)
                        y.append(keras.utils.to_categorical(seq[i], num_classes=vocab_size))
                if count % args.notebook_images == 0:
                    sizes.append(len(y))
                    yield (np.array(x1), np.array(x2)), np.array(y)
                    x1, x2, y = [], [], []

    class Timer(keras.callbacks.Callback):
        """Times from the end of the first batch (tracing excluded); stops after --seconds."""

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch == 0:
                self.start, self.first = now, batch
            elif now - self.start > args.seconds:
                self.samples = sum(sizes[1:batch + 1])
                self.seconds = now - self.start
                self.model.stop_training = True

    def notebook_run() -> float:
        sizes.clear()
        timer = Timer()
        notebook_model().fit(generator(), steps_per_epoch=10**7, epochs=1, verbose=0, callbacks=[timer])
        return timer.samples / timer.seconds

    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(tfcap_run())
        theirs.append(notebook_run())
        print(f"run {r + 1}: tfcap {ours[-1]:,.0f} tokens/s, notebook {theirs[-1]:,.0f} tokens/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median of {args.repeats}: tfcap {a:,.0f} tokens/s, notebook {b:,.0f} tokens/s, ratio {a / b:.1f}x")


if __name__ == "__main__":
    main()
