"""Image bytes: format sniffing, header-only size checks, and decoding to RGB, as TensorFlow ops.

Every stage that touches pixels (build-records validation, the training pipeline, caption-dir,
an exported model) decodes through `decode_rgb`, so a file that works in one works in all.
"""

from __future__ import annotations

import re
from pathlib import Path

import tensorflow as tf

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# Default refusal threshold for header-declared size: PIL's decompression-bomb limit (2 x 89.5 Mpx
# warns there); far above any photo, far below what exhausts memory when decoded to RGB.
DEFAULT_MAX_PIXELS = 178_956_970


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None if it is not one we read."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _uint(data: tf.Tensor, offset: int, size: int, little_endian: bool) -> tf.Tensor:
    """Unsigned integer of `size` bytes at `offset` of a tf.string scalar, as tf.int64."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8), tf.int64)
    weights = tf.constant([256**i for i in range(size)], tf.int64)
    if not little_endian:
        weights = tf.reverse(weights, [0])
    return tf.reduce_sum(raw * weights)


def header_shape(data: tf.Tensor) -> tf.Tensor:
    """Height and width as declared by an image's header, without decoding any pixels.

    Args:
      data: tf.string scalar, the file's bytes.
    Returns:
      tf.int64 [2] (height, width); (-1, -1) when the format is unknown or the header is short.
    """
    unknown = tf.constant([-1, -1], tf.int64)
    long_enough = tf.strings.length(data) >= 32
    magic = tf.strings.substr(data, 0, 4)

    def jpeg():
        # extract_jpeg_shape reads markers only; it fails on garbage, so guard with its own check.
        return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    def png():
        return tf.stack([_uint(data, 20, 4, False), _uint(data, 16, 4, False)])

    def gif():
        return tf.stack([_uint(data, 8, 2, True), _uint(data, 6, 2, True)])

    def bmp():
        height = _uint(data, 22, 4, True)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # negative = top-down rows
        return tf.stack([height, _uint(data, 18, 4, True)])

    def webp():
        chunk = tf.strings.substr(data, 12, 4)
        lossless_bits = _uint(data, 21, 4, True)
        return tf.case([
            (tf.equal(chunk, b"VP8X"), lambda: tf.stack([_uint(data, 27, 3, True) + 1, _uint(data, 24, 3, True) + 1])),
            (tf.equal(chunk, b"VP8 "), lambda: tf.stack([_uint(data, 28, 2, True) % 16384,
                                                          _uint(data, 26, 2, True) % 16384])),
            (tf.equal(chunk, b"VP8L"), lambda: tf.stack([(lossless_bits // 16384) % 16384 + 1,
                                                          lossless_bits % 16384 + 1])),
        ], default=lambda: unknown)

    return tf.case([
        (~long_enough, lambda: unknown),
        (tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"), jpeg),
        (tf.equal(magic, b"\x89PNG"), png),
        (tf.equal(tf.strings.substr(data, 0, 3), b"GIF"), gif),
        (tf.equal(tf.strings.substr(data, 0, 2), b"BM"), bmp),
        (tf.equal(magic, b"RIFF") & tf.equal(tf.strings.substr(data, 8, 4), b"WEBP"), webp),
    ], default=lambda: unknown)


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Decode JPEG (also CMYK), PNG (also 16-bit and palette), GIF (first frame), BMP or WebP to RGB.

    Grayscale becomes three equal channels; alpha is composited over white, as a viewer shows it.

    Args:
      data: tf.string scalar.
    Returns:
      tf.uint8 [H, W, 3].
    """
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]

    def over_white():
        alpha = tf.cast(image[..., -1:], tf.float32) / 255.0
        color = tf.cast(image[..., :-1], tf.float32)
        return tf.cast(tf.round(color * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

    image = tf.cond(tf.equal(channels % 2, 0), over_white, lambda: image)  # 2 (gray+alpha) or 4 (RGBA)
    image = tf.cond(tf.equal(tf.shape(image)[-1], 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    image.set_shape([None, None, 3])
    return image


def validate(data: tf.Tensor) -> tf.Tensor:
    """Fully check that image bytes decode; raise InvalidArgumentError if they do not.

    JPEGs are decoded at 1/8 scale: every entropy-coded byte is still read (so truncation and
    corruption are caught) at a fraction of the cost of a full decode.

    Args:
      data: tf.string scalar.
    Returns:
      tf.int64 [2], the decoded (height, width) at full scale.
    """
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")

    def jpeg():
        small = tf.io.decode_jpeg(data, ratio=8)
        with tf.control_dependencies([small]):
            return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    def other():
        return tf.cast(tf.shape(decode_rgb(data))[:2], tf.int64)

    return tf.cond(is_jpeg, jpeg, other)


def quick_check(path: Path) -> str | None:
    """Why `path` is certainly not a usable image (missing, empty, unknown format), from its first bytes only.

    None means it may be fine; only a full decode (`validate`) can tell.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "not a file"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not head:
        return "empty"
    if sniff_format(head) is None:
        return "not an image"
    return None


def diagnose(path: Path) -> str:
    """Why the image file at `path` cannot be used: a short reason for manifests and error rows."""
    reason = quick_check(path)
    if reason:
        return reason
    try:
        validate(tf.constant(Path(path).read_bytes()))
    except tf.errors.OpError as e:
        # Eager errors start with "{{function_node __wrapped__...}}": noise for a reader.
        message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message).strip()
        message = message.splitlines()[-1] if message else "decode failed"
        return f"truncated or corrupt ({message[:120]})"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return "unreadable"
