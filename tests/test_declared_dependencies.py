"""Every third-party distribution the code imports is declared in pyproject.toml.

A clean install (README command 2 in a fresh virtual environment, which is what ``.ci/run`` does)
only has what ``pyproject.toml`` asks for; an import that arrives through another package's
requirements (``tokenizers`` through ``transformers``) or not at all (``sklearn``) passes on a
developer's machine and breaks there. This test walks the sources with ``ast`` and maps each
top-level imported module to the distributions that provide it
(``importlib.metadata.packages_distributions()``):

* the package (``fedrlhf_secure``, ``aggregation``, ``attacks``): an unguarded module-level import
  must be in ``[project] dependencies``; an import of a distribution declared only in an extra is
  allowed when it is guarded (inside ``try: ... except ImportError``), inside a function (the
  optional feature imports it when used), or at module level in a module of that extra's
  feature (``OPTIONAL_FEATURE_PATHS``, e.g. ``fedrlhf_secure/transport/`` for ``flower``);
* the tests: dependencies plus the ``test`` and ``flower`` extras (what README command 2 installs).

``if TYPE_CHECKING:`` imports never run and are held to the package's optional rule.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs 3.11; tomli is not a declared dependency
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("fedrlhf_secure", "aggregation", "attacks")
TEST_DIR = "tests"
TEST_EXTRAS = ("test", "flower")
# Module-level imports of an extra's distributions are allowed in the modules of that extra's feature.
OPTIONAL_FEATURE_PATHS = {"flower": ("fedrlhf_secure/transport/",)}
FIRST_PARTY = set(PACKAGE_DIRS)
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparseable requirement in pyproject.toml: {requirement!r}"
    return _normalize(match.group(1))


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {extra: {_requirement_name(r) for r in reqs} for extra, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository root
    line: int
    module: str  # top-level module name
    optional: bool  # guarded by except ImportError, inside a function, or under TYPE_CHECKING


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, path: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(path, node.lineno, alias.name.split(".")[0], optional) for alias in node.names)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append(Import(path, node.lineno, node.module.split(".")[0], optional))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child, True)
            return
        if isinstance(node, ast.Try) or (sys.version_info >= (3, 11) and isinstance(node, ast.TryStar)):
            guarded = optional or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, optional)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return found


def collect(directory: str) -> list[Import]:
    out: list[Import] = []
    for file in sorted((ROOT / directory).rglob("*.py")):
        rel = file.relative_to(ROOT).as_posix()
        out.extend(_imports(ast.parse(file.read_text(), filename=rel), rel))
    return out


def _local_modules(directory: str) -> set[str]:
    """Modules a directory provides to itself (tests import conftest, toy_task, ... by bare name)."""
    base = ROOT / directory
    return {p.stem for p in base.glob("*.py")} | {p.name for p in base.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def _problems(
    imports: list[Import], allowed_core: set[str], extras: dict[str, set[str]], local: set[str], feature_paths: dict[str, tuple[str, ...]]
) -> list[str]:
    dist_of = importlib.metadata.packages_distributions()
    problems = []
    for imp in imports:
        if imp.module in sys.stdlib_module_names or imp.module in FIRST_PARTY or imp.module in local or imp.module == "__future__":
            continue
        dists = {_normalize(d) for d in dist_of.get(imp.module, [])}
        where = f"{imp.path}:{imp.line}: import {imp.module}"
        if not dists:
            # an optional import of an extra this environment did not install (e.g. gguf, in the llm
            # extra, imported inside the function that converts the GGUF file): declared by name
            if imp.optional and _normalize(imp.module) in set().union(*extras.values()):
                continue
            problems.append(f"{where} -- no installed distribution provides it (undeclared, or this environment is stale)")
            continue
        if dists & allowed_core:
            continue
        in_extras = sorted(extra for extra, names in extras.items() if dists & names)
        if not in_extras:
            problems.append(f"{where} -- distribution {'/'.join(sorted(dists))} is not declared in pyproject.toml")
            continue
        if imp.optional or any(imp.path.startswith(p) for extra in in_extras for p in feature_paths.get(extra, ())):
            continue
        problems.append(
            f"{where} -- {'/'.join(sorted(dists))} is declared only in extra(s) {in_extras} but imported unguarded at module "
            "level: guard it (try/except ImportError), import it inside the function that needs it, "
            "or add the module to OPTIONAL_FEATURE_PATHS"
        )
    return problems


def test_package_imports_are_declared():
    core, extras = declared()
    imports = [imp for directory in PACKAGE_DIRS for imp in collect(directory)]
    assert len(imports) > 100, "the walk found almost no imports: wrong root?"
    problems = _problems(imports, core, extras, set(), OPTIONAL_FEATURE_PATHS)
    assert not problems, "undeclared imports in the package:\n" + "\n".join(problems)


def test_test_imports_are_declared():
    core, extras = declared()
    missing_extras = [e for e in TEST_EXTRAS if e not in extras]
    assert not missing_extras, f"pyproject.toml lacks the extras README command 2 installs: {missing_extras}"
    allowed = core.union(*(extras[e] for e in TEST_EXTRAS))
    problems = _problems(collect(TEST_DIR), allowed, {}, _local_modules(TEST_DIR), {})
    assert not problems, "undeclared imports in the tests:\n" + "\n".join(problems)


def test_walker_sees_guards():
    tree = ast.parse(
        "import a\n"
        "try:\n    import b\nexcept ImportError:\n    import c\n"
        "def f():\n    import d\n"
        "if TYPE_CHECKING:\n    import e\n"
        "try:\n    import g\nexcept ValueError:\n    pass\n"
    )
    flags = {imp.module: imp.optional for imp in _imports(tree, "x.py")}
    assert flags == {"a": False, "b": True, "c": False, "d": True, "e": True, "g": False}


def test_readme_command_2_installs_what_the_tests_import():
    """.ci/run runs README command 2 verbatim: it must install the extras this test allows the tests to import."""
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / "tools" / "readme_command.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = module.readme_command(2)
    assert "pip install torch==" in command, command
    assert re.search(r"pip install -e \"?\.\[([a-z,]+)\]", command), command
    extras = set(re.search(r"pip install -e \"?\.\[([a-z,]+)\]", command).group(1).split(","))
    assert extras == set(TEST_EXTRAS), f"README command 2 installs extras {sorted(extras)}, the tests are checked against {TEST_EXTRAS}"
    assert command.rstrip().endswith("python -m pytest -q"), command
