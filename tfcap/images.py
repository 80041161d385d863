"""Image bytes: format sniffing, header-only size checks, and decoding to RGB, as TensorFlow ops.

Every stage that touches pixels (the training pipeline, caption-dir, an exported model) decodes
through `decode_rgb`, so a file that works in one works in all. build-records only `check`s each
image: its header and the end of the file, decoding only when those leave a doubt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import tensorflow as tf

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# Default refusal threshold for header-declared size: PIL's decompression-bomb limit (2 x 89.5 Mpx
# warns there); far above any photo, far below what exhausts memory when decoded to RGB.
DEFAULT_MAX_PIXELS = 178_956_970


# Each format we read and the magic bytes that name it: any of its alternatives, each a list of
# (offset, bytes) that must all match.
_MAGIC = {
    "jpeg": [[(0, b"\xff\xd8\xff")]],
    "png": [[(0, b"\x89PNG\r\n\x1a\n")]],
    "gif": [[(0, b"GIF87a")], [(0, b"GIF89a")]],
    "bmp": [[(0, b"BM")]],
    "webp": [[(0, b"RIFF"), (8, b"WEBP")]],
}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None if it is not one we read."""
    for name, alternatives in _MAGIC.items():
        if any(all(data[at:at + len(magic)] == magic for at, magic in parts) for parts in alternatives):
            return name
    return None


def _is_format(data: tf.Tensor) -> tf.Tensor:
    """`sniff_format` in TensorFlow: tf.bool [..., 5], whether `data` (tf.string [...]) is each of `_MAGIC`."""
    length = tf.strings.length(data)

    def starts(at, magic):  # substr fails beyond the end, hence the clipped offset
        return tf.equal(tf.strings.substr(data, tf.minimum(at, length), tf.zeros_like(length) + len(magic)), magic)

    return tf.stack([tf.reduce_any(tf.stack([tf.reduce_all(tf.stack([starts(at, magic) for at, magic in parts]), 0)
                                             for parts in alternatives]), 0)
                     for alternatives in _MAGIC.values()], axis=-1)


# Header integers of the formats other than JPEG: name -> (offset, bytes, little endian). All lie
# in the first 32 bytes, which `_inspect` reads as one vector and multiplies out at once.
_FIELDS = {
    "png_width": (16, 4, False), "png_height": (20, 4, False),
    "gif_width": (6, 2, True), "gif_height": (8, 2, True),
    "bmp_size": (2, 4, True), "bmp_offset": (10, 4, True), "bmp_width": (18, 4, True), "bmp_height": (22, 4, True),
    "bmp_bits": (28, 2, True),
    "riff_size": (4, 4, True), "webp_chunk_size": (16, 4, True),
    "vp8x_width": (24, 3, True), "vp8x_height": (27, 3, True),  # minus one
    "vp8_width": (26, 2, True), "vp8_height": (28, 2, True),  # 14 bits each
    "vp8l_bits": (21, 4, True),  # width - 1 and height - 1, 14 bits each
}
_HEAD = 32
_FIELD_WEIGHTS = [[(256 ** (k - offset if little else offset + size - 1 - k) if offset <= k < offset + size else 0)
                   for k in range(_HEAD)] for offset, size, little in _FIELDS.values()]
# `_inspect`'s format index: 1 + the position in `_MAGIC`, 0 if unknown or shorter than `_HEAD`.
_JPEG = 1
# Bytes at the end of a JPEG searched for the EOI marker behind padding (0x00 or 0xFF fill).
_JPEG_TAIL = 256
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole last chunk: length 0, type, CRC


