"""Slice-count normalisation: N axial slices -> the target count T (the paper uses T = 24).

Three policies, applied identically to an image and its label:

``paper`` (default, SPEC §1.1)
    N < T: pad at the end by repeating the last slice. N > T: remove E = N - T slices at evenly
    spaced positions symmetric about the middle: with c = (N - 1)/2 and s = N/E, remove
    round(c + (j - (E - 1)/2)·s), j = 0..E-1, rounding halves up. In integers this is
    floor(N·(2j + 1) / (2E)) — e.g. N=30 -> {2, 7, 12, 17, 22, 27}, N=25 -> {12}.
``crop``
    N > T: keep the central T slices, starting at (N - T) // 2. N < T: pad like ``paper``.
``resample``
    Linear interpolation of the image (nearest for labels) onto T slices covering the same extent.

A :class:`DepthPlan` is computed once per case from (N, T, policy), stored in the manifest, and
used to apply the policy (:func:`apply_depth`) and to undo it on a label (:func:`invert_depth`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

DepthPolicyName = Literal["paper", "resample", "crop"]


def paper_removed_slices(n_slices: int, target: int) -> list[int]:
    """Indices the paper policy removes from ``n_slices`` to leave ``target`` (empty if N <= T)."""
    excess = n_slices - target
    if excess <= 0:
        return []
    # round-half-up of c + (j - (E-1)/2)·N/E equals floor(N(2j+1) / 2E): exact integer arithmetic.
    return [n_slices * (2 * j + 1) // (2 * excess) for j in range(excess)]


@dataclasses.dataclass(frozen=True)
class DepthPlan:
    """How one case's N slices become T slices.

    ``source``: for ``paper``/``crop``, the input slice each output slice copies (length T);
    empty for ``resample``. ``removed``: input slices dropped. ``padded``: output slices that
    repeat the last input slice. ``z_scale``: output slice spacing / input slice spacing (the
    output covers the same extent as the kept input slices, corner to corner, when slices are
    removed or resampled; padding keeps the spacing, so padded slices lie beyond the input's end).
    """

    policy: str
    n_in: int
    n_out: int
    source: tuple[int, ...]
    removed: tuple[int, ...]
    padded: tuple[int, ...]
    z_scale: float
    crop_start: int = 0

    @classmethod
    def make(cls, n_in: int, n_out: int, policy: str) -> DepthPlan:
        """The plan for ``n_in`` -> ``n_out`` slices under ``policy``."""
        if n_in < 1 or n_out < 1:
            raise ValueError(f"slice counts must be >= 1, got {n_in} -> {n_out}")
        if policy not in ("paper", "resample", "crop"):
            raise ValueError(f"unknown depth policy {policy!r}")
        if policy == "resample":
            return cls("resample", n_in, n_out, (), (), (), n_in / n_out)
        if n_in <= n_out:  # both paper and crop pad by repeating the last slice
            source = tuple(range(n_in)) + (n_in - 1,) * (n_out - n_in)
            return cls(policy, n_in, n_out, source, (), tuple(range(n_in, n_out)), 1.0)
        if policy == "paper":
            removed = paper_removed_slices(n_in, n_out)
            kept = tuple(k for k in range(n_in) if k not in set(removed))
            return cls("paper", n_in, n_out, kept, tuple(removed), (), n_in / n_out)
        start = (n_in - n_out) // 2
        kept = tuple(range(start, start + n_out))
        removed = tuple(k for k in range(n_in) if not start <= k < start + n_out)
        return cls("crop", n_in, n_out, kept, removed, (), 1.0, crop_start=start)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description (stored per case in the manifest)."""
        return {
            "policy": self.policy,
            "slices_in": self.n_in,
            "slices_out": self.n_out,
            "source_slices": list(self.source),
            "removed_slices": list(self.removed),
            "padded_slices": list(self.padded),
            "z_scale": self.z_scale,
            "crop_start": self.crop_start,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DepthPlan:
        """Inverse of :meth:`to_record`."""
        return cls(
            policy=record["policy"],
            n_in=int(record["slices_in"]),
            n_out=int(record["slices_out"]),
            source=tuple(int(k) for k in record["source_slices"]),
            removed=tuple(int(k) for k in record["removed_slices"]),
            padded=tuple(int(k) for k in record["padded_slices"]),
            z_scale=float(record["z_scale"]),
            crop_start=int(record.get("crop_start", 0)),
        )

    def z_index_map(self) -> np.ndarray:
        """4x4 matrix mapping output voxel indices to input voxel indices (for the affine).

        Removing or resampling slices spreads the T output slices over the input's extent:
        output slice k sits at input index (k + 0.5)·N/T - 0.5, so the outer slice corners keep
        their world positions. Padding and cropping keep the slice spacing.
        """
        matrix = np.eye(4)
        matrix[2, 2] = self.z_scale
        matrix[2, 3] = 0.5 * self.z_scale - 0.5 + self.crop_start
        return matrix


def apply_depth(array: np.ndarray, plan: DepthPlan, nearest: bool) -> np.ndarray:
    """Apply ``plan`` along the last axis of ``array`` (X, Y, N) -> (X, Y, T).

    ``nearest``: for labels under ``resample`` (paper/crop copy whole slices either way).
    """
    if array.shape[-1] != plan.n_in:
        raise ValueError(f"array has {array.shape[-1]} slices, plan expects {plan.n_in}")
    if plan.policy != "resample":
        return np.ascontiguousarray(array[..., list(plan.source)])
    n_in, n_out = plan.n_in, plan.n_out
    if nearest:
        index = (2 * np.arange(n_out) + 1) * n_in // (2 * n_out)
        return np.ascontiguousarray(array[..., index])
    position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    weight = (position - low).astype(np.float32)
    out = array[..., low] * (1.0 - weight) + array[..., high] * weight
    return out.astype(array.dtype, copy=False)


def invert_depth(array: np.ndarray, plan: DepthPlan) -> np.ndarray:
    """Map a label (X, Y, T) back to the input's N slices with nearest-neighbour choices.

    Removed slices (``paper``) take the nearest kept slice (the lower one on a tie); padded slices
    are dropped; slices a ``crop`` never saw are background (0); ``resample`` picks the nearest
    output slice.
    """
    if array.shape[-1] != plan.n_out:
        raise ValueError(f"array has {array.shape[-1]} slices, plan expects {plan.n_out}")
    n_in, n_out = plan.n_in, plan.n_out
    if plan.policy == "resample":
        index = (2 * np.arange(n_in) + 1) * n_out // (2 * n_in)
        return np.ascontiguousarray(array[..., index])
    source = np.array(plan.source[: n_out - len(plan.padded)])  # drop padded repeats
    if plan.policy == "crop" and plan.removed:
        out = np.zeros(array.shape[:-1] + (n_in,), dtype=array.dtype)
        out[..., source] = array[..., : len(source)]
        return out
    # For every input slice, the output slice whose source is nearest (argmin takes the first,
    # i.e. the lower source, on a tie).
    distance = np.abs(np.arange(n_in)[:, None] - source[None, :])
    index = np.argmin(distance, axis=1)
    return np.ascontiguousarray(array[..., index])
