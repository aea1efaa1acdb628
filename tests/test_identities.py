"""Identity tests: one estimator reduces to another at a limit."""

import numpy as np
import pytest
from hypothesis import given, settings

import mica_core as mc

from strategies import ragged_batches


@settings(max_examples=30, deadline=None)
@given(batch=ragged_batches(allow_empty=False))
def test_weight_one_and_zero_reduce_mica(backend, batch):
    kw = dict(distance=batch.distance, initial_distance=batch.initial_distance)

    def adv(**options):
        return backend.estimate(batch.offsets, batch.group, **kw, **options).advantage

    np.testing.assert_array_equal(adv(estimator="mica", weight=1.0), adv(estimator="mica_turn"))
    np.testing.assert_array_equal(adv(estimator="mica", weight=0.0),
                                  adv(estimator="mica_group"))


@settings(max_examples=20, deadline=None)
@given(batch=ragged_batches(allow_empty=False))
def test_gamma_zero_returns_equal_rewards(backend, batch):
    for name in ("mica", "mica_turn", "mapo", "reinforce_pp_idr"):
        res = backend.estimate(batch.offsets, batch.group, distance=batch.distance,
                               initial_distance=batch.initial_distance, estimator=name,
                               gamma=0.0)
        np.testing.assert_array_equal(res.returns, res.reward)


@pytest.mark.parametrize("name", mc.list_estimators())
def test_one_trajectory_of_one_turn_gives_zero(name):
    # Every bucket, at every scope, holds one element: nothing to compare with.
    res = mc.estimate([0, 1], ["only"], distance=[7.0], initial_distance=[10.0], estimator=name,
                      key=["k"])
    np.testing.assert_array_equal(res.advantage, [0.0])


@pytest.mark.parametrize("name", ["mica_turn", "grpo"])
def test_one_group_of_one_trajectory_gives_zero(name):
    # Turn buckets and the group's trajectory bucket are singletons.
    res = mc.estimate([0, 5], ["only"], distance=[9.0, 7.0, 7.5, 3.0, 1.0],
                      initial_distance=[10.0], estimator=name)
    np.testing.assert_array_equal(res.advantage, np.zeros(5))


def test_one_trajectory_mica_keeps_only_its_group_component():
    # z_group(r) ranges over the turns of the group, so it survives with one trajectory.
    kw = dict(distance=[9.0, 7.0, 7.5, 3.0, 1.0], initial_distance=[10.0])
    mica = mc.estimate([0, 5], ["only"], estimator="mica", weight=0.3, **kw).advantage
    group = mc.estimate([0, 5], ["only"], estimator="mica_group", **kw).advantage
    np.testing.assert_allclose(mica, 0.7 * group, atol=1e-15)


def test_grpo_is_constant_per_trajectory_and_mica_group_equals_reinforce_pp_idr_in_one_group():
    offsets = np.array([0, 3, 5, 6])
    d = np.array([8.0, 8.5, 6.0, 9.0, 7.0, 10.5])
    init = np.full(3, 10.0)
    g = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=init, estimator="grpo")
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        assert np.ptp(g.advantage[lo:hi]) == 0.0
    a = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=init, estimator="mica_group")
    b = mc.estimate(offsets, [0, 0, 0], distance=d, initial_distance=init,
                    estimator="reinforce_pp_idr")
    np.testing.assert_allclose(a.advantage, b.advantage, atol=1e-15)


def test_empty_input():
    res = mc.estimate(np.array([0]), [], distance=np.zeros(0), initial_distance=np.zeros(0))
    assert res.advantage.shape == (0,) and res.returns.shape == (0,)


def test_weight_one_selects_one_component_even_when_the_other_is_not_finite():
    # With weight 1, mica is mica_turn exactly: the group component is left out of the plan,
    # not multiplied by 0 (0 x NaN would be NaN).
    from mica_core.estimators import resolve

    plan = resolve("mica", reward_given=False, weight=1.0)
    assert [(c.signal, c.scope) for c in plan.components] == [("return", "turn")]
    plan = resolve("mica", reward_given=False, weight=0.0)
    assert [(c.signal, c.scope) for c in plan.components] == [("reward", "group")]


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(eps=0.0, estimator="mica_group")])
def test_eps_zero_with_std_scaling_is_refused(options):
    with pytest.raises(ValueError, match="eps must be > 0 with scale='std'"):
        mc.estimate([0, 2], ["g"], distance=[1.0, 1.0], initial_distance=[2.0], **options)


def test_eps_zero_without_scaling_is_allowed(backend):
    # Two equal rollouts: every turn bucket has zero variance; centring needs no eps.
    res = backend.estimate(np.array([0, 2, 4]), ["g", "g"],
                           distance=np.array([1.0, 1.0, 1.0, 1.0]),
                           initial_distance=np.array([2.0, 2.0]), eps=0.0, scale="none")
    # rewards (1, 0) twice: z_turn(G) = 0 everywhere, z_group(r) = r - 0.5
    np.testing.assert_array_equal(res.advantage, [0.25, -0.25, 0.25, -0.25])
