"""The `tfcap` command line: a thin layer over the library.

Each command parses its options into the library's config dataclasses and calls one library
function. TensorFlow is imported inside the commands, so `tfcap --help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

import tfcap
from tfcap.errors import TfcapError

# encoder.PRECISIONS without "auto", and encoder.ARCHITECTURES (spelled out: importing tfcap.encoder
# imports TensorFlow, too slow for --help; tests/test_cli.py keeps them equal).
_PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
_ARCHITECTURES = ("xception", "mobilenet", "inception_v3", "vgg16", "convnet")



def _import_tensorflow_quietly() -> None:
    """Import TensorFlow without its C++ start-up chatter (CUDA probing, oneDNN notes).

    Part of it is logged before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so stderr is silenced at
    the file-descriptor level during the import only. A user who sets TF_CPP_MIN_LOG_LEVEL sees all.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _UserError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turns library errors about the user's input into `Error: ...` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TfcapError as e:
            raise _UserError(str(e)) from None


PathArg = click.Path(path_type=Path)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(tfcap.__version__, prog_name="tfcap")
def main():
    """Train CNN-LSTM image captioners and caption whole image collections fast."""
    if not any(a in ("-h", "--help", "--version") for a in sys.argv[1:]):
        _import_tensorflow_quietly()


@main.command("build-records")
@click.argument("data", type=PathArg, required=False)
@click.option("-o", "--out", type=PathArg, required=True, help="Output folder for shards, vocab.txt, manifest.json.")
@click.option("--layout", type=click.Choice(["auto", "kaggle", "original", "flickr30k", "coco", "karpathy", "generic"]),
              default="auto",
              show_default=True, help="Dataset layout of DATA.")
@click.option("--captions", "captions_file", type=PathArg, help="Generic layout: CSV with image,caption[,split] header.")
@click.option("--images", "images_dir", type=PathArg, help="Images folder (generic layout, or to override).")
@click.option("--min-count", type=int, default=5, show_default=True, help="Train occurrences for a word to be kept.")
@click.option("--max-length", type=int, default=30, show_default=True, help="Words per caption; longer are truncated.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Without official splits.")
@click.option("--test-fraction", type=float, default=0.1, show_default=True, help="Without official splits.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split by image.")
@click.option("--shards", type=int, help="Shards per split (default: about --shard-mb each).")
@click.option("--shard-mb", type=float, default=100.0, show_default=True, help="Target shard size in MB.")
@click.option("--compression", type=click.Choice(["none", "gzip"]), default="none", show_default=True)
@click.option("--skip-bad-lines", is_flag=True, help="Skip unparsable caption lines instead of stopping.")
@click.option("--no-restval", is_flag=True, help="Karpathy splits: leave restval images out instead of in train.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_records_command(data, out, layout, captions_file, images_dir, min_count, max_length, val_fraction,
                          test_fraction, seed, shards, shard_mb, compression, skip_bad_lines, no_restval, overwrite,
                          quiet):
    """Images and captions in DATA into sharded TFRecords in OUT.

    DATA is a Kaggle Flickr8k folder (captions.txt, Images/), an original Flickr8k folder
    (Flickr8k.token.txt and split files), a Kaggle Flickr30k folder (results.csv), a COCO folder
    (annotations/captions_*.json), a Karpathy dataset_*.json (or its folder), or omitted with
    --captions FILE.csv --images DIR.
    """
    from tfcap import datasets, records, text

    source = datasets.read_source(data, captions_file=captions_file, images_dir=images_dir, layout=layout,
                                  skip_bad_lines=skip_bad_lines, restval=not no_restval)
    config = records.RecordsConfig(
        text=text.TextConfig(max_length=max_length),
        split=datasets.SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed),
        min_count=min_count, shards=shards, shard_mb=shard_mb,
        compression=None if compression == "none" else compression)
    records.build_records(source, out, config, overwrite=overwrite, show_progress=not quiet)


@main.command("train")
@click.argument("records_dir", metavar="RECORDS", type=PathArg)
@click.option("-o", "--out", "run_dir", type=PathArg, required=True, help="Run directory (checkpoints, logs, model).")
@click.option("--encoder", type=click.Choice(_ARCHITECTURES),
              default="xception", show_default=True,
              help="ImageNet CNN, or convnet: a small CNN to train from scratch (--train-encoder, weights none).")