def _inspect(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Format, header size (not for JPEG) and end structure of image bytes, in straight-line ops.

    No branches: this runs once per image inside tf.data, where every cond costs, and every
    format's fields come out of one multiplication of the first 32 bytes.

    Returns:
      format index (tf.int32 scalar, see `_JPEG`), (height, width) from the header (tf.int64
      [2]; (-1, -1) for JPEG and unknown formats) and whether the file ends as `structure_ok` says.
    """
    length = tf.strings.length(data)
    length64 = tf.cast(length, tf.int64)

    def ends(magic):
        return tf.equal(tf.strings.substr(data, tf.maximum(length - len(magic), 0), len(magic)), magic)

    found = _is_format(data) & (length >= _HEAD)
    index = tf.where(tf.reduce_any(found), tf.argmax(tf.cast(found, tf.int32), output_type=tf.int32) + 1, 0)

    head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, _HEAD), tf.uint8, fixed_length=_HEAD), tf.int64)
    f = dict(zip(_FIELDS, tf.unstack(tf.reduce_sum(tf.constant(_FIELD_WEIGHTS, tf.int64) * head, axis=1))))
    bmp_height = tf.where(f["bmp_height"] >= 2**31, 2**32 - f["bmp_height"], f["bmp_height"])  # negative: top-down
    chunk = tf.strings.substr(data, tf.minimum(12, length), 4)
    webp = tf.where(tf.equal(chunk, b"VP8X"), tf.stack([f["vp8x_height"] + 1, f["vp8x_width"] + 1]),
                    tf.where(tf.equal(chunk, b"VP8 "), tf.stack([f["vp8_height"] % 16384, f["vp8_width"] % 16384]),
                             tf.where(tf.equal(chunk, b"VP8L"),
                                      tf.stack([f["vp8l_bits"] // 16384 % 16384 + 1, f["vp8l_bits"] % 16384 + 1]),
                                      tf.constant([-1, -1], tf.int64))))
    unknown = tf.constant([-1, -1], tf.int64)
    shape = tf.gather(tf.stack([unknown, unknown, tf.stack([f["png_height"], f["png_width"]]),
                                tf.stack([f["gif_height"], f["gif_width"]]), tf.stack([bmp_height, f["bmp_width"]]),
                                webp]), index)

    end = tf.cast(tf.io.decode_raw(tf.strings.substr(data, tf.maximum(length - _JPEG_TAIL, 0), _JPEG_TAIL), tf.uint8,
                                   fixed_length=_JPEG_TAIL), tf.int32)  # a shorter file is padded with zeros
    last = tf.reduce_max(tf.where((end != 0x00) & (end != 0xFF), tf.range(_JPEG_TAIL), -1))  # -1: all padding
    jpeg_end = (last >= 1) & tf.reduce_all(tf.gather(end, tf.maximum([last - 1, last], 0)) == [0xFF, 0xD9])
    bits = f["bmp_bits"]
    row = (bits // 8 * f["bmp_width"] + 3) // 4 * 4  # BMP rows are padded to 4 bytes
    bmp_end = (((bits == 8) | (bits == 24) | (bits == 32)) & tf.equal(f["bmp_size"], length64)
               & tf.equal(f["bmp_offset"] + row * bmp_height, length64))
    webp_end = tf.equal(f["riff_size"] + 8, length64) & (f["webp_chunk_size"] + 20 <= length64)
    ihdr = tf.equal(tf.strings.substr(data, tf.minimum(12, length), 4), b"IHDR")
    end_ok = tf.gather(tf.stack([False, jpeg_end, ihdr & ends(_PNG_IEND), ends(b";"), bmp_end, webp_end]), index)
    return index, shape, end_ok


def _jpeg_shape(data: tf.Tensor) -> tf.Tensor:
    # extract_jpeg_shape has libjpeg parse every marker up to the first scan; it fails on garbage.
    return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)


def header_shape(data: tf.Tensor) -> tf.Tensor:
    """Height and width as declared by an image's header, without decoding any pixels.

    Args:
      data: tf.string scalar, the file's bytes.
    Returns:
      tf.int64 [2] (height, width); (-1, -1) when the format is unknown or the header is short.
      A JPEG whose header libjpeg cannot parse raises InvalidArgumentError.
    """
    index, shape, _ = _inspect(data)
    return _with_jpeg_shape(data, index, shape)


def _with_jpeg_shape(data: tf.Tensor, index: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """`_inspect`'s shape, with a JPEG's read by libjpeg."""
    return tf.cond(tf.equal(index, _JPEG), lambda: _jpeg_shape(data), lambda: shape)


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
    damaged markers are caught) at about half the cost of a full decode; corrupt entropy data
    decodes with a libjpeg warning, as it would for training. `check` is the cheap version that
    decodes only when the file's structure leaves a doubt.

    Args:
      data: tf.string scalar.
    Returns:
      tf.int64 [2], the decoded (height, width) at full scale.
    """
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")

    def jpeg():
        small = tf.cast(tf.shape(tf.io.decode_jpeg(data, ratio=8))[:2], tf.int64)
        # A data dependency, not a control one: grappler turns a stateless op whose output only
        # feeds control edges into a no-op, so inside tf.data the decode would silently not run.
        return tf.maximum(_jpeg_shape(data), small)  # the full size is never below the 1/8 one

    def other():
        return tf.cast(tf.shape(decode_rgb(data))[:2], tf.int64)

    return tf.cond(is_jpeg, jpeg, other)


def structure_ok(data: tf.Tensor) -> tf.Tensor:
    """Whether image bytes end as a complete file of their format does, without decoding.

    Checked, after the format's magic bytes:
      JPEG: the file ends with the EOI marker FF D9, possibly followed by up to 254 bytes of 0x00
        or 0xFF padding.
      PNG: the first chunk is IHDR and the file ends with the IEND chunk.
      GIF: the file ends with the 0x3B trailer.
      BMP: the header's file size is the length, 8, 24 or 32 bits per pixel, and the pixel rows
        end exactly at the end of the file (TensorFlow's decoder requires the last two).
      WebP: the RIFF size is the length and the first chunk fits in it.
    This catches truncation, the usual damage (an interrupted copy or download), and files of
    another kind with a borrowed extension or magic. False means "in doubt", not "broken": a JPEG
    or PNG with bytes after its end, or a GIF without its trailer, still decodes.

    Not checked: the data between header and end (JPEG entropy-coded data and, in progressive
    JPEGs, the tables and scan headers between scans; PNG IDAT and chunk CRCs; GIF LZW; WebP
    bitstream). Damage there with an intact header and end passes. TensorFlow's decoders render
    corrupt JPEG entropy data (libjpeg warns "Corrupt JPEG data" and decodes what it can, as for
    Flickr8k's 1798209205_77dbf525b0.jpg, whose lower half is corrupt), but fail on a damaged
    scan header or PNG/GIF/WebP data: such a file passes here and fails when decoded for training.

    Args:
      data: tf.string scalar.
    Returns:
      tf.bool scalar.
    """
    return _inspect(data)[2]


# Kept out of line, so that the branch `check`'s shortcut does not take is one call op: inlined,
# the hundreds of ops of `_inspect` and the decoders made every image's check slower (a lowered
# tf.cond still visits each op of the branch it skips) and the tf.data graph slower to build.
@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False,
             experimental_attributes={"_noinline": True})
