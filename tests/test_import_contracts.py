"""The import contracts of pyproject.toml's ``[tool.importlinter]`` hold (``lint-imports``).

``.ci/run`` runs ``lint-imports`` as a step of its own; this test runs it too, so that the ordinary
test suite catches a protocol module that imports the runtime, or the runtime importing ``attacks``
outside the ``fedrlhf audit`` front door, or an import cycle, before CI does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs 3.11; tomli is not a declared dependency
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        # it is part of the `test` extra: an install without it is broken, not a reason to skip the contracts
        pytest.fail("import-linter is not installed (it comes with the `test` extra: pip install -e '.[test]')")
    return [exe]


def test_contracts_are_configured():
    ids = [c["id"] for c in CONTRACTS]
    assert {"aggregation-standalone", "runtime-without-attacks", "top-level-layers", "runtime-acyclic"} <= set(ids)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_import_contract_holds(contract):
    cmd = _lint_imports()
    # --no-cache: the test suite writes no .import_linter_cache; the graph takes well under a second
    proc = subprocess.run([*cmd, "--no-cache", "--no-logo", "--contract", contract], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "1 kept" in proc.stdout or "1 broken" in proc.stdout, f"lint-imports did not check {contract}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"import contract {contract} broken:\n{proc.stdout}\n{proc.stderr}"
