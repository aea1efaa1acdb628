"""The torch backend against tests/naive.py, its loop versions, and the numpy backend.

CPU always; the CUDA tests run only where ``torch.cuda.is_available()``, with
``torch.cuda.set_sync_debug_mode("error")`` around the sync-free path.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mica_core as mc
from mica_core import _backend_torch as tb

from naive import PRESETS, flat, naive_estimate
from strategies import grid_options, ragged_batches

PRESET_NAMES = sorted(PRESETS)
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# How the batch reaches the torch path: through mica_core.estimate with labels, or through
# the backend's own entry with codes + ngroups + max_turns (the sync-free options), with or
# without validation, in deterministic mode.
MODES = ["api", "codes", "codes_unvalidated", "deterministic", "host_offsets"]


def _codes(groups):
    uniq = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return np.array([uniq[g] for g in groups], dtype=np.int64), len(uniq)


def _run(mode, offsets, groups, name, opts, *, dist=None, init=None, rew=None, device="cpu",
         dtype=torch.float64, key=None):
    def t(a):
        return None if a is None else torch.as_tensor(a, dtype=dtype, device=device)

    o = torch.as_tensor(offsets, dtype=torch.int64, device=device)
    values = dict(distance=t(dist), initial_distance=t(init), reward=t(rew), key=key)
    if mode == "api":
        return mc.estimate(o, groups, estimator=name, **values, **opts)
    codes, ng = _codes(groups)
    lengths = np.diff(offsets)
    extra = dict(ngroups=ng, max_turns=int(lengths.max()) if lengths.size else 1)
    if mode == "codes_unvalidated":
        extra["validate"] = False
    if mode == "deterministic":
        extra = dict(deterministic=True)
        codes = groups
    if mode == "host_offsets":
        extra = {}
        o = np.asarray(offsets)
        codes = groups
    g = torch.as_tensor(codes, device=device) if not isinstance(codes, list) else codes
    return mc.estimate(o, g, estimator=name, **values, **extra, **opts)


@settings(max_examples=60, deadline=None)
@given(batch=ragged_batches(), name=st.sampled_from(PRESET_NAMES), opts=grid_options,
       mode=st.sampled_from(MODES), given_rewards=st.booleans())
def test_torch_options_match_naive(batch, name, opts, mode, given_rewards):
    """The torch-only options (codes + ngroups + max_turns, validate=False, deterministic,
    host offsets) against tests/naive.py; plain tensors in are covered for every backend in
    tests/test_backends.py."""
    rew = batch.distance - 5.0 if given_rewards else None
    values = dict(rew=rew) if given_rewards else dict(dist=batch.distance,
                                                      init=batch.initial_distance)
    res = _run(mode, batch.offsets, batch.group, name, opts, key=batch.keys(), **values)
    want = naive_estimate(batch.trajs(reward=rew), name, **opts)
    for k, got in enumerate(res):
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), flat(want, k), rtol=1e-12, atol=1e-12)


def test_output_dtype_follows_numpy_rule():
    o = torch.tensor([0, 2, 3])
    d32 = torch.tensor([1.0, 0.5, 2.0])
    i32 = torch.tensor([2.0, 3.0])
    assert mc.estimate(o, [0, 0], distance=d32, initial_distance=i32).advantage.dtype \
        == torch.float32
    # a float64 initial distance makes the result float64, as on the numpy path
    assert mc.estimate(o, [0, 0], distance=d32, initial_distance=i32.double()).advantage.dtype \
        == torch.float64
    assert mc.estimate(o, [0, 0], reward=torch.tensor([1, 2, 3])).advantage.dtype \
        == torch.float64
    assert mc.estimate(o, [0, 0], reward=d32.half()).advantage.dtype == torch.float32


def test_compute_advantages_table_with_torch_backend():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"group_id": ["a", "a", "a", "b"], "traj_id": [0, 0, 1, 2],
                      "turn": [0, 1, 0, 0], "distance": [2.0, 1.0, 3.0, 0.5],
                      "initial_distance": [3.0, 3.0, 4.0, 1.0]})
    a = mc.compute_advantages(table, backend="numpy")
    b = mc.compute_advantages(table, backend="torch")
    for col in ("reward", "return", "advantage"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-12, atol=1e-12)


# --- loop versions against vectorized ones ------------------------------------------------


@st.composite
def ragged_tensors(draw, max_traj=10, max_len=8):
    lengths = draw(st.lists(st.integers(1, max_len), min_size=0, max_size=max_traj))
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    n = int(offsets[-1])
    vals = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n,
                         max_size=n))
    return offsets, torch.tensor(vals, dtype=torch.float64)


def _layout(offsets, n_rows):
    traj = tb.ragged_row_trajectory(offsets, n_rows)
    t = tb.ragged_turn_index(offsets, traj)
    n_traj = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    T = int(lengths.max()) if n_traj else 1
    return traj, t, n_traj, T, tb.padded_positions(traj, t, n_traj)


@settings(max_examples=60, deadline=None)
@given(data=ragged_tensors(), gamma=st.sampled_from([0.0, 0.3, 0.85, 1.0]))
def test_ragged_scans_match_loops(data, gamma):
    offsets, r = data
    n = r.shape[0]
    traj, t, n_traj, T, pos = _layout(offsets, n)
    assert torch.equal(traj, tb.ragged_row_trajectory_loop(offsets, n))
    assert torch.equal(t, tb.ragged_turn_index_loop(offsets, n))
    if n == 0:
        return
    torch.testing.assert_close(tb.ragged_discounted_returns(r, pos, T, n_traj, gamma),
                               tb.ragged_discounted_returns_loop(offsets, r, gamma),
                               rtol=1e-12, atol=1e-12)
    out = tb.ragged_outcome(r, pos, T, n_traj)
    torch.testing.assert_close(out, tb.ragged_outcome_loop(offsets, r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tb.ragged_outcome_returns(out, offsets, pos, T, gamma),
                               tb.ragged_outcome_returns_loop(offsets, out, gamma),
                               rtol=1e-12, atol=1e-12)
    d = r.abs()
    d0 = torch.linspace(0, 5, n_traj, dtype=torch.float64)
    torch.testing.assert_close(tb.ragged_incremental_distance_reward(d, d0, traj, t),
                               tb.ragged_incremental_distance_reward_loop(offsets, d, d0))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, -2.5, 1e3, 7.25]) |
                       st.floats(-100, 100, allow_nan=False, width=32), max_size=40),
       nb=st.integers(1, 6), seed=st.integers(0, 2**16), opts=grid_options,
       deterministic=st.booleans())
def test_bucket_zscore_matches_loop(values, nb, seed, opts, deterministic):
    x = torch.tensor(values, dtype=torch.float64)
    labels = torch.as_tensor(np.random.default_rng(seed).integers(0, nb, size=len(values)),
                             dtype=torch.int64)
    kw = {k: opts[k] for k in ("baseline", "scale", "ddof", "eps", "singleton") if k in opts}
    torch.testing.assert_close(tb.bucket_sum(x, labels, nb),
                               tb.bucket_sum_loop(x, labels, nb), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        tb.bucket_zscore(x, labels, nb, deterministic=deterministic, **kw),
        tb.bucket_zscore_loop(x, labels, nb, **kw), rtol=1e-9, atol=1e-9)


# --- numerics ------------------------------------------------------------------------------


def test_long_trajectory_small_gamma_has_no_overflow():
    """A gamma^-t rescaling would overflow here (0.1^-3000); the recursion does not."""
    n = 3000
    r = torch.ones(n, dtype=torch.float64)
    offsets = torch.tensor([0, n])
    res = mc.estimate(offsets, ["g"], reward=r, estimator="mica_turn", gamma=0.1)
    assert torch.isfinite(res.returns).all()
    torch.testing.assert_close(res.returns[-1], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(res.returns[0], torch.tensor(1 / 0.9, dtype=torch.float64))


def test_large_offset_values_keep_their_digits():
    """Rewards riding on 1e12: the corrected two-pass moments recover the small spread."""
    base = 1e12
    rew = torch.tensor([base + 1.0, base + 2.0, base + 3.0, base + 4.0], dtype=torch.float64)
    res = mc.estimate(torch.tensor([0, 1, 2, 3, 4]), ["g"] * 4, reward=rew,
                      estimator="grpo")
    z = (np.arange(1, 5) - 2.5) / (np.std(np.arange(1, 5), ddof=1) + 1e-6)
    np.testing.assert_allclose(res.advantage.numpy(), z, rtol=1e-9)


def test_empty_batch():
    res = mc.estimate(torch.tensor([0]), [], distance=torch.zeros(0, dtype=torch.float64),
                      initial_distance=torch.zeros(0, dtype=torch.float64))
    assert all(x.shape == (0,) for x in res)


def test_deterministic_mode_is_bitwise_repeatable_and_close_to_default():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 9, size=400)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    group = torch.as_tensor(rng.integers(0, 37, size=400))
    d = torch.as_tensor(rng.random(int(offsets[-1])) * 5)
    d0 = torch.as_tensor(rng.random(400) * 5)
    kw = dict(distance=d, initial_distance=d0, ngroups=37)
    a = mc.estimate(offsets, group, deterministic=True, **kw)
    b = mc.estimate(offsets, group, deterministic=True, **kw)
    c = mc.estimate(offsets, group, deterministic=False, **kw)
    assert torch.equal(a.advantage, b.advantage)
    torch.testing.assert_close(a.advantage, c.advantage, rtol=1e-12, atol=1e-12)


def test_deterministic_default_follows_torch_flag():
    assert tb.deterministic_default(None) == torch.are_deterministic_algorithms_enabled()
    assert tb.deterministic_default(True) is True


# --- validation ----------------------------------------------------------------------------


def _bad(match, **kw):
    base = dict(offsets=torch.tensor([0, 2, 3]), group=["a", "b"],
                distance=torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
                initial_distance=torch.tensor([2.0, 3.0], dtype=torch.float64))
    base.update(kw)
    offsets, group = base.pop("offsets"), base.pop("group")
    if base.pop("host_offsets", False):
        offsets = offsets.numpy()
    with pytest.raises(mc.MicaInputError, match=match) as info:
        mc.estimate(offsets, group, **base)
    return info.value


@pytest.mark.parametrize("host_offsets", [False, True])
def test_bad_input_names_column_row_and_rule(host_offsets):
    def bad(match, **kw):
        return _bad(match, host_offsets=host_offsets, **kw)

    nan = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    e = bad("not finite", distance=nan)
    assert (e.column, e.row, e.rule) == ("distance", 1, "finite")
    e = bad("negative", distance=torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64))
    assert (e.column, e.row) == ("distance", 2)
    e = bad("negative", initial_distance=torch.tensor([2.0, -3.0], dtype=torch.float64))
    assert (e.column, e.row) == ("initial_distance", 1)
    e = bad("at least one", offsets=torch.tensor([0, 3, 3]))
    assert (e.column, e.row) == ("offsets", 2)
    e = bad("start at 0|must start", offsets=torch.tensor([1, 2, 3]))
    assert e.column == "offsets"
    bad("offsets", offsets=torch.tensor([0, 1, 2]))  # offsets[-1] != number of rows
    bad("required", initial_distance=None)
    bad("not both", reward=torch.ones(3))
    bad("one label per trajectory", group=["a"])
    e = bad("outside", group=torch.tensor([0, 5]), ngroups=2)
    assert (e.column, e.row) == ("group", 1)
    e = bad("max_turns", max_turns=1, offsets=torch.tensor([0, 2, 3]))



def test_two_dimensional_values_name_the_shape():
    e = _bad("1-D", distance=torch.zeros(3, 2, dtype=torch.float64))
    assert (e.column, e.rule) == ("distance", "shape") and "(3, 2)" in str(e)
    assert "None" not in str(e)
    e = _bad("one per trajectory", initial_distance=torch.zeros(2, 2, dtype=torch.float64))
    assert e.column == "initial_distance" and "(2, 2)" in str(e)


def test_invalid_backend_is_refused_for_tensors_too():
    with pytest.raises(ValueError, match="backend must be one of"):
        mc.estimate(torch.tensor([0, 1]), [0], distance=torch.ones(1),
                    initial_distance=torch.ones(1), backend="jax")


def test_outputs_never_require_grad():
    """Advantages are constants of the policy-gradient loss: inputs that require grad give
    outputs outside any autograd graph."""
    d = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    d0 = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    res = mc.estimate(torch.tensor([0, 2, 3]), ["a", "b"], distance=d, initial_distance=d0)
    assert not any(t.requires_grad or t.grad_fn is not None for t in res)
    r = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
    res = mc.estimate(torch.tensor([0, 2, 3]), torch.tensor([0, 0]), reward=r,
                      estimator="grpo")
    assert not any(t.requires_grad for t in res)

def test_validate_false_skips_value_checks():
    nan = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    res = mc.estimate(torch.tensor([0, 2, 3]), torch.tensor([0, 1]), ngroups=2, max_turns=2,
                      distance=nan, initial_distance=torch.ones(2, dtype=torch.float64),
                      validate=False)
    assert torch.isnan(res.reward[1])


# --- CUDA ----------------------------------------------------------------------------------


def _cuda_batch(n_traj=300, ngroups=40, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n_traj)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    group = rng.integers(0, ngroups, size=n_traj)
    d = rng.random(int(offsets[-1])) * 4
    d0 = rng.random(n_traj) * 4
    return offsets, group, d, d0, int(lengths.max())


@cuda_only
@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_sync_free_path_matches_numpy(name, dtype):
    offsets, group, d, d0, T = _cuda_batch()
    want = mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator=name,
                       backend="numpy")
    dev = torch.device("cuda")
    o = torch.as_tensor(offsets, device=dev)
    g = torch.as_tensor(group, device=dev)
    dd = torch.as_tensor(d, dtype=dtype, device=dev)
    dd0 = torch.as_tensor(d0, dtype=dtype, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = mc.estimate(o, g, distance=dd, initial_distance=dd0, estimator=name,
                          ngroups=int(group.max()) + 1, max_turns=T, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, ref in zip(res, want):
        assert got.device.type == "cuda" and got.dtype == dtype
        np.testing.assert_allclose(got.cpu().double().numpy(), ref, **tol)


@cuda_only
@pytest.mark.parametrize("name", ["mica", "grpo", "mapo"])
def test_cuda_api_path_and_deterministic_mode(name):
    offsets, group, d, d0, _ = _cuda_batch(seed=1)
    want = mc.estimate(offsets, group, distance=d, initial_distance=d0, estimator=name,
                       backend="numpy")
    dev = torch.device("cuda")
    args = dict(distance=torch.as_tensor(d, device=dev),
                initial_distance=torch.as_tensor(d0, device=dev), estimator=name)
    res = mc.estimate(torch.as_tensor(offsets, device=dev), [f"g{x}" for x in group], **args)
    np.testing.assert_allclose(res.advantage.cpu().numpy(), want.advantage, rtol=1e-10,
                               atol=1e-10)
    o, g = torch.as_tensor(offsets, device=dev), torch.as_tensor(group, device=dev)
    a = mc.estimate(o, g, deterministic=True, **args)
    b = mc.estimate(o, g, deterministic=True, **args)
    assert torch.equal(a.advantage, b.advantage)
    np.testing.assert_allclose(a.advantage.cpu().numpy(), want.advantage, rtol=1e-10,
                               atol=1e-10)


@cuda_only
def test_cuda_validation_raises_like_cpu():
    dev = torch.device("cuda")
    d = torch.tensor([1.0, float("inf"), 2.0], device=dev, dtype=torch.float64)
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(torch.tensor([0, 2, 3], device=dev), torch.tensor([0, 1], device=dev),
                    ngroups=2, distance=d,
                    initial_distance=torch.ones(2, device=dev, dtype=torch.float64))
    assert (info.value.column, info.value.row) == ("distance", 1)


def test_math_sanity_of_turn_buckets():
    """Two groups, turn scope: each (group, turn) bucket is normalized on its own."""
    res = mc.estimate(torch.tensor([0, 2, 4, 5]), ["a", "a", "b"],
                      reward=torch.tensor([1.0, 0.0, 3.0, 0.0, 7.0], dtype=torch.float64),
                      estimator="mica_turn", gamma=0.5, eps=0.0, scale="none")
    # G: traj0 [1, 0], traj1 [3, 0], traj2 [7]; group a turn 0: 1 vs 3 -> -1, +1
    np.testing.assert_allclose(res.advantage.numpy(), [-1.0, 0.0, 1.0, 0.0, 0.0])
    assert math.isclose(float(res.returns[0]), 1.0)
