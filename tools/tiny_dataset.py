"""Write a tiny generated captioned dataset (generic layout) for trying tfcap without real data.

    python tools/tiny_dataset.py OUT_DIR [--images N]

Makes OUT_DIR/images/*.png (solid colour tiles) and OUT_DIR/captions.csv (image,caption).
"""

import argparse
import csv
from pathlib import Path

import numpy as np
import tensorflow as tf

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(args.out / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(args.images):
            name, rgb = list(COLORS.items())[i % len(COLORS)]
            tile = np.clip(np.array(rgb) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            file = f"tile{i:04d}.png"
            tf.io.write_file(str(args.out / "images" / file), tf.io.encode_png(tile))
            for caption in (f"A {name} tile.", f"a plain {name} square", f"{name.title()}, nothing else"):
                writer.writerow([file, caption])
    print(args.out)


if __name__ == "__main__":
    main()
