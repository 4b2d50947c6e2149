"""Reading and writing CT volumes with their geometry: NIfTI, other SimpleITK formats, DICOM series.

Every volume is held as a :class:`Volume`: a numpy array in (X, Y, Z) voxel order (Z = the third
index axis, the axial slice axis for axial scans) and a 4x4 ``affine`` that maps voxel indices to
world coordinates in millimetres, RAS+ (nibabel's convention: +x right, +y anterior, +z superior).
The affine maps the *centre* of voxel (i, j, k) to the world; voxel corners sit at half indices.

NIfTI is read and written with nibabel (its affine is already RAS). Other formats and DICOM series
are read with SimpleITK, whose world is LPS: the affine is flipped on x and y to reach RAS.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from bladdergen.errors import InputError
from bladdergen.fileio import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Single-file formats SimpleITK reads that carry 3D geometry.
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

MAX_VOXELS_ENV = "BLADDERGEN_MAX_VOXELS"
# 2**30 voxels (4 GiB as float32): a 512 x 512 x 4096 scan. Larger claims are refused before any
# memory is allocated; raise it with BLADDERGEN_MAX_VOXELS for bigger volumes.
DEFAULT_MAX_VOXELS = 2**30
# deflate cannot expand data by more than ~1032:1, so a .nii.gz of N bytes holds < 1032 N bytes.
_GZIP_MAX_RATIO = 1032


@dataclasses.dataclass
class Volume:
    """One 3D volume and its geometry.

    ``array``: shape (X, Y, Z); float32 HU for images (labels are read the same way, as float32
    holding their integer values). ``affine``: 4x4 float64, voxel index -> world mm (RAS+).
    ``source``: the file or DICOM folder it came from.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array's (X, Y, Z) index axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> str:
        """Orientation of the index axes, e.g. ``'RAS'`` or ``'LPS'`` (nibabel's aff2axcodes)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))


def volume_suffix(path: Path) -> str | None:
    """The recognised volume suffix of ``path`` (``'.nii.gz'``, ``'.mha'``, ...) or None."""
    name = path.name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def strip_volume_suffix(path: Path) -> str:
    """The file name without its volume suffix (``case_01.nii.gz`` -> ``case_01``)."""
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def is_dicom_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding at least one DICOM series SimpleITK can find."""
    if not Path(path).is_dir():
        return False
    import SimpleITK as sitk

    # ITK warns on stderr for every folder without a series; here "no series" is an answer.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_volume(path: Path) -> Volume:
    """Read a 3D volume: NIfTI (.nii/.nii.gz), .mha/.mhd/.nrrd, or a folder holding one DICOM series.

    Returns a :class:`Volume` with a float32 (X, Y, Z) array (HU for CT; NIfTI scaling applied)
    and its RAS affine. Raises :class:`InputError` naming the file for a missing, unreadable or
    truncated file, a folder without exactly one DICOM series, a volume that is not 3D (2D, or 4D
    with more than one frame), or NaN/inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif volume_suffix(path) in NIFTI_SUFFIXES:
        array, affine = _read_nifti(path)
    else:
        array, affine = _read_with_sitk(path)
    array = _as_3d(array, path)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{path}: {bad} voxels are NaN or infinite, expected finite values")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: invalid voxel-to-world matrix, expected a non-singular affine")
    return Volume(array=array, affine=np.asarray(affine, dtype=np.float64), source=path)


def max_voxels() -> int:
    """The largest volume (in voxels) a reader accepts: ``BLADDERGEN_MAX_VOXELS`` or 2**30."""
    text = os.environ.get(MAX_VOXELS_ENV)
    if text is None:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"{MAX_VOXELS_ENV}: got {text!r}, expected a positive whole number")
    return value


def _check_voxel_count(path: Path, shape: tuple[int, ...]) -> None:
    voxels = math.prod(shape)
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            f"{path}: header claims shape {'x'.join(map(str, shape))} = {voxels} voxels, "
            f"expected at most {limit} ({MAX_VOXELS_ENV})"
        )


def open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file's header without reading voxels; the one NIfTI reader of the toolkit.

    The header's claimed size is checked before anything is allocated: more voxels than
    :func:`max_voxels`, or more voxel bytes than the file can hold (uncompressed: its size;
    ``.nii.gz``: the most deflate can expand it), is an InputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for garbage headers
        raise InputError(f"{path}: unreadable NIfTI ({_first_line(error)})") from None
    shape = tuple(int(n) for n in image.shape)
    voxels = math.prod(shape)
    _check_voxel_count(path, shape)
    header = image.header
    data_bytes = voxels * int(header.get_data_dtype().itemsize)
    offset = int(header.get("vox_offset", 0)) if hasattr(header, "get") else 0
    file_bytes = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    room = file_bytes * _GZIP_MAX_RATIO if compressed else file_bytes - offset
    if data_bytes > room:
        raise InputError(
            f"{path}: header claims shape {'x'.join(map(str, shape))} ({data_bytes} bytes of "
            f"voxels) but the file has {file_bytes} bytes, expected a complete NIfTI file"
        )
    return image


def nifti_array(image: nib.Nifti1Image, path: Path, dtype: np.dtype | None = None) -> np.ndarray:
    """The voxels of an image from :func:`open_nifti`, scale factors applied.

    ``dtype``: a float dtype to read as (``get_fdata``), or None for the stored type (labels).
    Trailing singleton axes beyond the third are dropped. Truncated data is an InputError.
    """
    try:
        if dtype is None:
            array = np.asanyarray(image.dataobj)
        else:
            array = np.asarray(image.get_fdata(dtype=dtype))
    except (OSError, EOFError, ValueError, zlib.error, MemoryError) as error:
        raise InputError(
            f"{path}: truncated or corrupt NIfTI data ({_first_line(error)}), expected "
            f"{'x'.join(str(n) for n in image.shape)} voxels"
        ) from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = open_nifti(path)
    array = nifti_array(image, path, np.float32)
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_with_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()  # the header only: refuse an impossible size before reading
        _check_voxel_count(path, tuple(int(n) for n in info.GetSize()))
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: unreadable image ({_first_line(error)})") from None
    return _sitk_to_array_affine(image, path)


def _read_dicom_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{path}: folder holds no DICOM series, expected one axial CT series")
    if len(series) > 1:
        raise InputError(
            f"{path}: folder holds {len(series)} DICOM series, expected exactly one per folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: unreadable DICOM series ({_first_line(error)})") from None
    return _sitk_to_array_affine(image, path)


def _sitk_to_array_affine(image: object, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> ((X, Y, Z) float32 array, RAS affine)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: image has vector pixels, expected one scalar value per voxel")
    dimension = image.GetDimension()
    # SimpleITK's numpy view is (Z, Y, X): reverse the axes to index as (X, Y, Z).
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False).transpose()
    if dimension != 3:
        return array, np.eye(4)  # rejected by _as_3d with the right message
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing  # column j = direction of index axis j, scaled
    affine_lps[:3, 3] = origin
    return np.ascontiguousarray(array), _LPS_TO_RAS @ affine_lps


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes beyond the third; reject 2D and true 4D volumes."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(
            f"{path}: volume has shape {tuple(array.shape)} ({array.ndim}D), expected a 3D volume"
        )
    if min(array.shape) < 1:
        raise InputError(f"{path}: volume has shape {tuple(array.shape)}, expected no empty axis")
    if array.shape[2] == 1 and max(array.shape[:2]) > 1:
        raise InputError(
            f"{path}: volume has shape {tuple(array.shape)} (a single 2D slice), "
            "expected a 3D volume with several axial slices"
        )
    return array.astype(np.float32, copy=False)


def geometry_difference(
    affine: np.ndarray, expected: np.ndarray, tolerance_mm: float
) -> str | None:
    """What differs between two voxel-to-world affines, in words for an error message, or None.

    Spacing, then direction, then origin are compared; the first that differs is named with
    both values (``origin (35, 30, -50) mm, expected (30, 30, -50) mm``).
    """
    affine, expected = np.asarray(affine, float), np.asarray(expected, float)
    spacing, wanted = (
        np.linalg.norm(affine[:3, :3], axis=0),
        np.linalg.norm(expected[:3, :3], axis=0),
    )
    if np.abs(spacing - wanted).max() > max(tolerance_mm, 1e-4 * wanted.max()):
        return f"spacing {_mm(spacing)} mm, expected {_mm(wanted)} mm"
    if np.abs(affine[:3, :3] / spacing - expected[:3, :3] / wanted).max() > 1e-4:
        codes = "".join(nib.orientations.aff2axcodes(affine))
        wanted_codes = "".join(nib.orientations.aff2axcodes(expected))
        return f"direction {codes}, expected {wanted_codes} (or an oblique difference)"
    if np.abs(affine[:3, 3] - expected[:3, 3]).max() > tolerance_mm:
        return f"origin {_mm(affine[:3, 3])} mm, expected {_mm(expected[:3, 3])} mm"
    return None


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray,
    dtype: np.dtype | str = np.float32,
    slope: float | None = None,
) -> Path:
    """Write ``array`` (X, Y, Z) as NIfTI at ``path`` atomically, cast to ``dtype``.

    ``affine``: 4x4 voxel -> world (RAS mm); it is stored as both sform and qform with the
    "scanner" code, and the units as mm, so viewers (3D Slicer, ITK-SNAP) place the volume
    correctly. Integer dtypes are rounded, not truncated. ``slope``: store ``array / slope`` and
    the NIfTI scale factor ``slope`` (readers get ``array`` back, quantised to ``slope`` steps).
    Returns ``path``.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    data = np.asarray(array)
    if slope is not None:
        data = data / np.float32(slope)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    data = np.ascontiguousarray(data.astype(dtype, copy=False))
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(dtype)
    image.header.set_sform(affine, code="scanner")
    image.header.set_qform(affine, code="scanner")
    image.header.set_xyzt_units(xyz="mm")
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
