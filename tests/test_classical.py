import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from stm_live.engines import create_engine, reconstruct_exact
from stm_live.engines.base import EngineError, Reconstruction, Reconstructor
from stm_live.engines.classical import spline_rows
from stm_live.metrics import quality
from stm_live.plans import parse_plan
from stm_live.sim.frames import random_spec, simulate_frame


@pytest.fixture(scope="module")
def surface():
    rng = np.random.default_rng(3)
    spec = random_spec(rng, 128, surface="si111_7x7", scenario="good", frame_nm=8.0, bias_v=-2.0, steps=False)
    return simulate_frame(spec, rng).measurement.z[0]


@pytest.mark.parametrize("plan", ["full", "lines:2", "lines:4", "lines:8", "sr:2", "sr:4", "pixels:0.3", "partial:40"])
def test_measured_pixels_are_returned_exactly(surface, plan):
    mask = parse_plan(plan).mask(*surface.shape)
    measured = np.where(mask, surface, np.nan).astype(np.float32)
    out = reconstruct_exact(create_engine("classical"), measured[None], mask[None]).images[0]
    assert out.dtype == np.float32
    assert np.array_equal(out[mask], surface[mask])


@pytest.mark.parametrize("plan, min_psnr", [("lines:2", 30.0), ("lines:4", 22.0), ("sr:2", 25.0), ("pixels:0.5", 25.0)])
def test_reconstruction_is_close_to_the_full_scan(surface, plan, min_psnr):
    mask = parse_plan(plan).mask(*surface.shape)
    out = reconstruct_exact(create_engine("classical"), np.where(mask, surface, 0)[None], mask[None]).images[0]
    assert quality(surface.astype(float), out.astype(float)).psnr > min_psnr


def test_more_lines_reconstruct_better(surface):
    psnr = []
    for k in (2, 4, 8):
        mask = parse_plan(f"lines:{k}").mask(*surface.shape)
        out = reconstruct_exact(create_engine("classical"), surface[None], mask[None]).images[0]
        psnr.append(quality(surface.astype(float), out.astype(float)).psnr)
    assert psnr[0] > psnr[1] > psnr[2]


def test_unscanned_region_is_not_invented(surface):
    mask = parse_plan("lines:4").mask(*surface.shape)
    mask[41:] = False
    out = reconstruct_exact(create_engine("classical"), surface[None], mask[None]).images[0]
    assert np.isfinite(out[:45]).all()
    assert np.isnan(out[45:]).all()


def test_lost_lines_are_bridged(surface):
    mask = parse_plan("lines:4").mask(*surface.shape)
    mask[[20, 24, 60]] = False
    out = reconstruct_exact(create_engine("classical"), surface[None], mask[None]).images[0]
    assert np.isfinite(out).all()


def test_engine_cannot_alter_measurements_or_shape():
    class Liar(Reconstructor):
        name = "liar"

        def reconstruct(self, measured, mask):
            return Reconstruction(np.zeros_like(measured) + 42.0)

    class Wrong(Reconstructor):
        name = "wrong"

        def reconstruct(self, measured, mask):
            return Reconstruction(np.zeros((1, 2, 2)))

    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    mask = np.zeros((1, 4, 4), bool)
    mask[0, ::2] = True
    out = reconstruct_exact(Liar(), img, mask).images
    assert np.array_equal(out[mask], img[mask]) and (out[~mask] == 42).all()
    with pytest.raises(EngineError):
        reconstruct_exact(Wrong(), img, mask)


def test_unknown_engine_names_the_choices():
    with pytest.raises(EngineError, match="classical"):
        create_engine("magic")
    assert create_engine("none") is None


@pytest.mark.parametrize("method", ["linear", "cubic", "biharmonic"])
@pytest.mark.parametrize("plan", ["lines:4", "sr:2", "pixels:0.3"])
def test_every_baseline_method_fills_every_plan_keeping_measurements(surface, method, plan):
    from stm_live.engines.classical import ClassicalReconstructor

    mask = parse_plan(plan).mask(*surface.shape)
    engine = ClassicalReconstructor("auto" if method == "cubic" else method)
    out = reconstruct_exact(engine, np.where(mask, surface, np.nan)[None], mask[None]).images[0]
    assert np.isfinite(out).all() and np.array_equal(out[mask], surface[mask])
    assert quality(surface.astype(float), out.astype(float)).psnr > 18


@pytest.mark.parametrize("degree", [1, 3])
def test_row_spline_is_the_per_column_spline_of_scipy(degree):
    """The cached row-weight matrices give what a spline fitted to each column gives."""
    rng = np.random.default_rng(3)
    image = rng.normal(size=(90, 40))
    rows = np.sort(rng.choice(np.arange(5, 80), size=17, replace=False))
    at = np.clip(np.arange(90), rows[0], rows[-1])
    if degree == 3:
        expected = CubicSpline(rows, image[rows], axis=0, bc_type="not-a-knot")(at)
    else:
        expected = np.stack([np.interp(at, rows, column) for column in image[rows].T], axis=1)
    for span in [(0, 90), (2, 85)]:
        np.testing.assert_allclose(spline_rows(image, rows, degree, span), expected[span[0]:span[1]], atol=1e-12)


@pytest.mark.parametrize(("n_rows", "n_cols"), [(16, 20), (4, 5), (3, 7), (2, 9)])
def test_grid_spline_is_scipys_bivariate_interpolating_spline(n_rows, n_cols):
    """One cached matrix per axis gives FITPACK's interpolating tensor spline (degree 3, or
    points - 1 on an axis with fewer than four), edges held beyond the grid."""
    from scipy.interpolate import RectBivariateSpline

    from stm_live.engines.classical import spline_grid

    rng = np.random.default_rng(4)
    image = rng.normal(size=(100, 90))
    rows = np.sort(rng.choice(np.arange(3, 95), n_rows, replace=False))
    cols = np.sort(rng.choice(np.arange(2, 88), n_cols, replace=False))
    spline = RectBivariateSpline(rows, cols, image[np.ix_(rows, cols)], kx=min(3, n_rows - 1), ky=min(3, n_cols - 1))
    expected = spline(np.clip(np.arange(100), rows[0], rows[-1]), np.clip(np.arange(90), cols[0], cols[-1]))
    np.testing.assert_allclose(spline_grid(image, rows, cols), expected, rtol=0, atol=1e-10)
