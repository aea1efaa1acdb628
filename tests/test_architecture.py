"""The module structure the docs promise (docs/architecture.md): the core never imports the
trainer, no two modules import each other (deferred imports inside functions count), and
code outside the core reaches it through public names only."""

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


# Code outside the core proper: the trainer, the benchmarks and the framework integrations
# (a subpackage of the core that uses only what any user of the core could).
OUTSIDE = ("mica_train", "bench", "mica_core.integrations")
INTERNAL_API = "mica_core.internal"  # the one documented internal module (docs/architecture.md)


def is_private(module, importer):
    """Whether ``importer`` (code outside the core proper) may not import ``module``: a part
    ``_name`` of a module's path is private to the package that holds it, so only modules of
    that package may import it (``mica_core._errors`` is the core's, not the integrations';
    ``mica_core.integrations._trl_signals`` is the integrations')."""
    mod, own = module.split("."), importer.split(".")
    home = next(o.split(".") for o in OUTSIDE if importer == o or importer.startswith(o + "."))
    return any(part.startswith("_") and not part.startswith("__")
               and not (own[:k] == mod[:k] and mod[:len(home)] == home)
               for k, part in enumerate(mod))


def outside_core_imports():
    graph = {**module_imports("mica_core"), **module_imports("mica_train"),
             **module_imports("bench")}
    return {mod: {d for d in deps if d.startswith("mica_core")}
            for mod, deps in graph.items() if mod.startswith(OUTSIDE)}


def test_code_outside_the_core_uses_public_names():
    offenders = sorted((mod, dep) for mod, deps in outside_core_imports().items()
                       for dep in deps if dep != INTERNAL_API and is_private(dep, mod))
    assert offenders == []


def test_the_privacy_rule_reads_imports_as_meant():
    assert is_private("mica_core._errors", "mica_train.report")
    assert is_private("mica_core._errors", "mica_core.integrations.verl")
    assert is_private("mica_core._autoselect", "bench.__main__")
    # an integration's own private helpers are its business; the core's public modules too
    assert not is_private("mica_core.integrations._trl_signals", "mica_core.integrations.trl")
    assert not is_private("mica_core.turns", "mica_core.integrations.verl")
    assert not is_private("mica_core", "mica_train.env.env")
    deps = outside_core_imports()
    assert "mica_core" in deps["mica_train.env.env"]  # `from mica_core import MicaInputError`
    assert INTERNAL_API in deps["bench.__main__"]  # imported inside a method
    assert "mica_core.turns" in deps["mica_core.integrations.verl"]


def test_the_internal_api_is_documented():
    import mica_core.internal as internal

    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "mica_core.internal" in doc
    assert all(f":func:`{n}`" in internal.__doc__ or f":data:`{n}`" in internal.__doc__
               for n in internal.__all__)


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


def _documented_files():
    for top in ("mica_core", "mica_train", "bench", "tests", "docs", "examples"):
        yield from (p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".pyx"))
    yield ROOT / "README.md"


def test_docs_and_code_cite_only_documents_in_the_repository():
    """No pointer to a design document outside the repository; every cited section of
    docs/architecture.md or the README exists (docs/architecture.md is self-contained)."""
    import re

    headings = {}
    for doc in ("docs/architecture.md", "README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        headings[doc] = {h.strip() for h in re.findall(r"^#+ (.+)$", text, re.M)}
    cite = re.compile(r'(docs/architecture\.md|README)[,:]?\s+\(?"([^"]+)"')
    outside, missing, found = [], [], set()
    for f in _documented_files():
        text = f.read_text(encoding="utf-8")
        if f.name != "test_architecture.py" and re.search(r"design §|design\.md", text, re.I):
            outside.append(str(f.relative_to(ROOT)))
        for doc, section in cite.findall(re.sub(r"\s*\n\s*(#\s*)?", " ", text)):
            doc = "README.md" if doc == "README" else doc
            found.add((doc, section))
            if section not in headings[doc]:
                missing.append((str(f.relative_to(ROOT)), doc, section))
    assert outside == []
    assert sorted(set(missing)) == []
    assert ("docs/architecture.md", "Conventions") in found  # the check reads citations
    assert "Adding a framework integration" in headings["docs/architecture.md"]


def test_formats_and_containers_are_read_in_one_module():
    """Reading files, counting rows, converting containers and the Parquet write options
    live in mica_core/io.py (docs/architecture.md, "Adding an input format")."""
    import re

    calls = re.compile(r"\.(read_table|read_csv|read_metadata|from_pandas|to_arrow)\(|"
                       r"ipc\.open_(file|stream)|\bds\.dataset\(|use_dictionary")
    found = {str(f.relative_to(ROOT)) for f in (ROOT / "mica_core").rglob("*.py")
             if calls.search(f.read_text(encoding="utf-8"))}
    assert found == {"mica_core/io.py"}


#: The modules that build MicaInputError: the validate modules own every rule and its message
#: (docs/architecture.md, "Validation"), and _errors defines the class (``with_row``).
ERROR_BUILDERS = {"mica_core._errors", "mica_core.validate", "mica_core.validate_rows",
                  "mica_core.validate_tensors", "mica_core.validate_tokens"}
#: Modules allowed to build them besides, each with its reason. None today.
ERROR_BUILDER_EXCEPTIONS: dict[str, str] = {}


def error_constructions(package="mica_core"):
    """``{module: number of MicaInputError(...) calls in its source}``."""
    counts = {}
    for f in (ROOT / package).rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        n = sum(1 for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                if isinstance(node, ast.Call)
                and (getattr(node.func, "id", None) == "MicaInputError"
                     or getattr(node.func, "attr", None) == "MicaInputError"))
        if n:
            counts[name] = n
    return counts


def test_input_errors_are_built_only_by_the_validate_modules():
    """Readers (arrow, stream, tokens, io) and adapters (turns, the integrations) raise the
    errors the validate modules build, so that a rule has one name and one message."""
    counts = error_constructions()
    outside = {m: n for m, n in counts.items()
               if m not in ERROR_BUILDERS and m not in ERROR_BUILDER_EXCEPTIONS}
    assert outside == {}
    assert counts.get("mica_core.validate", 0) > 20  # the counter sees constructions


def test_each_rule_has_one_name():
    """A rule named in two spellings is one rule stated twice (e.g. "non-negative" and
    "distance >= 0" for negative distances)."""
    import re

    rules = set()
    for f in (ROOT / "mica_core").rglob("validate*.py"):
        rules |= set(re.findall(r'rule="([^"]+)"', f.read_text(encoding="utf-8")))
    for old in ("distance >= 0", "every assistant token in a turn", "a per-turn signal"):
        assert old not in rules
    assert {"non-negative", "every assistant token belongs to a turn", "no nulls",
            "per-turn signal required"} <= rules
