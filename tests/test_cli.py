"""The `mica` console script, run as a user runs it: a subprocess on real files."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import mica_core as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def mica_cmd():
    exe = shutil.which("mica", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "mica_core.cli"]


def run(*args, **kw):
    return subprocess.run(mica_cmd() + list(args), capture_output=True, text=True, **kw)


def sample(shuffle=True):
    from mica_core.demo import sample_rollouts

    t = sample_rollouts(n_groups=3, rollouts=4, max_turns=6, seed=1)
    if shuffle:
        t = t.take(np.random.default_rng(0).permutation(t.num_rows))
    return t


def test_console_script_is_installed():
    exe = shutil.which("mica", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("not running inside the project's virtual environment")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "advantages" in out.stdout


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "csv"])
def test_advantages_matches_python_api(tmp_path, fmt):
    table = sample()
    src = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, src)
    elif fmt == "arrow":
        with pa.OSFile(str(src), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    else:
        pcsv.write_csv(table, src)
    out = tmp_path / "out.parquet"
    res = run("advantages", str(src), str(out), "--estimator", "mapo", "--gamma", "0.9",
              "--baseline", "loo")
    assert res.returncode == 0, res.stderr
    got = pq.read_table(out)
    want = mc.compute_advantages(table, "mapo", gamma=0.9, baseline="loo")
    assert got["traj_id"].to_pylist() == table["traj_id"].to_pylist()
    np.testing.assert_allclose(got["advantage"].to_numpy(), want["advantage"].to_numpy(),
                               atol=1e-12)


def test_column_flags(tmp_path):
    t = sample().rename_columns(["uid", "ep", "step", "d", "d0"])
    pq.write_table(t, tmp_path / "in.parquet")
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"),
              "--group-col", "uid", "--traj-col", "ep", "--turn-col", "step",
              "--distance-col", "d", "--initial-distance-col", "d0")
    assert res.returncode == 0, res.stderr
    assert pq.read_table(tmp_path / "o.parquet").column_names[-3:] == ["reward", "return",
                                                                         "advantage"]


def test_existing_output_kept_unless_force(tmp_path):
    pq.write_table(sample(), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    res = run("advantages", str(tmp_path / "in.parquet"), str(out))
    assert res.returncode == 2 and "--force" in res.stderr
    assert out.read_bytes() == b"precious"
    res = run("advantages", str(tmp_path / "in.parquet"), str(out), "--force")
    assert res.returncode == 0 and pq.read_table(out).num_rows == sample().num_rows


def test_bad_input_exit_2_one_line_and_no_output(tmp_path):
    t = sample(shuffle=False)
    turns = t["turn"].to_numpy().copy()
    turns[5] = turns[4]  # a duplicate turn
    t = t.set_column(2, "turn", pa.array(turns))
    pq.write_table(t, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    res = run("advantages", str(tmp_path / "in.parquet"), str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'turn'" in lines[0] and "row 5" in lines[0]
    assert "duplicate" in lines[0]
    assert not out.exists() and os.listdir(tmp_path) == ["in.parquet"]


def test_bad_paths_and_extensions(tmp_path):
    res = run("advantages", str(tmp_path / "missing.parquet"), str(tmp_path / "o.parquet"))
    assert res.returncode == 2 and "no such file" in res.stderr
    pq.write_table(sample(), tmp_path / "in.parquet")
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "o.csv"))
    assert res.returncode == 2 and ".parquet" in res.stderr
    (tmp_path / "in.txt").write_text("x")
    res = run("advantages", str(tmp_path / "in.txt"), str(tmp_path / "o.parquet"))
    assert res.returncode == 2 and "extension" in res.stderr


def test_estimators_listing():
    res = run("estimators")
    assert res.returncode == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names[:8] == mc.list_estimators()[:8]


def test_progress_goes_to_stderr_when_asked(tmp_path):
    pq.write_table(sample(), tmp_path / "in.parquet")
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "o.parquet"),
              "--progress", "on")
    assert res.returncode == 0 and "[3/3]" in res.stderr and res.stdout == ""
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "o2.parquet"))
    assert res.stderr == ""  # not a terminal: quiet


def test_env_commands_route_to_mica_train():
    res = run("env", "--help")
    assert res.returncode == 0 and "replay" in res.stdout
    res = run("env", "eval", "--policy", "nonsense")
    assert res.returncode == 2


# Runs the `mica` command in a process where `import mica_train` fails, as in an install that
# has the core alone; also records whether anything imported mica_train.
_WITHOUT_TRAIN = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mica_train" or name.startswith("mica_train."):
            raise ImportError("mica_train is not installed")
sys.meta_path.insert(0, Block())
from mica_core.cli import main
code = main(sys.argv[1:])
assert not any(m.startswith("mica_train") for m in sys.modules), "core imported mica_train"
sys.exit(code)
"""


