"""The README's "What a run is" block, run in order as a newcomer would, on the tiny configs.

Each line is taken from README.md and run as a real process in a fresh directory; only the config
is swapped for a tiny one of the same kind (``configs/movielens.yaml`` → ``movielens-tiny.yaml``,
the silos preset → the tiny config with the silos preset's privacy and aggregation, ``imdb.yaml``
→ ``imdb-tiny.yaml``). The test checks exit codes, the printed table and that every run's
``summary.json``/``metrics.jsonl`` validate against the package's schemas with a strict parser.
``fedrlhf deploy local`` is the one line not run here: ``tests/test_flower_deployment.py`` runs it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from fedrlhf_secure.schemas import METRICS_ROW, SUMMARY

REPO = Path(__file__).resolve().parents[1]

# what each line must end in: 0, or 2 for the resume of a run that does not exist in a fresh clone
EXPECTED_STATUS = {"--resume": 2}


def readme_block() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What a run is", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def tiny_silos(tmp: Path) -> Path:
    """The tiny config with the silos preset's privacy and aggregation sections."""
    tiny = yaml.safe_load((REPO / "configs" / "movielens-tiny.yaml").read_text())
    silos = yaml.safe_load((REPO / "configs" / "movielens-silos.yaml").read_text())
    tiny["privacy"] = silos["privacy"]
    tiny["aggregation"] = {"kind": "secagg", "max_weight": 8192}
    tiny.setdefault("federation", {})["rounds"] = 2
    path = tmp / "tiny-silos.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


def swap(line: str, tmp: Path) -> list[str]:
    line = line.replace("configs/movielens.yaml", str(REPO / "configs" / "movielens-tiny.yaml"))
    line = line.replace("configs/movielens-silos.yaml", str(tiny_silos(tmp)))
    line = line.replace("configs/imdb.yaml", str(REPO / "configs" / "imdb-tiny.yaml"))
    args = shlex.split(line)
    assert args[0] == "fedrlhf"
    return [sys.executable, "-m", "fedrlhf_secure.cli", *args[1:]]


def strict(text: str):
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_every_line_of_the_readme_block_works_in_order_on_the_tiny_configs(tmp_path, shared_datasets):
    lines = readme_block()
    assert lines[0].startswith("fedrlhf run configs/movielens.yaml") and any(" ledger " in f" {x} " for x in lines)
    env = {**os.environ, "FEDRLHF_DATA_DIR": str(shared_datasets), "FEDRLHF_CACHE_DIR": str(tmp_path / "cache")}
    work = tmp_path / "clone"
    work.mkdir()
    schemas = {p.name: json.loads(p.read_text()) for p in (METRICS_ROW, SUMMARY)}
    registry = Registry().with_resources((n, Resource.from_contents(s)) for n, s in schemas.items())
    summary_v = jsonschema.Draft202012Validator(schemas[SUMMARY.name], registry=registry)
    row_v = jsonschema.Draft202012Validator(schemas[METRICS_ROW.name], registry=registry)
    for line in lines:
        if line.startswith("fedrlhf deploy local"):
            continue  # tests/test_flower_deployment.py
        proc = subprocess.run(swap(line, tmp_path), cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        want = next((code for flag, code in EXPECTED_STATUS.items() if flag in line), 0)
        assert proc.returncode == want, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, line
        assert "\r" not in proc.stdout + proc.stderr, line  # piped: plain lines, no progress frames
        if line.startswith("fedrlhf run") and want == 0:
            assert re.search(r"^\| model \| ", proc.stdout, re.M), line  # the result table
            run = work / "runs" / "latest"
            summary_v.validate(strict((run / "summary.json").read_text()))
            for row in (run / "metrics.jsonl").read_text().splitlines():
                row_v.validate(strict(row))
        if line.startswith("fedrlhf ledger"):
            assert "ε" in proc.stdout
        if line.startswith("fedrlhf audit"):
            assert "audit plan:" in proc.stdout and "largest ε it can refute" in proc.stdout
        if line.startswith("fedrlhf redteam"):
            assert (work / "redteam.json").is_file()
