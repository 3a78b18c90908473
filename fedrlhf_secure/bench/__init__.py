"""``fedrlhf bench NAME``: benchmarks that write ``bench/NAME.json`` and their table in BENCHMARKS.md.

Each benchmark is a module here exposing ``add_arguments(parser)`` and ``run(args) -> int``; timing
targets live here, never in unit tests. Quote medians and ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "round": ("fedrlhf_secure.bench.round", "one MovieLens federation: seconds per round, bytes per client"),
    "aggregation": ("fedrlhf_secure.bench.aggregation", "plain vs masking (vs Flower SecAgg+) vs CKKS"),
    "dp": ("fedrlhf_secure.bench.dp", "DP-SGD overhead vs non-private local training; privacy-utility table"),
    "audit": ("fedrlhf_secure.bench.audit", "16-shadow LiRA audit of the default MovieLens run"),
    "flower": ("fedrlhf_secure.bench.flower", "per-round overhead of the Flower transport vs in-process"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)
