"""mica_core.atomic: whole files or nothing, exclusive publishing, the umask's mode."""

import multiprocessing as mp
import os
import stat

import pytest

from mica_core.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    default_file_mode,
)


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "1\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise RuntimeError
    assert path.read_text() == "1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_no_overwrite_refuses_existing_and_leaves_it(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        atomic_write_bytes(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_no_overwrite_loses_to_a_writer_that_finished_first(tmp_path):
    # The target appears while this writer is still writing: publishing must fail, not
    # replace the other writer's file.
    path = tmp_path / "out.bin"
    with pytest.raises(FileExistsError):
        with atomic_path(path, overwrite=False) as tmp:
            tmp.write_bytes(b"slow writer")
            path.write_bytes(b"fast writer")
    assert path.read_bytes() == b"fast writer"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _race(path, tag, barrier, results):
    barrier.wait()
    try:
        with atomic_path(path, overwrite=False) as tmp:
            tmp.write_bytes(tag * 100_000)
        results.put(("ok", tag))
    except FileExistsError:
        results.put(("exists", tag))


def test_two_processes_exactly_one_wins(tmp_path):
    path = tmp_path / "out.bin"
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, tag, barrier, results))
             for tag in (b"a", b"b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert [g[0] for g in got] == ["exists", "ok"]
    winner = next(tag for status, tag in got if status == "ok")
    assert path.read_bytes() == winner * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        path = tmp_path / "f.txt"
        path.write_text("x")
        os.chmod(path, 0o600)  # an existing private file is replaced with the default mode
        atomic_write_text(path, "y")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("z")
            (tmp / "sub").mkdir()
        assert stat.S_IMODE((tmp_path / "d" / "a").stat().st_mode) == 0o666 & ~umask
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
        assert stat.S_IMODE((tmp_path / "d" / "sub").stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)


def test_keyboard_interrupt_removes_the_temporary_file(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import os, sys, time
from mica_core.atomic import atomic_dir, atomic_path
target = sys.argv[1]
with (atomic_dir if sys.argv[2] == "dir" else atomic_path)(target) as tmp:
    if sys.argv[2] == "dir":
        (tmp / "part").write_bytes(b"half")
    else:
        tmp.write_bytes(b"half")
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def _killed_writer(target, kind):
    """A process killed by SIGKILL while writing ``target``: returns its leftover's name."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), kind],
                            stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert name and (target.parent / name).exists()
    return name


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_the_next_write_removes_what_a_killed_writer_left(tmp_path, kind):
    import subprocess
    import sys

    target = tmp_path / ("learning_curves.png" if kind == "file" else "step_1")
    left = _killed_writer(target, kind)
    assert left.startswith(".") and left.endswith(".tmp")
    # Files a cleanup must never touch: a live writer's (this process's parent), one of
    # another host, another target's, and names of other patterns.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        host, pid = left.split(".")[-3].split("-")
        keep = [f".{target.name}.{host}-{sleeper.pid}.abcd1234.tmp",
                f".{target.name}.{'0' * 8 if host != '0' * 8 else '1' * 8}-{pid}.abcd1234.tmp",
                f".other.png.{host}-{pid}.abcd1234.tmp", f".{target.name}.{host}-{pid}.tmp",
                f"{target.name}.{host}-{pid}.abcd1234.tmp", f".{target.name}.x.tmp"]
        for name in keep:
            (tmp_path / name).write_bytes(b"someone else's")
        if kind == "file":
            atomic_write_text(target, "new")
            assert target.read_text() == "new"
        else:
            with atomic_dir(target) as tmp:
                (tmp / "f").write_text("new")
            assert (target / "f").read_text() == "new"
        assert not (tmp_path / left).exists()
        assert sorted(os.listdir(tmp_path)) == sorted(keep + [target.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_that_takes_no_file_says_so(tmp_path):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    with pytest.raises(OSError) as info:
        atomic_write_text("/proc/x.parquet", "x")
    assert info.value.filename == "/proc" and "cannot create a file" in str(info.value)
