"""The `tfcap` command line: a thin layer over the library.

Each command parses its options into the library's config dataclasses and calls one library
function. TensorFlow is imported (quietly, `tfcap.quiet`) only when a command that needs it runs,
after click has parsed its arguments: `--help`, a usage error and `tfcap models` answer at once.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import click

import tfcap
from tfcap.errors import TfcapError
from tfcap.quiet import import_tensorflow

# encoder.PRECISIONS without "auto", and encoder.ARCHITECTURES (spelled out: importing tfcap.encoder
# imports TensorFlow, too slow for --help; tests/test_cli.py keeps them equal).
_PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
_ARCHITECTURES = ("xception", "mobilenet", "inception_v3", "vgg16", "efficientnet_lite0", "efficientnet_lite1",
                  "efficientnet_lite2", "convnet")
_STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")  # distribute.STRATEGIES


class _UserError(click.ClickException):
    exit_code = 2


def _os_error_message(e: OSError) -> str:
    """One line for an OSError that escaped the checks made up front (disk full, permissions changed mid-run)."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}" if e.strerror else f"{type(e).__name__}: {e}"


class _Command(click.Command):
    """A command that imports TensorFlow quietly when it runs, once its arguments are parsed."""

    def invoke(self, ctx):
        import_tensorflow()
        return super().invoke(ctx)


class _Group(click.Group):
    """Turns library errors about the user's input into `Error: ...` and exit code 2, file system
    errors at write time into one line too, and Ctrl-C into one line and exit code 130 (the shell's
    code for SIGINT) instead of click's `Aborted!` and 1. Its commands are `_Command`s."""

    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TfcapError as e:
            raise _UserError(str(e)) from None
        except OSError as e:
            raise _UserError(_os_error_message(e)) from None
        except KeyboardInterrupt as e:
            click.echo(f"\n{e}" if str(e) else "\ninterrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as e:
            tf_errors = getattr(sys.modules.get("tensorflow"), "errors", None)
            if tf_errors is not None and isinstance(e, (tf_errors.PermissionDeniedError,
                                                        tf_errors.ResourceExhaustedError)):
                raise _UserError(_tf_error_message(e)) from None
            raise


def _tf_error_message(e: Exception) -> str:
    """The first line of a TensorFlow error without the graph node before it and the op after it
    ("{{function_node __wrapped__SaveV2...}} run/ckpt...: No space left on device [Op:SaveV2]")."""
    line = str(e).strip().splitlines()[0]
    return re.sub(r"\s*\[Op:\w+\]$", "", re.sub(r"^\{\{.*?\}\}\s*", "", line))


def _claim(out: Path, **claim):
    """`outputs.Output(out, **claim)`, held until the command ends, however it ends: claimed before
    the long work, so a second writer or an existing output is refused first."""
    from tfcap import outputs

    return click.get_current_context().with_resource(outputs.Output(out, **claim))


PathArg = click.Path(path_type=Path)


class _Location(click.ParamType):
    """A local path (Path) or, kept as it is, a URL of a file system (gs://bucket/photos: a Path would
    fold its // into one)."""

    name = "path"

    def convert(self, value, param, ctx):
        if isinstance(value, Path) or value is None:
            return value
        return value if "://" in str(value) else Path(value)


LocationArg = _Location()
_POSITIVE = click.IntRange(min=1)  # a batch or beam of 0 would fail deep inside TensorFlow
_NON_NEGATIVE = click.FloatRange(min=0)  # a negative length penalty would fail inside a traced function


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(tfcap.__version__, prog_name="tfcap")
def main():
    """Train CNN-LSTM image captioners and caption whole image collections fast."""


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
@click.option("--shards", type=_POSITIVE, help="Shards per split (default: about --shard-mb each).")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True, help="Target shard size in MB.")
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

    output = _claim(out, overwrite=overwrite, inputs={"dataset": data, "captions file": captions_file,
                                                      "images folder": images_dir})
    source = datasets.read_source(data, captions_file=captions_file, images_dir=images_dir, layout=layout,
                                  skip_bad_lines=skip_bad_lines, restval=not no_restval)
    config = records.RecordsConfig(
        text=text.TextConfig(max_length=max_length),
        split=datasets.SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed),
        min_count=min_count, shards=shards, shard_mb=shard_mb,
        compression=None if compression == "none" else compression)
    records.build_records(source, output, config, show_progress=not quiet)


