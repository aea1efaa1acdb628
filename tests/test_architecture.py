"""The module structure the docs promise (docs/architecture.md): the core never imports the
trainer, and no two modules import each other (deferred imports inside functions count)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def module_imports(package):
    """``{module: set of modules of the same project it imports}``, from the source text."""
    top = ROOT / package
    files = {}
    for f in top.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f
    graph = {}
    for name, f in files.items():
        base = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
                subs = [f"{mod}.{a.name}" for a in node.names]
                # `from pkg import submodule` imports the submodule (and runs pkg's __init__,
                # which every import of a submodule does anyway): count the submodule only.
                targets = [s for s in subs if s in files] or [mod]
            else:
                continue
            deps.update(t for t in targets if t != name and t.split(".")[0] in
                        ("mica_core", "mica_train"))
        graph[name] = deps
    return graph


def test_core_never_imports_the_trainer():
    offenders = sorted((mod, dep) for mod, deps in module_imports("mica_core").items()
                       for dep in deps if dep.startswith("mica_train"))
    assert offenders == []


@pytest.mark.parametrize("package", ["mica_core", "mica_train"])
def test_no_module_pair_imports_each_other(package):
    graph = module_imports(package)
    known = set(graph)
    pairs = sorted((a, b) for a, deps in graph.items() for b in deps
                   if b in known and a < b and a in graph.get(b, ()))
    assert pairs == []


def test_the_checker_sees_deferred_imports():
    # The checks above would pass vacuously if the parser missed imports inside functions.
    graph = module_imports("mica_core")
    assert "mica_core._backend_torch" in graph["mica_core.api"]  # imported inside a function
    assert "mica_core.validate" in graph["mica_core.api"]


def test_importing_the_core_and_its_cli_loads_no_numeric_library():
    """Public names load on first use: `import mica_core` and the `mica` command's module
    cost next to nothing (docs/architecture.md, "Commands")."""
    import subprocess
    import sys

    code = ("import sys, mica_core, mica_core.cli\n"
            "heavy = {m.split('.')[0] for m in sys.modules} & {'numpy', 'pyarrow', 'torch', "
            "'numba', 'mica_train'}\n"
            "assert not heavy, heavy\n"
            "assert mica_core.list_estimators()[0] == 'mica' and callable(mica_core.estimate)\n"
            "assert 'numpy' in sys.modules and 'pyarrow' not in sys.modules\n"
            "assert mica_core.validate.MAX_MAGNITUDE == 1e100\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
