"""The CT noise the VQ-GAN's decoder does not reproduce, measured on the training set and put back
into generated volumes.

A decoder that reconstructs a volume from a compressed latent keeps its anatomy but averages away
its quantum noise: the noise is independent from voxel to voxel along Z and carries no
information the latent could hold. Generated volumes come out too smooth from slice to slice
(adjacent-slice SSIM 0.94-0.96 against 0.77-0.83 for the real phantoms they learned from), and a
segmenter trained on them sees a texture that real scans never have.

So ``train-ldm`` measures that noise on the residual ``real - reconstruction`` of every training
volume, and ``sample`` adds noise of the same level and correlation to each generated volume.
The model is the usual one for CT noise in a small region: Gaussian, stationary, spatially
correlated like white noise blurred by a Gaussian kernel of ``sigma`` voxels per axis.

How it is measured (:func:`estimate_noise`): the residual also holds the decoder's errors at
edges, so only *flat* voxels are used (the lowest quarter of the reconstruction's gradient
magnitude inside the body, away from the clipped window ends), and the residual's local 5-voxel
mean (a smooth reconstruction bias, not noise) is taken off first. The standard deviation there
is the noise level; the lag-1 autocorrelation along each axis gives the kernel width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from bladdergen.data.intensity import unit_to_hu

if TYPE_CHECKING:
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.diffusion.latents import LatentAutoencoder

FLAT_QUANTILE = 0.25  # share of the body's voxels, least gradient first, where noise is measured
DETREND_VOXELS = 5  # width of the local mean taken off the residual (reconstruction bias)
GRADIENT_SIGMA = 1.0  # voxels, Gaussian derivative scale of the reconstruction's gradient
WINDOW_MARGIN = 0.1  # share of the HU window at each end treated as clipped (bone, air)
BODY_EROSION = 2  # voxels taken off the body's edge before measuring
MAX_SIGMA = 5.0  # voxels, widest correlation kernel the estimate may return


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """Stationary Gaussian noise: white noise blurred by a Gaussian of ``sigma`` voxels per axis
    (X, Y, Z), scaled to a standard deviation of ``sd_hu``; ``voxels`` is how many residual voxels
    measured it."""

    sd_hu: float
    sigma: tuple[float, float, float]
    voxels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"sd_hu": self.sd_hu, "sigma_voxels": list(self.sigma), "voxels": self.voxels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseModel:
        sigma = tuple(float(s) for s in data["sigma_voxels"])
        if len(sigma) != 3 or min(sigma) < 0 or float(data["sd_hu"]) < 0:
            raise ValueError(f"noise model needs sd_hu >= 0 and 3 sigmas >= 0, got {data}")
        return cls(float(data["sd_hu"]), sigma, int(data.get("voxels", 0)))  # type: ignore[arg-type]


def _kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel ``gaussian_filter1d`` applies for ``sigma`` (its impulse response)."""
    if sigma <= 0:
        return np.ones(1)
    radius = int(4.0 * sigma + 0.5)  # scipy's default truncation at 4 sigma
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    return ndimage.gaussian_filter1d(impulse, sigma, mode="constant")


def _autocorrelation(sigma: float, length: int) -> np.ndarray:
    """Autocovariance at lags -length..length of unit white noise blurred by the kernel."""
    k = _kernel(sigma)
    full = np.correlate(k, k, mode="full")  # lags -(len(k)-1)..len(k)-1
    out = np.zeros(2 * length + 1)
    half = min(len(k) - 1, length)
    out[length - half : length + half + 1] = full[len(k) - 1 - half : len(k) + half]
    return out


def detrended_statistics(sigma: tuple[float, float, float]) -> tuple[float, np.ndarray]:
    """What :func:`estimate_noise` measures on blurred white noise once its local
    ``DETREND_VOXELS`` mean is taken off: (its variance as a share of the noise's own, its lag-1
    correlations along X, Y and Z).

    Exact for a stationary field: with ``y = x - U x`` (U the separable box mean) the
    autocovariance of ``y`` is ``C - 2 U*C + U*U*C``, and each term is a product of 1-D
    autocovariances, because the blur kernel and the box are both separable."""
    length = int(4.0 * MAX_SIGMA + 0.5) * 2 + 2 * DETREND_VOXELS
    box = np.full(DETREND_VOXELS, 1.0 / DETREND_VOXELS)
    terms = []  # per term (C, U*C, U*U*C): per axis, the 1-D sequence
    for times in range(3):
        axes = []
        for s in sigma:
            c = _autocorrelation(s, length)
            for _ in range(times):
                c = np.convolve(c, box, mode="same")
            axes.append(c)
        terms.append(axes)
    weights = (1.0, -2.0, 1.0)

    def covariance(lags: tuple[int, int, int]) -> float:
        return sum(
            w * np.prod([axes[a][length + lags[a]] for a in range(3)])
            for w, axes in zip(weights, terms, strict=True)
        )

    variance = covariance((0, 0, 0))
    undetrended = np.prod([axes[length] for axes in terms[0]])
    correlations = [covariance(tuple(int(a == b) for b in range(3))) / variance for a in range(3)]
    return float(variance / undetrended), np.array(correlations)


