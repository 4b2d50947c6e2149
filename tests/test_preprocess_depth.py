"""The depth policy (SPEC §1.1) with hand-derived slice indices."""

from __future__ import annotations

import numpy as np

from bladdergen.data.depth import DepthPlan, apply_depth, invert_depth, paper_removed_slices


def _numbered(n_slices: int) -> np.ndarray:
    """A (2, 2, N) volume whose slice k holds the value k."""
    return np.broadcast_to(np.arange(n_slices, dtype=np.float32), (2, 2, n_slices)).copy()


def test_paper_policy_pads_20_slices_by_repeating_the_last_slice():
    plan = DepthPlan.make(20, 24, "paper")
    out = apply_depth(_numbered(20), plan, nearest=False)
    assert out[0, 0].tolist() == list(range(20)) + [19, 19, 19, 19]
    assert list(plan.padded) == [20, 21, 22, 23]
    assert list(plan.removed) == []


def test_paper_policy_keeps_24_slices_unchanged():
    plan = DepthPlan.make(24, 24, "paper")
    out = apply_depth(_numbered(24), plan, nearest=False)
    assert out[0, 0].tolist() == list(range(24))
    assert plan.removed == () and plan.padded == ()


def test_paper_policy_removes_the_middle_slice_of_25():
    # E = 1, c = 12, s = 25: remove round(12) = 12.
    assert paper_removed_slices(25, 24) == [12]
    out = apply_depth(_numbered(25), DepthPlan.make(25, 24, "paper"), nearest=False)
    assert out[0, 0].tolist() == list(range(12)) + list(range(13, 25))


def test_paper_policy_removes_evenly_spaced_slices_around_the_middle_of_30():
    # E = 6, c = 14.5, s = 5: 14.5 + (j - 2.5) * 5 = 2, 7, 12, 17, 22, 27.
    assert paper_removed_slices(30, 24) == [2, 7, 12, 17, 22, 27]


def test_paper_policy_removes_every_odd_slice_of_47():
    # E = 23, c = 23, s = 47/23: 23 + (j - 11) * 47/23 = (2j + 1) + (2j + 1)/46 - 0.5 -> rounds
    # half up to 2j + 1 for every j in 0..22, so the odd slices 1..45 go and the 24 even stay.
    assert paper_removed_slices(47, 24) == list(range(1, 46, 2))
    out = apply_depth(_numbered(47), DepthPlan.make(47, 24, "paper"), nearest=False)
    assert out[0, 0].tolist() == list(range(0, 47, 2))


def test_paper_rule_matches_round_half_up_of_the_spec_formula():
    from fractions import Fraction

    for n in range(25, 80):
        excess = n - 24
        centre, step = Fraction(n - 1, 2), Fraction(n, excess)
        expected = [
            int((centre + (j - Fraction(excess - 1, 2)) * step + Fraction(1, 2)) // 1)
            for j in range(excess)
        ]
        assert paper_removed_slices(n, 24) == expected, n


def test_image_and_label_get_the_same_slices():
    plan = DepthPlan.make(30, 24, "paper")
    image = apply_depth(_numbered(30), plan, nearest=False)
    label = apply_depth(_numbered(30).astype(np.uint8), plan, nearest=True)
    assert image[0, 0].astype(int).tolist() == label[0, 0].tolist()


def test_crop_policy_keeps_the_central_slices():
    plan = DepthPlan.make(30, 24, "crop")
    out = apply_depth(_numbered(30), plan, nearest=False)
    assert out[0, 0].tolist() == list(range(3, 27))


def test_resample_policy_interpolates_onto_the_same_extent():
    # Output slice k sits at input position (k + 0.5) * 30/24 - 0.5 = 1.25 k + 0.125.
    out = apply_depth(_numbered(30), DepthPlan.make(30, 24, "resample"), nearest=False)
    np.testing.assert_allclose(out[0, 0], 1.25 * np.arange(24) + 0.125, atol=1e-5)


def test_invert_depth_fills_a_removed_slice_from_its_lower_neighbour():
    plan = DepthPlan.make(25, 24, "paper")
    restored = invert_depth(apply_depth(_numbered(25), plan, nearest=True), plan)
    assert restored[0, 0].tolist() == list(range(12)) + [11] + list(range(13, 25))


def test_invert_depth_drops_padded_slices():
    plan = DepthPlan.make(20, 24, "paper")
    restored = invert_depth(apply_depth(_numbered(20), plan, nearest=True), plan)
    assert restored[0, 0].tolist() == list(range(20))


def test_invert_crop_leaves_unseen_slices_as_background():
    plan = DepthPlan.make(30, 24, "crop")
    restored = invert_depth(apply_depth(_numbered(30) + 1, plan, nearest=True), plan)
    assert restored[0, 0].tolist() == [0, 0, 0] + list(range(4, 28)) + [0, 0, 0]


def test_depth_plan_round_trips_through_its_record():
    plan = DepthPlan.make(47, 24, "paper")
    assert DepthPlan.from_record(plan.to_record()) == plan
