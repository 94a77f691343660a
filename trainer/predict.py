"""Digits from files, the way the logged model takes them: uint8 (28, 28), a light digit on black.

An image (PNG, JPEG or anything else Pillow reads), of any size, drawn or photographed either way
round: the ink is what differs from the border (a transparent background: the opaque part is the
ink), the background is subtracted and the ink stretched to full contrast. A 28x28 image is taken to be
framed like MNIST already; any other size is framed as MNIST was made: the ink's bounding box scaled
to fit 20x20, placed in 28x28 with its centre of mass in the middle. An IDX file (the MNIST format,
gzipped or not) gives every image in it, as is.
"""

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
SIZE, BOX = 28, 20


class DigitFileError(ValueError):
    """A file that holds no digit we can read; the message names the file."""


def read_digits(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 (28, 28) digit) for each digit in the file: `path` for an image, `path[i]` for IDX."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DigitFileError(f"{path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            raise DigitFileError(f"{path}: a broken gzip file") from None
    if data[:4] == struct.pack(">I", IDX_IMAGES):
        return [(f"{path}[{i}]", image) for i, image in enumerate(idx_images(path, data))]
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return [(str(path), mnist_style(image, path))]
    except (UnidentifiedImageError, OSError):
        raise DigitFileError(f"{path}: neither an image nor an IDX image file") from None


def idx_images(path: Path, data: bytes) -> np.ndarray:
    n, rows, cols = struct.unpack(">III", data[4:16])
    if (rows, cols) != (SIZE, SIZE) or len(data) != 16 + n * rows * cols:
        raise DigitFileError(f"{path}: an IDX file of {n} {rows}x{cols} images in {len(data)} bytes, not 28x28")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, SIZE, SIZE)


def ink(image: Image.Image) -> np.ndarray:
    """Float (H, W) in 0-1, the digit bright on a dark background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha / 255.0
    gray = np.asarray(image.convert("L")) / 255.0
    return 1.0 - gray if np.median(border(gray)) > 0.5 else gray


def border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def mnist_style(image: Image.Image, path: Path) -> np.ndarray:
    x = ink(image)
    background = np.median(border(x))
    if x.max() - background < 0.1:
        raise DigitFileError(f"{path}: no digit found (the image is blank)")
    if x.shape == (SIZE, SIZE):
        return np.rint(x * 255).astype(np.uint8)
    x = np.clip((x - background) / (x.max() - background), 0, 1)
    rows, cols = np.nonzero(x > 0.2)
    x = x[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(x.shape)
    h, w = (max(1, round(n * scale)) for n in x.shape)
    digit = np.asarray(Image.fromarray(np.uint8(np.rint(x * 255))).resize((w, h), Image.Resampling.LANCZOS))
    weight = digit.astype(np.float64)
    cy = (weight.sum(1) * np.arange(h)).sum() / weight.sum()
    cx = (weight.sum(0) * np.arange(w)).sum() / weight.sum()
    top = min(max(round((SIZE - 1) / 2 - cy), 0), SIZE - h)
    left = min(max(round((SIZE - 1) / 2 - cx), 0), SIZE - w)
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    canvas[top : top + h, left : left + w] = digit
    return canvas
