"""What one attack reports, and the suite's table and ``redteam.json``.

Every attack ends in one verdict: ``refused`` (the honest parties refused, or what the adversary
got reveals nothing about an individual update), ``recovered`` (the adversary obtained what the
threat model says it must not: an individual update, a weaker configuration the nodes accepted,
a run ended by one node's frame), ``skipped`` (the attack does not apply to this configuration,
the reason says why) or ``error`` (the attack could not run: an interface changed; this counts as
a failure, because a suite that cannot run an attack proves nothing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERDICTS = ("refused", "recovered", "skipped", "error")
SCHEMA_PATH = Path(__file__).with_name("redteam.schema.json")
FORMAT_VERSION = 1


@dataclass
class AttackResult:
    """One attack's outcome. ``evidence`` holds numbers (reconstruction error against the victim's
    true update, what was accepted, who refused and why); ``claim`` is the security claim tested."""

    name: str
    verdict: str
    summary: str
    claim: str
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def clean(value: Any) -> Any:
    """Evidence as strict JSON: numpy scalars and arrays to Python, non-finite floats to None."""
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [clean(v) for v in items]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def exit_code(results: Sequence[AttackResult]) -> int:
    """1 if any attack recovered anything or could not run, else 0."""
    return 1 if any(r.verdict in ("recovered", "error") for r in results) else 0


def to_json(results: Sequence[AttackResult], target: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    return clean(
        {
            "format": FORMAT_VERSION,
            "target": dict(target),
            "attacks": [asdict(r) for r in results],
            "counts": counts,
            "verdict": "fail" if exit_code(results) else "pass",
            "seconds": seconds,
        }
    )


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def format_table(results: Sequence[AttackResult]) -> str:
    rows = [("attack", "verdict", "evidence")]
    rows += [(r.name, r.verdict.upper() if r.verdict == "recovered" else r.verdict, r.summary) for r in results]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 8}")
    return "\n".join(lines)
