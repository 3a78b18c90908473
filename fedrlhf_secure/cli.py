"""The ``fedrlhf`` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only lists them, so a feature and its command stay together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedrlhf_secure.commands.run", "run a federation from a YAML config"),
    "baseline": ("fedrlhf_secure.commands.baseline", "run the centralized / local-only baselines of a config"),
    "data": ("fedrlhf_secure.tasks.movielens.download", "download and verify MovieLens (needs network)"),
    "ledger": ("fedrlhf_secure.privacy.ledger_cli", "print the privacy spend of a run, per client and in total"),
    "audit": ("attacks.cli", "membership-inference audit of a run directory; exit 1 if ε̂ exceeds the claim"),
    "bench": ("fedrlhf_secure.bench", "benchmarks: write JSON and the tables in BENCHMARKS.md"),
    "keys": ("aggregation.ckks_keys", "CKKS key setup: make and deliver a run's key to the clients"),
    "deploy": ("fedrlhf_secure.transport.deploy", "Flower deployment helpers (certificates, node keys, launch)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrlhf", description="Privacy-hardened federated RLHF.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # command not built in this installation
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .configtypes import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (InputError, FileNotFoundError) as exc:
        print(f"fedrlhf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedrlhf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