@click.option("--encoder-weights", default="imagenet", show_default=True,
              help="imagenet (Keras cache, downloaded on first use), a weights file path, or none (random).")
@click.option("--alpha", type=float, help="MobileNet width multiplier (default: the one a Keras MobileNet weights "
              "file is named for, as in mobilenet_2_5_224_tf_no_top.h5 -> 0.25; else 1.0).")
@click.option("--image-size", type=int, help="Encoder input side (default: the architecture's).")
@click.option("--precision", type=click.Choice(["auto", *_PRECISIONS]),
              default="auto", show_default=True, help="auto: mixed_float16 on a GPU, float32 on a CPU.")
@click.option("--decoder", "decoder_kind", type=click.Choice(["merge", "attention"]), default="merge", show_default=True)
@click.option("--units", type=int, default=256, show_default=True)
@click.option("--embed-dim", type=int, default=256, show_default=True)
@click.option("--dropout", type=float, default=0.5, show_default=True)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--learning-rate", type=float, default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--clip-norm", type=float, default=5.0, show_default=True)
@click.option("--captions-per-image", type=click.Choice(["one", "all"]), default="all", show_default=True,
              help="Per image per epoch: one random caption, or all of them.")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Epochs between val BLEU-4 (0: never).")
@click.option("--eval-images", type=int, default=0, help="Val images decoded for BLEU-4 (0: all).")
@click.option("--patience", type=int, default=3, show_default=True, help="Evaluations without gain before stopping.")
@click.option("--train-encoder", is_flag=True,
              help="Train the CNN with the decoder (no feature cache; --batch-size then counts images).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=PathArg, help="Feature cache (default: RECORDS.cache beside the records).")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from its last checkpoint, with its saved config.")
@click.option("--overwrite", is_flag=True, help="Replace an existing RUN_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(records_dir, run_dir, encoder, encoder_weights, alpha, image_size, precision, decoder_kind, units,
                  embed_dim, dropout, epochs, batch_size, learning_rate, lr_schedule, clip_norm, captions_per_image,
                  eval_every, eval_images, patience, train_encoder, seed, cache_dir, resume, overwrite, quiet):
    """Train a captioner on RECORDS (from build-records) into RUN_DIR."""
    from tfcap import decoder, encoder as encoders, train

    if resume and overwrite:
        raise TfcapError("--resume and --overwrite contradict each other")
    if alpha is None:
        alpha = (encoder == "mobilenet" and encoders.mobilenet_alpha_of(encoder_weights)) or 1.0
    train.train(
        records_dir, run_dir,
        encoder_config=encoders.EncoderConfig(name=encoder, weights=encoder_weights, image_size=image_size,
                                              alpha=alpha),
        decoder_config=decoder.DecoderConfig(kind=decoder_kind, units=units, embed_dim=embed_dim, dropout=dropout),
        train_config=train.TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                       lr_schedule=lr_schedule, clip_norm=clip_norm,
                                       captions_per_image=captions_per_image, eval_every=eval_every,
                                       eval_images=eval_images, patience=patience, seed=seed, precision=precision,
                                       train_encoder=train_encoder),
        cache_dir=cache_dir, resume=resume, overwrite=overwrite, show_progress=not quiet)


def _precision_option(f):
    return click.option("--precision", type=click.Choice(_PRECISIONS), default=None,
                        help="The encoder's precision (default: the run's). mixed_bfloat16 encodes Xception 1.3x "
                             "to 1.9x faster on CPUs with AMX or AVX512-BF16; captions can differ in rare cases.")(f)


def _decoding_options(f):
    f = _precision_option(f)
    f = click.option("--length-penalty", type=float, default=None,
                     help="alpha in sum_logp / length**alpha for ranking beams (default 0).")(f)
    f = click.option("--beam-size", type=int, default=None, help="Beam width; 1 is greedy (default 3).")(f)
    return click.option("--model", "model_path", type=PathArg, required=True,
                        help="Run directory from tfcap train, or a SavedModel from tfcap export.")(f)


