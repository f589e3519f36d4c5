import numpy as np
import pytest

from stm_live.plans import PlanError, parse_plan


@pytest.mark.parametrize("text", ["full", "lines:4", "pixels:0.25", "pixels:0.1:7", "sr:4", "partial:32"])
def test_round_trip(text):
    assert str(parse_plan(text)) == text


def test_lines_measures_every_kth_row():
    mask = parse_plan("lines:4").mask(16, 8)
    assert np.flatnonzero(mask.any(axis=1)).tolist() == [0, 4, 8, 12]
    assert mask[mask.any(axis=1)].all()


def test_sr_is_a_coarse_grid():
    mask = parse_plan("sr:4").mask(16, 16)
    assert mask.sum() == 16
    assert np.array_equal(np.argwhere(mask)[:, 0] % 4, np.zeros(16))
    assert np.array_equal(np.argwhere(mask)[:, 1] % 4, np.zeros(16))


def test_pixels_fraction_is_seeded_and_exact():
    a = parse_plan("pixels:0.25:3").mask(64, 64)
    assert a.sum() == 1024
    assert np.array_equal(a, parse_plan("pixels:0.25:3").mask(64, 64))
    assert not np.array_equal(a, parse_plan("pixels:0.25:4").mask(64, 64))


def test_partial_follows_acquisition_order():
    plan = parse_plan("partial:3")
    assert np.flatnonzero(plan.mask(8, 4, "down").any(axis=1)).tolist() == [0, 1, 2]
    assert np.flatnonzero(plan.mask(8, 4, "up").any(axis=1)).tolist() == [5, 6, 7]
    assert plan.row_order(8, 4, "up").tolist() == [7, 6, 5]


@pytest.mark.parametrize("text", ["", "lines", "lines:0", "lines:x", "pixels:0", "pixels:1.5", "sr:-2",
                                  "partial:0", "full:2", "zigzag:3", "pixels:0.5:-1"])
def test_bad_plans_are_refused(text):
    with pytest.raises(PlanError):
        parse_plan(text)
