"""Choose beam size, length penalty and n-gram blocking on the validation split: CIDEr-D (and BLEU-4)
of each setting.

    python tools/choose_decoding.py RUN_DIR RECORDS [--beams 1 3 5] [--penalties 0 0.5 1] [--no-repeat-ngrams 0 2 3]
                                    [--decoder-precision auto|float32|bfloat16]

Decodes the val images' cached features (the training feature cache: each image is encoded once,
not once per setting) with every combination and scores them as `tfcap evaluate` does (coco-caption
definitions, METEOR left out). Prints one line per setting, with the share of captions that repeat
a 2-gram and a 3-gram, and, last, the chosen one, as the decoding.json to write: the smallest beam
whose best CIDEr-D is within --tolerance (default 0.001, below the noise of 1,000 images) of the
best overall, so that a wider beam must earn its decoding time, and that beam's best penalty and
blocking. --no-repeat-ngrams 0 (the default) tries no blocking, as before the option existed.
The decoder is the one captioning runs (`model.load_model(inference=True)`: frozen, its matmuls in
--decoder-precision, auto by default as caption-dir's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfcap import decoder as decoders, encoder as encoders, features, inputs, metrics, model as models


def cached_batches(captioner, records: Path, split: str, cache_dir: Path | None = None) -> list:
    """The split's cached features in batches of 64 images: [(features, references, image ids)]."""
    config = captioner.config
    # The encoder the features were cached with: the run's original weights (the same features).
    encoder = encoders.build_encoder(config.encoder, config.precision)
    cached = features.features_for(records, split, encoder, decoders.needs_grid(config.decoder),
                                   cache_dir=cache_dir, show_progress=False)
    return list(inputs.image_feature_batches(cached, batch_size=64, feature_keys=models.feature_keys(config.decoder)))


def decode(captioner, batches: list, beam_size: int, length_penalty: float,
           no_repeat_ngram: int = 0) -> dict[bytes, str]:
    """Image id -> caption of every image in `batches`, decoded from its cached features."""
    import tensorflow as tf

    step = tf.function(lambda feats: captioner.caption_features(feats, beam_size=beam_size,
                                                                length_penalty=length_penalty,
                                                                no_repeat_ngram=no_repeat_ngram)[0],
                       reduce_retracing=True)
    return {image_id: caption.decode("utf-8") for feats, _, image_ids in batches
            for image_id, caption in zip(image_ids.numpy(), step(feats).numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("records", type=Path)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--no-repeat-ngrams", type=int, nargs="+", default=[0], metavar="N",
                        help="n-gram blocking sizes to try (0: none)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.001)
    parser.add_argument("--decoder-precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    captioner = models.load_model(args.run_dir, inference=True, decoder_precision=args.decoder_precision)
    print(f"decoder matmuls in {captioner.decoder.precision}", file=sys.stderr, flush=True)
    batches = cached_batches(captioner, args.records, args.split, args.cache_dir)
    references = {image_id: [metrics.ptb_tokenize(r.decode("utf-8")) for r in refs]
                  for _, captions, image_ids in batches for image_id, refs in zip(image_ids.numpy(), captions.to_list())}
    results = []
    for beam_size in args.beams:
        for penalty in args.penalties if beam_size > 1 else [0.0]:
            for ngram in args.no_repeat_ngrams:
                captions = decode(captioner, batches, beam_size, penalty, ngram)
                hypotheses = {k: metrics.ptb_tokenize(v) for k, v in captions.items()}
                bleu4 = metrics.score_bleu(references, hypotheses)[0][3]
                cider = metrics.score_cider_d(references, hypotheses)[0]
                words = sum(len(h.split()) for h in hypotheses.values()) / len(hypotheses)
                repeats = [sum(metrics.repeats_a_phrase(c, n) for c in captions.values()) / len(captions)
                           for n in (2, 3)]
                results.append((cider, bleu4, beam_size, penalty, ngram))
                print(f"beam {beam_size} length penalty {penalty:g} no repeated {ngram}-grams: {args.split} CIDEr-D "
                      f"{cider:.4f}, BLEU-4 {bleu4:.4f}, {words:.1f} words per caption, repeating a 2-gram "
                      f"{repeats[0]:.1%}, a 3-gram {repeats[1]:.1%}", flush=True)
    best = max(results)[0]
    beam_size = min(r[2] for r in results if r[0] >= best - args.tolerance)
    cider, bleu4, beam_size, penalty, ngram = max(r for r in results if r[2] == beam_size)
    chosen = {"beam_size": beam_size, "length_penalty": penalty, "no_repeat_ngram": ngram}
    print(f"best by {args.split} CIDEr-D (smallest beam within {args.tolerance:g} of {best:.4f}): --beam-size "
          f"{beam_size} --length-penalty {penalty:g} --no-repeat-ngram {ngram} (CIDEr-D {cider:.4f}, BLEU-4 "
          f"{bleu4:.4f}); decoding.json: {json.dumps(chosen)}")


if __name__ == "__main__":
    main()