def sigma_for_correlations(rho: np.ndarray) -> tuple[float, float, float]:
    """The kernel widths whose detrended blurred noise has the lag-1 correlations ``rho`` along
    X, Y, Z (see :func:`detrended_statistics`): one axis at a time by bisection (a wider kernel
    correlates more), repeated until the three settle. Each in [0, ``MAX_SIGMA``]."""
    sigma = [0.0, 0.0, 0.0]
    for _ in range(8):
        for axis in range(3):
            low, high = 0.0, MAX_SIGMA
            for _ in range(30):
                middle = (low + high) / 2
                sigma[axis] = middle
                if detrended_statistics(tuple(sigma))[1][axis] < rho[axis]:
                    low = middle
                else:
                    high = middle
            sigma[axis] = (low + high) / 2
    return tuple(sigma)  # type: ignore[return-value]


def _measurable(real_hu: np.ndarray, recon_hu: np.ndarray, window: tuple[float, float]):
    """(residual with its local mean taken off, mask of the flat body voxels to measure it on)."""
    low, high = window
    margin = WINDOW_MARGIN * (high - low)
    inside = (real_hu > low + margin) & (real_hu < high - margin)
    body = ndimage.binary_erosion(inside, iterations=BODY_EROSION)
    residual = (real_hu - recon_hu).astype(np.float64)
    residual -= ndimage.uniform_filter(residual, DETREND_VOXELS, mode="nearest")
    if not body.any():
        return residual, body
    gradient = ndimage.gaussian_gradient_magnitude(recon_hu.astype(np.float64), GRADIENT_SIGMA)
    flat = body & (gradient <= np.quantile(gradient[body], FLAT_QUANTILE))
    return residual, flat


def estimate_noise(
    volumes: Iterable[tuple[np.ndarray, np.ndarray]], window: tuple[float, float]
) -> NoiseModel:
    """The noise model of ``volumes``: pairs of (real, reconstruction) HU arrays (X, Y, Z) on the
    same grid, clipped to ``window``. ValueError when no voxel is flat enough to measure."""
    sums = np.zeros(3)  # per axis: sum of neighbour products, and the two sums of squares
    squares_a, squares_b = np.zeros(3), np.zeros(3)
    count, total, total_squares = 0, 0.0, 0.0  # of the flat voxels' residuals
    for real_hu, recon_hu in volumes:
        residual, flat = _measurable(real_hu, recon_hu, window)
        values = residual[flat]
        count += values.size
        total += float(values.sum())
        total_squares += float(np.dot(values, values))
        for axis in range(3):
            n = residual.shape[axis]
            if n < 2:
                continue
            a = np.take(residual, range(n - 1), axis=axis)
            b = np.take(residual, range(1, n), axis=axis)
            both = np.take(flat, range(n - 1), axis=axis) & np.take(flat, range(1, n), axis=axis)
            sums[axis] += float(np.dot(a[both], b[both]))
            squares_a[axis] += float(np.dot(a[both], a[both]))
            squares_b[axis] += float(np.dot(b[both], b[both]))
    if count < 100:
        raise ValueError(f"only {count} flat body voxels to measure the noise on; expected >= 100")
    norms = np.sqrt(squares_a * squares_b)
    rho = np.divide(sums, norms, out=np.zeros(3), where=norms > 0)
    sigma = sigma_for_correlations(rho)
    # the local mean taken off removed some of the noise's variance too: put it back
    kept, _ = detrended_statistics(sigma)
    variance = max(total_squares / count - (total / count) ** 2, 0.0)
    sd = float(np.sqrt(variance / kept))
    return NoiseModel(round(sd, 4), tuple(round(s, 4) for s in sigma), count)  # type: ignore[arg-type]


def noise_field(
    shape: tuple[int, int, int], model: NoiseModel, rng: np.random.Generator
) -> np.ndarray:
    """A float32 field of ``shape`` drawn from ``model``: blurred white noise rescaled by the
    kernel's exact gain, so its standard deviation is ``model.sd_hu``."""
    field = rng.standard_normal(shape, dtype=np.float32)  # float32: half the time at 512²
    if max(model.sigma) > 0:
        # periodic edges: every voxel sees a full kernel, so the field is stationary
        field = ndimage.gaussian_filter(field, model.sigma, mode="grid-wrap")
    gain = np.prod([np.linalg.norm(_kernel(s)) for s in model.sigma])
    return field * np.float32(model.sd_hu / gain)


def add_noise(
    hu: np.ndarray, model: NoiseModel, window: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """``hu`` (X, Y, Z) with noise from ``model`` added, clipped to ``window`` as the training
    volumes are. Voxels within one noise standard deviation of a window end are left as they are:
    in a real scan they are air or bone far outside the window, clipped after the noise."""
    low, high = window
    noise = noise_field(hu.shape, model, rng)
    inside = (hu > low + model.sd_hu) & (hu < high - model.sd_hu)
    noisy = np.where(inside, hu + noise, hu)
    return np.clip(noisy, low, high).astype(np.float32)


@torch.no_grad()
def decoder_noise(
    vqgan: LatentAutoencoder, dataset: PreprocessedSet, latents: torch.Tensor, device: torch.device
) -> NoiseModel:
    """The noise model of what ``vqgan`` (eval mode) leaves out of the set's volumes: each case's
    pre-quantisation latent (``latents``, (N, D, x, y, z) in case order, as ``train-ldm`` cached
    them) snapped to its nearest codes and decoded, as ``sample`` decodes a generated latent."""

    def pairs():
        window = dataset.window
        for index, case in enumerate(dataset.cases):
            codes, _ = vqgan.quantize(latents[index : index + 1].to(device))
            recon = vqgan.decode(codes).float()[0, 0].cpu().numpy()
            yield unit_to_hu(dataset.load_image(case), window), unit_to_hu(recon, window)

    return estimate_noise(pairs(), tuple(dataset.window))