@main.command("caption-dir")
@click.argument("images_dir", metavar="IMAGES", type=PathArg)
@click.option("-o", "--out", type=PathArg, required=True, help="Output CSV (or JSON Lines with --format jsonl).")
@_decoding_options
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-pixels", type=int, default=None, help="Refuse images whose header declares more pixels.")
@click.option("--no-recursive", is_flag=True, help="Only the top folder.")
@click.option("--gallery", "gallery_path", type=PathArg, help="Also write an HTML gallery of the results here.")
@click.option("--strict", is_flag=True, help="Exit 1 if any image failed.")
@click.option("--resume", is_flag=True, help="Append the images missing from an existing output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def caption_dir_command(images_dir, out, model_path, beam_size, length_penalty, precision, fmt, batch_size, max_pixels,
                        no_recursive, gallery_path, strict, resume, overwrite, quiet):
    """Caption every image under IMAGES (jpg, png, gif, bmp, webp) into a CSV."""
    from tfcap import caption, export, images, outputs

    config = caption.CaptionConfig(beam_size=beam_size or 3, length_penalty=length_penalty or 0.0,
                                   batch_size=batch_size, max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS,
                                   recursive=not no_recursive)
    if gallery_path:
        outputs.refuse_existing(gallery_path, overwrite or resume)
    caption.find_images(images_dir, config.recursive)  # a wrong folder fails before the model loads
    predictor = export.load_predictor(model_path, beam_size=beam_size, length_penalty=length_penalty,
                                      precision=precision)
    result = caption.caption_directory(predictor, images_dir, out, config, fmt=fmt, overwrite=overwrite,
                                       resume=resume, show_progress=not quiet)
    if gallery_path:
        from tfcap.gallery import write_gallery
        write_gallery(out, images_dir, gallery_path, overwrite=True, progress=not quiet)
        click.echo(f"gallery: {gallery_path}", err=True)
    if strict and result["failed"]:
        sys.exit(1)


@main.command("caption")
@click.argument("image_paths", metavar="IMAGE...", type=PathArg, nargs=-1, required=True)
@_decoding_options
def caption_command(image_paths, model_path, beam_size, length_penalty, precision):
    """Print PATH<TAB>CAPTION for a few images (errors go to stderr, exit 1)."""
    from tfcap import caption, export

    predictor = export.load_predictor(model_path, beam_size=beam_size, length_penalty=length_penalty,
                                      precision=precision)
    config = caption.CaptionConfig(beam_size=beam_size or 3, length_penalty=length_penalty or 0.0)
    failed = 0
    for path, text_, error in caption.iter_captions(predictor, list(image_paths), config):
        if error:
            failed += 1
            click.echo(f"{path}: {error}", err=True)
        else:
            click.echo(f"{path}\t{text_}")
    if failed:
        sys.exit(1)


@main.command("export")
@click.argument("run_dir", metavar="RUN_DIR", type=PathArg)
@click.option("-o", "--out", type=PathArg, required=True, help="SavedModel folder to write.")
@click.option("--beam-size", type=int, default=3, show_default=True)
@click.option("--length-penalty", type=float, default=0.0, show_default=True)
@_precision_option
@click.option("--overwrite", is_flag=True)
def export_command(run_dir, out, beam_size, length_penalty, precision, overwrite):
    """Export RUN_DIR as a SavedModel: image bytes in, captions and scores out."""
    from tfcap import export
    from tfcap.progress import Stopwatch, summary

    clock = Stopwatch()
    export.export(run_dir, out, beam_size=beam_size, length_penalty=length_penalty, precision=precision,
                  overwrite=overwrite)
    summary(f"export: {run_dir} -> {out} (beam size {beam_size}) in {clock.seconds:.1f} s")


@main.command("gallery")
@click.argument("predictions", type=PathArg)
@click.option("--images", "images_dir", type=PathArg, required=True, help="Folder the path column is relative to.")
@click.option("-o", "--out", type=PathArg, required=True, help="HTML file to write.")
@click.option("--thumb-size", type=int, default=256, show_default=True)
@click.option("--title", default=None)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def gallery_command(predictions, images_dir, out, thumb_size, title, overwrite, quiet):
    """One self-contained HTML page of thumbnails with their captions, from a caption-dir output."""
    from tfcap.gallery import write_gallery
    from tfcap.progress import summary

    s = write_gallery(predictions, images_dir, out, thumb_size=thumb_size, title=title, overwrite=overwrite,
                      progress=not quiet)
    mean = "n/a" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
    summary(f"gallery: {s['ok']} ok, {s['failed']} failed ({s['unreadable']} unreadable now), "
            f"mean score {mean} -> {out}")


