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
                  "mica_core.validate_tensors", "mica_core.validate_tokens",
                  "mica_core.validate_options"}
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


# --------------------------------------------------------------------------- one home per rule
# Estimator options are declared once (mica_core.options.EstimatorOptions); backend and preset
# names are listed once (mica_core.options.BACKENDS, mica_core.estimators.PRESETS). The tests
# below fail when a front end restates them instead of deriving them.

import inspect  # noqa: E402

from mica_core.estimators import PRESETS, list_estimators  # noqa: E402
from mica_core.options import (  # noqa: E402
    BACKENDS,
    OPTION_NAMES,
    TABLE_SPELLING,
    EstimatorOptions,
    option_fields,
)


def _keyword_defaults(fn, names):
    sig = inspect.signature(fn)
    return {n: sig.parameters[n].default for n in names if n in sig.parameters}


def test_every_option_field_has_help_a_rule_and_a_front_end():
    for f in option_fields():
        assert f.metadata["help"] and f.metadata["rule"] and f.metadata["surfaces"], f.name
    assert EstimatorOptions() == EstimatorOptions(**{f.name: f.default for f in option_fields()})


def test_cli_estimator_flags_are_the_option_fields():
    from mica_core.cli import _advantages_parser

    actions = {a.dest: a for a in _advantages_parser()._actions}
    table = {f.name: f for f in option_fields("table")}
    # every table option has its flag, with the field's default and choices ...
    for name, f in table.items():
        a = actions[name]
        assert a.option_strings == ["--" + name.replace("_", "-")]
        assert a.default == f.default and a.help.startswith(f.metadata["help"])
        assert (tuple(a.choices) if a.choices else None) == (
            f.metadata["choices"] if f.metadata["kind"] in ("str", "int") else None)
    # ... and every other flag is about files, columns or running (no option restated)
    others = {d for d in actions if d not in table}
    assert {d for d in others if not d.endswith("_col")} == {
        "help", "input", "output", "estimator", "stream", "batch_rows", "force", "progress"}


def test_estimate_and_compute_advantages_take_the_option_fields():
    import mica_core as mc
    from mica_core.estimators import resolve

    for fn, surface, spelling in ((mc.estimate, "estimate", {}),
                                  (mc.compute_advantages, "table", TABLE_SPELLING)):
        params = inspect.signature(fn).parameters
        for f in option_fields(surface):
            name = spelling.get(f.name, f.name)
            assert name in params, (fn.__name__, name)
            assert params[name].default == f.default, (fn.__name__, name)
        taken = {f.name for f in option_fields(surface)}
        assert not {spelling.get(n, n) for n in OPTION_NAMES if n not in taken} & set(params)
    norm = [f for f in option_fields("estimate") if f.name in
            inspect.signature(resolve).parameters]
    assert len(norm) == 7 and all(_keyword_defaults(resolve, [f.name])[f.name] == f.default
                                  for f in norm)


def test_backend_names_have_one_home(backend):
    from mica_core import api

    assert api.BACKENDS is BACKENDS
    # the fixture runs over mica_core.options.BACKENDS (tests/conftest.py)
    assert backend.option in set(BACKENDS) - {"auto"}


def test_verl_registers_the_derived_presets():
    from mica_core.integrations import verl as mv

    assert mv.PRESETS == PRESETS == tuple(list_estimators()[:len(PRESETS)])
    for name in PRESETS:
        fn = getattr(mv, f"compute_{name}_advantage")
        assert fn is mv.verl_estimator(name) and f"compute_{name}_advantage" in mv.__all__
    assert set(mv.OPTIONS) == {f.name for f in option_fields("turns")} & {
        f.name for f in option_fields("estimate")}
    assert set(mv.TOP_LEVEL) <= set(mv.OPTIONS)
    assert set(mv.SECTION_KEYS) == ({mv.SPELLING.get(f.name, f.name)
                                     for f in option_fields("turns")} | set(mv.ADAPTER_OPTIONS))


def test_trl_config_fields_are_the_option_fields():
    from mica_core.integrations import _trl_signals as ts

    names = [name for name, *_ in ts.config_fields()]
    assert names == ["mica_estimator"] + ["mica_" + f.name for f in option_fields("turns")]
    assert set(ts.MICA_DEFAULTS) == set(names)
    text = dict((name, help) for name, _, _, help in ts.config_fields())["mica_estimator"]
    assert all(p in text for p in PRESETS)


