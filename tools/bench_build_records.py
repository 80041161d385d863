"""build-records throughput against simply reading the same files, in one run.

    python tools/bench_build_records.py DATA [--repeats 3] [build-records options as for the CLI's layout]

(a) `cat` of every image and the captions file to /dev/null (the floor: reading the bytes);
(b) `tfcap.records.build_records` on the same data, in this process (TensorFlow already imported,
    so start-up is not counted; the CLI adds about 5 s of `import tensorflow`).
Prints each run, the medians, images/s and the ratio (b)/(a). Run it twice to see a warm page cache.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tfcap import layouts, records

    source = layouts.read_source(args.data, images_dir=args.images)
    files = [str(source.path(i)) for i in source.captions if source.path(i).exists()] + [str(source.captions_file)]
    cats, builds = [], []
    for run in range(args.repeats):
        start = time.perf_counter()
        for k in range(0, len(files), 1000):  # xargs-style batches keep the command line short
            subprocess.run(["cat", *files[k:k + 1000]], stdout=subprocess.DEVNULL, check=True)
        cats.append(time.perf_counter() - start)
        out = Path(tempfile.mkdtemp(prefix="tfcap-bench-")) / "records"
        start = time.perf_counter()
        records.build_records(source, out, show_progress=False)
        builds.append(time.perf_counter() - start)
        shutil.rmtree(out.parent)
        print(f"run {run + 1}: cat {cats[-1]:.2f} s, build-records {builds[-1]:.2f} s", flush=True)
    cat, build = statistics.median(cats), statistics.median(builds)
    n = len(source.captions)
    print(f"median of {args.repeats}: cat {cat:.2f} s ({n / cat:,.0f} images/s), build-records {build:.2f} s "
          f"({n / build:,.0f} images/s), ratio {build / cat:.1f}x the time of reading the files")


if __name__ == "__main__":
    main()
