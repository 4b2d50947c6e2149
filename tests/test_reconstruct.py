"""bladdergen reconstruct: outputs in HU inside --out, whatever the manifest says."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bladdergen.errors import InputError
from bladdergen.vqgan.reconstruct import reconstruct_set
from synthetic import WINDOW, make_preprocessed_set
from test_diffusion_fixtures import make_vqgan, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def vqgan(tiny_dataset, tmp_path_factory):
    return make_vqgan(tmp_path_factory.mktemp("vqgan"), tiny_dataset)


def test_reconstructions_are_written_in_hounsfield_units(vqgan, tiny_dataset, tmp_path):
    reconstruct_set(vqgan, tiny_dataset, device="cpu", out_dir=tmp_path / "out")
    hu = np.asarray(nib.load(tmp_path / "out" / "images" / "case_000.nii.gz").dataobj)
    assert hu.dtype == np.int16
    # the window maps [-1, 1] to [-200, 300] HU: values use that range, not [-1, 1]
    assert WINDOW[0] <= hu.min() and hu.max() <= WINDOW[1]
    assert hu.max() - hu.min() > 2


def test_a_case_id_that_climbs_out_writes_nothing_outside_out(vqgan, tmp_path):
    data = make_preprocessed_set(tmp_path / "data", n_cases=2, n_labeled=0)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["cases"][0]["case_id"] = "../../../ESCAPED"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest\.json: case_id '\.\./\.\./\.\./ESCAPED'"):
        reconstruct_set(vqgan, data, device="cpu", out_dir=tmp_path / "a" / "b" / "out")
    assert not list(tmp_path.rglob("ESCAPED*"))
    assert not (tmp_path / "a").exists()