@main.command("train")
@click.argument("records_dir", metavar="RECORDS", type=PathArg)
@click.option("-o", "--out", "run_dir", type=PathArg, required=True, help="Run directory (checkpoints, logs, model).")
@click.option("--encoder", type=click.Choice(_ARCHITECTURES),
              default="xception", show_default=True,
              help="ImageNet CNN (efficientnet_lite0/1/2: the best features per CPU cycle), or convnet: a small "
              "CNN to train from scratch (--train-encoder, weights none).")
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
@click.option("--context-dim", type=int, help="attention: channels the grid is projected to (once per image) before "
              "the decoder attends over it (default: --units; 0: the grid's own channels, several times slower).")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--learning-rate", type=float, help="Peak learning rate (default: 1e-3; 5e-5 with --objective scst).")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--clip-norm", type=float, default=5.0, show_default=True)
@click.option("--captions-per-image", type=click.Choice(["one", "all"]), default="all", show_default=True,
              help="Per image per epoch: one random caption, or all of them.")
@click.option("--augment", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: each training image mirrored left-right with probability 1/2, anew each epoch (the "
              "feature cache then encodes the train images a second time, mirrored).")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Epochs between val BLEU-4 and CIDEr-D, and after the last (0: never).")
@click.option("--eval-images", type=int, default=0, help="Val images decoded for BLEU-4 and CIDEr-D (0: all).")
@click.option("--patience", type=int, default=3, show_default=True, help="Evaluations without gain before stopping.")
@click.option("--train-encoder", is_flag=True,
              help="Train the CNN with the decoder (no feature cache; --batch-size then counts images).")
@click.option("--objective", type=click.Choice(["xe", "scst"]), default="xe", show_default=True,
              help="xe: cross-entropy on the references; scst: self-critical training (CIDEr-D reward of sampled "
              "captions), starting from the run given by --init, whose model it keeps.")
@click.option("--init", "init_run", type=PathArg, help="With --objective scst: the cross-entropy run to start from.")
@click.option("--samples", type=int, default=5, show_default=True, help="scst: captions sampled per image.")
@click.option("--baseline", type=click.Choice(["mean", "greedy"]), default="mean", show_default=True,
              help="scst: reward baseline, the mean of the image's other samples or its greedy caption's reward.")
@click.option("--select", type=click.Choice(["bleu4", "cider"]),
              help="Validation metric that picks the best weights and stops early (default: bleu4; cider with scst).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--strategy", type=click.Choice(_STRATEGIES), default="auto",
              show_default=True, help="tf.distribute: mirrored over this machine's GPUs (or --devices), multi-worker "
              "over the machines in TF_CONFIG; auto: mirrored with more than one GPU, else one-device.")
@click.option("--devices", default="", help="mirrored or one-device: the devices, e.g. GPU:0,GPU:1 (default: all GPUs).")
@click.option("--cluster-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="multi-worker: seconds to wait for the other machines of TF_CONFIG to start before giving up.")
@click.option("--cache-dir", type=PathArg, help="Feature cache (default: RECORDS.cache beside the records).")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from its last checkpoint, with its saved config "
              "(--epochs N extends it, --strategy and --devices may change; other options must match the run's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing RUN_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(records_dir, run_dir, encoder, encoder_weights, alpha, image_size, precision, decoder_kind, units,
                  embed_dim, dropout, context_dim, epochs, batch_size, learning_rate, lr_schedule, clip_norm,
                  captions_per_image, augment, eval_every, eval_images, patience, train_encoder, objective, init_run,
                  samples, baseline, select, seed, strategy, devices, cluster_timeout, cache_dir, resume, overwrite,
                  quiet):
    """Train a captioner on RECORDS (from build-records) into RUN_DIR."""
    from tfcap import decoder, encoder as encoders, features, outputs, train

    if resume and overwrite:
        raise TfcapError("--resume and --overwrite contradict each other")
    outputs.refuse_inputs(run_dir, {"records folder": records_dir, "--init run": init_run})
    if resume or overwrite or not run_dir.exists():  # else train refuses it, saying how to continue
        outputs.check_writable(run_dir, replace=not resume)
    cache = cache_dir or features.default_cache_dir(records_dir)
    if not cache.exists():  # an existing cache may be complete and read-only: found out when it is written
        outputs.check_writable(cache)
    if resume:  # what the command line says again; the rest comes from the run's config
        given, ctx = {}, click.get_current_context()
        fields = {"encoder": "encoder.name", "encoder_weights": "encoder.weights", "alpha": "encoder.alpha",
                  "image_size": "encoder.image_size", "decoder_kind": "decoder.kind", "units": "decoder.units",
                  "embed_dim": "decoder.embed_dim", "dropout": "decoder.dropout", "context_dim": "decoder.context_dim",
                  "init_run": "train.init"}
        for name in ("encoder", "encoder_weights", "alpha", "image_size", "precision", "decoder_kind", "units",
                     "embed_dim", "dropout", "context_dim", "epochs", "batch_size", "learning_rate", "lr_schedule",
                     "clip_norm", "captions_per_image", "augment", "eval_every", "eval_images", "patience",
                     "train_encoder", "objective", "init_run", "samples", "baseline", "select", "seed", "strategy",
                     "devices"):
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT,
                                                      click.core.ParameterSource.DEFAULT_MAP):
                value = ctx.params[name]
                given[fields.get(name, f"train.{name}")] = str(value.resolve()) if name == "init_run" else value
        train.train(records_dir, run_dir, cache_dir=cache_dir, resume=True, show_progress=not quiet, given=given,
                    cluster_timeout=cluster_timeout)
        return
    if alpha is None:
        alpha = (encoder == "mobilenet" and encoders.mobilenet_alpha_of(encoder_weights)) or 1.0
    train.train(
        records_dir, run_dir,
        encoder_config=encoders.EncoderConfig(name=encoder, weights=encoder_weights, image_size=image_size,
                                              alpha=alpha),
        decoder_config=decoder.DecoderConfig(kind=decoder_kind, units=units, embed_dim=embed_dim, dropout=dropout,
                                             context_dim=context_dim),
        train_config=train.TrainConfig(epochs=epochs, batch_size=batch_size,
                                       learning_rate=learning_rate or (5e-5 if objective == "scst" else 1e-3),
                                       lr_schedule=lr_schedule, clip_norm=clip_norm,
                                       captions_per_image=captions_per_image, augment=augment,
                                       eval_every=eval_every,
                                       eval_images=eval_images, patience=patience, seed=seed, precision=precision,
                                       train_encoder=train_encoder, objective=objective,
                                       init=str(init_run) if init_run else "", samples=samples, baseline=baseline,
                                       select=select or ("cider" if objective == "scst" else "bleu4"),
                                       strategy=strategy, devices=devices),
        cache_dir=cache_dir, overwrite=overwrite, show_progress=not quiet, cluster_timeout=cluster_timeout)