def test_core_commands_work_without_mica_train(tmp_path):
    def run_core(*args):
        return subprocess.run([sys.executable, "-c", _WITHOUT_TRAIN, *args],
                              capture_output=True, text=True)

    res = run_core("--help")
    assert res.returncode == 0 and "advantages" in res.stdout and "estimators" in res.stdout
    assert "train" not in res.stdout.split("options:")[0].split()  # not listed without it
    res = run_core("estimators")
    assert res.returncode == 0 and res.stdout.split()[0] == "mica"
    pq.write_table(sample(), tmp_path / "in.parquet")
    res = run_core("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"))
    assert res.returncode == 0, res.stderr
    assert pq.read_table(tmp_path / "out.parquet").num_rows == sample().num_rows
    res = run_core("train", "--help")
    assert res.returncode == 2 and "not installed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_trainer_commands_come_from_entry_points():
    from mica_core.cli import plugin_commands

    found = plugin_commands()
    assert {"env", "train", "eval", "tiny-model", "warm-start", "study", "report"} <= set(found)
    assert all(p.value.startswith("mica_train") for p in found.values())
    res = run("--help")
    assert res.returncode == 0 and "warm-start" in res.stdout


def test_backend_choices_are_the_api_backends():
    from mica_core.api import BACKENDS
    from mica_core.cli import _advantages_parser

    (action,) = [a for a in _advantages_parser()._actions if a.dest == "backend"]
    assert tuple(action.choices) == BACKENDS and action.default == "auto"


# ----------------------------------------------------------------- commands of other packages

# A throwaway distribution "brokenplug": its metadata (a .dist-info folder with
# entry_points.txt, all importlib.metadata needs) and modules, on PYTHONPATH of the child.
PLUGIN_ENTRY_POINTS = {
    "syntax": "brokenplug_syntax:main",          # a syntax error in the module
    "boom": "brokenplug_boom:main",              # raises while imported
    "exit-at-import": "brokenplug_exit:main",    # SystemExit(7) while imported
    "noattr": "brokenplug_ok:missing",           # no such attribute
    "badspec": "not a valid spec!!",             # not module:attribute
    "notcallable": "brokenplug_ok:VALUE",        # not a function
    "runfail": "brokenplug_ok:fail",             # raises while it runs
    "badexit": "brokenplug_ok:bad_exit",         # SystemExit with a message while it runs
    "ok": "brokenplug_ok:main",                  # works
    "train": "brokenplug_ok:main",               # contends with mica_train's train
    "advantages": "brokenplug_ok:main",          # contends with a built-in
}
PLUGIN_MODULES = {
    "brokenplug_syntax": "def main(argv:\n",
    "brokenplug_boom": "raise RuntimeError('boom at import')\n",
    "brokenplug_exit": "raise SystemExit(7)\n",
    "brokenplug_ok": ("import sys\nVALUE = 3\n"
                      "def main(argv):\n    print('brokenplug ran', argv)\n    return 0\n"
                      "def fail(argv):\n    raise ValueError('bad things')\n"
                      "def bad_exit(argv):\n    sys.exit('a message, not a status')\n"),
}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    info = site / "brokenplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[mica.commands]\n" + "".join(f"{k} = {v}\n" for k, v in PLUGIN_ENTRY_POINTS.items()))
    for name, code in PLUGIN_MODULES.items():
        (site / f"{name}.py").write_text(code)
    return site


