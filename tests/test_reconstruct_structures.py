"""Per-structure reconstruction errors: what segmentation needs the VQ-GAN to keep, in HU."""

from __future__ import annotations

import numpy as np
import pytest

from bladdergen.vqgan.reconstruct import _plausible, structure_errors


def _bladder():
    """A 9x9x2 slab: a one-voxel wall ring (class 1) around a 5x5 lumen holding a 2x2 tumor."""
    classes = np.zeros((9, 9, 2), np.uint8)
    classes[1:8, 1:8] = 1
    classes[2:7, 2:7] = 0  # lumen
    classes[3:5, 3:5] = 2  # tumor inside the lumen
    hu = np.full(classes.shape, -100.0)  # fat around
    hu[classes == 1] = 40.0
    hu[2:7, 2:7][classes[2:7, 2:7] == 0] = 10.0  # urine
    hu[classes == 2] = 60.0
    return hu, classes


def test_an_exact_reconstruction_has_no_error_and_keeps_all_contrast():
    hu, classes = _bladder()
    errors = structure_errors(hu, hu, classes)
    assert errors["wall_hu_error"] == 0 and errors["tumor_hu_error"] == 0
    assert errors["urine_hu_error"] == 0 and errors["tumor_urine_contrast_kept"] == 1.0


def test_errors_are_measured_inside_each_structure_only():
    hu, classes = _bladder()
    recon = hu.copy()
    recon[classes == 1] += 10.0  # only the wall is off, by 10 HU
    recon[0, 0, 0] += 500.0  # background errors do not count
    errors = structure_errors(recon, hu, classes)
    assert errors["wall_hu_error"] == pytest.approx(10.0)
    assert errors["tumor_hu_error"] == 0 and errors["urine_hu_error"] == 0


def test_a_tumor_reconstructed_at_urine_hu_keeps_no_contrast():
    hu, classes = _bladder()
    recon = hu.copy()
    recon[classes == 2] = 10.0  # the tumor washed out to urine
    errors = structure_errors(recon, hu, classes)
    assert errors["tumor_hu_error"] == pytest.approx(50.0)
    assert errors["tumor_urine_contrast_kept"] == pytest.approx(0.0)


def test_a_case_without_tumor_reports_none_for_the_tumor_terms():
    hu, classes = _bladder()
    classes[classes == 2] = 0
    errors = structure_errors(hu, hu, classes)
    assert errors["tumor_hu_error"] is None and errors["tumor_urine_contrast_kept"] is None


def test_a_closed_wall_ring_is_plausible_and_a_split_one_is_not():
    _, classes = _bladder()
    classes[classes == 2] = 0  # a tumor floating in the urine would fail the tumor checks
    anything = {}  # no thickness or volume range: only the structural checks decide
    assert _plausible(classes, (1.0, 1.0, 1.0), anything) == 1.0
    split = classes.copy()
    split[:, 4, :] = 0  # cut the ring into two halves of equal size: 50 % in the largest piece
    assert _plausible(split, (1.0, 1.0, 1.0), anything) == 0.0


def test_reconstruct_reports_structures_against_the_trilinear_baseline(tiny_dataset, tmp_path):
    from bladdergen.config import load_config
    from bladdergen.vqgan.reconstruct import reconstruct_set
    from bladdergen.vqgan.train import train_vqgan

    overrides = {"vqgan.max_steps": 2, "vqgan.disc_start": 100, "vqgan.device": "cpu"}
    overrides |= {"vqgan.n_hiddens": 4, "vqgan.n_codes": 32, "vqgan.num_groups": 4}
    train_vqgan(load_config("tiny", overrides=overrides).vqgan, tiny_dataset, tmp_path / "vq")
    result = reconstruct_set(tmp_path / "vq", tiny_dataset, device="cpu")
    for key in ("wall_hu_error", "trilinear_wall_hu_error", "label_dice_wall", "label_plausible"):
        assert result["structures"][key] is not None
    # The true labels are checked against their own ranges, so a rate below 1 would mean the
    # check itself rejects real anatomy.
    assert result["structures"]["label_plausible_truth"] == 1.0
    labeled = [c for c in result["cases"] if "wall_hu_error" in c]
    assert len(labeled) == 4  # the fixture's labeled cases


def test_a_segmenter_that_reads_every_volume_as_its_true_labels_scores_one_except_against_decoding(
    tiny_dataset, tmp_path
):
    from bladdergen.config import load_config
    from bladdergen.data.dataset import PreprocessedSet
    from bladdergen.vqgan.reconstruct import reconstruct_set
    from bladdergen.vqgan.train import train_vqgan

    dataset = PreprocessedSet.open(tiny_dataset)
    truths = {dataset.load_image(c).tobytes(): dataset.load_label(c) for c in dataset.labeled_cases}

    class Oracle:
        """Returns the true label map of the case it is shown (the input or, being called on it
        next, its reconstruction)."""

        window = dataset.window
        current = None

        def classes(self, image):
            self.current = truths.get(image.tobytes(), self.current)
            return self.current

    overrides = {"vqgan.max_steps": 2, "vqgan.disc_start": 100, "vqgan.device": "cpu"}
    overrides |= {"vqgan.n_hiddens": 4, "vqgan.n_codes": 32, "vqgan.num_groups": 4}
    train_vqgan(load_config("tiny", overrides=overrides).vqgan, tiny_dataset, tmp_path / "vq")
    result = reconstruct_set(tmp_path / "vq", tiny_dataset, device="cpu", segmenter=Oracle())
    for case in (c for c in result["cases"] if "label_dice_wall" in c):
        assert case["segmenter_dice_wall_input"] == 1.0
        assert case["segmenter_dice_wall"] == 1.0
        # against the decoded labels it scores what the label decoder scores against the truth
        assert case["segmenter_dice_wall_decoded"] == pytest.approx(case["label_dice_wall"])


def test_a_segmenter_of_another_hu_window_is_refused_naming_both_windows(tiny_dataset, tmp_path):
    from bladdergen.errors import InputError
    from bladdergen.vqgan.reconstruct import reconstruct_set

    class OtherWindow:
        window = (-1000.0, 1000.0)

    with pytest.raises(InputError, match=r"\[-1000.0, 1000.0\].*expected the same window"):
        reconstruct_set(tmp_path / "absent", tiny_dataset, segmenter=OtherWindow())
