"""mica_core.integrations.verl without verl: the adapters are plain torch functions.

The tests against the real verl package are in test_verl_integration.py (own environment,
scripts/test-verl.sh).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import verl_layouts as L

import mica_core as mc
from mica_core.integrations import verl as mv

from naive import KEYED, PRESETS, naive_estimate
from naive import broadcast_to_tokens as naive_broadcast


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
    for tr in trajs[:B]:
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
    adv, ret = fn(rew, mask, index, non_tensor_batch={}, require_per_turn=False, **kw)
    want = L.lone_rule(trajs, name, naive_estimate(trajs, name, **kw), **kw)
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
    assert mv.options_from_config("mica", Cfg(gamma=0.5, mica=Cfg(weight=0.1))) == dict(
        gamma=0.5, weight=0.1)
    assert mv.options_from_config("mica", None, {"reward_baselines": 1}) == {}


@pytest.mark.parametrize("section, message", [
    ({"gammma": 0.9}, "unknown option 'algorithm.mica.gammma'; known: gamma, weight, "),
    ({"ddof": 2}, "algorithm.mica.ddof must be 0 or 1; got 2"),
    ({"baseline": "median"}, "algorithm.mica.baseline must be one of 'mean', 'loo'; got 'median'"),
    ({"distance_epsilon": -1}, "algorithm.mica.distance_epsilon must be a finite number >= 0"),
    ({"distance_kind": "l1"}, "algorithm.mica.distance_kind must be one of 'hinge', 'norm'"),
    ({"lone_rollout": "none"}, "algorithm.mica.lone_rollout must be one of 'zero', 'within' or "
                               "None; got 'none'"),
])
def test_bad_algorithm_mica_options_are_one_line_errors(section, message):
    """algorithm.mica is checked against mica_core.EstimatorOptions (verl's spelling of the
    state options): an unknown key or a bad value stops the call with one line."""
    scores = torch.tensor([[0.0, 1.0], [0.0, 0.5]])
    mask = torch.ones(2, 2)
    with pytest.raises(mc.MicaInputError) as info:
        mv.compute_mica_advantage(scores, mask, np.array(["a", "a"], dtype=object),
                                  config={"mica": section}, non_tensor_batch={
                                      "mica_state": np.array([[[-3.0, -1.0]], [[-2.0, 0.0]]]),
                                      "mica_initial_state": np.array([[-4.0, -2.0],
                                                                      [-4.0, -2.0]])})
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_config_reaches_the_estimator():
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]])
    rew = torch.tensor([[0, 1.0, 0, 2.0], [3.0, 0, 0, -1.0], [0, 0, 0.5, 0]])
    index = np.array(["a", "a", "a"], dtype=object)
    a, _ = mv.compute_mica_advantage(rew, mask, index, config={"gamma": 0.5, "weight": 0.2})
    b, _ = mv.compute_mica_advantage(rew, mask, index, gamma=0.5, weight=0.2)
    c, _ = mv.compute_mica_advantage(rew, mask, index)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_errors_name_the_row():
    rew = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    rew[1, 0] = 1.0
    with pytest.raises(mc.MicaInputError, match="before the row's first assistant turn") as info:
        mv.compute_mica_advantage(rew, mask, np.array(["a", "b"], dtype=object))
    assert (info.value.row, str(info.value).count("\n")) == (1, 0)
    with pytest.raises(mc.MicaInputError, match="one label"):
        mv.compute_mica_advantage(torch.zeros(2, 4), mask, np.array(["a"], dtype=object))
    with pytest.raises(mc.MicaInputError, match="keep data.non_tensor_batch\\['uid'\\]"):
        mv.compute_mica_advantage(torch.zeros(2, 4), mask)  # verl omits index without uid
    nt = {"mica_distance": np.array([[1.0], [1.0, 2.0]], dtype=object),
          "mica_initial_distance": np.array([2.0, 3.0])}
    with pytest.raises(mc.MicaInputError, match="has 2 values but the row has 1") as info:
        mv.compute_mica_advantage(torch.zeros(2, 4), mask, np.array(["a", "a"], dtype=object),
                                  non_tensor_batch=nt)
    assert (info.value.column, info.value.row) == ("mica_distance", 1)


def test_verl_default_gamma_warns_once_per_preset():
    mv._GAMMA_WARNED.clear()
    with pytest.warns(UserWarning, match="algorithm.gamma=1.0 .* preset 'mica_turn''s gamma 0.85"):
        opts = mv.options_from_config("mica_turn", {"gamma": 1.0})
    assert opts["gamma"] == 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.options_from_config("mica_turn", {"gamma": 1.0})           # warned already
        mv.options_from_config("grpo", {"gamma": 1.0})                # its own gamma is 1.0
        mv.options_from_config("mica", {"gamma": 0.9})                # set on purpose
        assert mv.options_from_config("mica", {"gamma": 1.0, "mica": {"gamma": 0.85}})[
            "gamma"] == 0.85                                          # mica's key wins


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kl", [False, True])
def test_distances_in_non_tensor_batch_one_row_per_trajectory(name, kl):
    """verl's agent-loop layout: tool calls inside turns (turn starts given), user tokens after
    each turn, the outcome score on the last valid token, per-turn distances in
    non_tensor_batch, optionally a KL penalty on every assistant token."""
    rng = np.random.default_rng(7)
    eps = L.random_episodes(rng, tool_p=0.5)
    rows = L.trajectory_rows(eps)
    mask = torch.as_tensor(rows["response_mask"])
    scores = torch.as_tensor(rows["scores"])
    kl_tok = torch.zeros_like(scores)
    if kl:
        kl_tok = torch.as_tensor(np.float32(rng.uniform(0, 0.02, scores.shape))) * mask
    rewards = scores - kl_tok
    nt = rows["non_tensor"]
    adv, ret = mv.verl_estimator(name)(rewards, mask, nt["uid"], non_tensor_batch=nt,
                                       batch={"token_level_scores": scores}, gamma=0.85)
    kl_turn = []
    for b, ep in enumerate(eps):
        starts = list(nt["mica_turn_start"][b]) + [mask.shape[1]]
        kl_turn.append([-float(kl_tok[b, starts[k]:starts[k + 1]].double().sum())
                        for k in range(len(ep["turns"]))])
    want = L.expected(eps, name, kl=kl_turn if kl else None, gamma=0.85)
    for col, got in ((2, adv), (1, ret)):
        tok = L.expected_tokens(eps, want, col, "trajectory")
        ref = np.zeros(tuple(mask.shape))
        for b, row in enumerate(tok):
            ref[b, :len(row)] = row
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    # without turn starts, a tool call makes two turns and the distances no longer fit
    if any(t["tool"] for ep in eps for t in ep["turns"]):
        nt2 = {k: v for k, v in nt.items() if k != "mica_turn_start"}
        with pytest.raises(mc.MicaInputError, match="but the row has"):
            mv.verl_estimator(name)(rewards, mask, nt["uid"], non_tensor_batch=nt2)


def test_mica_and_mica_adr_differ_given_distances():
    rng = np.random.default_rng(3)
    eps = L.random_episodes(rng)
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = rows["non_tensor"]
    a, _ = mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    b, _ = mv.compute_mica_adr_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_score_only_trajectory_rows_credit_the_last_turn(name):
    """No per-turn signal: verl's outcome score on the last valid (often user) token is the
    last turn's reward; the other turns get 0."""
    rng = np.random.default_rng(11)
    eps = L.random_episodes(rng, tool_p=0.5)
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = {"uid": rows["non_tensor"]["uid"],
          "mica_turn_start": rows["non_tensor"]["mica_turn_start"],
          "mica_key": rows["non_tensor"]["mica_key"]}
    adv, _ = mv.verl_estimator(name)(scores, mask, nt["uid"], non_tensor_batch=nt, gamma=0.85)
    want = L.expected(eps, name, signal="score", gamma=0.85)
    tok = L.expected_tokens(eps, want, 2, "trajectory")
    ref = np.zeros(tuple(mask.shape))
    for b, row in enumerate(tok):
        ref[b, :len(row)] = row
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("signal", ["distance", "score"])
def test_v1_rows_of_a_session_are_one_trajectory(name, signal):
    """verl v1: one row per turn keyed {uid}_{session}_{index}, rows shuffled, the session's
    score copied on every row (counted once)."""
    rng = np.random.default_rng(5)
    eps = L.random_episodes(rng, tool_p=0.5)
    rows = L.turn_rows(eps, rng)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = rows["non_tensor"] if signal == "distance" else {
        k: rows["non_tensor"][k] for k in ("uid", "mica_key")}
    adv, ret = mv.verl_estimator(name)(scores, mask, nt["uid"], non_tensor_batch=nt,
                                       batch={"token_level_scores": scores},
                                       batch_keys=rows["keys"], gamma=0.85)
    want = L.expected(eps, name, signal=signal, gamma=0.85)
    by_ep = {id(ep): res for ep, res in zip(eps, want)}
    for b, (ep, i) in enumerate(rows["turn"]):
        m = mask[b].bool()
        np.testing.assert_allclose(adv[b][m].numpy(), by_ep[id(ep)][i][2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b][m].numpy(), by_ep[id(ep)][i][1], rtol=1e-5, atol=1e-5)
        assert torch.all(adv[b][~m] == 0)


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


