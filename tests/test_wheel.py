"""mica as a user installs it: a wheel built from this tree, installed into a fresh virtual
environment outside the source tree, its ``mica`` command run from an empty folder.

Slow (a Cython build and a venv with the training extra: a few minutes), so it runs once per
session; ``make test`` includes it.
"""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin folder, work folder)`` of a fresh venv holding the wheel with its training
    extra, versions pinned by requirements/ci.txt."""
    base = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files a clone has (tracked, and new files git does not
    # ignore), as they are in the working tree: no build/ or egg-info left by earlier builds
    # can slip into the wheel.
    src = base / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(src)])
    wheels = list(dist.glob("mica_credit-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
          "-c", str(ROOT / "requirements" / "ci.txt"), f"{wheels[0]}[train]"],
         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    work = base / "work"  # no source tree here: imports must come from the venv
    work.mkdir()
    return bin_dir, work


def _env(bin_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def test_imports_come_from_the_installed_wheel(installed):
    bin_dir, work = installed
    res = _run([str(bin_dir / "python"), "-c",
                "import mica_core, mica_core._ext, mica_train; "
                "print(mica_core.__file__); print(mica_train.__file__)"],
               cwd=work, env=_env(bin_dir))
    for line in res.stdout.split():
        assert str(ROOT) not in line and "site-packages" in line


def test_estimators_and_advantages_from_the_wheel(installed):
    bin_dir, work = installed
    res = _run([str(bin_dir / "mica"), "estimators"], cwd=work, env=_env(bin_dir))
    assert res.stdout.split()[0] == "mica"
    rows = {"group_id": ["a"] * 5 + ["b"] * 2, "traj_id": [0, 0, 0, 1, 1, 2, 2],
            "turn": [0, 1, 2, 0, 1, 0, 1],
            "distance": [3.0, 2.0, 2.5, 4.0, 1.0, 2.0, 0.5],
            "initial_distance": [4.0, 4.0, 4.0, 5.0, 5.0, 2.5, 2.5]}
    pq.write_table(pa.table(rows), work / "in.parquet")
    _run([str(bin_dir / "mica"), "advantages", "in.parquet", "out.parquet"], cwd=work,
         env=_env(bin_dir))
    out = pq.read_table(work / "out.parquet")
    assert out.column_names[-3:] == ["reward", "return", "advantage"]
    np.testing.assert_allclose(out["reward"].to_numpy(), [1.0, 1.0, -0.5, 1.0, 3.0, 0.5, 1.5])


def test_study_quick_from_the_wheel(installed):
    bin_dir, work = installed
    _run([str(bin_dir / "mica"), "study", "--quick"], cwd=work, env=_env(bin_dir))
    made = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    assert "runs/study-quick/study.json" in made, sorted(made)
    assert not (work / "bench").exists() and not (work / "docs").exists()
