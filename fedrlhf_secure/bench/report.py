"""Writing benchmark results: a JSON file, and a Markdown table spliced into BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; rewriting one section leaves the others alone.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..rundir import strict_json


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (worker processes not included): the cost
    figure of the in-process benches, robust to other load on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(strict_json({"machine": machine_info(), **payload}, indent=2))
    os.replace(tmp, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(doc: Path | None, name: str, body: str) -> None:
    """Print the ``name`` table; with ``doc`` given, also replace (or append) its section there.

    Only an explicit ``--doc`` writes a file: a bench run in any directory must not create or
    rewrite a BENCHMARKS.md there."""
    print(body.strip())
    if doc is None:
        return
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")
    print(f"(section {name!r} of {doc} rewritten)")