@pytest.mark.parametrize("name", ["mica", "mica_adr", "grpo"])
def test_v1_one_row_per_session_keeps_its_turns(name):
    """v1 with an ordinary multi-turn agent loop: one row per session ({uid}_{s}_0) holds all
    of its turns, found from the mask (or given boundaries) as in the legacy layout."""
    rng = np.random.default_rng(9)
    eps = L.random_episodes(rng, tool_p=0.0)
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = {k: v for k, v in rows["non_tensor"].items() if k != "mica_turn_start"}
    keys = [f"{ep['uid']}_{ep['session']}_0" for ep in eps]
    kw = dict(non_tensor_batch=nt, batch={"token_level_scores": scores}, gamma=0.85)
    a, _ = mv.verl_estimator(name)(scores, mask, nt["uid"], batch_keys=keys, **kw)
    b, _ = mv.verl_estimator(name)(scores, mask, nt["uid"], **kw)
    assert torch.equal(a, b)
    with pytest.raises(mc.MicaInputError, match="values but the row has 1 turns"):
        mv.verl_estimator(name)(scores, mask, nt["uid"], batch_keys=keys,
                                config={"mica": {"v1_rows": "turn", "gamma": 0.85}},
                                **{k: v for k, v in kw.items() if k != "gamma"})


