"""``fedrlhf ledger RUN_DIR``: print a run's privacy spend per client and in total."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from ..privacy.ledger import read_ledger


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory (finished or .partial)")
    p.add_argument("--rounds", action="store_true", help="also list every release (client, round, ε after it)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _ledger_dir(run_dir: Path) -> Path:
    for candidate in (run_dir / "ledger", run_dir.with_name(run_dir.name + ".partial") / "ledger"):
        if candidate.is_dir():
            return candidate
    raise InputError(f"no privacy ledger in {run_dir} (the run had privacy.mode: none, or this is not a run directory)")


def run(args: argparse.Namespace) -> int:
    ledger_dir = _ledger_dir(Path(args.run_dir))
    header, entries = read_ledger(ledger_dir)
    spent = {c: max(e.epsilon_after for e in es) for c, es in entries.items() if es}
    budget = header.get("epsilon_budget")
    total = max(spent.values(), default=0.0)
    if args.json:
        print(
            json.dumps(
                {
                    "plan": header,
                    "epsilon_per_client": {str(c): v for c, v in spent.items()},
                    "epsilon_total": total,
                    "releases": sum(len(es) for es in entries.values()),
                },
                indent=2,
            )
        )
        return 0
    print(f"ledger: {ledger_dir}")
    print(f"mode: {header.get('mode')}  accountant: {header.get('accountant')}  budget ε={budget}  δ={header.get('delta')}")
    print("| client | releases | rounds | ε spent |")
    print("|---|---|---|---|")
    for c in sorted(entries):
        rounds = ",".join(str(e.round) for e in entries[c])
        print(f"| {c} | {len(entries[c])} | {rounds} | {spent[c]:.4f} |")
    if args.rounds:
        print("\n| client | round | mechanism | noise multiplier | sample rate | steps | ε after |")
        print("|---|---|---|---|---|---|---|")
        for c in sorted(entries):
            for e in entries[c]:
                print(
                    f"| {c} | {e.round} | {e.mechanism} | {e.noise_multiplier:.4f} | {e.sample_rate:.4g} | {e.steps} "
                    f"| {e.epsilon_after:.4f} |"
                )
    print(
        f"total: ε = {total:.4f} (max over clients: each client's data is disjoint, so the run's guarantee is the worst client's), "
        f"{sum(len(es) for es in entries.values())} releases by {len(entries)} clients"
    )
    if budget is not None and total > budget + 1e-9:
        print(f"WARNING: spend exceeds the budget ε={budget}")
        return 1
    return 0