@main.command("evaluate")
@click.argument("records_dir", metavar="[RECORDS]", type=PathArg, required=False)
@click.option("--model", "model_path", type=PathArg, help="Run directory or SavedModel: caption RECORDS' split.")
@click.option("--predictions", type=PathArg, help="Score an existing caption-dir CSV/JSONL instead.")
@click.option("--references", type=PathArg, help="With --predictions: a records folder or a dataset/captions file.")
@click.option("--human-baseline", is_flag=True, help="Score each image's first reference against the others.")
@click.option("--split", default="test", show_default=True, help="Split to caption or to take references from.")
@click.option("--beam-size", type=int, default=None, help="Beam width (default 3; fixed for a SavedModel).")
@click.option("--length-penalty", type=float, default=None)
@_precision_option
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (it starts Java: about 15 s).")
@click.option("-o", "--out", type=PathArg, help="Folder for scores.json and captions_coco.json.")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(records_dir, model_path, predictions, references, human_baseline, split, beam_size,
                     length_penalty, precision, batch_size, no_meteor, out, overwrite, quiet):
    """Score captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (coco-caption definitions).

    \b
    tfcap evaluate --model RUN_DIR RECORDS --split test
    tfcap evaluate --predictions out.csv --references RECORDS_OR_DATA [--split test]
    tfcap evaluate --human-baseline --references RECORDS_OR_DATA --split test
    """
    from tfcap import evaluate, outputs

    modes = sum(bool(x) for x in (model_path, predictions, human_baseline))
    if modes != 1:
        raise TfcapError("give exactly one of --model (with RECORDS), --predictions or --human-baseline")
    if out is not None:
        outputs.refuse_existing(out, overwrite)
    if model_path:
        if records_dir is None:
            raise TfcapError("--model needs the RECORDS folder to caption")
        result = evaluate.run_model(model_path, records_dir, split, beam_size=beam_size, length_penalty=length_penalty,
                                    precision=precision, batch_size=batch_size, meteor=not no_meteor, show_progress=not quiet)
        out = out or Path(model_path) / f"eval-{split}"
    else:
        refs_path = references or records_dir
        if refs_path is None:
            raise TfcapError("give --references (a records folder or a dataset)")
        refs = evaluate.references_from(refs_path, split)
        if human_baseline:
            result = evaluate.human_baseline(refs, split=split, meteor=not no_meteor)
            out = out or Path(f"human-baseline-{split}")
        else:
            hypotheses, failed = evaluate.predictions_from(predictions)
            result = evaluate.evaluate(refs, hypotheses, split=split, failed=failed, meteor=not no_meteor,
                                       settings={"predictions": str(Path(predictions).resolve()),
                                                 "references": str(Path(refs_path).resolve())})
            out = out or Path(predictions).with_suffix(".eval")
    click.echo(evaluate.table(result))
    evaluate.write_results(out, result, overwrite=True)
    click.echo(f"scores: {out / 'scores.json'}; COCO results: {out / 'captions_coco.json'}", err=True)


@main.command("demo")
@click.option("-o", "--out", type=PathArg, default=Path("tfcap-demo"), show_default=True, help="Folder for everything.")
@click.option("--images", type=int, default=None, help="Generated scenes (default 2500).")
@click.option("--epochs", type=int, default=None, help="Training epochs (default 10).")
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out, images, epochs, overwrite, quiet):
    """Generate a captioned dataset, build records, train, caption held-out images, evaluate: offline."""
    import dataclasses

    from tfcap import demo

    config = demo.DemoConfig()
    if images:
        config = dataclasses.replace(config, scenes=dataclasses.replace(config.scenes, images=images))
    if epochs:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    demo.run_demo(out, config, overwrite=overwrite, show_progress=not quiet)


if __name__ == "__main__":
    sys.exit(main())