def _precision_option(f, decoder_default: str = "auto"):
    f = click.option("--decoder-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
                     help=f"The attention decoder's matmuls (default: {decoder_default}). auto: bfloat16 on a CPU with "
                          "AVX512-BF16 or AMX (its steps about 1.7x faster; captions can differ in rare cases), "
                          "float32 elsewhere.")(f)
    return click.option("--precision", type=click.Choice(_PRECISIONS), default=None,
                        help="The encoder's precision (default: the run's). mixed_bfloat16 encodes Xception 1.3x "
                             "to 1.9x faster on CPUs with AMX or AVX512-BF16; captions can differ in rare cases.")(f)


def _search_default(key: str, fallback: float) -> str:
    """Option help on a decoding setting's default: the model's decoding.json, and what the bundled
    model's says (read without TensorFlow, so the help shows the real value)."""
    from tfcap import pretrained

    try:
        bundled = f"; the bundled model's: {pretrained.decoding().get(key, fallback):g}"
    except TfcapError:  # no bundled model in this installation
        bundled = ""
    return f"default: the model's decoding.json, else {fallback:g}{bundled}"


def _no_repeat_ngram_option(f):
    return click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=None, metavar="N",
                        help="No phrase of N words twice in a caption; 0: off "
                             f"({_search_default('no_repeat_ngram', 0)}; fixed for a SavedModel).")(f)


