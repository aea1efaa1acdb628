"""mica_core.integrations.verl without verl: the adapters are plain torch functions.

The tests against the real verl package are in test_verl_integration.py (own environment,
scripts/test-verl.sh).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from naive import KEYED, PRESETS, naive_estimate
from naive import broadcast_to_tokens as naive_broadcast

import mica_core as mc
from mica_core.integrations import verl as mv


@st.composite
def verl_batches(draw, max_rows=8, max_turns=4):
    """verl's layout: rows of [prompt-side filler, assistant span, user/tool tokens, ...]."""
    B = draw(st.integers(1, max_rows))
    n_groups = draw(st.integers(1, B))
    labels = draw(st.lists(st.integers(0, n_groups - 1), min_size=B, max_size=B))
    rows, trajs = [], []
    for b in range(B):
        T = draw(st.integers(1, max_turns))
        mask, rew, turn_rewards = [], [], []
        for _ in range(T):
            # turns are separated by at least one user token, else their spans merge
            gap = draw(st.integers(1, 2)) if mask else draw(st.integers(0, 1))
            span = draw(st.integers(1, 3))
            r = draw(st.sampled_from([0.0, 1.0, -0.5]) | st.floats(-3, 3, width=32))
            mask += [0] * gap + [1] * span
            rew += [0.0] * gap + [0.0] * (span - 1) + [r]
            turn_rewards.append(r)
        tail = draw(st.integers(0, 2))
        rows.append((mask + [0] * tail, rew + [0.0] * tail))
        trajs.append({"group": f"u{labels[b]}", "rewards": turn_rewards})
    L = max(len(m) for m, _ in rows)
    mask = np.zeros((B, L), dtype=np.int64)
    rew = np.zeros((B, L), dtype=np.float32)
    for b, (m, r) in enumerate(rows):
        mask[b, :len(m)] = m
        rew[b, :len(r)] = r
    for tr, b in zip(trajs, range(B)):
        tr["rewards"] = [float(np.float32(x)) for x in tr["rewards"]]
    index = np.array([tr["group"] for tr in trajs], dtype=object)
    return torch.from_numpy(rew), torch.from_numpy(mask), index, trajs


@settings(max_examples=60, deadline=None)
@given(batch=verl_batches(), name=st.sampled_from(sorted(set(PRESETS) - set(KEYED))),
       gamma=st.sampled_from([None, 0.5, 1.0]))
def test_adapter_matches_naive_per_token(batch, name, gamma):
    rew, mask, index, trajs = batch
    fn = mv.verl_estimator(name)
    kw = {} if gamma is None else {"gamma": gamma}
    adv, ret = fn(rew, mask, index, **kw)
    want = naive_estimate(trajs, name, **kw)
    want_adv = naive_broadcast([[t[2] for t in row] for row in want], mask.tolist())
    want_ret = naive_broadcast([[t[1] for t in row] for row in want], mask.tolist())
    assert adv.dtype == torch.float32 and adv.shape == rew.shape
    np.testing.assert_allclose(adv.numpy(), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), want_ret, rtol=1e-5, atol=1e-5)


def test_names_do_not_shadow_verls_own():
    assert mv.verl_name("mica") == "mica"
    assert mv.verl_name("mica_turn") == "mica_turn"
    assert mv.verl_name("grpo") == "mica_grpo"
    assert mv.verl_name("reinforce_pp") == "mica_reinforce_pp"
    assert mv.compute_mica_advantage is mv.verl_estimator("mica")


class Cfg:
    """An attribute-style config like verl's dataclasses (no ``get``)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_options_come_from_kwargs_then_mica_section_then_top_level():
    cfg = {"gamma": 0.9, "eps": 1e-3, "norm_adv_by_std_in_grpo": False,
           "mica": {"weight": 0.25, "baseline": "loo"}}
    assert mv.options_from_config("mica", cfg) == dict(gamma=0.9, eps=1e-3, weight=0.25,
                                                       baseline="loo")
    assert mv.options_from_config("grpo", cfg)["scale"] == "none"
    assert "scale" not in mv.options_from_config("mica", cfg)
    assert mv.options_from_config("mica", cfg, {"gamma": 0.5, "epsilon": 0.0}) == dict(
        gamma=0.5, eps=0.0, weight=0.25, baseline="loo")
    cfg["mica"]["gamma"] = 0.7
    assert mv.options_from_config("mica", cfg)["gamma"] == 0.7
    assert mv.options_from_config("mica", Cfg(gamma=1.0, mica=Cfg(weight=0.1))) == dict(
        gamma=1.0, weight=0.1)
    assert mv.options_from_config("mica", None, {"reward_baselines": 1}) == {}


def test_config_reaches_the_estimator():
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]])
    rew = torch.tensor([[0, 1.0, 0, 2.0], [3.0, 0, 0, -1.0], [0, 0, 0.5, 0]])
    index = np.array(["a", "a", "a"], dtype=object)
    a, _ = mv.compute_mica_advantage(rew, mask, index, config={"gamma": 0.5, "weight": 0.2})
    b, _ = mv.compute_mica_advantage(rew, mask, index, gamma=0.5, weight=0.2)
    c, _ = mv.compute_mica_advantage(rew, mask, index)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_errors_name_the_row():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    rew = torch.zeros(2, 4)
    with pytest.raises(mc.MicaInputError, match="no assistant token") as info:
        mv.compute_mica_advantage(rew, mask, np.array(["a", "b"], dtype=object))
    assert (info.value.column, info.value.row) == ("response_mask", 1)
    mask[1, 1] = 1
    rew[0, 3] = 1.0
    with pytest.raises(mc.MicaInputError, match="outside any assistant span") as info:
        mv.compute_mica_advantage(rew, mask, np.array(["a", "b"], dtype=object))
    assert info.value.row == 0
    with pytest.raises(mc.MicaInputError, match="one label"):
        mv.compute_mica_advantage(torch.zeros(2, 4), mask, np.array(["a"], dtype=object))


def test_grpo_adapter_equals_verl_formula_written_out():
    """verl's GRPO: z of the row's summed reward in its uid group, singletons mean 0 std 1."""
    torch.manual_seed(0)
    B, L = 9, 10
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[:, 4] = 0
    rew = torch.zeros(B, L)
    rew[:, 3] = torch.randn(B)
    rew[:, 9] = torch.randn(B)
    index = np.array(["p", "p", "q", "q", "q", "r", "s", "s", "s"], dtype=object)
    adv, _ = mv.compute_grpo_advantage(rew, mask, index, singleton="raw")
    score = rew.sum(-1).double()
    want = torch.empty(B, dtype=torch.float64)
    for u in set(index):
        rows = [i for i in range(B) if index[i] == u]
        s = score[rows]
        mean, std = (s.mean(), s.std()) if len(rows) > 1 else (0.0, 1.0)
        want[rows] = (s - mean) / (std + 1e-6)
    torch.testing.assert_close(adv, (want[:, None] * mask).float(), rtol=1e-5, atol=1e-6)
