"""The contract's worked example (tests/data/worked_example.json) on every
backend and through the Arrow path."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

import mica_core as mc

HERE = os.path.dirname(__file__)
EXAMPLE = json.load(open(os.path.join(HERE, "data", "worked_example.json")))
CASES = [(k, "mica" if k == "mica baseline=loo" else k,
          {"baseline": "loo"} if k == "mica baseline=loo" else {}) for k in EXAMPLE["expected"]]


def arrays():
    inp = EXAMPLE["input"]
    lengths = [len(t["distances"]) for t in inp]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dist = np.concatenate([t["distances"] for t in inp])
    init = np.array([t["initial_distance"] for t in inp])
    return offsets, [t["group"] for t in inp], dist, init


def expected(key, field):
    exp = EXAMPLE["expected"][key]
    if field == "advantage" and not isinstance(exp[0][0], dict):
        return np.array([x for tr in exp for x in tr])
    return np.array([x[field] for tr in exp for x in tr])


@pytest.mark.parametrize("key,name,opts", CASES)
def test_worked_example_arrays(backend, key, name, opts):
    offsets, groups, dist, init = arrays()
    res = backend.estimate(offsets, groups, distance=dist, initial_distance=init,
                           estimator=name, **opts)
    np.testing.assert_allclose(res.advantage, expected(key, "advantage"), atol=1e-11)
    if isinstance(EXAMPLE["expected"][key][0][0], dict):
        np.testing.assert_allclose(res.reward, expected(key, "reward"), atol=1e-12)
        np.testing.assert_allclose(res.returns, expected(key, "return"), atol=1e-11)


@pytest.mark.parametrize("key,name,opts", CASES)
def test_worked_example_table_shuffled(key, name, opts):
    offsets, groups, dist, init = arrays()
    rows = []
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        for t in range(hi - lo):
            rows.append({"group_id": groups[i], "traj_id": i, "turn": t,
                         "distance": dist[lo + t], "initial_distance": init[i]})
    perm = np.random.default_rng(1).permutation(len(rows))
    table = pa.Table.from_pylist([rows[k] for k in perm])
    out = mc.compute_advantages(table, name, **opts)
    assert out.column_names[:5] == ["group_id", "traj_id", "turn", "distance",
                                    "initial_distance"]
    np.testing.assert_allclose(out["advantage"].to_numpy(),
                               expected(key, "advantage")[perm], atol=1e-11)