def _labels_options(f):
    f = click.option("--no-labels", is_flag=True, help="No ImageNet labels (same as --labels 0).")(f)
    return click.option("--labels", "label_count", type=click.IntRange(min=0), default=None, metavar="N",
                        help="ImageNet labels per image from the encoder's own classifier, most probable first "
                             "(default 3; a SavedModel: as exported, or fewer). Encoders without one leave them "
                             "empty.")(f)


def _label_count(label_count: int | None, no_labels: bool) -> int | None:
    """--labels N and --no-labels as one count (None: the default)."""
    if no_labels and label_count:
        raise TfcapError("--labels and --no-labels contradict each other")
    return 0 if no_labels else label_count


def _search_options(f):
    f = _no_repeat_ngram_option(f)
    f = click.option("--length-penalty", type=_NON_NEGATIVE, default=None,
                     help="alpha in sum_logp / length**alpha for ranking beams "
                     f"({_search_default('length_penalty', 0)}).")(f)
    return click.option("--beam-size", type=_POSITIVE, default=None,
                        help=f"Beam width; 1 is greedy ({_search_default('beam_size', 3)}).")(f)


def _decoding_options(f):
    f = _search_options(_precision_option(_labels_options(f)))
    return click.option("--model", "model_path", type=LocationArg, callback=_default_model,
                        help="Run directory from tfcap train, or a SavedModel from tfcap export, local or "
                        "gs://... (default: the bundled model, see tfcap models).")(f)


def _default_model(ctx, param, value):
    """--model, or the bundled default model when it is not given (a URL as it is)."""
    from tfcap import pretrained

    return value if isinstance(value, str) else pretrained.resolve(value)


@main.command("caption-dir", epilog="Beam pipeline options go after --, e.g. "
              "tfcap caption-dir photos -o out --engine beam -- --direct_running_mode=multi_processing "
              "--direct_num_workers=2")
@click.argument("images_dir", metavar="IMAGES", type=LocationArg)
@click.option("-o", "--out", type=LocationArg, required=True,
              help="Output file: CSV, or JSON Lines when it ends in .jsonl (or with --format jsonl). "
              "With --engine beam a folder of parts OUT/part-SSSSS-of-NNNNN.csv.")
@_decoding_options
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="Output format (default: from the suffix of --out; .jsonl, .ndjson, .json are JSON Lines, else CSV).")
@click.option("--batch-size", type=_POSITIVE, default=64, show_default=True,
              help="Images per batch through the encoder and decoding.")
@click.option("--max-pixels", type=_POSITIVE, default=None, help="Refuse images whose header declares more pixels.")
@click.option("--no-recursive", is_flag=True, help="Only the top folder.")
@click.option("--gallery", "gallery_path", type=PathArg, help="Also write an HTML gallery of the results here.")
@click.option("--strict", is_flag=True, help="Exit 1 if any image failed.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None, metavar="X",
              help="Leave out the caption of rows whose confidence is below X, with the reason in the row's error "
                   "(the model must have a fitted confidence: the bundled one has).")
@click.option("--resume", is_flag=True, help="Append the images missing from an existing output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="local: in this process; beam: one Apache Beam pipeline (pip install 'tfcap[beam]'), "
              "IMAGES and OUT may be gs://, s3://.")
@click.option("--runner", help="With --engine beam: the Beam runner (default DirectRunner; DataflowRunner, "
              "FlinkRunner, SparkRunner need a SavedModel their workers can read, see tfcap export).")
