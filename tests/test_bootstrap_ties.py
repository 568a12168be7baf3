"""The run-level bootstrap does not let float noise break BCa's ties (analysis.correlate.TIE_DECIMALS)."""
import numpy as np

from analysis.correlate import run_bootstrap


def _mean_with_noise(sign: float):
    x = np.array([0.11, 0.27, 0.35, 0.42, 0.58])

    def statistic(idx, axis=-1):
        # a resample that draws every run once gives the mean itself; the noise (far below any real difference,
        # as a sum in another order would give) depends on the order of the draws
        return (x[idx].mean(axis=axis) + sign * 1e-15 * (idx[..., 0] - 2))[None]
    return statistic


def test_float_noise_does_not_move_the_interval():
    # with 5 runs about 4% of the resamples are permutations of all five: exact ties with the statistic, once
    # rounded; unrounded, the sign of the noise would decide how BCa counts them
    lo_a, hi_a = run_bootstrap(_mean_with_noise(+1.0), 5, 2000, seed=0, n_stats=1)
    lo_b, hi_b = run_bootstrap(_mean_with_noise(-1.0), 5, 2000, seed=0, n_stats=1)
    assert np.isfinite(lo_a).all() and np.isfinite(hi_a).all()
    np.testing.assert_array_equal(lo_a, lo_b)
    np.testing.assert_array_equal(hi_a, hi_b)
    assert lo_a[0] < 0.346 < hi_a[0]  # the mean of the five