def test_gigpo_needs_a_key_per_turn():
    rng = np.random.default_rng(2)
    eps = L.random_episodes(rng)
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = {k: v for k, v in rows["non_tensor"].items() if k != "mica_key"}
    with pytest.raises(mc.MicaInputError, match="mica_key") as info:
        mv.compute_gigpo_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    assert info.value.rule == "required"
    nt["mica_key"] = L._objects([["a"] * (len(ep["turns"]) + 1) for ep in eps])
    with pytest.raises(mc.MicaInputError, match="keys but the row") as info:
        mv.compute_gigpo_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    assert info.value.row == 0


def test_a_call_without_verls_batch_warns_every_time_and_counts():
    import warnings

    rng = np.random.default_rng(4)
    rows = L.trajectory_rows(L.random_episodes(rng))
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    before = mv.counters()["frame_lookup_failed"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mv.compute_mica_advantage(scores, mask, rows["non_tensor"]["uid"])
        assert mv.LAST_METRICS["mica/frame_lookup_failed"] == 1.0
        mv.compute_mica_advantage(scores, mask, rows["non_tensor"]["uid"])
        mv.compute_mica_advantage(scores, mask, rows["non_tensor"]["uid"],
                                  non_tensor_batch=rows["non_tensor"])
        assert mv.LAST_METRICS["mica/frame_lookup_failed"] == 0.0
    msgs = [str(w.message) for w in seen if "no verl DataProto" in str(w.message)]
    assert len(msgs) == 2 and "mica_distance are not read" in msgs[0]
    assert mv.counters()["frame_lookup_failed"] == before + 2


# --- per-turn signal: never lost without a word -----------------------------------------------

def _score_only(seed=11):
    rng = np.random.default_rng(seed)
    eps = L.random_episodes(rng, tool_p=0.0, per_group=(2, 3))
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    assert (np.diff(mc.tokens.turn_spans(mask).offsets.numpy()) >= 2).any()
    return eps, mask, scores, {"uid": rows["non_tensor"]["uid"]}, rows


def test_multi_turn_without_per_turn_signal_warns_every_call_and_sets_the_metric():
    import warnings

    _, mask, scores, nt, _ = _score_only()
    before = mv.counters()["no_per_turn_signal"]
    for _ in range(3):
        with pytest.warns(UserWarning, match="without a per-turn signal") as seen:
            mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
        assert "require_per_turn=true" in str(seen[0].message)
        assert mv.LAST_METRICS["mica/per_turn_signal"] == 0.0
    assert mv.counters()["no_per_turn_signal"] == before + 3
    with pytest.raises(mc.MicaInputError, match="without a per-turn signal") as info:
        mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt,
                                  config={"mica": {"require_per_turn": True}})
    assert "\n" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt,
                                  require_per_turn=False)
        # outcome-only presets need no per-turn signal: no warning
        mv.compute_grpo_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
        # per-turn signals present: no warning, metric 1
        _, _, _, _, rows = _score_only()
        mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=rows["non_tensor"])
    assert mv.LAST_METRICS["mica/per_turn_signal"] == 1.0


