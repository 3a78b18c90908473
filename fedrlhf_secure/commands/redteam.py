"""``fedrlhf redteam CONFIG``: the security regression suite, run against the user's own configuration.

Every attack of :mod:`attacks.redteam` plays a lying server (with colluding clients where the
attack needs them) or a hostile node against the real participants and protocol state machines of
``CONFIG`` (with ``--set`` overrides), on synthetic updates of ``--dim`` values at the config's
round size. It prints a table, writes ``redteam.json`` (strict JSON; the schema is
``attacks/redteam/redteam.schema.json``) and exits 1 if any attack recovered anything (or could
not run), 0 if every attack was refused, 2 on bad input.

Like ``fedrlhf audit``, this command is a front door to :mod:`attacks`; the runtime never imports it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ..config import load_config
from ..errors import InputError
from .options import add_data_dir, add_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config to attack (e.g. configs/movielens.yaml)")
    add_overrides(p, "aggregation.kind=secagg")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for redteam.json (default: the current directory)")
    p.add_argument("--clients", type=int, default=None, help="clients per round (default: the config's round size)")
    p.add_argument("--dim", type=int, default=64, help="length of the synthetic update vectors (default 64)")
    p.add_argument("--only", default=None, help="comma-separated suite entries to run (default: all)")
    p.add_argument(
        "--node-socket",
        type=Path,
        default=None,
        help="send the dictation attacks to a running node (`fedrlhf deploy client-host`) over its Unix socket",
    )
    add_data_dir(p)


def run(args: argparse.Namespace) -> int:
    from attacks.redteam import ATTACKS, Target, exit_code, format_table, round_size, run_suite, to_json, write_json

    config = load_config(args.config, args.overrides)
    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(only) - set(ATTACKS))
        if unknown:
            raise InputError(f"--only: unknown suite entries {unknown}; expected some of {sorted(ATTACKS)}")
    if args.clients is not None and args.clients < 3:
        raise InputError(f"--clients must be >= 3 (a victim, a neighbour and a colluder), got {args.clients}")
    if not 1 <= args.dim <= 1 << 20:
        raise InputError(f"--dim must be in 1..{1 << 20}, got {args.dim}")
    n, source = round_size(config, args.clients, args.data_dir)
    if n < 3:
        raise InputError(f"{args.config}: a round of {n} clients is too small to attack (need >= 3)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedrlhf-redteam-") as tmp:
        if args.node_socket is not None and not args.node_socket.exists():
            raise InputError(f"--node-socket: no socket at {args.node_socket}")
        target = Target(config, n, args.dim, Path(tmp), n_source=source, node_socket=args.node_socket, data_dir=args.data_dir)
        what = f"{config.source} ({config.aggregation.kind}, privacy {config.privacy.mode})"
        print(f"redteam: {what}, {n} clients per round ({source})", file=sys.stderr)
        results = run_suite(target, only, progress=lambda name: print(f"redteam: {name} ...", file=sys.stderr))
        report = to_json(results, target.describe(), time.perf_counter() - t0)
    print(format_table(results))
    path = args.out / "redteam.json"
    write_json(report, path)
    verdict = "every attack refused" if not exit_code(results) else "attacks RECOVERED what the threat model protects (or could not run)"
    print(f"redteam: {verdict}; wrote {path}")
    return exit_code(results)
