"""PNG previews of generated volumes: a montage of every axial slice, written without extra
dependencies (8-bit greyscale PNG via zlib)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from bladdergen.fileio import atomic_write_bytes


def encode_png_gray(image: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG file's bytes for ``image`` (H, W) of uint8."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    # every scanline starts with filter type 0 (none)
    raw = b"".join(b"\x00" + row.tobytes() for row in image)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
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


def write_preview(path: Path, hu: np.ndarray, window: tuple[float, float]) -> Path:
    """Write the slice montage of ``hu`` (X, Y, Z) as a PNG at ``path`` atomically."""
    atomic_write_bytes(Path(path), encode_png_gray(slice_montage(hu, window)))
    return Path(path)