@click.option("--verbose", is_flag=True, help="With --engine beam: show the runner's and its workers' logs.")
@click.argument("pipeline_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- BEAM_OPTION...]")
def caption_dir_command(images_dir, out, model_path, beam_size, length_penalty, no_repeat_ngram, precision,
                        decoder_precision, label_count, no_labels, fmt, batch_size, max_pixels, no_recursive,
                        gallery_path, strict, min_confidence, resume, overwrite, quiet, engine, runner, verbose,
                        pipeline_args):
    """Caption every image under IMAGES (jpg, png, gif, bmp, webp) into a CSV (--engine beam: a folder of parts)."""
    import dataclasses

    from click.core import ParameterSource

    from tfcap import caption, export, images

    label_count = _label_count(label_count, no_labels)

    config = caption.CaptionConfig(beam_size=beam_size or 3, length_penalty=length_penalty or 0.0,
                                   batch_size=batch_size, max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS,
                                   recursive=not no_recursive, min_confidence=min_confidence)
    if engine == "beam":
        for name, given in (("--resume", resume), ("--gallery", gallery_path)):
            if given:
                raise TfcapError(f"{name} does not go with --engine beam (it writes OUT/part-* files in one pass)")
        if pipeline_args and not pipeline_args[0].startswith("-"):
            raise TfcapError(f"unexpected argument {pipeline_args[0]} (Beam pipeline options start with --)")
        from tfcap.engines import beam_engine

        engine_module = beam_engine()
        result = engine_module.caption_directory(
            images_dir, out, model_path, config, engine_module.BeamConfig(runner, tuple(pipeline_args), verbose),
            fmt=fmt, overwrite=overwrite, beam_size=beam_size, length_penalty=length_penalty,
            no_repeat_ngram=no_repeat_ngram, labels=label_count, precision=precision,
            decoder_precision=decoder_precision)
        if strict and result["failed"]:
            sys.exit(1)
        return
    if runner or pipeline_args or verbose:
        raise TfcapError(f"{'--runner' if runner else '--verbose' if verbose else pipeline_args[0]}: "
                         "Beam options need --engine beam")
    for location in (images_dir, out, model_path):
        if export.is_url(location):
            raise TfcapError(f"{location}: the local engine reads and writes local paths; use --engine beam")
    if overwrite and resume:
        raise TfcapError("--overwrite and --resume contradict each other")
    fmt = caption.output_format(out, fmt)
    # Wrong folders, unwritable outputs and a second writer fail before the model loads.
    inputs = {"images folder": images_dir, "model": model_path}
    output = _claim(out, overwrite=overwrite, append=resume, inputs=inputs, hint=caption.RESUME_HINT)
    gallery = gallery_path and _claim(gallery_path, overwrite=overwrite or resume, inputs={**inputs, "output": out})
    found = caption.find_images(images_dir, config.recursive)
    if not found:
        caption.nothing_found(images_dir, out)
        return
    if resume:  # the decoding the output was begun with; given again, it must be the same
        model_given = click.get_current_context().get_parameter_source("model_path") == ParameterSource.COMMANDLINE
        settings = caption.resumed_settings(out, {
            "model": caption.model_location(model_path) if model_given else None, "beam_size": beam_size,
            "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram, "precision": precision,
            "decoder_precision": None if decoder_precision == "auto" else decoder_precision, "labels": label_count,
            "max_pixels": max_pixels, "min_confidence": min_confidence})
        model_path = settings["model"] or model_path
        beam_size, length_penalty, precision = settings["beam_size"], settings["length_penalty"], settings["precision"]
        no_repeat_ngram, label_count = settings["no_repeat_ngram"], settings["labels"]
        decoder_precision = settings["decoder_precision"]
        config = dataclasses.replace(config, max_pixels=settings["max_pixels"] or config.max_pixels,
                                     min_confidence=settings["min_confidence"])
    predictor = export.load_predictor(model_path, beam_size=beam_size, length_penalty=length_penalty,
                                      no_repeat_ngram=no_repeat_ngram, labels=label_count, precision=precision,
                                      decoder_precision=decoder_precision)
    if min_confidence is not None and not predictor.settings.get("confidence"):
        raise TfcapError(f"--min-confidence: {model_path} has no fitted confidence (tfcap fit-confidence RUN_DIR RECORDS, "
                         "then export again)")
    result = caption.caption_directory(predictor, images_dir, output, config, fmt=fmt, overwrite=overwrite,
                                       resume=resume, show_progress=not quiet,
                                       settings=caption.decoding_settings(model_path, predictor, config),
                                       paths=found)
    if gallery:
        from tfcap.gallery import write_gallery
        write_gallery(out, images_dir, gallery, progress=not quiet)
        click.echo(f"gallery: {gallery_path}", err=True)
    if strict and result["failed"]:
        sys.exit(1)