def test_adr_preset_without_distances_warns_and_counts():
    _, mask, scores, nt, rows = _score_only()
    before = mv.counters()["missing_field"]
    reward = L._objects([[1.0] * len(s) for s in rows["non_tensor"]["mica_turn_start"]])
    with pytest.warns(UserWarning, match="computes ADR"):
        mv.compute_mica_adr_advantage(scores, mask, nt["uid"],
                                      non_tensor_batch={**nt, "mica_reward": reward})
    assert mv.LAST_METRICS["mica/missing_field"] == 1.0
    assert mv.counters()["missing_field"] == before + 1
    with pytest.raises(mc.MicaInputError, match="computes ADR"):
        mv.compute_mica_adr_advantage(scores, mask, nt["uid"], require_per_turn=True,
                                      non_tensor_batch={**nt, "mica_reward": reward})


class FakeDataProto:
    """What the frame lookup needs of verl's DataProto: batch and non_tensor_batch."""

    def __init__(self, tensors, non_tensors):
        self.batch, self.non_tensor_batch = dict(tensors), dict(non_tensors)

    def __len__(self):
        return len(next(iter(self.batch.values())))


def _nested(depth, fn):
    if depth == 0:
        return fn()
    return _nested(depth - 1, fn)


@pytest.mark.parametrize("how", ["same", "clone", "cast"])
@pytest.mark.parametrize("depth", [0, 9])
def test_the_callers_batch_is_found_when_cloned_cast_or_deep(how, depth):
    import warnings

    rng = np.random.default_rng(3)
    eps = L.random_episodes(rng)
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    data = FakeDataProto({"token_level_rewards": scores, "response_mask": mask},
                         rows["non_tensor"])
    metrics = {}  # noqa: F841 - the trainer step's dict, which mica fills
    handed = {"same": scores, "clone": scores.clone(), "cast": scores.double()}[how]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _nested(depth, lambda: mv.compute_mica_advantage(handed, mask,
                                                                  rows["non_tensor"]["uid"]))
    want, _ = mv.compute_mica_advantage(handed, mask, rows["non_tensor"]["uid"],
                                        non_tensor_batch=data.non_tensor_batch)
    assert torch.equal(got, want)
    assert metrics["mica/frame_lookup_failed"] == 0.0 and metrics["mica/per_turn_signal"] == 1.0


# --- empty rows and lone rollouts ---------------------------------------------------------------

def test_an_empty_row_gets_zero_and_is_counted():
    rng = np.random.default_rng(13)
    eps = L.random_episodes(rng, per_group=(2, 3))
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = rows["non_tensor"]
    ref, _ = mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    # append an aborted rollout of group uid0: no assistant token, a score on its last token
    mask2 = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=mask.dtype)])
    scores2 = torch.cat([scores, torch.zeros(1, scores.shape[1])])
    scores2[-1, 3] = 5.0
    nt2 = {k: np.concatenate([v, L._objects([[]]) if v.dtype == object and k != "uid" else
                              np.array(["uid0"] if k == "uid" else [1.0], dtype=v.dtype)])
           for k, v in nt.items()}
    before = mv.counters()["empty_rows"]
    adv, ret = mv.compute_mica_advantage(scores2, mask2, nt2["uid"], non_tensor_batch=nt2)
    assert torch.all(adv[-1] == 0) and torch.all(ret[-1] == 0)
    assert torch.equal(adv[:-1], ref)
    assert mv.LAST_METRICS["mica/empty_rows"] == 1.0
    assert mv.counters()["empty_rows"] == before + 1


