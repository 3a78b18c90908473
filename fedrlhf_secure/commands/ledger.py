"""``fedrlhf ledger RUN_DIR``: verify a run's privacy ledger and print its spend per client, recomputed.

Nothing stored is taken on trust: the hash chain of every client's entries is checked against the
ledger's manifest (:func:`~fedrlhf_secure.privacy.ledger.check_ledger`), and each client's ε is
recomputed from the mechanism parameters of its entries (noise multiplier, sampling rate, steps;
Skellam variance and sensitivities) with the accountant the plan names, after every entry, and
compared with the ``epsilon_after`` the entry stores. The table shows both figures. The command
exits 1 when the ledger is incomplete or altered, when a stored ε disagrees with the recomputed
one, or when the spend exceeds the budget; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..privacy.accountants import GaussianAccountant, GaussianRelease, SkellamAccountant, SkellamRelease
from ..privacy.ledger import LedgerEntry, LedgerIncomplete, check_ledger

logger = logging.getLogger(__name__)

EPS_TOLERANCE = 1e-6
"""Recomputed vs stored ε: the accountants are deterministic, so anything above float noise is a mismatch."""

GAUSSIAN_MECHANISMS = ("dp-sgd", "gaussian")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory (finished or .partial), or a ledger directory")
    p.add_argument("--rounds", action="store_true", help="also list every release (client, round, ε after it, stored and recomputed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _ledger_dir(run_dir: Path) -> Path:
    """The ledger of ``run_dir``; a DP run whose ledger is gone is an integrity failure, not "no ledger"."""
    run_dir = run_dir.resolve()  # "." has no name to add ".partial" to
    if (run_dir / "manifest.json").exists() or (run_dir / "plan.json").exists():
        return run_dir  # a ledger directory itself (a deployment node's state directory)
    for place in (run_dir, run_dir.with_name(run_dir.name + ".partial")):
        if (place / "ledger").is_dir():
            return place / "ledger"
    for place in (run_dir, run_dir.with_name(run_dir.name + ".partial")):
        config = place / "config.yaml"
        if config.exists():
            try:
                mode = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("privacy", {}).get("mode", "none")
            except (OSError, yaml.YAMLError, AttributeError):
                mode = "?"
            if mode not in ("none", None):
                raise LedgerIncomplete(
                    f"{place / 'ledger'}: missing, but {config} says privacy.mode: {mode}; the ε this run spent cannot be shown"
                )
    raise InputError(f"no privacy ledger in {run_dir} (the run had privacy.mode: none, or this is not a run directory)")


def recompute_epsilon(header: Mapping[str, Any], entries: Sequence[LedgerEntry]) -> list[float]:
    """ε after each of ``entries`` (one client's, in round order), recomputed with the plan's accountant.

    The same composition the client's plan performed at commit time (:mod:`fedrlhf_secure.privacy.record_level`,
    :mod:`~fedrlhf_secure.privacy.client_level`): the subsampled Gaussian mechanism through Opacus'
    ``rdp``/``prv`` accountant for ``dp-sgd`` and ``gaussian`` entries, the Skellam RDP bound
    (Agarwal, Kairouz & Liu 2021, Thm 3.5) for ``skellam`` entries; at the plan's δ.
    """
    delta = float(header["delta"])
    mechanisms = {e.mechanism for e in entries}
    out: list[float] = []
    if mechanisms <= set(GAUSSIAN_MECHANISMS):
        accountant = GaussianAccountant(str(header["accountant"]))
        history = [GaussianRelease(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        return [accountant.epsilon(history[: i + 1], delta) for i in range(len(history))]
    if mechanisms == {"skellam"}:
        skellam = SkellamAccountant()
        sk = [SkellamRelease(e.params["variance"], e.params["l1"], e.params["l2"], e.steps) for e in entries]
        return [skellam.epsilon(sk[: i + 1], delta) for i in range(len(sk))]
    if entries:
        raise InputError(f"cannot recompute ε for mechanisms {sorted(mechanisms)} (known: {', '.join(GAUSSIAN_MECHANISMS)}, skellam)")
    return out


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= EPS_TOLERANCE * max(1.0, abs(b))


def run(args: argparse.Namespace) -> int:
    ledger_dir = _ledger_dir(Path(args.run_dir))
    check = check_ledger(ledger_dir)  # a missing plan/manifest raises (LedgerIncomplete, exit 1)
    header, entries = check.header, check.entries
    problems = list(check.problems)
    stored: dict[int, float] = {}
    recomputed: dict[int, float] = {}
    per_entry: dict[int, list[float]] = {}
    for c, rows in sorted(entries.items()):
        if not rows:
            continue
        try:
            per_entry[c] = recompute_epsilon(header, rows)
        except (InputError, KeyError, ValueError) as exc:
            problems.append(f"{ledger_dir / f'client-{c}.json'}: ε cannot be recomputed ({exc})")
            per_entry[c] = [math.nan] * len(rows)
        stored[c] = max(e.epsilon_after for e in rows)
        recomputed[c] = per_entry[c][-1]
        for e, eps in zip(rows, per_entry[c], strict=True):
            if not _close(e.epsilon_after, eps):
                problems.append(
                    f"{ledger_dir / f'client-{c}.json'}: round {e.round} stores ε = {e.epsilon_after:.6f}, the accountant gives "
                    f"{eps:.6f} for the releases up to it"
                )
            if e.delta != header.get("delta"):
                problems.append(f"{ledger_dir / f'client-{c}.json'}: round {e.round} has δ = {e.delta:g}, the plan {header.get('delta')}")
    listed = {int(c): int(rec.get("count", 0)) for c, rec in check.manifest.get("clients", {}).items() if isinstance(rec, dict)}
    lost = {c: n for c, n in listed.items() if c not in entries and n > 0}
    budget = header.get("epsilon_budget")
    total = max(recomputed.values(), default=0.0)
    releases = sum(len(es) for es in entries.values())
    over = budget is not None and total > float(budget) + 1e-9
    if args.json:
        print(
            json.dumps(
                {
                    "plan": header,
                    "epsilon_per_client": {str(c): recomputed[c] for c in recomputed},
                    "epsilon_per_client_stored": {str(c): stored[c] for c in stored},
                    "epsilon_total": total,
                    "releases": releases,
                    "chain_verified": check.ok,
                    "clients_missing": {str(c): n for c, n in lost.items()},
                    "problems": problems,
                },
                indent=2,
            )
        )
    else:
        _print_table(ledger_dir, header, entries, stored, recomputed, per_entry, args.rounds)
        for c, n in sorted(lost.items()):
            print(f"| {c} | {n} in the manifest, file missing | ? | ? | ? |")
        print(
            f"total: ε {'≥' if lost else '='} {total:.4f} (recomputed; max over clients: each client's data is disjoint, so the "
            f"run's guarantee is the worst client's), {releases} releases by {len(entries)} clients"
            + (f" ({sum(lost.values())} more releases of {len(lost)} clients are missing)" if lost else "")
            + "; hash chains "
            + f"{'verified against the manifest' if check.ok else 'NOT verified'}"
        )
        for p in problems:
            print(f"MISMATCH: {p}")
        if over:
            print(f"WARNING: spend exceeds the budget ε={budget}")
    return 1 if problems or over else 0


def _print_table(
    ledger_dir: Path,
    header: Mapping[str, Any],
    entries: Mapping[int, list[LedgerEntry]],
    stored: Mapping[int, float],
    recomputed: Mapping[int, float],
    per_entry: Mapping[int, list[float]],
    rounds: bool,
) -> None:
    print(f"ledger: {ledger_dir}")
    print(
        f"mode: {header.get('mode')}  accountant: {header.get('accountant')}  budget ε={header.get('epsilon_budget')}  "
        f"δ={header.get('delta')}"
    )
    print("| client | releases | rounds | ε recomputed | ε stored |")
    print("|---|---|---|---|---|")
    for c in sorted(entries):
        if not entries[c]:
            print(f"| {c} | 0 | | 0.0000 | 0.0000 |")
            continue
        rs = ",".join(str(e.round) for e in entries[c])
        print(f"| {c} | {len(entries[c])} | {rs} | {recomputed[c]:.4f} | {stored[c]:.4f} |")
    if rounds:
        print("\n| client | round | mechanism | noise multiplier | sample rate | steps | ε after (recomputed) | ε after (stored) |")
        print("|---|---|---|---|---|---|---|---|")
        for c in sorted(entries):
            for e, eps in zip(entries[c], per_entry.get(c, []), strict=False):
                print(
                    f"| {c} | {e.round} | {e.mechanism} | {e.noise_multiplier:.4f} | {e.sample_rate:.4g} | {e.steps} "
                    f"| {eps:.4f} | {e.epsilon_after:.4f} |"
                )
