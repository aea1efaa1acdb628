"""Scope ``key`` and the ``gigpo`` preset: hand-computed numbers, GiGPO's own definition, and
every way a key reaches the core (arrays, tensors, Arrow long and nested form, the CLI)."""

import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mica_core as mc

# Group g0: trajectory 0 visits anchor states a, b, c; trajectory 1 visits a, b.
# Group g1: one trajectory, state a. (The same label in another group is another bucket.)
OFFSETS = np.array([0, 3, 5, 6])
GROUP = ["g0", "g0", "g1"]
DIST = np.array([3.0, 2.0, 1.0, 2.0, 1.0, 0.5])
INIT = np.array([4.0, 3.0, 1.0])
KEY = ["a", "b", "c", "a", "b", "a"]


def test_gigpo_hand_computed(backend):
    # IDR: trajectory 0 r = (1, 1, 1), R = 3; trajectory 1 r = (1, 1), R = 2; g1: r = 0.5.
    # Episode level (z of R_i among g0's trajectories): mean 2.5, std (ddof 1) sqrt(0.5):
    #   z = +-0.5 / (sqrt(0.5) + 1e-6). g1 has one trajectory: 0.
    # Step level, gamma 0.95: G = (1 + 0.95 * 1.95, 1.95, 1) = (2.8525, 1.95, 1) and (1.95, 1).
    #   bucket (g0, a) = {2.8525, 1.95}: z = +-0.45125 / (0.45125 sqrt(2) + 1e-6);
    #   bucket (g0, b) = {1.95, 1}: z = +-0.475 / (0.475 sqrt(2) + 1e-6); (g0, c), (g1, a): 0.
    res = backend.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT,
                           estimator="gigpo", key=KEY)
    ep = 0.5 / (math.sqrt(0.5) + 1e-6)
    sa = 0.45125 / (0.45125 * math.sqrt(2) + 1e-6)
    sb = 0.475 / (0.475 * math.sqrt(2) + 1e-6)
    np.testing.assert_allclose(res.advantage, [ep + sa, ep + sb, ep, -ep - sa, -ep - sb, 0.0],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.returns, [2.8525, 1.95, 1.0, 1.95, 1.0, 0.5], rtol=1e-12)


def gigpo_by_definition(offsets, group, rewards, keys, gamma=0.95, eps=1e-6, w=1.0):
    """GiGPO (Feng et al. 2025, arXiv 2505.10978) as its equations read, 'mean_std_norm':
    episode advantage (Eq. 3) = (R_i - mean) / (std + eps) over the trajectories of a group;
    step return (Eq. 5) G_t = sum_k gamma^k r_{t+k}; anchor-state step groups (Eq. 6) = the
    turns of one group with the same key; step advantage (Eq. 7) = (G_t - mean) / (std + eps)
    over a step group, 0 for a step group of one; A = A_E + w A_S (Eq. 8). std with ddof 1."""
    n_traj = len(offsets) - 1
    R = [sum(rewards[offsets[i]:offsets[i + 1]]) for i in range(n_traj)]
    G = np.zeros(len(rewards))
    for i in range(n_traj):
        g = 0.0
        for k in range(offsets[i + 1] - 1, offsets[i] - 1, -1):
            g = rewards[k] + gamma * g
            G[k] = g
    adv = np.zeros(len(rewards))
    for i in range(n_traj):
        peers = [R[j] for j in range(n_traj) if group[j] == group[i]]
        a_e = (R[i] - np.mean(peers)) / (np.std(peers, ddof=1) + eps)
        for k in range(offsets[i], offsets[i + 1]):
            step = [G[m] for j in range(n_traj) if group[j] == group[i]
                    for m in range(offsets[j], offsets[j + 1]) if keys[m] == keys[k]]
            a_s = 0.0 if len(step) == 1 else (G[k] - np.mean(step)) / (np.std(step, ddof=1)
                                                                       + eps)
            adv[k] = a_e + w * a_s
    return adv


def test_gigpo_matches_the_definition_on_random_groups():
    rng = np.random.default_rng(7)
    n_groups, per = 6, 4  # every group has several trajectories (GiGPO's rollout groups)
    lengths = rng.integers(1, 9, n_groups * per)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    group = np.repeat(np.arange(n_groups), per)
    rewards = rng.normal(size=offsets[-1])
    keys = rng.integers(0, 4, offsets[-1])  # few anchor states: step groups of every size
    want = gigpo_by_definition(offsets, group, rewards, keys)
    got = mc.estimate(offsets, group, reward=rewards, estimator="gigpo", key=keys)
    np.testing.assert_allclose(got.advantage, want, rtol=1e-10, atol=1e-10)


def test_same_label_in_two_groups_is_two_buckets():
    a = mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, estimator="gigpo",
                    key=KEY)
    renamed = ["a", "b", "c", "a", "b", "z"]  # g1's lone state renamed: nothing changes
    b = mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, estimator="gigpo",
                    key=renamed)
    np.testing.assert_array_equal(a.advantage, b.advantage)


