"""`tfcap demo` at smaller sizes over several seeds: held-out BLEU-4 against the constant caption, and CPU time.

    python tools/demo_sizes.py --images 800 --epochs 6 --seeds 0 1 2 3 4

Each run is `demo.run_demo` with DemoConfig's scene seed and training seed set to SEED (the demo's
own are 0), in this process; CPU seconds are this process's user + system time during the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    from tfcap import demo  # TensorFlow imported before the clocks start

    base = demo.DemoConfig()
    for seed in args.seeds:
        config = dataclasses.replace(
            base, scenes=dataclasses.replace(base.scenes, images=args.images, seed=seed),
            train=dataclasses.replace(base.train, epochs=args.epochs, seed=seed))
        with tempfile.TemporaryDirectory() as tmp:
            cpu, wall = cpu_seconds(), time.monotonic()
            result = demo.run_demo(Path(tmp) / "demo", config, show_progress=False)
            cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
        bleu4, constant = result["scores"]["BLEU-4"], result["constant_scores"]["BLEU-4"]
        print(f"images {args.images} epochs {args.epochs} seed {seed}: held-out {result['images_scored']}, "
              f"BLEU-4 {bleu4:.3f}, constant {constant:.3f}, ratio {bleu4 / max(constant, 1e-9):.1f}, "
              f"CPU {cpu:.0f} s, wall {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