@main.command("caption")
@click.argument("image_paths", metavar="IMAGE...", type=PathArg, nargs=-1, required=True)
@_decoding_options
def caption_command(image_paths, model_path, beam_size, length_penalty, no_repeat_ngram, precision,
                    decoder_precision, label_count, no_labels):
    """Print PATH<TAB>CAPTION<TAB>SCORE<TAB>LABELS for a few images (errors go to stderr, exit 1)."""
    from tfcap import caption, export, rows

    folder = next((p for p in image_paths if p.is_dir()), None)
    if folder is not None:  # before the model loads
        raise TfcapError(f"{folder} is a folder; use tfcap caption-dir {folder} -o captions.csv")
    predictor = export.load_predictor(model_path, beam_size=beam_size, length_penalty=length_penalty,
                                      no_repeat_ngram=no_repeat_ngram, labels=_label_count(label_count, no_labels),
                                      precision=precision, decoder_precision=decoder_precision)
    config = caption.CaptionConfig(beam_size=beam_size or 3, length_penalty=length_penalty or 0.0)
    failed = 0
    for row in caption.iter_captions(predictor, list(image_paths), config):
        if row["error"]:
            failed += 1
            click.echo(f"{row['path']}: {row['error']}", err=True)
        else:
            click.echo(rows.tab_line(row["path"], row))
    if failed:
        sys.exit(1)


@main.command("export")
@click.argument("run_dir", metavar="[RUN_DIR]", type=PathArg, required=False, callback=_default_model)
@click.option("-o", "--out", type=LocationArg, required=True,
              help="SavedModel folder to write (or gs://...: for the workers of caption-dir --engine beam).")
@_search_options
@functools.partial(_precision_option, decoder_default="auto, resolved on this machine; float32 for a SavedModel to "
                   "serve on CPUs without bfloat16 instructions")
@_labels_options
@click.option("--overwrite", is_flag=True)
def export_command(run_dir, out, beam_size, length_penalty, no_repeat_ngram, precision, decoder_precision, label_count,
                   no_labels, overwrite):
    """Export RUN_DIR (default: the bundled model) as a SavedModel: image bytes in, captions, scores and labels out."""
    import dataclasses

    from tfcap import decoder, export, model
    from tfcap.progress import Stopwatch, summary

    label_count = _label_count(label_count, no_labels)
    kind = model.read_run_config(run_dir)["model"].get("decoder", {}).get("kind", "merge")
    matmuls = decoder.resolve_precision(decoder_precision, kind)  # a refusal before anything is written
    output = out if export.is_url(out) else _claim(out, overwrite=overwrite, inputs={"run directory": run_dir})
    decoding = export.run_decoding(run_dir, beam_size, length_penalty, no_repeat_ngram)
    clock = Stopwatch()
    export.export(run_dir, output, **dataclasses.asdict(decoding), labels=label_count, precision=precision,
                  decoder_precision=decoder_precision, overwrite=overwrite)
    labels = export.run_labels(run_dir, label_count)
    summary(f"export: {run_dir} -> {out} (beam size {decoding.beam_size}, length penalty {decoding.length_penalty:g}, "
            f"no repeated {decoding.no_repeat_ngram}-grams, {labels} labels, decoder matmuls in {matmuls}) in "
            f"{clock.seconds:.1f} s")


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

    output = _claim(out, overwrite=overwrite, inputs={"predictions file": predictions, "images folder": images_dir})
    s = write_gallery(predictions, images_dir, output, thumb_size=thumb_size, title=title, progress=not quiet)
    mean = "n/a" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
    summary(f"gallery: {s['ok']} ok, {s['failed']} failed ({s['unreadable']} unreadable now), "
            f"mean score {mean} -> {out}")


