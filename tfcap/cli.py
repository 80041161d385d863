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
@click.option("--layout", type=click.Choice(["auto", "kaggle", "original", "generic"]), default="auto",
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
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_records_command(data, out, layout, captions_file, images_dir, min_count, max_length, val_fraction,
                          test_fraction, seed, shards, shard_mb, compression, skip_bad_lines, overwrite, quiet):
    """Images and captions in DATA into sharded TFRecords in OUT.

    DATA is a Kaggle Flickr8k folder (captions.txt, Images/), an original Flickr8k folder
    (Flickr8k.token.txt and split files), or omitted with --captions FILE.csv --images DIR.
    """
    from tfcap import layouts, records, text

    source = layouts.read_source(data, captions_file=captions_file, images_dir=images_dir, layout=layout,
                                 skip_bad_lines=skip_bad_lines)
    config = records.RecordsConfig(
        text=text.TextConfig(max_length=max_length),
        split=layouts.SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed),
        min_count=min_count, shards=shards, shard_mb=shard_mb,
        compression=None if compression == "none" else compression)
    records.build_records(source, out, config, overwrite=overwrite, show_progress=not quiet)


if __name__ == "__main__":
    sys.exit(main())