def run_with(site, *args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("MICA_TRACEBACK", None)
    return subprocess.run(mica_cmd() + list(args), capture_output=True, text=True, env=env,
                          **kw)


def warnings_and_errors(stderr):
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    return ([ln for ln in lines if ln.startswith("mica: warning: ")],
            [ln for ln in lines if not ln.startswith("mica: warning: ")])


def test_broken_plugins_do_not_break_the_core_commands(tmp_path, plugin_site):
    res = run_with(plugin_site, "--help")
    assert res.returncode == 0, res.stderr
    warns, errors = warnings_and_errors(res.stderr)
    assert errors == []
    assert any("'advantages'" in w and "built-in" in w and "brokenplug" in w for w in warns)
    assert any("'train'" in w and "'brokenplug'" in w for w in warns), warns
    listed = res.stdout.split("options:")[0]
    for name in ("advantages", "estimators", "train", "syntax", "boom", "ok"):
        assert name in listed
    assert "see `mica boom --help` (from brokenplug)" in " ".join(res.stdout.split())

    res = run_with(plugin_site, "advantages", "--help")
    assert res.returncode == 0 and res.stderr == "" and "--estimator" in res.stdout
    pq.write_table(sample(), tmp_path / "in.parquet")
    res = run_with(plugin_site, "advantages", str(tmp_path / "in.parquet"),
                   str(tmp_path / "out.parquet"))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert pq.read_table(tmp_path / "out.parquet").num_rows == sample().num_rows
    res = run_with(plugin_site, "estimators")
    assert res.returncode == 0 and res.stderr == "" and res.stdout.split()[0] == "mica"


@pytest.mark.parametrize("name, word", [
    ("syntax", "SyntaxError"), ("boom", "RuntimeError: boom at import"),
    ("exit-at-import", "exited with status 7"), ("noattr", "AttributeError"),
    ("badspec", "while loading"), ("notcallable", "not callable"),
    ("runfail", "ValueError: bad things"), ("badexit", "a message, not a status"),
])
def test_a_broken_plugin_is_one_line_naming_it(plugin_site, name, word):
    res = run_with(plugin_site, name, "x")
    assert res.returncode == 2, (res.stdout, res.stderr)
    warns, errors = warnings_and_errors(res.stderr)
    assert warns == [] and len(errors) == 1, res.stderr
    assert errors[0].startswith(f"mica: error: the {name!r} command ")
    assert "'brokenplug'" in errors[0] and word in errors[0], errors[0]


def test_a_working_plugin_runs_and_traceback_on_request(plugin_site):
    res = run_with(plugin_site, "ok", "a", "b")
    assert res.returncode == 0 and "brokenplug ran ['a', 'b']" in res.stdout
    env = dict(os.environ, PYTHONPATH=str(plugin_site), MICA_TRACEBACK="1")
    res = subprocess.run(mica_cmd() + ["boom"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "Traceback" in res.stderr and "boom at import" in res.stderr


def test_a_plugin_cannot_shadow_the_trainer_or_a_builtin(plugin_site):
    res = run_with(plugin_site, "train", "--help")
    assert res.returncode == 0, res.stderr
    assert "--print-config" in res.stdout and "brokenplug ran" not in res.stdout
    warns, errors = warnings_and_errors(res.stderr)
    assert errors == [] and len(warns) == 1 and "brokenplug_ok:main" in warns[0]


_IMPORTS = """
import sys
from mica_core.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "mica_train", "numba"})
print("HEAVY", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["advantages", "--help"], ["--help"], ["estimators"],
                                  ["advantages", "IN", "OUT"]])
def test_core_commands_import_neither_torch_nor_the_trainer(tmp_path, args):
    pq.write_table(sample(), tmp_path / "in.parquet")
    args = [str(tmp_path / "in.parquet") if a == "IN" else str(tmp_path / "out.parquet")
            if a == "OUT" else a for a in args]
    res = subprocess.run([sys.executable, "-c", _IMPORTS, *args], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "HEAVY", res.stderr


def test_startup_bench_section_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--sections", "startup",
                           "--repeats", "1", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    cases = json.loads(out.read_text())["cases"]
    names = [c["name"] for c in cases if c["section"] == "startup"]
    assert names == ["mica --help", "mica advantages --help", "mica advantages (12k turns)"]
    assert all(c["median_s"] > 0 and c["launches"] >= 5 for c in cases)
    assert cases[-1]["heavy_imports"] == []


def test_streamed_parquet_equals_in_memory(tmp_path):
    from mica_core.demo import sample_rollouts

    t = sample_rollouts(n_groups=12, rollouts=4, max_turns=8, seed=5)
    pq.write_table(t, tmp_path / "in.parquet", row_group_size=37)
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
              "--stream", "on", "--batch-rows", "40")
    assert res.returncode == 0, res.stderr
    got = pq.read_table(tmp_path / "out.parquet")
    want = mc.compute_advantages(t)
    assert got["traj_id"].to_pylist() == t["traj_id"].to_pylist()
    np.testing.assert_allclose(got["advantage"].to_numpy(), want["advantage"].to_numpy(),
                               atol=1e-12)


def test_streamed_groups_not_stored_together_is_an_error(tmp_path):
    from mica_core.demo import sample_rollouts

    t = sample_rollouts(n_groups=3, rollouts=2, max_turns=3, seed=5)
    first = t.filter(pa.compute.equal(t["group_id"], "scenario-0"))
    rest = t.filter(pa.compute.not_equal(t["group_id"], "scenario-0"))
    split = pa.concat_tables([first.slice(0, 2), rest, first.slice(2)])
    pq.write_table(split, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    res = run("advantages", str(tmp_path / "in.parquet"), str(out), "--stream", "on",
              "--batch-rows", "1")
    assert res.returncode == 2
    assert "column 'group_id'" in res.stderr and "stored together" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("stream", ["off", "on"])
def test_output_encodings_ids_dictionary_floats_plain(tmp_path, stream):
    """Ids and turns keep dictionary encoding; float columns (distances, the three outputs)
    are written plain: a dictionary attempt on measured values only costs time."""
    pq.write_table(sample(shuffle=False), tmp_path / "in.parquet")
    res = run("advantages", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
              "--stream", stream)
    assert res.returncode == 0, res.stderr
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    rg = meta.row_group(0)
    encodings = {rg.column(i).path_in_schema: rg.column(i).encodings
                 for i in range(rg.num_columns)}
    for name in ("group_id", "traj_id", "turn"):
        assert "RLE_DICTIONARY" in encodings[name], (name, encodings[name])
    for name in ("distance", "initial_distance", "reward", "return", "advantage"):
        assert "RLE_DICTIONARY" not in encodings[name], (name, encodings[name])


def test_state_option_flags_reach_compute_advantages(tmp_path):
    """--state-weights/--state-epsilon/--state-kind (derived from EstimatorOptions) are
    compute_advantages' state_weights/epsilon/distance_kind."""
    from mica_core.cli import main

    rng = np.random.default_rng(3)
    rows = [{"group_id": i % 2, "traj_id": i, "turn": t,
             "state": [float(x) for x in rng.integers(-9, 2, size=2)],
             "initial_state": [-9.0, -7.0]} for i in range(4) for t in range(3)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "in.parquet")
    flags = ["--state-weights", "1", "2.5", "--state-epsilon", "0.5", "--state-kind", "norm"]
    assert main(["advantages", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
                 *flags]) == 0
    want = mc.compute_advantages(table, state_weights=[1.0, 2.5], epsilon=0.5,
                                 distance_kind="norm")
    got = pq.read_table(tmp_path / "out.parquet")
    np.testing.assert_array_equal(got["advantage"].to_numpy(), want["advantage"].to_numpy())
    default = mc.compute_advantages(table)
    assert not np.array_equal(default["advantage"].to_numpy(), want["advantage"].to_numpy())


def test_a_reader_that_stops_early_ends_mica_quietly():
    """`mica estimators | head -0`: the closed pipe ends mica as SIGPIPE ends a program (status
    141), with nothing on stderr."""
    mica = shutil.which("mica", path=os.path.dirname(sys.executable))
    read, write = os.pipe()
    proc = subprocess.Popen([mica, "estimators"], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)  # the reader is gone before mica writes a line
    err = proc.stderr.read()
    assert proc.wait() == 141, err
    assert err == b""