@main.command("evaluate")
@click.argument("records_dir", metavar="[RECORDS]", type=PathArg, required=False)
@click.option("--model", "model_path", type=PathArg, help="Run directory or SavedModel: caption RECORDS' split.")
@click.option("--predictions", type=PathArg,
              help="Score an existing caption-dir output instead: CSV, JSON Lines, or a --engine beam OUT folder.")
@click.option("--references", type=PathArg, help="With --predictions: a records folder or a dataset/captions file.")
@click.option("--human-baseline", is_flag=True, help="Score each image's first reference against the others.")
@click.option("--split", default=None,
              help="Split to caption or to take references from (default: test; with --predictions, all splits).")
@_search_options
@_precision_option
@click.option("--batch-size", type=_POSITIVE, default=32, show_default=True)
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (it starts Java: about 15 s).")
@click.option("-o", "--out", type=PathArg,
              help="Folder for scores.json and captions_coco.json (default: RUN_DIR/eval-SPLIT, SAVEDMODEL.eval-SPLIT "
                   "beside a SavedModel, PREDICTIONS.eval beside the predictions, ./human-baseline-SPLIT).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(records_dir, model_path, predictions, references, human_baseline, split, beam_size,
                     length_penalty, no_repeat_ngram, precision, decoder_precision, batch_size, no_meteor, out,
                     overwrite, quiet):
    """Score captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (coco-caption definitions).

    \b
    tfcap evaluate --model RUN_DIR RECORDS --split test
    tfcap evaluate RECORDS --split test           (the bundled model)
    tfcap evaluate --predictions out.csv --references RECORDS_OR_DATA [--split test]
    tfcap evaluate --human-baseline --references RECORDS_OR_DATA --split test
    """
    from tfcap import evaluate, pretrained

    modes = sum(bool(x) for x in (model_path, predictions, human_baseline))
    if modes == 0 and records_dir is not None:  # RECORDS alone: caption its split with the bundled model
        model_path = pretrained.resolve(None)
    elif modes != 1:
        raise TfcapError("give exactly one of --model (with RECORDS), --predictions or --human-baseline")
    if model_path and records_dir is None:
        raise TfcapError("--model needs the RECORDS folder to caption")
    if not predictions:
        split = split or "test"
    out = out or evaluate.default_output(model_path=model_path, predictions=predictions, split=split)
    output = _claim(out, overwrite=overwrite, inputs={"model": model_path, "records folder": records_dir,
                                                      "predictions file": predictions, "references": references})
    if model_path:
        result = evaluate.run_model(model_path, records_dir, split, beam_size=beam_size, length_penalty=length_penalty,
                                    no_repeat_ngram=no_repeat_ngram, precision=precision,
                                    decoder_precision=decoder_precision, batch_size=batch_size,
                                    meteor=not no_meteor, show_progress=not quiet)
    else:
        refs_path = references or records_dir
        if refs_path is None:
            raise TfcapError("give --references (a records folder or a dataset)")
        refs = evaluate.references_from(refs_path, split)
        if human_baseline:
            result = evaluate.human_baseline(refs, split=split, meteor=not no_meteor)
        else:
            hypotheses, failed, repeated = evaluate.predictions_from(predictions)
            result = evaluate.evaluate(refs, hypotheses, split=split, failed=failed, meteor=not no_meteor,
                                       settings={"predictions": str(Path(predictions).resolve()),
                                                 "references": str(Path(refs_path).resolve())}, repeated=repeated)
            if result.repeated_predictions:
                click.echo(f"warning: {result.repeated_predictions} prediction rows repeat another one for the same "
                           "image with the same caption; each image is scored once", err=True)
    click.echo(evaluate.table(result))
    evaluate.write_results(output, result)
    click.echo(f"scores: {out / 'scores.json'}; COCO results: {out / 'captions_coco.json'}", err=True)


@main.command("score")
@click.argument("pairs", type=PathArg)
@click.option("-o", "--out", type=PathArg, required=True,
              help="Output: the pairs with score, confidence, in_domain, typicality and error added (CSV, or JSON "
                   "Lines when it ends in .jsonl; other names keep the input's format).")
@click.option("--images", "images_dir", type=PathArg, help="Folder the image paths are relative to (default: the "
              "pairs file's folder).")