def test_key_errors():
    kw = dict(distance=DIST, initial_distance=INIT, estimator="gigpo")
    with pytest.raises(mc.MicaInputError, match="scope 'key'") as info:
        mc.estimate(OFFSETS, GROUP, **kw)
    assert info.value.column == "key" and info.value.rule == "required"
    with pytest.raises(mc.MicaInputError, match=r"needs shape \(6,\)"):
        mc.estimate(OFFSETS, GROUP, key=KEY[:5], **kw)
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(OFFSETS, GROUP, key=[0.0, 1.0, np.nan, 0.0, 1.0, 0.0], **kw)
    assert info.value.column == "key" and info.value.row == 2
    # estimators without a key component ignore it
    mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, key=KEY[:2])


def test_key_in_tables_long_nested_and_shuffled():
    want = mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT,
                       estimator="gigpo", key=KEY).advantage
    rows = [dict(group_id=GROUP[i], traj_id=i, turn=k - OFFSETS[i], distance=DIST[k],
                 initial_distance=INIT[i], state_hash=KEY[k])
            for i in range(3) for k in range(OFFSETS[i], OFFSETS[i + 1])]
    perm = np.random.default_rng(0).permutation(len(rows))
    table = pa.Table.from_pylist([rows[p] for p in perm])
    out = mc.compute_advantages(table, "gigpo", columns={"key": "state_hash"})
    np.testing.assert_allclose(out["advantage"].to_numpy(), want[perm], rtol=1e-12)
    nested = pa.table({"group_id": GROUP,
                       "distances": [list(DIST[a:b]) for a, b in zip(OFFSETS, OFFSETS[1:])],
                       "initial_distance": INIT,
                       "keys": [KEY[a:b] for a, b in zip(OFFSETS, OFFSETS[1:])]})
    got = mc.compute_advantages(nested, "gigpo")["advantage"].to_pylist()
    np.testing.assert_allclose([x for row in got for x in row], want, rtol=1e-12)
    bad = nested.set_column(3, "keys", pa.array([["a"], ["a", "b"], ["a"]]))
    with pytest.raises(mc.MicaInputError, match="one key per turn") as info:
        mc.compute_advantages(bad, "gigpo")
    assert info.value.row == 0
    with pytest.raises(mc.MicaInputError, match="scope 'key'"):
        mc.compute_advantages(table, "gigpo")  # no column named "key"


def test_key_from_the_command_line(tmp_path):
    rows = [dict(group_id=GROUP[i], traj_id=i, turn=k - OFFSETS[i], distance=DIST[k],
                 initial_distance=INIT[i], anchor=KEY[k])
            for i in range(3) for k in range(OFFSETS[i], OFFSETS[i + 1])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    res = subprocess.run([sys.executable, "-m", "mica_core.cli", "advantages",
                          str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
                          "--estimator", "gigpo", "--key-col", "anchor"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    want = mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT,
                       estimator="gigpo", key=KEY).advantage
    np.testing.assert_allclose(pq.read_table(tmp_path / "out.parquet")["advantage"],
                               want, rtol=1e-12)


def test_key_with_torch_tensors():
    torch = pytest.importorskip("torch")
    want = mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT,
                       estimator="gigpo", key=KEY).advantage
    got = mc.estimate(torch.tensor(OFFSETS), GROUP, distance=torch.tensor(DIST),
                      initial_distance=torch.tensor(INIT), estimator="gigpo",
                      key=torch.tensor([0, 1, 2, 0, 1, 0]))
    np.testing.assert_allclose(got.advantage.numpy(), want, rtol=1e-12)


# --------------------------------------------------------------------------- out=


def test_out_fills_the_callers_arrays(backend):
    outs = tuple(np.full(6, np.nan) for _ in range(3))
    if backend.tensors:  # torch results are new tensors on the input's device
        with pytest.raises(ValueError, match="out= is for numpy input"):
            backend.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, out=outs)
        return
    res = backend.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, out=outs)
    assert all(a is b for a, b in zip(res, outs))
    want = backend.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT)
    for a, b in zip(outs, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, match", [
    ((np.zeros(6), np.zeros(6)), "three arrays"),
    ((np.zeros(6), np.zeros(6), np.zeros(5)), r"needs shape \(6,\)"),
    ((np.zeros(6), np.zeros(6), np.zeros(6, dtype=np.float32)), "float64"),
    ((np.zeros(6), np.zeros(12)[::2], np.zeros(6)), "contiguous"),
])
def test_out_rejects_wrong_arrays(bad, match):
    with pytest.raises(mc.MicaInputError, match=match):
        mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, out=bad)


def test_out_rejects_overlapping_arrays_and_float32_values():
    a = np.zeros(6)
    with pytest.raises(mc.MicaInputError, match="overlap"):
        mc.estimate(OFFSETS, GROUP, distance=DIST, initial_distance=INIT, out=(a, a, np.zeros(6)))
    with pytest.raises(ValueError, match="float32"):
        mc.estimate(OFFSETS, GROUP, distance=DIST.astype(np.float32),
                    initial_distance=INIT.astype(np.float32),
                    out=tuple(np.zeros(6) for _ in range(3)))
