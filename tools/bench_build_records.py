"""build-records throughput against simply reading the same files, in one run.

    python tools/bench_build_records.py DATA [--repeats 3] [--cold] [--images DIR]

(a) `cat` of every image and the captions file to /dev/null (the floor: reading the bytes);
(b) `tfcap.records.build_records` on the same data, in this process (TensorFlow already imported,
    so start-up is not counted; the CLI adds about 5 s of `import tensorflow`).
Prints each run, the medians of at least 3 runs, images/s and the ratio (b)/(a), and the load
average before and after (the machine may be shared).

Without `--cold` the page cache is warm: one untimed `cat` first, so that run 1 is like the rest.
With `--cold` every file is evicted from the page cache before each timed `cat` and each build
(posix_fadvise(POSIX_FADV_DONTNEED) on each file: no root needed; it drops clean pages that no
process maps, which `fincore FILE` confirms), so both sides read from the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def cat(files: list[str]) -> float:
    start = time.perf_counter()
    for k in range(0, len(files), 1000):  # xargs-style batches keep the command line short
        subprocess.run(["cat", *files[k:k + 1000]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (at least 3)")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3, for a median")

    from tfcap import layouts, records

    source = layouts.read_source(args.data, images_dir=args.images)
    files = [source.path(i) for i in source.captions if os.path.exists(source.path(i))] + [str(source.captions_file)]
    cache = "cold" if args.cold else "warm"
    print(f"{len(files):,} files, {sum(os.path.getsize(f) for f in files) / 1e6:.0f} MB, {cache} cache; "
          f"load average {load()}", flush=True)
    if not args.cold:
        cat(files)
    cats, builds = [], []
    for run in range(args.repeats):
        if args.cold:
            evict(files)
        cats.append(cat(files))
        if args.cold:
            evict(files)
        out = Path(tempfile.mkdtemp(prefix="tfcap-bench-")) / "records"
        start = time.perf_counter()
        records.build_records(source, out, show_progress=False)
        builds.append(time.perf_counter() - start)
        shutil.rmtree(out.parent)
        print(f"run {run + 1}: cat {cats[-1]:.2f} s, build-records {builds[-1]:.2f} s "
              f"({builds[-1] / cats[-1]:.1f}x)", flush=True)
    median_cat, median_build = statistics.median(cats), statistics.median(builds)
    n = len(source.captions)
    print(f"median of {args.repeats}, {cache} cache: cat {median_cat:.2f} s ({n / median_cat:,.0f} images/s), "
          f"build-records {median_build:.2f} s ({n / median_build:,.0f} images/s), "
          f"ratio {median_build / median_cat:.1f}x the time of reading the files; load average {load()}")


if __name__ == "__main__":
    main()
