"""build-records throughput against simply reading the same files, or at two dataset sizes, in one run.

    python tools/bench_build_records.py DATA [--repeats 3] [--cold] [--images DIR]
    python tools/bench_build_records.py --scale [--sizes 12000 120000] [--repeats 3] [--work /tmp/...]

(a) `cat` of every image and the captions file to /dev/null (the floor: reading the bytes);
(b) `tfcap.records.build_records` on the same data, in this process (TensorFlow already imported,
    so start-up is not counted; the CLI adds about 5 s of `import tensorflow`).
Prints each run, the medians of at least 3 runs, images/s and the ratio (b)/(a), and the load
average before and after (the machine may be shared).

Without `--cold` the page cache is warm: one untimed `cat` first, so that run 1 is like the rest.
With `--cold` every file is evicted from the page cache before each timed `cat` and each build
(posix_fadvise(POSIX_FADV_DONTNEED) on each file: no root needed; it drops clean pages that no
process maps, which `fincore FILE` confirms), so both sides read from the disk.

With `--scale`: generated Kaggle-layout datasets of each size (48-px JPEGs, 5 captions each from a
vocabulary of 2,000 words), written once into `--work` (reused by later runs; never in the repo),
each built by `build_records` in a child process of its own, so that its peak RSS (`wait4`'s
ru_maxrss) is its own. Prints each run's peak RSS and images/s, then the medians: peak RSS growth
per image between the sizes and the ratio of images/s, large to small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
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


def generate(work: Path, count: int) -> Path:
    """A Kaggle-layout dataset of `count` images in work/{count}/, images shared in work/images/."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    data = work / str(count)
    if (data / "captions.txt").is_file():
        return data
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    distinct = []
    for _ in range(64):  # 64 distinct files, written round robin: generating is not what is measured
        buffer = io.BytesIO()
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(buffer, "JPEG", quality=80)
        distinct.append(buffer.getvalue())
    have = len(list(images.iterdir()))
    for i in range(have, count):
        (images / f"{i:07d}.jpg").write_bytes(distinct[i % len(distinct)])
    words = [f"w{k}" for k in range(2000)]
    data.mkdir(exist_ok=True)
    (data / "Images").unlink(missing_ok=True)
    (data / "Images").symlink_to(images)
    with open(data / ".captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(count):
            for caption in rng.choice(words, size=(5, 9)):
                writer.writerow([f"{i:07d}.jpg", "A " + " ".join(caption) + "."])
    (data / ".captions.txt").rename(data / "captions.txt")
    return data


_CHILD = """
import sys, time
from pathlib import Path
from tfcap import datasets, records
start = time.perf_counter()
records.build_records(datasets.read_source(Path(sys.argv[1])), Path(sys.argv[2]), show_progress=False)
print(time.perf_counter() - start)
"""


def build_in_child(data: Path, out: Path) -> tuple[float, float]:
    """(seconds building, from reading the captions on; peak RSS in MB) of one build in a child process."""
    shutil.rmtree(out, ignore_errors=True)
    # -P: no current folder on sys.path, so the child imports the tfcap that PYTHONPATH names, as this process does.
    child = subprocess.Popen([sys.executable, "-P", "-c", _CHILD, str(data), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"build of {data} failed (exit {child.returncode})")
    shutil.rmtree(out, ignore_errors=True)
    return float(output.split()[-1]), usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def scale(args: argparse.Namespace) -> None:
    small, large = args.sizes
    print(f"generating (once) into {args.work} ...", flush=True)
    datas = {n: generate(args.work, n) for n in (small, large)}
    print(f"load average {load()}", flush=True)
    results: dict[int, list[tuple[float, float]]] = {small: [], large: []}
    for run in range(args.repeats):
        for n in (small, large):
            seconds, rss = build_in_child(datas[n], args.work / "records")
            results[n].append((n / seconds, rss))
            print(f"run {run + 1}: {n:,} images: {n / seconds:,.0f} images/s ({seconds:.1f} s), peak RSS {rss:,.0f} MB",
                  flush=True)
    rate = {n: statistics.median(r for r, _ in results[n]) for n in results}
    rss = {n: statistics.median(m for _, m in results[n]) for n in results}
    growth = (rss[large] - rss[small]) * 1024 / (large - small)
    print(f"median of {args.repeats}: {small:,} images {rate[small]:,.0f} images/s, peak RSS {rss[small]:,.0f} MB; "
          f"{large:,} images {rate[large]:,.0f} images/s, peak RSS {rss[large]:,.0f} MB; "
          f"peak RSS growth {growth:.2f} KB per image, images/s ratio large/small {rate[large] / rate[small]:.2f}; "
          f"load average {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?")
    parser.add_argument("--scale", action="store_true", help="build generated datasets of two sizes instead")
    parser.add_argument("--sizes", type=int, nargs=2, default=[12_000, 120_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tfcap-bench-scale",
                        help="where --scale writes its generated datasets (kept for later runs)")
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (at least 3)")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3, for a median")
    if args.scale:
        return scale(args)
    if args.data is None:
        parser.error("give DATA, or --scale")

    from tfcap import datasets, records

    source = datasets.read_source(args.data, images_dir=args.images)
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
