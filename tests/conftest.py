"""Shared fixtures: small captioned datasets generated on the fly, in each layout tfcap reads, and the
tiny trained runs that several test files read (`built_once`: made once per test session, not once per
test, file or pytest-xdist worker)."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small vocabulary of captions; every word appears often enough to pass --min-count 1.
COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def make_image_bytes(seed: int, fmt: str = "JPEG", size=(40, 32), mode: str = "RGB") -> bytes:
    """A small random image encoded as `fmt`, deterministic in `seed`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def captions_for(index: int) -> list[str]:
    """Five captions per image; punctuation, case and a comma to exercise normalization and CSV quoting."""
    color, shape = COLORS[index % len(COLORS)], SHAPES[index % len(SHAPES)]
    return [f"A {color} {shape}.", f"The {shape} is {color}!", f"{color.title()}, bright {shape}",
            f"one {color} {shape} here", f"a small {color} {shape}"]


def write_images(folder: Path, count: int, formats=("JPEG", "PNG", "GIF", "BMP", "WEBP")) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        fmt = formats[i % len(formats)]
        name = f"img{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        (folder / name).write_bytes(make_image_bytes(i, fmt))
        names.append(name)
    return names


@pytest.fixture
def kaggle_dataset(tmp_path: Path) -> Path:
    """Kaggle layout: captions.txt (CSV with quoted commas) and Images/, 20 images of 5 formats."""
    root = tmp_path / "kaggle"
    names = write_images(root / "Images", 20)
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(names):
            for caption in captions_for(i):
                writer.writerow([name, caption])
    return root


@pytest.fixture
def original_dataset(tmp_path: Path) -> Path:
    """Original Flickr8k layout: Flickr8k.token.txt, official split files, Flicker8k_Dataset/."""
    root = tmp_path / "original"
    names = write_images(root / "Flicker8k_Dataset", 12, formats=("JPEG",))
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = [f"{name}#{k}\t{c}" for i, name in enumerate(names) for k, c in enumerate(captions_for(i))]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:8]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[8:10]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(names[10:11]) + "\n")  # names[11]: no split
    return root


def flickr8k() -> Path | None:
    value = os.environ.get("TFCAP_FLICKR8K")
    return Path(value) if value else None


needs_flickr8k = pytest.mark.skipif(not os.environ.get("TFCAP_FLICKR8K"), reason="TFCAP_FLICKR8K is not set")


