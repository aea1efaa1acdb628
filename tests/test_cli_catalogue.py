"""`mica advantages` against hostile input, driven from one table.

Each case of ``CASES`` is an input table (or a command-line option) with the exit status it
must give, a word its one-line message must contain, and the promise that OUT is left as it
was (absent, or an existing file with ``--force``: never half written, never replaced by a
failed run). Every case runs on the in-memory and the streamed path (``--stream off`` and
``--stream on --batch-rows 1``, one chunk per group) and for Parquet, CSV and Arrow IPC
inputs. The catalogue calls :func:`mica_core.cli.main` in this process (the console script's
own code, minus the interpreter start-up); the behaviours that belong to the process (exit
on a signal, two processes racing for OUT, file modes, permissions) spawn the real console
script below it.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import mica_core as mc
from mica_core.cli import main

FORMATS = {"parquet": ".parquet", "csv": ".csv", "ipc": ".arrow"}
PATHS = {"in-memory": ["--stream", "off"], "streamed": ["--stream", "on", "--batch-rows", "1"]}
OUTPUTS = ["reward", "return", "advantage"]
PRECIOUS = b"an earlier result"


def base_rows() -> list[dict]:
    """Three groups of rollouts, rows stored group by group (as the streamed path needs)."""
    rows = []
    for group, traj, n_turns, d0 in (("a", 0, 2, 6.0), ("a", 1, 1, 6.0), ("b", 2, 2, 3.0),
                                     ("c", 3, 1, 4.0), ("c", 4, 3, 4.0)):
        for t in range(n_turns):
            rows.append({"group_id": group, "traj_id": traj, "turn": t,
                         "distance": d0 - 0.5 * (t + 1) + 0.25 * traj, "initial_distance": d0})
    return rows


def table_of(rows) -> pa.Table:
    return pa.Table.from_pylist(rows)


def with_rows(**changes):
    """The base table with ``{column: {row: value}}`` changed."""
    rows = base_rows()
    for column, values in changes.items():
        for row, value in values.items():
            rows[row][column] = value
    return table_of(rows)


def with_column(name, array):
    t = table_of(base_rows())
    return t.set_column(t.column_names.index(name), name, array)


def reused_trajectory_ids():
    """Every group numbers its rollouts 0, 1, ...: the ids name two trajectories each."""
    rows = base_rows()
    for row in rows:
        row["traj_id"] = {0: 0, 1: 1, 2: 0, 3: 0, 4: 1}[row["traj_id"]]
    return table_of(rows)


def duplicate_column():
    t = table_of(base_rows())
    return pa.Table.from_arrays(t.columns + [t.column("turn")], t.column_names + ["turn"])


def state_columns(initial_axes):
    t = table_of(base_rows())
    n = t.num_rows
    state = pa.array([[-2.0, -1.5, 0.5]] * n, pa.list_(pa.float64(), 3))
    initial = pa.array([[-3.0] * initial_axes] * n, pa.list_(pa.float64(), initial_axes))
    return t.drop_columns(["distance", "initial_distance"]).append_column(
        "state", state).append_column("initial_state", initial)


def state_table(state=None, initial=None):
    """Three-axis states (and initial states) on every row, one value changed: ``state`` /
    ``initial`` are ``(row, axis, value)``."""
    t = table_of(base_rows())
    n = t.num_rows
    states = [[-2.0, -1.5, 0.5] for _ in range(n)]
    initials = [[-3.0, -3.0, -3.0] for _ in range(n)]
    for rows, change in ((states, state), (initials, initial)):
        if change is not None:
            row, axis, value = change
            traj = base_rows()[row]["traj_id"]
            # an initial state is one per trajectory: change it on all of its rows
            targets = [r for r in range(n) if base_rows()[r]["traj_id"] == traj] \
                if rows is initials else [row]
            for r in targets:
                rows[r][axis] = value
    return t.drop_columns(["distance", "initial_distance"]).append_column(
        "state", pa.array(states, pa.list_(pa.float64(), 3))).append_column(
        "initial_state", pa.array(initials, pa.list_(pa.float64(), 3)))


@dataclass
class Case:
    name: str
    table: object  # () -> pa.Table
    code: int
    word: str | None = None
    args: tuple = ()
    formats: tuple = tuple(FORMATS)  # CSV cannot hold list or struct columns
    output_rows: int | None = None
    csv_word: str | None = None  # CSV reads "nan" as null (Arrow's and pandas' default)


CASES = [
    Case("valid", lambda: table_of(base_rows()), 0, output_rows=len(base_rows())),
    Case("header only", lambda: table_of(base_rows()).slice(0, 0), 0, output_rows=0),
    Case("duplicate turn", lambda: with_rows(turn={1: 0}), 2, "duplicate"),
    Case("missing turn", lambda: with_rows(turn={8: 5}), 2, "missing"),
    Case("negative distance", lambda: with_rows(distance={3: -0.5}), 2, "negative"),
    Case("NaN distance", lambda: with_rows(distance={4: float("nan")}), 2, "finite",
         csv_word="null"),
    Case("null distance", lambda: with_rows(distance={4: None}), 2, "null"),
    Case("no turn column", lambda: table_of(base_rows()).drop_columns(["turn"]), 2, "turn"),
    Case("text distances", lambda: with_column("distance", pa.array(["x"] * 9)), 2, "numeric"),
    Case("fractional turns", lambda: with_column("turn", pa.array([0.5] * 9)), 2, "integer"),
    Case("initial distance changes", lambda: with_rows(initial_distance={1: 9.0}), 2,
         "initial_distance"),
    Case("trajectory ids reused across groups", reused_trajectory_ids, 2,
         "more than one group"),
    Case("NaN group label", lambda: with_column(
        "group_id", pa.array([1.0, 1.0, 1.0, float("nan"), float("nan"), 3.0, 3.0, 3.0, 3.0])),
        2, "finite", csv_word="null"),
    Case("duplicate column name", duplicate_column, 2, "turn"),
    Case("struct group ids", lambda: with_column(
        "group_id", pa.array([{"k": r["group_id"]} for r in base_rows()])), 2, "group_id",
        formats=("parquet", "ipc")),
    Case("list trajectory ids", lambda: with_column(
        "traj_id", pa.array([[r["traj_id"]] for r in base_rows()])), 2, "traj_id",
        formats=("parquet", "ipc")),
    Case("state axes differ from initial_state", lambda: state_columns(2), 2, "axes",
         formats=("parquet", "ipc")),
    # Squares of 1e155 are past float64: refused (by row and axis) before any is taken.
    Case("state 1e155", lambda: state_table(state=(4, 1, -1e155)), 2,
         "column 'state', row 4: state value (axis 1) -1e+155 is too large",
         formats=("parquet", "ipc")),
    Case("state 1e300", lambda: state_table(state=(6, 0, 1e300)), 2, "row 6: state value",
         formats=("parquet", "ipc")),
    Case("state 1e101", lambda: state_table(state=(2, 2, -1e101)), 2, "(rule: magnitude)",
         formats=("parquet", "ipc")),
    Case("initial state 1e200", lambda: state_table(initial=(5, 0, -1e200)), 2,
         "column 'initial_state', row 5", formats=("parquet", "ipc")),
    Case("distance just past the limit", lambda: with_rows(distance={3: 1.0000001e100}), 2,
         "1.0000001e+100 is too large: |values| must be at most 1e+100"),
    Case("--eps nan", lambda: table_of(base_rows()), 2, "eps", args=("--eps", "nan")),
    Case("--eps negative", lambda: table_of(base_rows()), 2, "eps", args=("--eps", "-5")),
    Case("--batch-rows 0", lambda: table_of(base_rows()), 2, "batch-rows",
         args=("--batch-rows", "0")),
    Case("--batch-rows negative", lambda: table_of(base_rows()), 2, "batch-rows",
         args=("--batch-rows", "-3")),
]


def write_input(table: pa.Table, folder, fmt: str) -> str:
    path = os.path.join(folder, "in" + FORMATS[fmt])
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def run_main(capsys, *argv):
    code = main(["advantages", *argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(err, word):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mica: error: "), err
    assert word in lines[0], lines[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case, fmt", [(c, f) for c in CASES for f in FORMATS if f in c.formats],
                         ids=[f"{c.name}-{f}" for c in CASES for f in FORMATS if f in c.formats])
def test_catalogue(tmp_path, capsys, case, fmt, path):
    # (formats that cannot hold a case's input, e.g. a struct column in CSV, are not run)
    src = write_input(case.table(), str(tmp_path), fmt)
    out = tmp_path / "out.parquet"
    argv = [src, str(out), *PATHS[path]]
    if case.args:  # the option given last wins over PATHS' --batch-rows
        argv += list(case.args)
    code, err = run_main(capsys, *argv)
    assert code == case.code, err
    if case.code == 0:
        assert err == ""
        got = pq.read_table(out)
        assert got.num_rows == case.output_rows
        assert got.column_names[-3:] == OUTPUTS
        if case.output_rows:
            want = mc.compute_advantages(table_of(base_rows()))
            np.testing.assert_allclose(got["advantage"].to_numpy(),
                                       want["advantage"].to_numpy(), atol=1e-12)
        return
    word = case.csv_word if fmt == "csv" and case.csv_word else case.word
    assert_one_line(err, word)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(src)]  # OUT absent, no leftovers
    # An existing OUT survives a failed --force run whole.
    out.write_bytes(PRECIOUS)
    code, err = run_main(capsys, *argv, "--force")
    assert code == case.code
    assert_one_line(err, word)
    assert out.read_bytes() == PRECIOUS
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(src), "out.parquet"])


@pytest.mark.parametrize("fmt", ["csv", "ipc"])
def test_streamed_progress_without_a_known_total(tmp_path, capsys, fmt):
    """CSV and IPC inputs have no row count before reading: progress counts rows only."""
    src = write_input(table_of(base_rows()), str(tmp_path), fmt)
    code, err = run_main(capsys, src, str(tmp_path / "out.parquet"), "--stream", "on",
                         "--batch-rows", "1", "--progress", "on")
    assert code == 0, err
    assert f"{len(base_rows())} rows" in err and "/" not in err.split("\r")[-1]


# --------------------------------------------------------------------------- OUT itself


@pytest.mark.parametrize("path", PATHS)
def test_out_where_no_file_can_be_created_names_the_reason(tmp_path, capsys, path):
    """/proc exists and root may write to it, but no file can be created there: the message
    says that, not that /proc does not exist."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    code, err = run_main(capsys, src, "/proc/x.parquet", *PATHS[path])
    assert code == 2
    assert_one_line(err, "/proc")
    assert "cannot create" in err and "/proc: No such file or directory" not in err, err


