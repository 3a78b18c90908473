"""``fedrlhf secagg-params``: the masking graph degree k, Shamir threshold t and consistency quorum a
SecAgg config gets at each round size, with the failure probabilities they carry.

The numbers are :func:`aggregation.secagg.params.secagg_parameters` (or, for explicit
``neighbours`` / ``threshold``, their check): the same function the aggregator calls before a
round, so what this prints is what a round uses. Exit 2 (with the numbers) if a size cannot hold
the config's stated colluder and dropout fractions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .options import add_overrides

DEFAULT_SIZES = (10, 100, 1000, 10000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="?", default=None, help="run config with aggregation.kind: secagg (default: the defaults)")
    p.add_argument("--clients", type=int, nargs="+", default=None, help=f"round sizes n (default {list(DEFAULT_SIZES)})")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/masking.md)")
    add_overrides(p, example="aggregation.colluders=0.2")


def secagg_config(config_path: Path | None, overrides):
    """The SecAgg section of a run config (or the defaults) with ``--set aggregation.*`` overrides."""
    from aggregation.secagg import SecAggConfig

    from ..config import load_config, parse_overrides
    from ..configtypes import ConfigError, from_mapping

    if config_path is not None:
        section = load_config(config_path, overrides).aggregation
        if section.kind != "secagg":
            raise ConfigError(f"aggregation.kind is {section.kind!r}; secagg-params needs kind: secagg", source=str(config_path))
        return section.params
    raw = {}
    for path, value in parse_overrides(overrides):
        if len(path) != 2 or path[0] != "aggregation":
            raise ConfigError(f"--set {'.'.join(path)}: without a config only aggregation.<key> can be set")
        if path[1] != "kind":
            raw[path[1]] = value
    return from_mapping(SecAggConfig, raw, key="aggregation", source="--set")


def _p(x: float) -> str:
    return "0" if x == -math.inf else f"2^{x:.1f}"


def run(args: argparse.Namespace) -> int:
    from aggregation.secagg import ParameterError

    cfg = secagg_config(args.config, args.overrides)
    sizes = args.clients or list(DEFAULT_SIZES)
    head = ["n", "colluders C", "dropouts D", "k", "t", "quorum", "P[privacy]", "P[dropout]", "P[partition]"]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(
            f"colluders <= {cfg.colluders:g} n, dropouts <= {cfg.dropouts:g} n, each failure <= 2^-{cfg.failure_exponent}; "
            f"neighbours {cfg.neighbours}, threshold {cfg.threshold}"
        )
        print("  ".join(f"{h:>12}" for h in head))
    failed = []
    for n in sizes:
        try:
            p = cfg.parameters(n)
        except ParameterError as exc:
            failed.append(str(exc))
            print(f"n={n}: {exc}")
            continue
        row = [
            p.n,
            p.colluders,
            p.dropouts,
            p.k,
            p.t,
            p.quorum,
            _p(p.log2_privacy_failure),
            _p(p.log2_dropout_failure),
            _p(p.log2_partition_failure),
        ]
        if args.markdown:
            print("| " + " | ".join(str(v) for v in row) + " |")
        else:
            print("  ".join(f"{v!s:>12}" for v in row))
    return 2 if failed else 0