@click.option("--model", "model_path", type=LocationArg, callback=_default_model,
              help="Run directory or SavedModel (default: the bundled model, see tfcap models).")
@_precision_option
@click.option("--batch-size", type=_POSITIVE, default=32, show_default=True, help="Images per batch.")
@click.option("--max-pixels", type=_POSITIVE, default=None, help="Refuse images whose header declares more pixels.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score_command(pairs, out, images_dir, model_path, precision, decoder_precision, batch_size, max_pixels, overwrite,
                  quiet):
    """The confidence of given image-caption pairs: PAIRS is a CSV (or JSON Lines) with an image column
    (path, image, file or filename) and a caption column."""
    from tfcap import export, scoring

    output = _claim(out, overwrite=overwrite, inputs={"pairs file": pairs, "images folder": images_dir,
                                                      "model": model_path})
    scoring.read_pairs(pairs)  # a wrong file fails before the model loads
    predictor = export.load_predictor(model_path, precision=precision, decoder_precision=decoder_precision)
    scoring.score_pairs(predictor, pairs, output, images_dir=images_dir, batch_size=batch_size, max_pixels=max_pixels,
                        overwrite=overwrite, show_progress=not quiet)


@main.command("fit-confidence")
@click.argument("run_dir", metavar="RUN_DIR", type=PathArg)
@click.argument("records_dir", metavar="RECORDS", type=PathArg)
@click.option("--epochs", type=_POSITIVE, default=10, show_default=True, help="Epochs of the image-caption matcher.")
@click.option("--cache-dir", type=PathArg, help="Feature cache (default: RECORDS.cache beside the records).")
@click.option("--overwrite", is_flag=True, help="Replace the run's existing confidence.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def fit_confidence_command(run_dir, records_dir, epochs, cache_dir, overwrite, quiet):
    """Fit the confidence of RUN_DIR's captions on RECORDS' train and val splits (the records it was trained on)."""
    import dataclasses

    from tfcap import confidence, model, outputs

    model.read_run_config(run_dir)
    outputs.refuse_existing(run_dir / confidence.CONFIG, overwrite)
    _claim(run_dir, append=True)  # no train or second fit into it meanwhile
    confidence.fit(run_dir, records_dir, dataclasses.replace(confidence.ConfidenceConfig(), epochs=epochs),
                   cache_dir=cache_dir, show_progress=not quiet)


@main.command("models", cls=click.Command)  # reads the model cards: no TensorFlow
def models_command():
    """The captioners bundled with tfcap: what they were trained on, their scores, their licence."""
    from tfcap import pretrained

    names = pretrained.names()
    if not names:
        raise TfcapError("this tfcap installation has no bundled model")
    for name in names:
        card = pretrained.card(name)
        default = " (default)" if name == pretrained.DEFAULT else ""
        click.echo(f"{name}{default}: {card['summary']}")
        scores = ", ".join(f"{k} {v:.3f}" for k, v in card["test_scores"].items())
        click.echo(f"  {card['test_split']}: {scores}")
        click.echo(f"  licence: {card['licence']}")
        click.echo(f"  path: {pretrained.path(name)}")


@main.command("demo")
@click.option("-o", "--out", type=PathArg, default=Path("tfcap-demo"), show_default=True, help="Folder for everything.")
@click.option("--images", type=click.IntRange(min=20), default=None,
              help="Generated scenes (default 2500; at least 20, so that the held-out split is not empty).")
@click.option("--epochs", type=_POSITIVE, default=None, help="Training epochs (default 10).")
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out, images, epochs, overwrite, quiet):
    """Generate a captioned dataset, build records, train, caption held-out images, evaluate: offline."""
    import dataclasses

    from tfcap import demo

    _claim(out, overwrite=overwrite)  # one demo at a time into OUT
    config = demo.DemoConfig()
    if images is not None:
        config = dataclasses.replace(config, scenes=dataclasses.replace(config.scenes, images=images))
    if epochs is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    demo.run_demo(out, config, overwrite=overwrite, show_progress=not quiet)


if __name__ == "__main__":
    sys.exit(main())
