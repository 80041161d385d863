"""tfcap.Captioner: the bundled model from Python, on paths, bytes, arrays and PIL images, with the
captions caption-dir gives the same images, and nothing from TensorFlow on stderr."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tfcap
from tfcap import caption
from tfcap.api import Caption


@pytest.fixture(scope="module")
def captioner():
    return tfcap.Captioner(batch_size=4)  # the bundled model; 4: a list of 9 images takes three batches


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    """Photo-like pixels (smooth colour fields) in each array layout a Captioner takes."""
    rng = np.random.default_rng(0)

    def smooth(channels: int) -> np.ndarray:
        coarse = rng.uniform(0, 255, (3, 3, channels)).astype("uint8")
        image = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
        return np.asarray(image.resize((96, 72), Image.BILINEAR))

    rgba = np.concatenate([smooth(3), rng.integers(128, 256, (72, 96, 1), dtype=np.uint8)], axis=-1)
    return {"rgb": smooth(3), "gray": smooth(1), "rgba": rgba}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, arrays) -> Path:
    """The arrays as PNG files, a JPEG, and a damaged file: what caption-dir captions."""
    root = tmp_path_factory.mktemp("api-images")
    for name, pixels in arrays.items():
        Image.fromarray(pixels).save(root / f"{name}.png")
    Image.fromarray(np.ascontiguousarray(arrays["rgb"][::-1])).save(root / "photo.jpg", quality=90)
    (root / "damaged.png").write_bytes((root / "rgb.png").read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def caption_dir_rows(captioner, folder, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("api-out") / "captions.csv"
    caption.caption_directory(captioner.predictor, folder, out, show_progress=False)
    return {row["path"]: row for row in caption.read_rows(out)}


def assert_same(result: Caption, row: dict) -> None:
    """The caption, score (up to float error: batches differ) and error of a caption-dir row."""
    assert (result.text, result.error) == (row["caption"], row["error"])
    if not row["error"]:
        assert result.text and result.score == pytest.approx(float(row["score"]), abs=2e-4)


def row_of(result: Caption) -> dict:
    return {"caption": result.text, "score": result.score, "error": result.error}


def test_every_kind_of_image_gets_caption_dirs_caption(captioner, arrays, folder, caption_dir_rows):
    photo = folder / "photo.jpg"
    inputs = [str(photo), photo, photo.read_bytes(), bytearray(photo.read_bytes()), arrays["rgb"],
              arrays["gray"], arrays["rgba"], Image.fromarray(arrays["rgb"]), folder / "damaged.png"]
    expected = ["photo.jpg", "photo.jpg", "photo.jpg", "photo.jpg", "rgb.png", "gray.png", "rgba.png", "rgb.png",
                "damaged.png"]
    results = captioner(inputs)
    assert isinstance(results, list) and len(results) == len(inputs)
    for result, name in zip(results, expected):
        assert_same(result, caption_dir_rows[name])
    assert results[-1].error.startswith("truncated or corrupt") and not results[-1].ok
    for again, result in zip(captioner(tuple(inputs[:2])), results):  # a tuple is a list too
        assert_same(again, row_of(result))


def test_one_bad_image_in_a_list_gets_an_error_not_an_exception(captioner, folder, arrays):
    good = folder / "photo.jpg"
    results = captioner([b"", b"not an image", folder / "missing.jpg", good, np.zeros((4, 4), np.float32),
                         np.zeros((0, 5, 3), np.uint8), 42])
    assert [r.error for r in results[:3]] == ["empty", "not an image", "missing"]
    assert results[3].ok
    assert_same(results[3], row_of(captioner(good)))
    assert results[4].error.startswith("not an image: array of float32 [4, 4]")
    assert results[5].error.startswith("not an image: array of uint8 [0, 5, 3]")
    assert results[6].error.startswith("not an image: int")
    assert all(r.text == "" and r.score is None for r in results[:3] + results[4:])
    assert captioner([]) == []


def test_a_single_image_gives_a_caption_and_a_single_bad_one_raises(captioner, folder):
    result = captioner(folder / "photo.jpg")
    assert isinstance(result, Caption) and str(result) == result.text and result.error == ""
    assert repr(result).startswith(f"Caption({result.text!r}, score={result.score:.4f}, ")  # then labels, ...
    with pytest.raises(tfcap.TfcapError, match=r"missing\.jpg: missing$"):
        captioner(folder / "missing.jpg")
    with pytest.raises(tfcap.TfcapError, match="^image: not an image$"):
        captioner(b"GIF? no")


def test_the_predictor_is_callable_and_loads_the_bundled_model_by_default(captioner, folder):
    from tfcap import export, pretrained

    assert captioner.settings["beam_size"] == pretrained.decoding()["beam_size"]
    assert_same(captioner.predictor(folder / "photo.jpg"), row_of(captioner(folder / "photo.jpg")))
    assert export.load_predictor.__defaults__[0] is None  # export.load_predictor() is the bundled model


def test_a_caption_carries_whatever_further_outputs_the_model_gives():
    row = {"path": "a.jpg", "caption": "a dog", "score": -0.5, "error": "",
           "labels": [("beagle", 0.6), ("basset", 0.2)], "confidence": 0.7, "in_domain": True, "novelty": 3}
    result = Caption.from_row(row)
    assert (result.text, result.score, result.confidence, result.in_domain) == ("a dog", -0.5, 0.7, True)
    assert result.labels == (("beagle", 0.6), ("basset", 0.2)) and result.extras == {"novelty": 3}
    assert repr(result) == ("Caption('a dog', score=-0.5000, confidence=0.7, in_domain=True, "
                            "labels=(('beagle', 0.6), ('basset', 0.2)), novelty=3)")
    plain = Caption.from_row({"caption": "a dog", "score": -0.5, "error": ""})
    assert plain.labels is None and plain.confidence is None and plain.in_domain is None and plain.extras == {}
    assert repr(Caption.from_row({"caption": "", "score": None, "error": "missing"})) == "Caption(error='missing')"


def test_from_a_fresh_interpreter_two_lines_print_a_caption_and_nothing_else(tmp_path, folder, caption_dir_rows):
    (tmp_path / "dog.jpg").write_bytes((folder / "photo.jpg").read_bytes())
    script = ("import sys, tfcap; assert 'tensorflow' not in sys.modules; tfcap.Captioner; "
              "assert 'tensorflow' not in sys.modules; print(tfcap.Captioner()('dog.jpg'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the tests' conftest sets it
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""
    assert out.stdout == caption_dir_rows["photo.jpg"]["caption"] + "\n"


def test_arrays_are_encoded_losslessly(captioner, arrays):
    """The PNG a Captioner makes of an array decodes to the same pixels (caption-dir then reads the same image)."""
    pngs = captioner._encoded([arrays["rgb"], arrays["gray"], arrays["rgba"]])
    for png, pixels in zip(pngs, (arrays["rgb"], arrays["gray"], arrays["rgba"])):
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        assert np.array_equal(decoded, pixels)