def _check_general(data: tf.Tensor) -> tf.Tensor:
    index, shape, end_ok = _inspect(data)
    shape = _with_jpeg_shape(data, index, shape)
    return tf.cond(tf.reduce_all(shape > 0) & end_ok, lambda: shape, lambda: validate(data))


def check(data: tf.Tensor) -> tf.Tensor:
    """Check image bytes cheaply; decode them (`validate`) only when the cheap check is in doubt.

    Cheap: the header's size is positive (`header_shape`: for a JPEG, libjpeg parses every marker
    up to the first scan) and the end of the file is complete (`structure_ok`, which says what
    that does and does not catch); then the header's size is returned without decoding a pixel.
    Otherwise the full decode decides: it raises InvalidArgumentError for a truncated or corrupt
    file and returns the size of one that decodes after all (e.g. bytes after a JPEG's EOI).

    A JPEG ending exactly in FF D9, the common case, takes a shortcut with the same outcome in
    a handful of ops: this runs once per image in build-records' tf.data pass.

    Args:
      data: tf.string scalar.
    Returns:
      tf.int64 [2], (height, width).
    """
    length = tf.strings.length(data)
    plain_jpeg = (tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
                  & tf.equal(tf.strings.substr(data, tf.maximum(length - 2, 0), 2), b"\xff\xd9"))
    return tf.cond(plain_jpeg, lambda: _jpeg_shape(data), lambda: _check_general(data))


def open_error(e: OSError) -> str:
    """The reason text of a file that cannot be opened or read: "missing", "not a file", "unreadable (...)".

    One wording for every engine: caption-dir's local walk and the Beam engine's file systems
    both raise OSError subclasses.
    """
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, IsADirectoryError):
        return "not a file"
    return f"unreadable ({e.strerror or e})"


def head_reason(head: bytes) -> str | None:
    """Why a file whose first bytes are `head` is certainly not an image we read ("empty",
    "not an image"), or None if it may be one."""
    if not head:
        return "empty"
    return None if sniff_format(head) else "not an image"


def first_look(path: Path) -> tuple[str | None, str | None, int]:
    """What a file's first bytes tell: why it is certainly not a usable image, its format, its size.

    Returns:
      (reason, format, size): reason is "missing", "empty", "not an image" and the like, or None
      if the file may be fine (only `check` or `validate` can tell); format as `sniff_format`;
      size in bytes (0 if unreadable).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return open_error(e), None, 0
    try:
        size, head = os.fstat(fd).st_size, os.read(fd, 16)
    except OSError as e:
        return open_error(e), None, 0
    finally:
        os.close(fd)
    reason = head_reason(head)
    return reason, (None if reason else sniff_format(head)), (size if head else 0)


def quick_check(path: Path) -> str | None:
    """Why `path` is certainly not a usable image (missing, empty, unknown format), from its first bytes only.

    None means it may be fine; only a full decode (`validate`) can tell.
    """
    return first_look(path)[0]


def diagnose(path: Path) -> str:
    """Why the image file at `path` cannot be used: a short reason for manifests and error rows."""
    reason = quick_check(path)
    if reason:
        return reason
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return open_error(e)
    return diagnose_data(data)


def diagnose_data(data: bytes) -> str:
    """Why image bytes cannot be used ("empty", "not an image", "truncated or corrupt (...)"), the
    same text `diagnose` gives for a file holding them."""
    reason = head_reason(data[:16])
    if reason:
        return reason
    try:
        validate(tf.constant(data))
    except tf.errors.OpError as e:
        # Eager errors start with "{{function_node __wrapped__...}}": noise for a reader.
        message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message).strip()
        message = message.splitlines()[-1] if message else "decode failed"
        return f"truncated or corrupt ({message[:120]})"
    return "unreadable"
