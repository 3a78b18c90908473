"""``fedrlhf redteam``: the security regression suite users run against their own configuration.

Each attack plays an active adversary — a lying server, optionally with colluding clients, or one
hostile node — against the real participants (:mod:`fedrlhf_secure.federation.participant`), the
real node protocol and the real aggregation state machines (:mod:`aggregation.secagg`,
:mod:`aggregation.ckks`), and reports ``refused`` or ``recovered`` with evidence (reconstruction
error against the victim's true update, what a node accepted, what ended a run). See
docs/redteam.md for the entries and the claim each one tests.
"""

from .harness import Target
from .report import SCHEMA_PATH, AttackResult, exit_code, format_table, to_json, write_json
from .suite import ATTACKS, round_size, run_suite

__all__ = [
    "ATTACKS",
    "SCHEMA_PATH",
    "AttackResult",
    "Target",
    "exit_code",
    "format_table",
    "round_size",
    "run_suite",
    "to_json",
    "write_json",
]
