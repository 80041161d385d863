"""caption-dir as one Apache Beam pipeline (`tfcap caption-dir IMAGES -o OUT --engine beam`).

    MatchFiles(IMAGES/** or IMAGES/*) -> image names only -> Reshuffle -> ReadMatches -> read bytes
      -> RunInference(KeyedModelHandler(ImageCaptionHandler)) -> rows -> WriteToText(OUT/part-SSSSS-of-NNNNN.csv)

Files are listed and read through Beam's file systems, so IMAGES and OUT may be gs://, s3:// or
hdfs:// wherever Beam has that file system installed. The candidates are those of the local engine
(`caption.is_image_name`: the image extensions in any case, hidden files included, subfolders unless
--no-recursive), with two differences that come from Beam's local file system and exist only on a
local disk: it does not follow symlinked folders, and it lists no dangling symlink (the local engine
gives one a "missing" row).

A file that cannot be read, decoded or is too large becomes an error row with the local engine's
text (`images.open_error`, `caption.diagnose_bytes`): nothing raises inside a bundle for a bad
file, so a bad file never fails or retries a bundle.

Nothing is lost or doubled when a runner retries a bundle: rows reach OUT only through WriteToText,
which writes each bundle to a temporary file and, once the whole pipeline is done, renames each
finished shard into place once (a retried bundle's first attempt is a temporary file nobody
renames). No DoFn appends to an output. A local OUT is claimed for the whole run (`outputs.Output`:
locked, so a second caption-dir into it is refused) and the shards are written into a scratch folder
of this process beside it, which becomes OUT only when the pipeline succeeded, so an existing OUT is
replaced (with --overwrite) only by a complete one.

The pipeline runs quietly (`_quiet`): the runner's logs, its workers' start-up chatter and
tracebacks go nowhere unless `BeamConfig.verbose`; what failed is one line. Ctrl-C while it runs is
an `Interrupted` (exit 130), however the runner relays the KeyboardInterrupt, and the worker
processes it started are ended with it.

The model: an exported SavedModel (`tfcap export`), which each worker loads once per process
(`ImageCaptionHandler.load_model`). A run directory, or the bundled model, is exported on the fly
to a temporary folder when the runner is local (DirectRunner); a remote runner's workers cannot
read this machine's folders, so there it is refused with the `tfcap export` command to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tfcap import caption, export, images, names, pretrained, rows
from tfcap.errors import Interrupted, TfcapError
from tfcap.outputs import Output
from tfcap.progress import Stopwatch, summary

METRICS = "tfcap"  # the namespace of this pipeline's metrics, RunInference's own included
FAILED = "failed"  # the tag of the read step's error rows
# Runners whose workers run on this machine and see its folders (a temporary SavedModel, a local OUT).
LOCAL_RUNNERS = ("direct", "bundlebaseddirect", "switchingdirect")


def is_local_runner(runner: str) -> bool:
    """Whether `runner` (as --runner takes it: DirectRunner, direct, ...) runs its workers on this machine."""
    name = runner.rsplit(".", 1)[-1].lower()
    return name.removesuffix("runner") in LOCAL_RUNNERS


class ImageCaptionHandler(ModelHandler):
    """RunInference's view of a tfcap SavedModel: image bytes in, a row's values out.

    Examples are the bytes of one image file each (`bytes`); a batch of them is captioned by one
    `caption.BytesCaptioner` call (decode, check, preprocess, encode and beam search as tf graphs).
    Each inference is the row but its path ({column: value}, `tfcap.rows`: caption, score, labels,
    ..., error): an image that does not decode is an error, not an exception, so a batch never fails
    for a bad file. labels: ImageNet labels per row, at most the SavedModel's (None: all it has).

    The handler itself holds only the model's location and settings, so it pickles to workers of
    any runner; the model is loaded by each worker (`load_model`, once per process: RunInference
    shares it between threads).
    """

    def __init__(self, model: str, *, max_pixels: int = images.DEFAULT_MAX_PIXELS, batch_size: int = 32,
                 labels: int | None = None, min_confidence: float | None = None):
        # Fixed batches (min = max) like the local engine's; a bundle's last batch is smaller.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.model, self.max_pixels, self.labels, self.min_confidence = str(model), max_pixels, labels, min_confidence

    def load_model(self) -> caption.BytesCaptioner:
        return caption.BytesCaptioner(export.load_predictor(self.model, labels=self.labels), self.max_pixels,
                                      self.min_confidence)

    def run_inference(self, batch: Sequence[bytes], model: caption.BytesCaptioner,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        results = model(list(batch))
        # For the benchmark's breakdown: when the last batch was done (its max) tells when writing began.
        beam.metrics.Metrics.distribution(METRICS, "inference_end_epoch_ms").update(int(time.time() * 1000))
        return [PredictionResult(example, result) for example, result in zip(batch, results)]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(example) for example in batch)  # the default pickles the whole batch to measure it

    def get_metrics_namespace(self) -> str:
        return METRICS


def _relative(path: str, root: str) -> str:
    """A matched file's path as the local engine writes it: relative to the images folder, with '/', a
    name that is not UTF-8 spelled as `names.to_text` does (Beam's coders take no surrogate escapes)."""
    return names.to_text(path[len(root) + 1:] if path.startswith(root + "/") else path)


class _ReadBytes(beam.DoFn):
    """ReadableFile -> (relative path, bytes), or a row with the reason it cannot be read (tag FAILED)."""

    def __init__(self, root: str):
        self.root = root

    def process(self, readable: fileio.ReadableFile):
        path = _relative(readable.metadata.path, self.root)
        clock = Stopwatch()
        beam.metrics.Metrics.distribution(METRICS, "read_start_epoch_ms").update(int(time.time() * 1000))
        try:
            data = readable.read()
        except OSError as e:  # deleted since the match, permissions, a folder: the local engine's words
            yield beam.pvalue.TaggedOutput(FAILED, {"path": path, **rows.failed(images.open_error(e))})
            return
        beam.metrics.Metrics.distribution(METRICS, "read_micros").update(int(clock.seconds * 1e6))
        yield path, data


def _captioned_row(keyed: tuple[str, PredictionResult]) -> dict:
    path, result = keyed
    return {"path": path, **result.inference}


def _line(row: dict, fmt: str) -> str:
    """One row as caption-dir writes it (CSV or JSON Lines), without its newline: WriteToText adds it."""
    return rows.format_rows([row], fmt)[:-1]


def _is_candidate(metadata) -> bool:
    return caption.is_image_name(metadata.path.rsplit("/", 1)[-1])


def add_caption_dir(pipeline: beam.Pipeline, images_dir: str, prefix: str, model: str,
                    config: caption.CaptionConfig, fmt: str, labels: int | None = None) -> None:
    """Add caption-dir's transforms to `pipeline`: every image under `images_dir` (a local folder or
    a URL) captioned with the SavedModel at `model`, rows written as `prefix`-SSSSS-of-NNNNN.csv
    (or .jsonl), each CSV shard with the header `rows.COLUMNS` (path,caption,score,confidence,in_domain,typicality,labels,error).
    labels: per row, at most the SavedModel's (None: all it has)."""
    root = images_dir.rstrip("/")
    read = (pipeline
            | "Match" >> fileio.MatchFiles(f"{root}/**" if config.recursive else f"{root}/*",
                                           empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "ImagesOnly" >> beam.Filter(_is_candidate)
            # Listing happens in one place; the reshuffle spreads the files over the workers.
            | "Spread" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches(compression=CompressionTypes.UNCOMPRESSED)
            | "Read" >> beam.ParDo(_ReadBytes(root)).with_outputs(FAILED, main="images"))
    handler = KeyedModelHandler(ImageCaptionHandler(model, max_pixels=config.max_pixels,
                                                    batch_size=config.batch_size, labels=labels,
                                                    min_confidence=config.min_confidence))
    captioned = read.images | "Caption" >> RunInference(handler) | "Rows" >> beam.Map(_captioned_row)
    (((captioned, read[FAILED]) | "AllRows" >> beam.Flatten())
     | "Format" >> beam.Map(_line, fmt)
     | "Write" >> beam.io.WriteToText(prefix, file_name_suffix=f".{fmt}", shard_name_template="-SSSSS-of-NNNNN",
                                      header=",".join(rows.COLUMNS) if fmt == "csv" else None))


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Where the pipeline runs: a runner name and Beam pipeline options (as on Beam's command line)."""

    runner: str | None = None  # None: the one in `pipeline_args`, else DirectRunner
    pipeline_args: tuple[str, ...] = ()
    verbose: bool = False  # show the runner's and its workers' logs (quiet by default: `_quiet`)

    def options(self) -> PipelineOptions:
        args = list(self.pipeline_args)
        if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
            # Workers log every bundle at INFO; failures reach the launcher as exceptions anyway.
            args.append("--default_sdk_harness_log_level=ERROR")
        options = PipelineOptions(args)
        given = options.view_as(StandardOptions).runner
        if self.runner and given and given != self.runner:
            raise TfcapError(f"--runner {self.runner} contradicts the pipeline option --runner {given}")
        options.view_as(StandardOptions).runner = self.runner or given or "DirectRunner"
        return options


def _model_hint(model: Path) -> str:
    source = "" if pretrained.is_bundled(model) else f" {model}"
    return f"run 'tfcap export{source} -o gs://.../model' and pass --model gs://.../model"


def _is_run_directory(model) -> bool:
    """Whether --model is a run directory (to export first) rather than a SavedModel; neither: the usual error."""
    if export.is_url(model) or (Path(model) / "saved_model.pb").is_file():
        return False
    if not (Path(model) / "config.json").is_file():
        export.load_predictor(model)  # raises "neither a tfcap run directory nor a SavedModel"
    return True


def _prepare_model(model, options: dict, scratch: Path) -> tuple[str, float]:
    """The SavedModel location the workers load, and the seconds spent exporting it (0 if none).

    options: `export.load_predictor`'s keyword arguments (beam_size, length_penalty, no_repeat_ngram,
    labels, precision, decoder_precision), None where not given. A run directory is exported into
    `scratch` with the decoding, labels and precisions the local engine would use; a SavedModel given
    with any of them is loaded here once, so a mismatch is one line now and not an exception in every
    worker later.
    """
    if not _is_run_directory(model):
        if any(value is not None for value in options.values()):
            export.load_predictor(model, **options)
        return str(model), 0.0
    clock = Stopwatch()
    decoding = export.run_decoding(model, options["beam_size"], options["length_penalty"],
                                   options["no_repeat_ngram"])  # as the local engine
    location = export.export(model, scratch / "model", **dataclasses.asdict(decoding), labels=options["labels"],
                             precision=options["precision"], decoder_precision=options["decoder_precision"])
    return str(location), clock.seconds


def _check_file_system(location) -> None:
    """A URL whose scheme no installed Beam file system serves (gs:// without apache-beam[gcp]) is one
    line, before anything runs: Beam's own message names the extra to install."""
    if export.is_url(location):
        try:
            FileSystems.get_filesystem(str(location))
        except ValueError as e:
            raise TfcapError(f"{location}: {str(e).split(' Path specified')[0]}") from None


def _check_images(images_dir) -> None:
    if any(c in str(images_dir) for c in "*?["):
        raise TfcapError(f"{images_dir}: Beam reads *, ? and [ in a folder's name as a pattern; "
                         "rename the folder or link it under another name")
    if not export.is_url(images_dir) and not Path(images_dir).is_dir():
        raise TfcapError(f"{images_dir} is not a directory")


def _prepare_remote_out(out: str, overwrite: bool) -> None:
    """A URL OUT: refused if anything is there, unless --overwrite, which deletes its old parts first
    (WriteToText replaces only the parts of the same count; fewer new ones would leave old ones)."""
    existing = [m.path for r in FileSystems.match([f"{out.rstrip('/')}/*"]) for m in r.metadata_list]
    if existing and not overwrite:
        raise TfcapError(f"{out} already exists; pass --overwrite to replace it")
    old = [p for p in existing if p.rsplit("/", 1)[-1].startswith("part-")]
    if old:
        FileSystems.delete(old)


def _count_rows(out: str, fmt: str) -> tuple[int, int, int]:
    """(ok, failed, parts) of the shards written under `out`, read back from them."""
    paths = sorted(m.path for r in FileSystems.match([f"{out.rstrip('/')}/part-*.{fmt}"]) for m in r.metadata_list)
    ok = failed = 0
    for path in paths:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            found = caption.parse_rows(f.read().decode("utf-8"), fmt)
        failed += sum(1 for r in found if rows.is_failure(r))
        ok += sum(1 for r in found if not rows.is_failure(r))
    return ok, failed, len(paths)


def _distributions(result) -> dict[str, Any]:
    """This pipeline's distribution metrics by name (DistributionResult: sum, count, min, max, mean), where
    the runner reports them (committed values where it has them, else attempted)."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS))["distributions"]
    except Exception:  # noqa: BLE001 - a runner without metrics support: the breakdown is optional
        return {}
    values = {}
    for metric in found:
        value = metric.committed if metric.committed is not None else metric.attempted
        if value is not None and value.count:
            values[metric.key.metric.name] = value
    return values


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid` and by those, from /proc (Linux; elsewhere none are known)."""
    found = []
    for children in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(children) as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in _descendants(child)]


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """The block's stderr output goes nowhere, unless `verbose`: the runner's logging, tracebacks Beam
    logs before it raises, worker processes (they inherit file descriptor 2 when started) and the
    exceptions of the runner's threads. What failed is raised, for one line."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved, disabled, excepthook = os.dup(2), logging.root.manager.disable, threading.excepthook
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda args: None
        yield
    finally:
        threading.excepthook = excepthook
        logging.disable(disabled)
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _ended_with_the_pipeline(interrupted: threading.Event) -> Iterator[None]:
    """Ctrl-C sets `interrupted` (and raises KeyboardInterrupt as usual) for the block: a runner may
    relay it as another exception. Ctrl-C, or a failure of the block, ends the worker processes
    started in it (DirectRunner waits 10 s and more for them, and its threads keep the process alive
    while they run) and gives the threads started in it a few seconds to end, so that the process
    ends within seconds."""
    children, threads = set(_descendants(os.getpid())), set(threading.enumerate())

    def end_workers():
        for pid in set(_descendants(os.getpid())) - children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            interrupted.set()
            end_workers()  # at once: the runner waits for its workers before it lets the interrupt through
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except BaseException:
        end_workers()
        deadline = time.monotonic() + 10
        for thread in set(threading.enumerate()) - threads:
            if not thread.daemon:
                thread.join(max(deadline - time.monotonic(), 0))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def caption_directory(images_dir, out, model, config: caption.CaptionConfig = caption.CaptionConfig(),
                      beam_config: BeamConfig = BeamConfig(), *, fmt: str | None = None, overwrite: bool = False,
                      beam_size: int | None = None, length_penalty: float | None = None,
                      no_repeat_ngram: int | None = None, labels: int | None = None,
                      precision: str | None = None, decoder_precision: str | None = None) -> dict:
    """Caption every image under `images_dir` into the shards `out`/part-SSSSS-of-NNNNN.csv with one
    Beam pipeline; return counts and timing.

    `images_dir`, `out`: local folders (Path or str) or URLs (str, e.g. gs://bucket/photos).
    `model`: a run directory or SavedModel (local or URL). Decoding options and labels as for
    `export.load_predictor`. `fmt` (csv, jsonl) defaults to the suffix of `out` (`caption.output_format`).

    Returns {"images", "ok", "failed", "parts", "seconds", "export_seconds", "run_seconds",
    "metrics"}: `metrics` holds the runner's distributions of this pipeline (milliseconds, microseconds
    or epoch milliseconds, as their names say), `run_seconds` the pipeline from its start to its end,
    `started_epoch_ms`/`ended_epoch_ms` its bounds, for a breakdown of where the time went.
    """
    clock = Stopwatch()
    fmt = caption.output_format(Path(str(out)), fmt)
    options = beam_config.options()
    runner = options.view_as(StandardOptions).runner
    _check_images(images_dir)
    if not is_local_runner(runner) and _is_run_directory(model):  # before anything remote is contacted
        raise TfcapError(f"{runner} workers cannot read the run directory {model} on this machine: "
                         + _model_hint(Path(model)))
    for location in (images_dir, out):
        _check_file_system(location)
    remote_out = export.is_url(out)
    if remote_out:
        _prepare_remote_out(str(out), overwrite)
    scratch = Path(tempfile.mkdtemp(prefix="tfcap-beam-"))
    result = output = None
    try:
        if not remote_out:  # claimed for the whole run (a bucket has no lock: the runner's sink writes it)
            output = Output(Path(out), overwrite=overwrite, inputs={
                "images folder": None if export.is_url(images_dir) else Path(images_dir),
                "model": None if export.is_url(model) else Path(model)})
        location, export_seconds = _prepare_model(model, {"beam_size": beam_size, "length_penalty": length_penalty,
                                                          "no_repeat_ngram": no_repeat_ngram, "labels": labels,
                                                          "precision": precision,
                                                          "decoder_precision": decoder_precision}, scratch)
        local_root = str(images_dir) if export.is_url(images_dir) else str(Path(images_dir).resolve())

        def run(target: str) -> None:
            nonlocal result
            timings["started_epoch_ms"] = time.time() * 1000
            interrupted = threading.Event()
            try:
                with _quiet(beam_config.verbose), _ended_with_the_pipeline(interrupted):
                    pipeline = beam.Pipeline(options=options)  # an unknown or uninstalled runner fails here
                    add_caption_dir(pipeline, local_root, f"{target.rstrip('/')}/part", location, config, fmt, labels)
                    result = pipeline.run()
                    result.wait_until_finish()
            except (TfcapError, KeyboardInterrupt):
                raise
            except Exception as e:  # a worker's traceback, relayed by the runner: its last line says what
                if interrupted.is_set():  # Ctrl-C, relayed by the runner as its own exception
                    raise KeyboardInterrupt from None
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                raise TfcapError(f"the Beam pipeline failed on {runner}: {lines[-1] if lines else type(e).__name__}"
                                 + ("" if beam_config.verbose else " (--verbose shows its logs)")) from e
            timings["ended_epoch_ms"] = time.time() * 1000
            state = str(result.state)
            if "DONE" not in state:
                raise TfcapError(f"the Beam pipeline ended {state} on {runner}")

        timings: dict[str, float] = {}
        if remote_out:
            run(str(out))
        else:
            with output.directory() as folder:
                run(str(folder))
    except KeyboardInterrupt:
        left = ""
        if result is not None and not is_local_runner(runner):
            try:
                result.cancel()
            except Exception:  # noqa: BLE001 - say so instead
                left = f"; the job may still run on {runner}: cancel it there"
        raise Interrupted(f"interrupted: nothing written to {out} (a Beam pipeline writes its parts when it "
                          f"finishes){left}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if output is not None:
            output.release()
    ok, failed, parts = _count_rows(str(out), fmt)
    seconds = clock.seconds
    if ok + failed == 0:
        summary(f"caption-dir: 0 images to caption in {images_dir} -> {out} ({parts} part"
                f"{'s' if parts != 1 else ''}{', header only' if fmt == 'csv' else ', empty'})")
    else:
        summary(f"caption-dir: {ok + failed} images ({ok} ok, {failed} failed) in {seconds:.1f} s, "
                f"{(ok + failed) / max(seconds, 1e-9):.1f} images/s on {runner} -> {out} ({parts} part{'s' if parts != 1 else ''})")
    return {"images": ok + failed, "ok": ok, "failed": failed, "parts": parts, "seconds": seconds,
            "export_seconds": export_seconds,
            "run_seconds": (timings["ended_epoch_ms"] - timings["started_epoch_ms"]) / 1000, **timings,
            "metrics": _distributions(result)}
