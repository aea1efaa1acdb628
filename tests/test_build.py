"""The compiled kernels are built at install; a broken build fails loudly, never silently."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_compiler_fails_the_build_with_a_clear_message(tmp_path):
    pytest.importorskip("Cython")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, "kernels"), tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("*.c"))
    (tmp_path / "mica_core").mkdir()
    env = dict(os.environ, CC="/bin/false", LDSHARED="/bin/false")
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "mica could not compile its Cython kernels" in res.stderr
    assert not list((tmp_path / "mica_core").glob("_ext*"))


def test_no_silent_fallback_when_the_extension_is_missing():
    code = (
        "import sys; sys.modules['mica_core._ext'] = None\n"
        "import mica_core as mc\n"
        "try:\n"
        "    mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0])\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
        "r = mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], backend='numpy')\n"
        "print('NUMPY', r.reward[0])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "ERR mica_core._ext (the compiled Cython kernels) is not built" in res.stdout, res.stderr
    assert "NUMPY 1.0" in res.stdout


def test_import_compiles_nothing_and_skips_optional_packages():
    code = ("import sys, mica_core\n"
            "print(sorted(m for m in ('numba', 'torch', 'pandas', 'polars') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
