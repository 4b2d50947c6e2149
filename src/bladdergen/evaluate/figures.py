"""PNG figures for the reports, drawn with Pillow: orthogonal-view montages and simple plots.

Views follow the (X, Y, Z) layout with canonical RAS axes: the axial view shows an X-Y slice with
anterior up, coronal an X-Z slice and sagittal a Y-Z slice with superior up; every view is scaled
to its physical aspect ratio (mm) and letterboxed into a square tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bladdergen.fileio import atomic_path

VIEW_NAMES = ("axial", "coronal", "sagittal")
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
PALETTE = {"synthetic": (221, 110, 30), "real": (40, 100, 180)}
EXTRA_COLOURS = [(60, 150, 60), (150, 60, 150), (120, 120, 120)]


def orthogonal_views(
    hu: np.ndarray, spacing: tuple[float, float, float], hu_range: tuple[float, float], tile: int
) -> list[Image.Image]:
    """Middle axial, coronal and sagittal slices of a (X, Y, Z) HU volume as grey tiles.

    ``hu_range`` (HU) maps to black..white; each view keeps its aspect in mm inside a ``tile`` x
    ``tile`` square.
    """
    low, high = hu_range
    grey = np.clip((hu - low) / (high - low), 0.0, 1.0)
    grey = (grey * 255.0).astype(np.uint8)
    x, y, z = (n // 2 for n in hu.shape)
    sx, sy, sz = spacing
    views = [
        (np.flipud(grey[:, :, z].T), hu.shape[0] * sx, hu.shape[1] * sy),
        (np.flipud(grey[:, y, :].T), hu.shape[0] * sx, hu.shape[2] * sz),
        (np.flipud(grey[x, :, :].T), hu.shape[1] * sy, hu.shape[2] * sz),
    ]
    tiles = []
    for pixels, width_mm, height_mm in views:
        scale = tile / max(width_mm, height_mm)
        size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
        image = Image.fromarray(np.ascontiguousarray(pixels), mode="L").resize(
            size, Image.Resampling.BILINEAR
        )
        canvas = Image.new("L", (tile, tile), 0)
        canvas.paste(image, ((tile - size[0]) // 2, (tile - size[1]) // 2))
        tiles.append(canvas)
    return tiles


def montage(rows: list[tuple[str, list[Image.Image]]], path: Path, tile: int) -> Path:
    """A grid: one labelled row per volume, one column per view; written atomically as PNG."""
    font = ImageFont.load_default()
    label_height, header = 14, 16
    width = tile * max(len(tiles) for _, tiles in rows)
    height = header + len(rows) * (tile + label_height)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, name in enumerate(VIEW_NAMES):
        draw.text((column * tile + 4, 2), name, fill=INK, font=font)
    for row, (label, tiles) in enumerate(rows):
        top = header + row * (tile + label_height)
        draw.text((4, top), label, fill=INK, font=font)
        for column, tile_image in enumerate(tiles):
            sheet.paste(tile_image.convert("RGB"), (column * tile, top + label_height))
    return save_png(sheet, path)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _colour(name: str, index: int) -> tuple[int, int, int]:
    return PALETTE.get(name, EXTRA_COLOURS[index % len(EXTRA_COLOURS)])


class _Axes:
    """Maps data coordinates onto a plot area and draws the frame, ticks and labels."""

    def __init__(
        self, title: str, xlabel: str, xlim, ylim, yticks: bool = True, size=(480, 300)
    ) -> None:
        self.image = Image.new("RGB", size, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.left, self.top, self.right, self.bottom = 56, 28, size[0] - 12, size[1] - 40
        self.xlim = (xlim[0], xlim[1] if xlim[1] > xlim[0] else xlim[0] + 1.0)
        self.ylim = (ylim[0], ylim[1] if ylim[1] > ylim[0] else ylim[0] + 1.0)
        draw = self.draw
        draw.rectangle((self.left, self.top, self.right, self.bottom), outline=INK)
        draw.text((self.left, 8), title, fill=INK, font=self.font)
        draw.text((self.left, size[1] - 16), xlabel, fill=INK, font=self.font)
        for fraction in (0.0, 0.5, 1.0):
            xv = self.xlim[0] + fraction * (self.xlim[1] - self.xlim[0])
            yv = self.ylim[0] + fraction * (self.ylim[1] - self.ylim[0])
            px, py = self.px(xv, self.ylim[0])
            draw.text((px - 12, self.bottom + 4), f"{xv:.3g}", fill=INK, font=self.font)
            _, py = self.px(self.xlim[0], yv)
            if yticks:
                draw.text((4, py - 6), f"{yv:.3g}", fill=INK, font=self.font)

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return (
            self.left + fx * (self.right - self.left),
            self.bottom - fy * (self.bottom - self.top),
        )

    def legend(self, names: list[str]) -> None:
        for index, name in enumerate(names):
            y = self.top + 6 + 14 * index
            self.draw.line(
                (self.right - 110, y + 6, self.right - 92, y + 6),
                fill=_colour(name, index),
                width=3,
            )
            self.draw.text((self.right - 86, y), name, fill=INK, font=self.font)


def line_plot(
    path: Path, title: str, xlabel: str, series: dict[str, tuple[np.ndarray, np.ndarray]]
) -> Path:
    """Curves (e.g. HU histograms) of several named groups on one axis; PNG written atomically."""
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    axes = _Axes(title, xlabel, (xs.min(), xs.max()), (0.0, float(ys.max()) * 1.05))
    for index, (name, (x, y)) in enumerate(series.items()):
        points = [axes.px(float(a), float(b)) for a, b in zip(x, y, strict=True)]
        if len(points) > 1:
            axes.draw.line(points, fill=_colour(name, index), width=2)
    axes.legend(list(series))
    return save_png(axes.image, path)


def strip_plot(path: Path, title: str, xlabel: str, groups: dict[str, list[float]]) -> Path:
    """One row of dots per named group along a shared value axis, with the group mean as a bar."""
    values = [v for vs in groups.values() for v in vs]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (high - low) if high > low else 0.5
    axes = _Axes(title, xlabel, (low - pad, high + pad), (0.0, len(groups) + 1.0), yticks=False)
    for index, (name, group) in enumerate(groups.items()):
        row = len(groups) - index
        colour = _colour(name, index)
        for value in group:
            x, y = axes.px(value, row)
            axes.draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=colour, width=2)
        if group:
            x, y = axes.px(float(np.mean(group)), row)
            axes.draw.line((x, y - 12, x, y + 12), fill=colour, width=3)
        _, y = axes.px(low, row)
        axes.draw.text((axes.left + 4, y - 20), name, fill=colour, font=axes.font)
    return save_png(axes.image, path)
