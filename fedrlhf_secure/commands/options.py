"""Command-line options several commands share, written once so they read the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_overrides(p: argparse.ArgumentParser, example: str = "federation.rounds=3") -> None:
    """``--set KEY=VALUE`` (repeatable): override one config key, validated like the YAML file."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