@pytest.mark.parametrize("name", ["mica", "mica_group", "mapo", "grpo", "reinforce_pp_idr"])
@pytest.mark.parametrize("rule", ["zero", "within"])
def test_lone_rollout_rule(name, rule):
    rng = np.random.default_rng(17)
    eps = L.random_episodes(rng, n_groups=4, per_group=(1, 3), max_turns=4)
    eps.append({"uid": "alone", "session": 0, "initial_distance": 4.0,
                "turns": [{"reply": 2, "tool": None, "user": 1, "distance": d, "key": "s0"}
                          for d in (3.0, 3.5, 1.0)]})
    rows = L.trajectory_rows(eps)
    mask, scores = torch.as_tensor(rows["response_mask"]), torch.as_tensor(rows["scores"])
    nt = rows["non_tensor"]
    kw = {} if rule == "zero" else {"config": {"mica": {"lone_rollout": rule}}}
    adv, _ = mv.verl_estimator(name)(scores, mask, nt["uid"], non_tensor_batch=nt, **kw)
    want = L.expected(eps, name, lone_rollout=rule)
    tok = L.expected_tokens(eps, want, 2, "trajectory")
    ref = np.zeros(tuple(mask.shape))
    for b, row in enumerate(tok):
        ref[b, :len(row)] = row
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-5, atol=1e-5)
    last = adv[-1][mask[-1].bool()]
    if rule == "zero" and name != "reinforce_pp_idr":  # no batch-scope component
        assert torch.all(last == 0) if name != "mapo" else not torch.all(last == 0)
    if rule == "within" and name in ("mica", "mica_group"):
        assert last.abs().max() > 0.1  # z_group over the lone trajectory's own turns
    assert mv.LAST_METRICS["mica/lone_rollouts"] == float(
        sum(1 for u in set(nt["uid"]) if list(nt["uid"]).count(u) == 1))


def test_v1_turn_rows_with_turn_rewards_and_gigpo_refusal():
    """v1 rows, one per turn, each carrying its own turn's reward (mica's agent_loop_output):
    with algorithm.mica.turn_rewards=true they are per-turn rewards; gigpo refuses in one line
    naming the route that works."""
    rng = np.random.default_rng(5)
    eps = L.random_episodes(rng, tool_p=0.5)
    rows = L.turn_rows(eps, rng)
    mask = torch.as_tensor(rows["response_mask"])
    for name in ("mica", "mica_adr", "mica_turn", "mica_group"):
        want = L.expected(eps, name, signal="turn_reward", gamma=0.85)
        by_ep = {id(ep): res for ep, res in zip(eps, want)}
        scores = torch.zeros(mask.shape, dtype=torch.float32)
        for b, (ep, i) in enumerate(rows["turn"]):
            scores[b, int(np.flatnonzero(rows["response_mask"][b])[-1])] = by_ep[id(ep)][i][0]
        adv, _ = mv.verl_estimator(name)(
            scores, mask, rows["non_tensor"]["uid"], non_tensor_batch={},
            batch={"token_level_scores": scores}, batch_keys=rows["keys"],
            config={"mica": {"turn_rewards": True, "gamma": 0.85}})
        for b, (ep, i) in enumerate(rows["turn"]):
            m = mask[b].bool()
            np.testing.assert_allclose(adv[b][m].numpy(), by_ep[id(ep)][i][2], rtol=1e-5,
                                       atol=1e-5, err_msg=name)
    with pytest.raises(mc.MicaInputError, match="trainer.use_v1=false") as info:
        mv.compute_gigpo_advantage(scores, mask, rows["non_tensor"]["uid"], non_tensor_batch={},
                                   batch_keys=rows["keys"])
    assert "\n" not in str(info.value)


def test_the_warning_shows_on_every_call_under_pythons_default_filter():
    """A trainer runs with Python's default warning filter, which shows a message once per code
    location: mica's per-call warnings must still appear on every step."""
    import warnings

    _, mask, scores, nt, _ = _score_only()
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(3):
            mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    assert sum("without a per-turn signal" in str(w.message) for w in seen) == 3
    assert {w.filename for w in seen} == {__file__}  # attributed to the estimator's caller
    with warnings.catch_warnings(record=True) as seen:  # a user's ignore filter still holds
        warnings.simplefilter("ignore")
        mv.compute_mica_advantage(scores, mask, nt["uid"], non_tensor_batch=nt)
    assert seen == []
