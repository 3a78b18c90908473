"""``fedrlhf redteam``: the security regression suite users run against their own configuration.

Each attack plays an active adversary — a lying server, optionally with colluding clients, or one
hostile node — against the real participants (:mod:`fedrlhf_secure.federation.participant`), the
real node protocol and the real aggregation state machines (:mod:`aggregation.secagg`,
:mod:`aggregation.ckks`), and reports ``refused`` or ``recovered`` with evidence (reconstruction
error against the victim's true update, what a node accepted, what ended a run). See
docs/redteam.md for the entries and the claim each one tests.

The names below load on first use, so a module of this package that Flower starts per message
(:mod:`.flower_hostile`) does not import the whole suite.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Target": ".harness",
    "AttackResult": ".report",
    "SCHEMA_PATH": ".report",
    "exit_code": ".report",
    "format_table": ".report",
    "to_json": ".report",
    "write_json": ".report",
    "ATTACKS": ".suite",
    "round_size": ".suite",
    "run_suite": ".suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
