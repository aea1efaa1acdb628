"""The benchmark runner and its baselines (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mica_core as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.baselines import BASELINES
from bench.data import groups_of, long_table, make_batch


@pytest.mark.parametrize("layout", ["contiguous", "shuffled"])
@pytest.mark.parametrize("lengths", ["uniform", "skewed"])
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_compute_mica(name, lengths, layout):
    if name in ("pandas_groupby", "polars_window"):
        pytest.importorskip(name.split("_")[0])
    b = groups_of(6, lengths=lengths, layout=layout, seed=2)
    prepare, run = BASELINES[name]
    got = run(prepare(b.offsets, b.group, b.distance, b.initial_distance))
    want = mc.estimate(b.offsets, b.group, distance=b.distance,
                       initial_distance=b.initial_distance, backend="numpy")
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w, rtol=1e-9, atol=1e-9)


def test_batches_have_the_requested_shape():
    b = make_batch(20_000, lengths="skewed", layout="shuffled", seed=1)
    assert abs(b.n_turns - 20_000) < 4_000
    assert np.bincount(b.group).min() == np.bincount(b.group).max() == 8
    assert np.diff(b.offsets).min() >= 1
    assert (np.diff(b.group) != 0).sum() > b.n_groups  # groups interleave
    table = long_table(b, shuffle_rows=True)
    assert table.num_rows == b.n_turns
    out = mc.compute_advantages(table)
    ref = mc.estimate(b.offsets, b.group, distance=b.distance,
                      initial_distance=b.initial_distance)
    order = np.lexsort((table.column("turn").to_numpy(), table.column("traj_id").to_numpy()))
    np.testing.assert_allclose(out.column("advantage").to_numpy()[order], ref.advantage,
                               rtol=1e-12, atol=1e-12)


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--presets", "mica,grpo",
                           "--turns", "20000", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"command", "config", "machine", "cases", "targets"} <= set(result)
    assert result["config"]["quick"] is True
    assert result["machine"]["cpu_count"] >= 1
    sections = {c["section"] for c in result["cases"]}
    assert {"floor", "kernels", "api", "baselines", "memory"} <= sections
    kernels = [c for c in result["cases"] if c["section"] == "kernels"]
    assert {c["backend"] for c in kernels} >= {"numpy", "cython"}
    assert all(c["median_s"] > 0 and c["x_floor"] > 0 for c in kernels)
    checked = [c for c in result["cases"] if c["section"] == "baselines" and "x_mica" in c]
    assert checked and all(c["max_abs_diff_vs_mica"] <= 1e-9 for c in checked)
    assert "memory floor" in proc.stdout and "wrote" in proc.stdout
