"""caption-dir on Apache Beam (DirectRunner, worker processes) against the local engine, in one run.

    python tools/bench_beam.py [IMAGES] [--model RUN_OR_SAVEDMODEL] [--workers 2] [--batch-size 32] [--repeats 3]

On the same IMAGES (default /work/runs/test_images) and model (default: the bundled one, as
`caption-dir` with no --model), each repeat runs, in this process (TensorFlow imported once before):
  local: `export.load_predictor` + `caption.caption_directory` (what `tfcap caption-dir IMAGES -o out.csv` does);
  beam:  `tfcap.engines.beam.caption_directory` with `--direct_running_mode=multi_processing
         --direct_num_workers=N` (what `--engine beam -- ...` does): a run directory exported to a
         temporary SavedModel, the pipeline, the rows read back.
Both end to end, model loading included: images/s = rows / wall seconds. Prints each repeat, the
medians and their ratio beam / local, and where beam's time went, from the pipeline's own metrics
(RunInference's model load and batch latencies, and the epoch times this pipeline records when
each file is read and each batch is done), not from guesses:
  export          the run directory to a SavedModel (0 for a SavedModel)
  to first read   pipeline construction and submission, worker processes starting (Python, Beam,
                  TensorFlow imports), the listing and reshuffle, and the model loads, until the first
                  file is read on any worker
  model load      per worker (RunInference's load_model latency; inside "to first read")
  reading files   summed over workers (bytes through Beam's file system)
  inference       summed over workers and per worker (decode, check, preprocess, encoder, beam search)
  after last batch   writing the shards' temporary files, finalizing (renames), worker shutdown
  rows read back  counting the rows in the parts for the summary
The local engine's model load and captioning split is printed for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def local_run(images: Path, model, config, work: Path) -> dict:
    from tfcap import caption, export

    start = time.perf_counter()
    predictor = export.load_predictor(model)
    loaded = time.perf_counter()
    result = caption.caption_directory(predictor, images, work / "local.csv", config, show_progress=False)
    end = time.perf_counter()
    return {"images": result["images"], "seconds": end - start, "load": loaded - start, "caption": end - loaded,
            "rows": caption.read_rows(work / "local.csv")}


def beam_run(images: Path, model, config, work: Path, workers: int) -> dict:
    from tfcap import caption
    from tfcap.engines import beam_engine

    engine = beam_engine()
    start_epoch, start = time.time() * 1000, time.perf_counter()
    result = engine.caption_directory(images, work / "beam", model, config, engine.BeamConfig(None, (
        "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}")))
    end_epoch, seconds = time.time() * 1000, time.perf_counter() - start
    metrics = result["metrics"]
    inference = metrics["inference_batch_latency_micro_secs"]
    loads = metrics["load_model_latency_milli_secs"]
    breakdown = {
        "export": result["export_seconds"],
        "to first read": (metrics["read_start_epoch_ms"].min - result["started_epoch_ms"]) / 1000,
        "model load (per worker)": loads.mean / 1000,
        "reading files (sum)": metrics["read_micros"].sum / 1e6,
        "inference (sum)": inference.sum / 1e6,
        "inference (per worker)": inference.sum / 1e6 / workers,
        "after last batch": (result["ended_epoch_ms"] - metrics["inference_end_epoch_ms"].max) / 1000,
        "rows read back": (end_epoch - result["ended_epoch_ms"]) / 1000,
        "before the pipeline": (result["started_epoch_ms"] - start_epoch) / 1000 - result["export_seconds"],
    }
    rows = [row for part in sorted((work / "beam").iterdir()) for row in caption.read_rows(part)]
    return {"images": result["images"], "seconds": seconds, "breakdown": breakdown, "loads": loads.count,
            "batches": inference.count, "parts": result["parts"], "rows": rows}


def same_rows(beam_rows: list[dict], local_rows: list[dict]) -> str:
    """'same rows' or what differs: paths, captions, errors, scores to 1e-4."""
    by_path = {r["path"]: r for r in beam_rows}
    if sorted(by_path) != sorted(r["path"] for r in local_rows) or len(by_path) != len(beam_rows):
        return f"DIFFERENT paths ({len(beam_rows)} beam rows, {len(local_rows)} local)"
    differ = [r["path"] for r in local_rows
              if (by_path[r["path"]]["caption"], by_path[r["path"]]["error"]) != (r["caption"], r["error"])
              or (r["score"] and abs(float(by_path[r["path"]]["score"]) - float(r["score"])) > 1e-4)]
    return "same rows" if not differ else f"{len(differ)} rows DIFFER, e.g. {differ[:3]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_dir", metavar="IMAGES", nargs="?", default="/work/runs/test_images")
    parser.add_argument("--model", help="run directory or SavedModel (default: the bundled model)")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the workers inherit it
    from tfcap import caption, pretrained

    model = pretrained.resolve(Path(args.model) if args.model else None)
    images = Path(args.images_dir)
    config = caption.CaptionConfig(batch_size=args.batch_size)
    print(f"{len(caption.find_images(images))} images in {images}, model {model}, batch {args.batch_size}, "
          f"beam on DirectRunner with {args.workers} worker processes, {os.cpu_count()} cores", flush=True)
    local_rates, beam_rates, breakdowns = [], [], []
    for repeat in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix="tfcap-bench-beam-"))
        try:
            local = local_run(images, model, config, work)
            beam = beam_run(images, model, config, work, args.workers)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        local_rates.append(local["images"] / local["seconds"])
        beam_rates.append(beam["images"] / beam["seconds"])
        breakdowns.append(beam["breakdown"])
        print(f"run {repeat + 1}: local {local_rates[-1]:.2f} images/s ({local['seconds']:.1f} s: model load "
              f"{local['load']:.1f} s, captioning {local['caption']:.1f} s), beam {beam_rates[-1]:.2f} images/s "
              f"({beam['seconds']:.1f} s, {beam['loads']} model loads, {beam['batches']} batches, "
              f"{beam['parts']} parts); {same_rows(beam['rows'], local['rows'])}", flush=True)
    local_median, beam_median = statistics.median(local_rates), statistics.median(beam_rates)
    print(f"median of {args.repeats}: local {local_median:.2f} images/s, beam {beam_median:.2f} images/s, "
          f"beam / local = {beam_median / local_median:.2f}")
    print("where beam's time went (median of the repeats, seconds):")
    for name in breakdowns[0]:
        print(f"  {name:<24} {statistics.median(b[name] for b in breakdowns):7.1f}")


if __name__ == "__main__":
    sys.exit(main())
