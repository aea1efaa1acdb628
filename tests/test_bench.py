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


def _learning_run_folder(root):
    """A run folder as scripts/smollm2-learning-run.sh leaves it (made-up numbers)."""
    (root / "train").mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps({"seconds": 5, "before": {"pass_rate": 0.0},
                                                   "after": {"pass_rate": 0.1}}))
    for when, rate in (("before", 0.0), ("after", 0.1)):
        (root / f"eval_{when}.json").write_text(json.dumps({"n": 30, "pass_rate": rate}))
        (root / f"eval_{when}.jsonl").write_text(json.dumps({"turns": [{"reply": when}]}) + "\n")
    (root / "report.html").write_text("<html>report</html>")
    (root / "train" / "config.json").write_text(json.dumps({"steps": 2, "optim": {"lr": 2e-4}}))
    lines = [{"step": s, "pass_rate": 0.0, "time_step": 10.0 + s, "loss": 0.5, "extra": 1} for s in (1, 2)]
    lines.append({"eval": True, "pass_rate": 0.1})   # a line that is not a training step
    (root / "train" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_learning_run_record_holds_the_run_and_its_transcripts(tmp_path):
    from bench.smollm2_learning import main

    run, out = tmp_path / "run", tmp_path / "res" / "smollm2_learning.json"
    _learning_run_folder(run)
    assert main([str(run), "--out", str(out), "--note", "quiet machine"]) == 0
    rec = json.loads(out.read_text())
    assert rec["summary"]["after"]["pass_rate"] == 0.1 and rec["evaluations"]["before"]["n"] == 30
    assert [s["step"] for s in rec["steps"]] == [1, 2] and rec["steps"][1]["time_step"] == 12.0
    assert "extra" not in rec["steps"][0] and rec["config"]["optim"]["lr"] == 2e-4
    assert rec["note"] == "quiet machine" and rec["machine"]["cpu_count"] >= 1
    for name in ("eval_before.jsonl", "eval_after.jsonl", "report.html"):
        assert (out.parent / "smollm2_learning" / name).read_bytes() == (run / name).read_bytes()


@pytest.mark.parametrize("missing", ["summary.json", "eval_after.json", "train/metrics.jsonl", "report.html"])
def test_learning_run_record_names_a_missing_part_and_writes_nothing(tmp_path, missing):
    from bench.smollm2_learning import main

    run, out = tmp_path / "run", tmp_path / "res" / "smollm2_learning.json"
    _learning_run_folder(run)
    (run / missing).unlink()
    with pytest.raises(SystemExit) as err:
        main([str(run), "--out", str(out)])
    assert str(err.value).startswith("smollm2_learning: error: ") and missing in str(err.value)
    assert not out.parent.exists()


def test_learning_run_record_names_a_corrupt_file_and_writes_nothing(tmp_path):
    from bench.smollm2_learning import main

    run, out = tmp_path / "run", tmp_path / "res" / "smollm2_learning.json"
    _learning_run_folder(run)
    with open(run / "train" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "time_step": \n')   # a line cut short
    with pytest.raises(SystemExit) as err:
        main([str(run), "--out", str(out)])
    msg = str(err.value)
    assert msg.startswith("smollm2_learning: error: ") and "metrics.jsonl is not valid JSON" in msg
    assert "\n" not in msg and not out.parent.exists()