@pytest.fixture(autouse=True, scope="session")
def _session_cache_home(tmp_path_factory):
    """Shard verification stamps (`records.verify_shards`) of the tests go to a folder of this
    session's, not to the user's ~/.cache; subprocesses inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, made by `build(folder)` once per test session and then only read.

    pytest-xdist's workers are sessions of their own whose base temporary folders share a parent: the
    first worker to ask builds the folder there under an flock, the others wait for it and reuse it.
    A folder without its mark of completion (its builder died or failed) is built again from scratch.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            (root / ".built").touch()
    return root


def invoke(*args):
    """`tfcap ARGS...` in this process (click's CliRunner); arguments may be paths."""
    from click.testing import CliRunner

    from tfcap.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ---------------------------------------------------------------------------------------------
# A tiny dataset a tiny model memorizes (tiny_records), and runs trained on it

# Eight images, each with its own caption: a handful a tiny model can memorize.
WORDS = ["red", "green", "blue", "pink", "cat", "dog", "bird", "fish"]
CAPTIONS = [f"a {WORDS[i % 4]} {WORDS[4 + i // 2 % 4]} sits" for i in range(8)]
# The tiny encoder (of EncoderConfig): the small convnet, random init, 32 px (a 2x2 grid). It builds, traces
# and exports in a fraction of MobileNet's time, which every caption-dir, export and fit of a tiny run pays.
TINY_ENCODER_OPTIONS = dict(name="convnet", image_size=32, weights="none")
# MobileNet-0.25 at 32 px, random init: a weaker encoder, for the tests that need a model with room to learn.
TINY_MOBILENET_OPTIONS = dict(name="mobilenet", alpha=0.25, image_size=32, weights="none")


def tile(i: int) -> bytes:
    """A 32x32 PNG of a colour of its own (random noise would look alike to a random-init CNN)."""
    from PIL import Image

    rng = np.random.default_rng(i)
    color = np.array([(i * 97) % 256, (i * 53 + 80) % 256, (i * 151 + 30) % 256])
    pixels = np.clip(color + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def fit(records_dir, run_dir, cache_dir, *, kind="merge", epochs=30, encoder_config=None, **overrides):
    """`train.train` of a tiny decoder (32 units) on a tiny encoder (TINY_ENCODER_OPTIONS unless given), seed 1,
    constant learning rate 0.01, no validation BLEU, no early stop; `overrides` are TrainConfig fields."""
    from tfcap import decoder, encoder, train

    config = dict(epochs=epochs, batch_size=8, learning_rate=0.01, lr_schedule="constant", eval_every=0,
                  patience=0, seed=1)
    config.update(overrides)
    encoder_config = encoder_config or encoder.EncoderConfig(**TINY_ENCODER_OPTIONS)
    return train.train(records_dir, run_dir, encoder_config=encoder_config,
                       decoder_config=decoder.DecoderConfig(kind=kind, units=32, embed_dim=16, dropout=0.0,
                                                            attention_dim=16),
                       train_config=train.TrainConfig(**config), cache_dir=cache_dir, show_progress=False)


def greedy_captions(run_dir: Path, examples: list[dict]) -> list[str]:
    """Greedy captions by a run's saved model of records examples (`records.iterate_examples`), one batch."""
    import tensorflow as tf

    from tfcap import model

    captioner = model.load_model(run_dir)
    pixels = tf.stack([captioner.preprocess_bytes(tf.constant(example["image"])) for example in examples])
    captions, _ = captioner.caption_features(captioner.features(pixels), beam_size=1)  # rows are independent
    return [caption.decode() for caption in captions.numpy()]


def epochs_logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _build_tiny_records(root: Path) -> None:
    (root / "img").mkdir()
    with open(root / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for i, caption in enumerate(CAPTIONS):
            (root / "img" / f"{i}.png").write_bytes(tile(i))
            w.writerows([[f"{i}.png", caption, "train"]] * 8)  # more steps per epoch, fewer epochs
        for i in range(2):  # validation images share the training captions
            (root / "img" / f"v{i}.png").write_bytes(tile(i))
            w.writerow([f"v{i}.png", CAPTIONS[i], "val"])
    ok("build-records", "--captions", root / "c.csv", "--images", root / "img", "-o", root / "rec", "--min-count", "1",
       "--quiet")


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory) -> Path:
    """Records of 8 training images (32x32 PNG tiles), each with its own caption 8 times, and 2 validation
    images with the captions of the first two; no test split."""
    return built_once(tmp_path_factory, "tiny-records", _build_tiny_records) / "rec"


@pytest.fixture(scope="session")
def tiny_features(tiny_records, tmp_path_factory) -> Path:
    """A feature cache (`--cache-dir`) of tiny_records' train and val images by the tiny encoder in float32,
    grid included: it serves the merge and the attention decoder, so that fits with it encode nothing
    (encoding is about half of a tiny fit). Tests about building the cache, and fits with another
    encoder or precision, use a cache of their own."""
    return built_once(tmp_path_factory, "tiny-features", lambda root: build_features(tiny_records, root))


def build_features(records_dir: Path, cache_dir: Path, encoder_options: dict = TINY_ENCODER_OPTIONS) -> None:
    """A feature cache in `cache_dir` of the train and val images of `records_dir` (grid included)."""
    from tfcap import encoder, features

    tiny = encoder.build_encoder(encoder.EncoderConfig(**encoder_options), "float32")
    for split in ("train", "val"):
        features.build_features(records_dir, split, tiny, True, cache_dir=cache_dir, show_progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_records, tiny_features, tmp_path_factory) -> Path:
    """A merge run briefly trained on tiny_records (3 epochs at learning rate 0.005): it captions.
    Tests copy it before they change it."""
    build = lambda root: fit(tiny_records, root / "run", tiny_features, epochs=3, learning_rate=0.005)  # noqa: E731
    return built_once(tmp_path_factory, "tiny-run", build) / "run"


@pytest.fixture(scope="session")
def overfitted(tiny_records, tiny_features, tmp_path_factory) -> Callable[[str], Path]:
    """kind ("merge" or "attention") -> a run of that decoder trained on tiny_records long enough to reproduce
    the training captions (merge 12 epochs at learning rate 0.005; attention 18 at 0.007, where 24 at 0.005
    took a third longer), with validation BLEU-4 every 6 epochs. Attention
    trains on batches by image (all captions of an image share its grid): 8 captions, one image per step,
    so each step fits one image's caption and it takes more of them."""
    def run(kind: str) -> Path:
        epochs, learning_rate = {"merge": (12, 0.005), "attention": (18, 0.007)}[kind]
        build = lambda root: fit(tiny_records, root / "run", tiny_features, kind=kind, epochs=epochs,  # noqa: E731
                                 learning_rate=learning_rate, eval_every=6)
        return built_once(tmp_path_factory, f"overfitted-{kind}", build) / "run"

    return run


# ---------------------------------------------------------------------------------------------
# The world of the edge tests: records of 6 images, a 1-epoch convnet run, caption-dir outputs

def png(i: int) -> bytes:
    """A flat 32x32 PNG of a colour of its own."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), [(i * 97) % 256, (i * 53 + 80) % 256, 40], np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _build_world(root: Path) -> None:
    images, photos = root / "images", root / "photos"
    images.mkdir()
    photos.mkdir()
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        for i, split in enumerate(["train"] * 4 + ["val", "test"]):
            (images / f"{i}.png").write_bytes(png(i))
            (photos / f"{i}.png").write_bytes(png(i))
            writer.writerows([[f"{i}.png", f"a {w} cat", split] for w in ("red", "blue")])
    (photos / "broken.png").write_bytes(b"")
    (photos / "notes.txt").write_text("not an image\n")
    records, run = root / "records", root / "run"
    ok("build-records", "--captions", root / "captions.csv", "--images", images, "-o", records, "--min-count", "1",
       "--quiet")
    trained = ok("train", records, "-o", run, "--encoder", "convnet", "--encoder-weights", "none", "--image-size", "32",
                 "--units", "16", "--embed-dim", "8", "--epochs", "1", "--eval-every", "0", "--batch-size", "4",
                 "--quiet")
    (root / "train.stderr").write_text(trained.stderr)
    ok("caption-dir", photos, "-o", root / "out.csv", "--model", run, "--quiet")
    ok("caption-dir", photos, "-o", root / "out.jsonl", "--model", run, "--quiet")  # no --format: from the suffix


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> SimpleNamespace:
    """Records of 6 images (4 train, 1 val, 1 test; 2 captions each), a 1-epoch run (convnet at 32 px), and
    caption-dir outputs (CSV and JSON Lines) of a folder of those images plus an empty `broken.png` and a
    text file. The edge tests and the Apache Beam engine's tests read it; none writes into it."""
    root = built_once(tmp_path_factory, "world", _build_world)
    return SimpleNamespace(root=root, images=root / "images", photos=root / "photos", captions=root / "captions.csv",
                           records=root / "records", run=root / "run", csv=root / "out.csv", jsonl=root / "out.jsonl",
                           train_stderr=(root / "train.stderr").read_text())
