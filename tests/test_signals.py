"""Signals and normalization: hand-computed numbers, identities and numerical regressions."""

import math

import numpy as np
import pytest

import mica_core as mc
from mica_core.normalize import bucket_zscore

from naive import zscore


def test_idr_hand_computed():
    offsets = np.array([0, 3, 5])
    d = np.array([8.0, 8.5, 6.0, 9.0, 7.0])
    r = mc.incremental_distance_reward(offsets, d, [10.0, 10.0])
    np.testing.assert_array_equal(r, [2.0, -0.5, 2.5, 1.0, 2.0])
    # IDR telescopes: the outcome is D_{-1} - D_{T-1}.
    np.testing.assert_allclose(mc.trajectory_outcome(offsets, r), [4.0, 3.0])


def test_adr():
    np.testing.assert_array_equal(mc.absolute_distance_reward([1.0, 0.0, 3.5]), [-1.0, -0.0, -3.5])


def test_discounted_returns_hand_computed():
    offsets = np.array([0, 3, 4])
    r = np.array([2.0, -0.5, 2.5, 7.0])
    G = mc.discounted_returns(offsets, r, 0.85)
    np.testing.assert_allclose(G, [2 + 0.85 * (-0.5 + 0.85 * 2.5), -0.5 + 0.85 * 2.5, 2.5, 7.0])


def test_gamma_zero_returns_rewards_and_gamma_one_sums():
    offsets = np.array([0, 4, 6])
    r = np.array([1.0, -2.0, 3.0, 0.5, 4.0, -1.0])
    np.testing.assert_array_equal(mc.discounted_returns(offsets, r, 0.0), r)
    np.testing.assert_allclose(mc.discounted_returns(offsets, r, 1.0), [2.5, 1.5, 3.5, 0.5, 3.0, -1.0])


def test_long_trajectory_small_gamma_does_not_overflow():
    # gamma^-t rescaling would overflow here (0.1^-2000); the recursion is exact.
    n = 2000
    r = np.ones(n)
    G = mc.discounted_returns(np.array([0, n]), r, 0.1)
    assert np.all(np.isfinite(G))
    np.testing.assert_allclose(G[0], (1 - 0.1**n) / 0.9)
    assert G[-1] == 1.0


def test_distance_from_state_hinge_and_norm():
    s = np.array([[-4.0, -1.0, 2.0], [-1.0, -0.5, 0.0]])
    # hinge, eps 1: deficits beyond -1: (3, 0, 0) -> 3; second row all in zone -> 0
    np.testing.assert_allclose(mc.distance_from_state(s), [3.0, 0.0])
    np.testing.assert_allclose(mc.distance_from_state(s, weights=[4.0, 1, 1]), [6.0, 0.0])
    np.testing.assert_allclose(mc.distance_from_state(s, kind="norm"),
                               [math.sqrt(21), math.sqrt(1.25)])
    np.testing.assert_allclose(mc.distance_from_state(s, epsilon=0.0),
                               [math.sqrt(17), math.sqrt(1.25)])
    with pytest.raises(ValueError, match="kind"):
        mc.distance_from_state(s, kind="l1")


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_bucket_zscore_against_naive(baseline, scale, ddof):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    labels = rng.integers(0, 6, size=40)
    labels[0] = 6  # a singleton bucket
    z = bucket_zscore(x, labels, 7, baseline=baseline, scale=scale, ddof=ddof)
    for k in range(40):
        want = zscore(x[k], list(x[labels == labels[k]]), baseline=baseline, scale=scale,
                      ddof=ddof)
        assert z[k] == pytest.approx(want, abs=1e-12)
    assert z[0] == 0.0


def test_singleton_raw_is_verl_style():
    z = bucket_zscore(np.array([3.0]), np.array([0]), 1, singleton="raw")
    assert z[0] == 3.0 / (1 + 1e-6)
    z = bucket_zscore(np.array([3.0]), np.array([0]), 1, singleton="raw", scale="none")
    assert z[0] == 3.0


def test_large_offset_statistics(backend):
    # Values riding on 1e12: a plain sum/n loses the small part; the corrected two-pass keeps it.
    small = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    x = 1e12 + small
    exact = x - 1e12  # the small parts as stored (exact subtraction)
    z = bucket_zscore(x, np.zeros(8, dtype=np.int64), 1, eps=1e-12)
    ref = (exact - exact.mean()) / exact.std(ddof=1)
    np.testing.assert_allclose(z, ref, atol=1e-9)
    res = backend.estimate(np.arange(9), np.zeros(8, dtype=int), reward=x,
                           estimator="reinforce_pp_idr", eps=1e-12)
    np.testing.assert_allclose(res.advantage, ref, atol=1e-9)


def test_never_e_x2_minus_e_x_squared():
    # With E[x^2]-E[x]^2 this bucket's variance comes out negative or zero.
    x = 1e8 + np.array([1.0, 2.0, 3.0])
    z = bucket_zscore(x, np.zeros(3, dtype=np.int64), 1)
    np.testing.assert_allclose(z, [-1.0, 0.0, 1.0], atol=1e-6)
