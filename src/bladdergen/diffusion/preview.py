"""PNG previews of generated volumes: a montage of every axial slice, written without extra
dependencies (8-bit PNG via zlib); a generated label map is drawn as outlines on it (wall in
yellow, tumor in red)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from bladdergen.fileio import atomic_write_bytes

OUTLINE_COLOURS = {1: (255, 220, 0), 2: (255, 40, 40)}  # wall, tumor


def encode_png_gray(image: np.ndarray) -> bytes:
    """An 8-bit PNG file's bytes for ``image``: (H, W) greyscale or (H, W, 3) RGB, uint8."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    # every scanline starts with filter type 0 (none)
    raw = b"".join(b"\x00" + row.tobytes() for row in image)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def slice_montage(hu: np.ndarray, window: tuple[float, float], columns: int | None = None):
    """All axial slices of ``hu`` (X, Y, Z) tiled in a grid, as uint8 (rows, cols).

    HU inside ``window`` map to 0..255. Each slice is shown with anterior (+Y) up and X across,
    slices in order left to right, top to bottom; unused tiles stay black.
    """
    size_x, size_y, depth = hu.shape
    columns = columns or math.ceil(math.sqrt(depth))
    rows = math.ceil(depth / columns)
    low, high = window
    grey = np.clip((hu - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    canvas = np.zeros((rows * size_y, columns * size_x), dtype=np.uint8)
    for z in range(depth):
        r, c = divmod(z, columns)
        tile = grey[:, :, z].T[::-1]  # (Y, X) with +Y at the top
        canvas[r * size_y : (r + 1) * size_y, c * size_x : (c + 1) * size_x] = tile
    return canvas


def outline_montage(classes: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(rows, cols) class of each montage pixel on a label outline (0 elsewhere), tiled like
    :func:`slice_montage`: a pixel of class c whose 4-neighbourhood leaves class c."""
    from scipy import ndimage

    outline = np.zeros(classes.shape, dtype=np.uint8)
    for value in OUTLINE_COLOURS:
        mask = classes == value
        for z in range(classes.shape[2]):
            inner = ndimage.binary_erosion(mask[:, :, z], border_value=0)
            outline[:, :, z][mask[:, :, z] & ~inner] = value
    return slice_montage(outline.astype(np.float32), (0.0, 255.0), columns)


def write_preview(
    path: Path, hu: np.ndarray, window: tuple[float, float], classes: np.ndarray | None = None
) -> Path:
    """Write the slice montage of ``hu`` (X, Y, Z) as a PNG at ``path`` atomically, with the
    label map ``classes`` (X, Y, Z; 0/1/2) outlined on it when given."""
    grey = slice_montage(hu, window)
    if classes is None:
        atomic_write_bytes(Path(path), encode_png_gray(grey))
        return Path(path)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    # slice_montage scales 0..255 to 0..255, so outline pixels keep their class value
    outline = outline_montage(classes)
    for value, colour in OUTLINE_COLOURS.items():
        rgb[outline == value] = colour
    atomic_write_bytes(Path(path), encode_png_gray(rgb))
    return Path(path)
