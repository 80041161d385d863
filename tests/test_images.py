import pytest
import tensorflow as tf

from conftest import make_image_bytes
from tfcap import images

FORMATS = ["JPEG", "PNG", "GIF", "BMP", "WEBP"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sniff_header_and_decode_every_format(fmt):
    data = make_image_bytes(1, fmt, size=(53, 37))
    assert images.sniff_format(data) == fmt.lower()
    assert images.header_shape(tf.constant(data)).numpy().tolist() == [37, 53]
    assert images.validate(tf.constant(data)).numpy().tolist() == [37, 53]
    decoded = images.decode_rgb(tf.constant(data))
    assert decoded.shape == (37, 53, 3) and decoded.dtype == tf.uint8


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_fail_validation(fmt):
    data = make_image_bytes(2, fmt, size=(53, 37))
    with pytest.raises(tf.errors.InvalidArgumentError):
        images.validate(tf.constant(data[: len(data) // 2]))


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
                                      ("P", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")])
def test_unusual_modes_become_rgb(mode, fmt):
    decoded = images.decode_rgb(tf.constant(make_image_bytes(3, fmt, mode=mode)))
    assert decoded.shape == (32, 40, 3)


def test_transparent_pixels_composite_over_white():
    from PIL import Image
    import io
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, "PNG")
    assert images.decode_rgb(tf.constant(buffer.getvalue())).numpy().min() == 255


def test_header_of_garbage_is_unknown_and_diagnose_reasons(tmp_path):
    assert images.header_shape(tf.constant(b"x" * 100)).numpy().tolist() == [-1, -1]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello, not an image at all")
    (tmp_path / "cut.png").write_bytes(make_image_bytes(4, "PNG")[:100])
    assert images.diagnose(tmp_path / "nope.jpg") == "missing"
    assert images.diagnose(tmp_path / "empty.jpg") == "empty"
    assert images.diagnose(tmp_path / "text.jpg") == "not an image"
    assert images.diagnose(tmp_path / "cut.png").startswith("truncated or corrupt")