def test_trainer_options_are_checked_by_the_option_fields():
    from mica_train.config import AdvantageConfig

    text = next(f for f in __import__("dataclasses").fields(AdvantageConfig)
                if f.name == "options").metadata["help"]
    assert all(TABLE_SPELLING.get(f.name, f.name) in text for f in option_fields("table"))
    source = (ROOT / "mica_train" / "config.py").read_text(encoding="utf-8")
    assert "probe" not in source  # the options are checked by their declaration, not a run


def _string_literals(path):
    """Every tuple, list or set literal of strings in a Python file: ``(line, {strings})``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, {e.value for e in node.elts}


# Files allowed to spell a list out: this one (examples), and the registry's spec test, which
# pins the documented preset order (a derived list could not catch a reordering).
SPEC_PINS = {pathlib.Path(__file__).resolve(), ROOT / "tests" / "test_registry.py"}


def _restatements(names, home):
    """Literals anywhere in the project's Python that list (nearly) all of ``names``."""
    wanted = set(names)
    found = []
    for package in ("mica_core", "mica_train", "bench", "tests"):
        for f in (ROOT / package).rglob("*.py"):
            if f == home or f in SPEC_PINS:
                continue
            for line, values in _string_literals(f):
                if len(wanted - values) <= 1:
                    found.append(f"{f.relative_to(ROOT)}:{line}")
    return found


def test_backend_and_preset_lists_are_not_restated():
    assert _restatements(set(BACKENDS) - {"auto"}, ROOT / "mica_core" / "options.py") == []
    assert _restatements(PRESETS, ROOT / "mica_core" / "estimators.py") == []


def test_the_restatement_finder_finds_one(tmp_path):
    # The check above would pass vacuously if the finder missed literals.
    f = tmp_path / "x.py"
    f.write_text("X = ('mica', 'mica_turn')\nY = ['numpy', 'cython', 'numba', 'torch']\n")
    assert [v for _, v in _string_literals(f)] == [{"mica", "mica_turn"},
                                                   {"numpy", "cython", "numba", "torch"}]


def test_a_bad_option_gets_the_same_message_everywhere(tmp_path, capsys):
    """estimate, compute_advantages, the CLI, the trainer config, verl's algorithm.mica and
    TRL's config: one rule text per option, under the name each front end's user types."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    import mica_core as mc
    from mica_core.cli import main
    from mica_core.integrations import _trl_signals as ts
    from mica_core.integrations import verl as mv
    from mica_train.config import ConfigError, check_config, load_config

    rule = "must be a number in [0, 1]; got 2"
    got = {}

    def catch(where, fn, *errors):
        with pytest.raises(errors or (mc.MicaInputError,)) as info:
            fn()
        got[where] = str(info.value).splitlines()[0]

    catch("estimate", lambda: mc.estimate([0, 1], [0], reward=[1.0], weight=2))
    table = {"group_id": [0], "traj_id": [0], "turn": [0], "reward": [1.0]}
    catch("table", lambda: mc.compute_advantages(table, weight=2))
    catch("trainer", lambda: check_config(load_config("tiny", ["advantage.options={weight: 2}"])),
          ConfigError)
    catch("verl", lambda: mv.options_from_config("mica", {"mica": {"weight": 2}}))
    catch("trl", lambda: ts.estimator_options(SimpleNamespace(mica_weight=2)))
    assert got == {"estimate": "weight " + rule, "table": "weight " + rule,
                   "trainer": "advantage.options.weight " + rule,
                   "verl": "algorithm.mica.weight " + rule, "trl": "mica_weight " + rule}
    pq.write_table(pa.table(table), tmp_path / "in.parquet")
    args = ["advantages", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet")]
    assert main([*args, "--weight", "2"]) == 2
    assert capsys.readouterr().err == f"mica: error: --weight {rule}.0\n"
    # unknown keys of a mapping: one message naming the key and listing the known ones
    for fn, name in ((lambda: mv.options_from_config("mica", {"mica": {"gammma": 1}}),
                      "algorithm.mica.gammma"),
                     (lambda: check_config(load_config("tiny", ["advantage.options={gammma: 1}"])),
                      "advantage.options.gammma")):
        with pytest.raises(mc.MicaInputError, match=f"^unknown option '{name}'; known: gamma, "):
            fn()


def test_option_choices_have_one_home():
    from mica_core import arrow, layout, options, turns

    assert layout.ON_MISSING is options.ON_MISSING and turns.LONE_ROLLOUT is options.LONE_ROLLOUT
    assert arrow.SOURCES == options.SOURCES  # arrow.py states its own; they must agree
