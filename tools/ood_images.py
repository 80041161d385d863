"""An out-of-domain image set for the bundled Flickr8k captioner: what its training photos never show.

Flickr8k is people and dogs doing things outdoors. This writes images of everything else, by kind:

| kind        | how it is made                                                                          |
|-------------|-----------------------------------------------------------------------------------------|
| photos      | real photos that packages ship: scikit-image's data (a cat, a coffee cup, coins, a      |
|             | rocket, the moon, a parked motorcycle, a clock, microscopy, a retina, the Hubble deep   |
|             | field), scikit-learn's sample images (a temple, a flower), matplotlib's (a gift box);   |
|             | photos of people (scikit-image's astronaut and cameraman, matplotlib's Grace Hopper)    |
|             | are left out: people are what Flickr8k describes                                        |
| documents   | pages of prose in a few fonts, sizes and layouts                                        |
| charts      | line, bar, pie, scatter and histogram plots of random data (matplotlib)                 |
| spreadsheets| grids of numbers with a header row and row labels                                       |
| screens     | application windows: title bar, menu, sidebar, buttons, text fields                     |
| code        | pages of tfcap's own Python source in a monospace font                                  |
| textures    | crops of scikit-image's brick, grass and gravel, and procedural noise, stripes, checks  |

Everything but the photos is generated from a seed, so the set is the same on every machine.
Needs Pillow, matplotlib, scikit-image and scikit-learn (`pip install pillow matplotlib
scikit-image scikit-learn`): tools only, not tfcap's dependencies.

    python tools/ood_images.py OUT_DIR [--per-kind 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np

KINDS = ("photos", "documents", "charts", "spreadsheets", "screens", "code", "textures")
SIZE = 512  # generated images are SIZE x SIZE (caption-dir resizes them to the encoder's input)

# Real photos of things, not people: (package, file name) as the packages ship them.
PHOTOS = [("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("skimage", "coins.png"),
          ("skimage", "rocket.jpg"), ("skimage", "moon.png"), ("skimage", "motorcycle_left.png"),
          ("skimage", "clock_motion.png"), ("skimage", "ihc.png"), ("skimage", "retina.jpg"),
          ("skimage", "hubble_deep_field.jpg"), ("skimage", "cell.png"), ("skimage", "microaneurysms.png"),
          ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("matplotlib", "Minduka_Present_Blue_Pack.png")]

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "report quarterly revenue analysis section figure table results method data model system value "
         "performance customer account payment invoice total summary policy agreement shall party notice "
         "chapter introduction conclusion appendix reference version update install configure server").split()


def _package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage
        return Path(skimage.__file__).parent / "data" / name
    if package == "sklearn":
        import sklearn.datasets
        return Path(sklearn.datasets.__file__).parent / "images" / name
    import matplotlib
    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _font(size: int, kind: str = "DejaVuSans"):
    import matplotlib
    from PIL import ImageFont
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{kind}.ttf"), size)


def _canvas(rng, light=True):
    from PIL import Image
    shade = int(rng.integers(235, 256)) if light else int(rng.integers(20, 60))
    return Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))


def _document(rng):
    from PIL import ImageDraw
    image = _canvas(rng)
    draw = ImageDraw.Draw(image)
    font = _font(int(rng.integers(11, 20)), str(rng.choice(["DejaVuSans", "DejaVuSerif"])))
    margin, y = int(rng.integers(20, 60)), int(rng.integers(20, 50))
    draw.text((margin, y), " ".join(rng.choice(WORDS, 4)).title(), fill=(0, 0, 0),
              font=_font(int(rng.integers(18, 28)), "DejaVuSans-Bold"))
    y += 45
    while y < SIZE - 30:
        words = " ".join(rng.choice(WORDS, int(rng.integers(6, 12))))
        draw.text((margin, y), words, fill=(20, 20, 20), font=font)
        y += font.size + int(rng.integers(3, 9)) + (12 if rng.random() < 0.12 else 0)
    return image


def _chart(rng):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    figure, axes = plt.subplots(figsize=(5.12, 5.12), dpi=100)
    kind = ("line", "bar", "pie", "scatter", "hist")[int(rng.integers(5))]
    if kind == "line":
        for _ in range(int(rng.integers(1, 4))):
            axes.plot(np.cumsum(rng.normal(size=50)))
    elif kind == "bar":
        bars = int(rng.integers(3, 9))
        axes.bar([f"Q{i + 1}" for i in range(bars)], rng.uniform(1, 10) * rng.random(bars))
    elif kind == "pie":
        axes.pie(rng.random(int(rng.integers(3, 7))))
    elif kind == "scatter":
        axes.scatter(rng.normal(size=200), rng.normal(size=200), s=8, c=rng.random(200))
    else:
        axes.hist(rng.normal(size=500), bins=int(rng.integers(10, 40)))
    axes.set_title(" ".join(rng.choice(WORDS, 3)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _spreadsheet(rng):
    from PIL import ImageDraw
    image = _canvas(rng, light=True)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    cell_w, cell_h = int(rng.integers(60, 90)), int(rng.integers(18, 26))
    for row in range(SIZE // cell_h + 1):
        for col in range(SIZE // cell_w + 1):
            x, y = col * cell_w, row * cell_h
            header = row == 0 or col == 0
            draw.rectangle([x, y, x + cell_w, y + cell_h], outline=(190, 190, 190),
                           fill=(225, 230, 240) if header else None)
            label = (chr(65 + col - 1) if row == 0 and col else str(row) if col == 0 and row
                     else "" if header else f"{rng.uniform(0, 10_000):,.2f}")
            draw.text((x + 4, y + 3), label, fill=(0, 0, 0), font=font)
    return image


def _screen(rng):
    from PIL import ImageDraw
    image = _canvas(rng, light=bool(rng.random() < 0.7))
    draw = ImageDraw.Draw(image)
    accent = tuple(int(v) for v in rng.integers(40, 200, 3))
    draw.rectangle([0, 0, SIZE, 28], fill=accent)
    draw.text((10, 7), " ".join(rng.choice(WORDS, 2)).title(), fill=(255, 255, 255), font=_font(13))
    draw.rectangle([0, 28, SIZE, 50], fill=(235, 235, 235))
    for k, word in enumerate(("File", "Edit", "View", "Tools", "Help")):
        draw.text((10 + 55 * k, 32), word, fill=(0, 0, 0), font=_font(12))
    sidebar = int(rng.integers(100, 170))
    draw.rectangle([0, 50, sidebar, SIZE], fill=(245, 245, 248))
    for k in range(int(rng.integers(6, 14))):
        draw.text((12, 62 + 26 * k), str(rng.choice(WORDS)).title(), fill=(40, 40, 40), font=_font(12))
    y = 70
    while y < SIZE - 60:
        draw.text((sidebar + 20, y), str(rng.choice(WORDS)).title() + ":", fill=(30, 30, 30), font=_font(12))
        draw.rectangle([sidebar + 120, y - 3, SIZE - 30, y + 20], outline=(160, 160, 160), fill=(255, 255, 255))
        y += int(rng.integers(34, 50))
    for k in range(2):
        x = SIZE - 200 + 95 * k
        draw.rounded_rectangle([x, SIZE - 45, x + 85, SIZE - 15], radius=6, fill=accent if k else (220, 220, 220))
        draw.text((x + 20, SIZE - 38), ("Cancel", "OK")[k], fill=(0, 0, 0), font=_font(12))
    return image


def _code(rng, sources: list[str]):
    from PIL import ImageDraw
    image = _canvas(rng, light=bool(rng.random() < 0.5))
    dark = image.getpixel((0, 0))[0] < 128
    draw = ImageDraw.Draw(image)
    font = _font(int(rng.integers(10, 14)), "DejaVuSansMono")
    lines = sources[int(rng.integers(len(sources)))].splitlines()
    start = int(rng.integers(max(1, len(lines) - 40)))
    for k, line in enumerate(lines[start:start + SIZE // (font.size + 3)]):
        colour = (200, 200, 200) if dark else (30, 30, 30)
        if line.lstrip().startswith(("def ", "class ", "import ", "from ", "return")):
            colour = (86, 156, 214) if dark else (0, 0, 160)
        draw.text((8, 6 + k * (font.size + 3)), f"{start + k + 1:4d}  {line}", fill=colour, font=font)
    return image


def _texture(rng, k: int):
    from PIL import Image
    kind = k % 6
    if kind < 3:
        array = np.asarray(Image.open(_package_file("skimage", ("brick.png", "grass.png", "gravel.png")[kind])))
        y, x = rng.integers(0, max(1, array.shape[0] - 256)), rng.integers(0, max(1, array.shape[1] - 256))
        crop = array[y:y + 256, x:x + 256]
        return Image.fromarray(crop).convert("RGB").resize((SIZE, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if kind == 3:  # coloured noise, smoothed at a random scale
        scale = int(rng.integers(4, 32))
        small = rng.random((SIZE // scale + 1, SIZE // scale + 1, 3))
        array = np.kron(small, np.ones((scale, scale, 1)))[:SIZE, :SIZE]
    elif kind == 4:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        wave = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        array = wave[..., None] * rng.random(3) + (1 - wave[..., None]) * rng.random(3)
    else:  # checks
        period = int(rng.integers(8, 64))
        checks = ((xx // period + yy // period) % 2)[..., None]
        array = checks * rng.random(3) + (1 - checks) * rng.random(3)
    return Image.fromarray((255 * array).astype(np.uint8))


def write_ood_images(out: Path, per_kind: int = 20, seed: int = 0) -> dict[str, list[Path]]:
    """Write the set into `out`/KIND/*.png|jpg; return the files of each kind (photos: all of PHOTOS)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(out)
    sources = [p.read_text(encoding="utf-8") for p in sorted((Path(__file__).parent.parent / "tfcap").rglob("*.py"))]
    makers = {"documents": _document, "charts": _chart, "spreadsheets": _spreadsheet, "screens": _screen,
              "code": lambda r: _code(r, sources)}
    written: dict[str, list[Path]] = {}
    for kind in KINDS:
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        if kind == "photos":
            for package, name in PHOTOS:
                image = Image.open(_package_file(package, name)).convert("RGB")
                path = folder / f"{Path(name).stem}.jpg"
                image.save(path, quality=92)
                files.append(path)
        else:
            for k in range(per_kind):
                image = _texture(rng, k) if kind == "textures" else makers[kind](rng)
                path = folder / f"{kind}-{k:03d}.png"
                image.save(path)
                files.append(path)
        written[kind] = files
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-kind", type=int, default=20, help="generated images of each kind but photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    written = write_ood_images(args.out, args.per_kind, args.seed)
    print(", ".join(f"{kind} {len(files)}" for kind, files in written.items()), "->", args.out)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