@pytest.mark.parametrize("path", PATHS)
def test_out_in_a_missing_folder(tmp_path, capsys, path):
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    code, err = run_main(capsys, src, str(tmp_path / "nodir" / "x.parquet"), *PATHS[path])
    assert code == 2
    assert_one_line(err, "no such folder")
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]  # no folder created either


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_out_is_a_directory(tmp_path, capsys, path, force):
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    out = tmp_path / "out.parquet"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = run_main(capsys, src, str(out), *PATHS[path], *(["--force"] if force else []))
    assert code == 2
    assert_one_line(err, "is a directory")
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["in.parquet", "out.parquet"]


@pytest.mark.parametrize("path", PATHS)
def test_out_exists_without_force(tmp_path, capsys, path):
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    out = tmp_path / "out.parquet"
    out.write_bytes(PRECIOUS)
    code, err = run_main(capsys, src, str(out), *PATHS[path])
    assert code == 2
    assert_one_line(err, "--force")
    assert out.read_bytes() == PRECIOUS


def test_os_errors_while_writing_are_one_line(tmp_path, capsys, monkeypatch):
    """An OSError the up-front checks cannot foresee (a full disk, a file system that turned
    read-only) is one line and exit 2 as well, on both paths."""
    import mica_core.atomic as atomic

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", no_space)
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    for argv in PATHS.values():
        code, err = run_main(capsys, src, str(tmp_path / "out.parquet"), *argv)
        assert code == 2
        assert_one_line(err, "No space left on device")
        assert sorted(os.listdir(tmp_path)) == ["in.parquet"]


