"""The suite: every attack, in order, against one target; the numbers for ``redteam.json``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrlhf_secure.config import RunConfig

from . import ckks_attacks, dictation, malformed, passive, replay, secagg_attacks
from .harness import Target
from .report import AttackResult

logger = logging.getLogger(__name__)

Attack = Callable[[Target], "AttackResult | list[AttackResult]"]

ATTACKS: dict[str, Attack] = {
    "passive": passive.passive_server,
    "dictation": dictation.dictation,
    "overlap": secagg_attacks.overlap,
    "split-view": secagg_attacks.split_view,
    "key-substitution": secagg_attacks.key_substitution,
    "grinding": secagg_attacks.grinding,
    "ckks-single": ckks_attacks.single_ciphertext,
    "ckks-subset": ckks_attacks.subset,
    "replay": replay.replay,
    "malformed": malformed.malformed_frames,
}
"""Suite entry -> attack. An entry may report several rows (``dictation`` reports one per weakened field)."""

DEFAULT_CLIENTS = 100


def round_size(config: RunConfig, clients: int | None, data_dir: Path | None) -> tuple[int, str]:
    """How many clients a round of ``config`` has, and where the number came from.

    ``--clients`` wins; else the task's own ``num_clients``; else the task is built (MovieLens:
    one client per ``users_per_client`` users of the split) when its data is at hand; else 100."""
    fed = config.federation
    if clients is not None:
        total, source = clients, "--clients"
    else:
        total, source = getattr(config.task.params, "num_clients", None), f"task.num_clients of {config.source}"
        if not isinstance(total, int) or total < 1:
            total, source = _task_clients(config, data_dir)
    n = min(total, max(fed.min_clients, math.ceil(fed.fraction * total)))
    return n, source


def _task_clients(config: RunConfig, data_dir: Path | None) -> tuple[int, str]:
    if config.task.kind != "movielens":
        return DEFAULT_CLIENTS, f"default ({config.task.kind} is not built just to count its clients)"
    try:
        from fedrlhf_secure.federation.participant import build_task

        return len(build_task(config, data_dir).client_ids()), f"the {config.task.kind} task built from its data"
    except Exception as exc:  # noqa: BLE001 - no data here: fall back, and say so
        return DEFAULT_CLIENTS, f"default (the task could not be built here: {type(exc).__name__})"


def run_suite(target: Target, only: Sequence[str] | None = None, progress: Callable[[str], None] = lambda _: None) -> list[AttackResult]:
    """Every attack (or ``only`` those), in order; an attack that raises is an ``error`` row, never a pass."""
    results: list[AttackResult] = []
    for name, attack in ATTACKS.items():
        if only and name not in only:
            continue
        progress(name)
        t0 = time.perf_counter()
        try:
            out = attack(target)
        except Exception as exc:  # noqa: BLE001 - an attack that cannot run proves nothing: report it
            logger.exception("redteam: attack %s could not run", name)
            out = AttackResult(name, "error", f"{type(exc).__name__}: {str(exc)[:120]}", "the attack could not run")
        seconds = time.perf_counter() - t0
        rows = out if isinstance(out, list) else [out]
        for r in rows:
            r.seconds = seconds / len(rows)
        results.extend(rows)
    return results
