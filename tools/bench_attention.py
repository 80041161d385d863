"""Train-step throughput of the attention decoder against the merge decoder, in one process.

    python tools/bench_attention.py [--units 256 512] [--seconds 20] [--repeats 3] [--layout image|caption]

The real train step (`train._Trainer.train_step`: the `tf.function` with forward, backward, global-norm
clipping and the Adam update, dropout on) of both decoders on random features of Lite2's sizes: batches
of 64 captions of 12 tokens (11 words and `<end>`), a vocabulary of 2,538, a grid of 81 locations x
1,280 channels stored float16 as in the feature cache, the pooled vector (1,280, float32) for merge.
Each run trains for `--seconds` after one untimed step (tracing); the decoders' runs alternate, and
the figures are the median of `--repeats` runs of each, in target tokens/s, with attention/merge.

How the attention decoder gets its grids (`--layout`):
  - image: as the trainer batches it (`inputs.image_caption_batches`): the captions' images, each
    grid once, with `owners` (caption n belongs to image owners[n]); 5 captions per image, so 64
    captions come from 13 images;
  - caption: one grid per caption, as `inputs.caption_batches` gives them (tfcap before the shared grid).
Merge always gets caption batches (its pooled vector is 1,280 floats per caption).

With `--scst`, the self-critical step instead (`scst.SelfCritical.step`: K samples and the greedy
caption of each image, their CIDEr-D rewards, the policy gradient), on batches of `--images` images
with 5 random references each, in samples/s and the seconds an epoch of Flickr8k's 6,000 training
images takes. The logits' bias on `<end>` makes random weights sample captions of 12 tokens on average
(geometric, at most 31), as a trained model's are, the same for both decoders.

It runs on any tfcap checkout (PYTHONPATH): tfcap before the shared grid gathers a grid per
caption from `owners` in its train step (and copies it per sample in SCST), so `--layout caption`
measures what it trained with.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--attention-dim", type=int, default=256)
    parser.add_argument("--context-dim", type=int, default=None,
                        help="channels the grid is projected to (0: none); default: DecoderConfig's")
    parser.add_argument("--captions", type=int, default=64, help="captions per step")
    parser.add_argument("--tokens", type=int, default=12, help="target tokens per caption (words + <end>)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=2538)
    parser.add_argument("--locations", type=int, default=81)
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--layout", choices=["image", "caption"], default="image")
    parser.add_argument("--batches", type=int, default=4, help="distinct random batches, cycled")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--scst", action="store_true", help="time the self-critical step instead")
    parser.add_argument("--images", type=int, default=64, help="--scst: images per step")
    parser.add_argument("--samples", type=int, default=5, help="--scst: samples per image")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import tensorflow as tf

    import tfcap
    from tfcap import decoder, encoder, metrics, model, text, train

    print(f"tfcap at {Path(tfcap.__file__).parent}; attention layout {args.layout}"
          + (f"; SCST, {args.images} images x {args.samples} samples per step" if args.scst else ""), flush=True)
    rng = np.random.default_rng(0)
    images = args.images if args.scst else -(-args.captions // args.captions_per_image)
    captions = images * args.captions_per_image if args.scst else args.captions
    owners = np.arange(captions) // args.captions_per_image

    def random_batch(kind: str):
        """xe: (features, inputs, targets[, owners]) of `captions`; --scst: the references of `images`."""
        words = rng.integers(4, args.vocab, size=(captions, args.tokens - 1))
        inputs_ = tf.constant(np.concatenate([np.full((captions, 1), text.START_ID), words], axis=1), tf.int32)
        targets = tf.constant(np.concatenate([words, np.full((captions, 1), text.END_ID)], axis=1), tf.int32)
        if kind == "merge":
            pooled = tf.constant(rng.normal(size=(images if args.scst else captions, args.channels)), tf.float32)
            return ({"pooled": pooled}, inputs_, targets) + ((tf.constant(owners, tf.int32),) if args.scst else ())
        grid = tf.constant(np.abs(rng.normal(size=(images, args.locations, args.channels))).astype(np.float16))
        if args.layout == "caption" and not args.scst:
            return ({"grid": tf.gather(grid, owners)}, inputs_, targets)
        return ({"grid": grid}, inputs_, targets, tf.constant(owners, tf.int32))

    context_dim = {} if args.context_dim is None else {"context_dim": args.context_dim}

    def trainer_of(kind: str, units: int) -> train._Trainer:
        config = model.ModelConfig(
            encoder=encoder.EncoderConfig(), text=text.TextConfig(), precision=args.precision,
            decoder=decoder.DecoderConfig(kind=kind, units=units, embed_dim=args.embed_dim,
                                          attention_dim=args.attention_dim, **context_dim),
            vocab_size=args.vocab, vocab_sha256="")
        captioner = model.Captioner(config, None, model.build_decoder(config, args.channels, args.locations), None)
        if not args.scst:
            return train._Trainer(captioner, train.TrainConfig(), total_steps=10**6,
                                  run_dir=Path("/tmp/tfcap-bench-attention"))
        bias = captioner.decoder.logits.bias
        bias.assign(tf.tensor_scatter_nd_update(bias, [[text.END_ID]], [float(np.log((args.vocab - 4) / 11))]))
        references = [[list(rng.integers(4, args.vocab, size=args.tokens - 1)) for _ in range(5)] for _ in range(100)]
        return train._Trainer(captioner, train.TrainConfig(objective="scst", init="-", batch_size=args.images,
                                                           samples=args.samples), total_steps=10**6,
                              run_dir=Path("/tmp/tfcap-bench-attention"),
                              reward=metrics.TokenCiderD(references, args.vocab))

    def run(trainer, batches) -> float:
        """Work per second: target tokens (xe) or samples (SCST), the step's second output."""
        float(trainer.train_step(*batches[0])[0])  # tracing (first call) and warm-up: not timed
        work, start, i = 0.0, time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            _, n = trainer.train_step(*batches[i % len(batches)])
            work += float(n)
            i += 1
        return work / (time.perf_counter() - start)

    results = {}
    for units in args.units:
        setups = {kind: (trainer_of(kind, units), [random_batch(kind) for _ in range(args.batches)])
                  for kind in ("merge", "attention")}
        rates = {kind: [] for kind in setups}
        for r in range(args.repeats):
            for kind, (trainer, batches) in setups.items():
                rates[kind].append(run(trainer, batches))
            print(f"units {units} run {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
                  + (" samples/s" if args.scst else " tokens/s"), flush=True)
        results[units] = {kind: statistics.median(v) for kind, v in rates.items()}
    print(f"median of {args.repeats} ({args.seconds:.0f} s each), " + ("samples/s, seconds per epoch of 6,000 images:"
                                                                      if args.scst else "target tokens/s:"))
    for units, medians in results.items():
        epoch = (lambda rate: f" ({6000 * args.samples / rate:,.0f} s per epoch)") if args.scst else (lambda rate: "")
        print(f"  {units} units: merge {medians['merge']:,.0f}{epoch(medians['merge'])}, attention "
              f"{medians['attention']:,.0f}{epoch(medians['attention'])}, "
              f"attention/merge {medians['attention'] / medians['merge']:.2f}x")


if __name__ == "__main__":
    main()