# --------------------------------------------------------------------------- the process


def mica_cmd():
    exe = shutil.which("mica", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "mica_core.cli"]


def _default_sigint():
    # A shell's background job inherits SIGINT ignored; the user's terminal does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def without_file_mode_override():
    """The command prefix that makes file modes apply to this process's children: none for
    an ordinary user; for root (who ignores modes), ``setpriv`` dropping the capabilities
    that override them (CAP_DAC_OVERRIDE, CAP_FOWNER) from the child's bounding set. ``None``
    when root has no ``setpriv``."""
    if os.geteuid() != 0:
        return []
    exe = shutil.which("setpriv")
    return None if exe is None else [exe, "--bounding-set", "-dac_override,-fowner", "--"]


def test_no_write_permission_is_one_line(tmp_path):
    prefix = without_file_mode_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: root writes into read-only folders, "
                    "so a missing write permission cannot be produced here")
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for argv in PATHS.values():
            res = subprocess.run(prefix + mica_cmd() + ["advantages", src,
                                                        str(locked / "out.parquet"), *argv],
                                 capture_output=True, text=True)
            assert res.returncode == 2, res.stderr
            assert_one_line(res.stderr, "permission denied")
            assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("path", PATHS)
def test_output_mode_follows_the_umask(tmp_path, path):
    """``--force`` over a private 0600 file, under umask 027: OUT is 0640 like any file the
    user creates (mkstemp's 0600 must not survive the rename)."""
    src = write_input(table_of(base_rows()), str(tmp_path), "parquet")
    out = tmp_path / "out.parquet"
    out.write_bytes(PRECIOUS)
    os.chmod(out, 0o600)
    res = subprocess.run(mica_cmd() + ["advantages", src, str(out), "--force", *PATHS[path]],
                         capture_output=True, text=True, umask=0o027)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert pq.read_table(out).num_rows == len(base_rows())


