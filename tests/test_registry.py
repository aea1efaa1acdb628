"""The estimator registry: presets, user compositions, errors."""

import numpy as np
import pytest

import mica_core as mc

from naive import flat, naive_estimate

PRESETS = ["mica", "mica_turn", "mica_group", "mica_adr", "mapo", "grpo", "reinforce_pp",
           "reinforce_pp_idr", "mica_group_adr"]


def test_presets_listed_in_order():
    assert mc.list_estimators()[:9] == PRESETS
    assert mc.get_estimator("grpo").gamma == 1.0
    assert mc.get_estimator("mica").gamma == 0.85


def test_register_user_estimator_matches_naive_spec(backend):
    name = "test_turn_heavy_loo"
    mc.register_estimator(name, [(0.8, "return", "turn"),
                                 mc.Component(0.2, "reward", "group", baseline="loo"),
                                 {"weight": 0.1, "signal": "outcome", "scope": "batch",
                                  "scale": "none"}], gamma=0.9)
    try:
        offsets = np.array([0, 3, 5, 6, 8])
        d = np.array([8.0, 8.5, 6.0, 9.0, 7.0, 10.5, 3.0, 1.0])
        init = np.array([10.0, 10.0, 10.0, 4.0])
        groups = ["A", "A", "A", "B"]
        trajs = [{"group": groups[i], "distances": list(d[offsets[i]:offsets[i + 1]]),
                  "initial_distance": init[i]} for i in range(4)]
        spec = ("idr", 0.9, "outcome",
                [(0.8, "return", "turn"), (0.2, "reward", "group", "loo"),
                 (0.1, "outcome", "batch", None, "none")])
        want = naive_estimate(trajs, spec=spec)
        res = backend.estimate(offsets, groups, distance=d, initial_distance=init,
                               estimator=name)
        np.testing.assert_allclose(res.advantage, flat(want, 2), atol=1e-12)
        np.testing.assert_allclose(res.returns, flat(want, 1), atol=1e-12)
        assert mc.get_estimator(name).returns == "outcome"
        with pytest.raises(ValueError, match="already registered"):
            mc.register_estimator(name, [(1.0, "reward", "batch")])
        mc.register_estimator(name, [(1.0, "reward", "batch")], overwrite=True)
    finally:
        mc.unregister_estimator(name)
    assert name not in mc.list_estimators()


@pytest.mark.parametrize("component,match", [
    ((1.0, "advantage", "turn"), "signal"),
    ((1.0, "reward", "episode"), "scope"),
    ((1.0, "reward", "turn", "median"), "baseline"),
    ((1.0, "reward", "turn", "mean", "mad"), "scale"),
    (("half", "reward", "turn"), "weight"),
    ((float("nan"), "reward", "turn"), "weight"),
])
def test_bad_components(component, match):
    with pytest.raises(ValueError, match=match):
        mc.register_estimator("bad", [component])
    assert "bad" not in mc.list_estimators()


def test_unknown_estimator_lists_known():
    with pytest.raises(ValueError, match="unknown estimator 'nope'.*mica"):
        mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], estimator="nope")


def test_mica_group_adr_is_group_zscore_of_negative_distance(backend):
    # The paper's reward ablation: z_group(-D_t), checked by hand on one group of two
    # one-turn rollouts (distances 1 and 3: rewards -1 and -3, mean -2, std sqrt(2)).
    res = backend.estimate(np.array([0, 1, 2]), ["g", "g"], distance=np.array([1.0, 3.0]),
                           initial_distance=np.array([5.0, 5.0]), estimator="mica_group_adr")
    np.testing.assert_allclose(res.reward, [-1.0, -3.0])
    z = 1.0 / (np.sqrt(2.0) + 1e-6)
    np.testing.assert_allclose(res.advantage, [z, -z], rtol=1e-12)
