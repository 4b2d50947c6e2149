"""Masks derived from a class map (X, Y, Z) of 0 background, 1 wall, 2 tumor.

The label maps mark only the wall and the tumor; the urine they enclose is background in the
file. Several stages need it as a region of its own (registration's filled-bladder term, the VQ-GAN
label decoder's lumen class), so it is derived here, one way for all of them: the holes that wall
and tumor enclose in each axial slice, as the anatomy checks measure it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def filled_bladder(classes: np.ndarray) -> np.ndarray:
    """Filled bladder of a class map (X, Y, Z): wall ∪ tumor ∪ the holes they enclose in each
    axial slice, as a bool array (X, Y, Z)."""
    organ = classes > 0
    filled = np.zeros_like(organ)
    for z in range(organ.shape[2]):
        if organ[:, :, z].any():
            filled[:, :, z] = ndimage.binary_fill_holes(organ[:, :, z])
    return filled


def lumen(classes: np.ndarray) -> np.ndarray:
    """The urine-filled lumen of a class map (X, Y, Z): the filled bladder less wall and tumor."""
    return filled_bladder(classes) & (classes == 0)