def big_input(folder, n_traj, payload_bytes=0, seed=0):
    """A long-form Parquet file of ``n_traj`` trajectories of 1-8 turns in groups of 8; with
    an incompressible ``payload`` column of that many bytes per row (a slow write)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n_traj)
    n = int(lengths.sum())
    traj = np.repeat(np.arange(n_traj), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    d0 = rng.uniform(5, 10, n_traj)
    cols = {"group_id": traj // 8, "traj_id": traj, "turn": np.arange(n) - starts,
            "distance": rng.uniform(0, 10, n), "initial_distance": d0[traj]}
    if payload_bytes:
        blob = rng.integers(0, 256, n * payload_bytes, dtype=np.uint8).tobytes()
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * payload_bytes)
        cols["payload"] = pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets.buffers()[1],
                                                                      pa.py_buffer(blob)])
    table = pa.table(cols)
    path = os.path.join(folder, "in.parquet")
    pq.write_table(table, path, compression="none")
    return path, table


def test_two_processes_racing_for_out_exactly_one_wins(tmp_path):
    """Same OUT, no --force, started together: one exits 0, the other 2, and OUT is the
    winner's complete result (the two compute different gammas, so the winner is known)."""
    src, table = big_input(str(tmp_path), 40_000)
    out = tmp_path / "out.parquet"
    procs = {gamma: subprocess.Popen(mica_cmd() + ["advantages", src, str(out), "--gamma",
                                                   gamma, "--backend", "numpy"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for gamma in ("0.5", "0.9")}
    results = {gamma: (p.wait(120), p.stderr.read()) for gamma, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    winner = next(g for g, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code == 2)
    assert_one_line(loser_err, "exists")
    want = mc.compute_advantages(table, gamma=float(winner))
    np.testing.assert_allclose(pq.read_table(out)["return"].to_numpy(),
                               want["return"].to_numpy(), atol=1e-12)
    assert sorted(os.listdir(tmp_path)) == ["in.parquet", "out.parquet"]


SIGNALS = {"SIGTERM": (signal.SIGTERM, 143), "SIGINT": (signal.SIGINT, 130)}


def _signal_during_write(folder, out, signum, extra=()):
    """Start the command, wait until its temporary output has bytes (it is inside the
    Parquet write), send ``signum``; returns (exit status, stderr)."""
    proc = subprocess.Popen(mica_cmd() + ["advantages", os.path.join(folder, "in.parquet"),
                                          str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [e for e in os.scandir(folder) if e.name.endswith(".tmp")]
            if tmp and tmp[0].stat().st_size > 0:
                proc.send_signal(signum)
                break
            time.sleep(0.002)
        return proc.wait(120), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.fixture(scope="module")
def slow_write_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    big_input(str(folder), 8_000, payload_bytes=2_000)  # about 70 MB to write
    return folder


@pytest.mark.parametrize("existing", [False, True], ids=["OUT absent", "OUT existing"])
@pytest.mark.parametrize("name", SIGNALS)
def test_signal_during_write(tmp_path, slow_write_input, name, existing):
    """SIGTERM or SIGINT while OUT is being written: no temporary file is left, OUT is
    absent or keeps its old content, one line on stderr, exit 128 + the signal."""
    signum, status = SIGNALS[name]
    folder = tmp_path
    shutil.copy(slow_write_input / "in.parquet", folder / "in.parquet")
    out = folder / "out.parquet"
    if existing:
        out.write_bytes(PRECIOUS)
    code, err = _signal_during_write(str(folder), out, signum,
                                     ["--force", "--stream", "on"] if existing else [])
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"mica: interrupted ({name})", err
    assert sorted(os.listdir(folder)) == (["in.parquet", "out.parquet"] if existing
                                          else ["in.parquet"])
    if existing:
        assert out.read_bytes() == PRECIOUS
