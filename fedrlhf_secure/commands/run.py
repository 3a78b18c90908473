"""``fedrlhf run CONFIG``: run a federation into a run directory (or ``--resume`` one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import load_config
from ..configtypes import ConfigError
from ..rundir import point_latest
from .options import add_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/movielens.yaml); omit with --resume")
    add_overrides(p)
    p.add_argument("--out", type=Path, default=None, help="parent directory of run directories (default: ./runs)")
    p.add_argument("--name", default=None, help="run directory name prefix (default: TASK-AGGREGATION)")
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--workers", type=int, default=None, help="run clients in N worker processes")
    p.add_argument("--epsilon", type=float, default=None, help="privacy budget ε for the whole run (sets privacy.epsilon)")
    p.add_argument("--delta", type=float, default=None, help="privacy δ (sets privacy.delta)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue an interrupted run from its last completed round")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.workers is not None:
        out.append(f"federation.workers={args.workers}")
    if args.epsilon is not None:
        out.append(f"privacy.epsilon={args.epsilon}")
    if args.delta is not None:
        out.append(f"privacy.delta={args.delta}")
    return out


def run(args: argparse.Namespace) -> int:
    from ..federation.engine import RunOptions, resume_federation, run_federation
    from ..federation.results import render_result

    options = RunOptions(data_dir=args.data_dir, out=args.out, progress=not args.no_progress, name=args.name)
    if args.resume is not None:
        if args.config or overrides_from_args(args):
            raise ConfigError("--resume continues a run with its own saved config; give no CONFIG or overrides")
        path = resume_federation(args.resume, options)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG file (e.g. configs/movielens.yaml) or --resume RUN_DIR")
        config = load_config(args.config, overrides_from_args(args))
        if args.epsilon is not None and config.privacy.mode == "none":
            raise ConfigError(
                "--epsilon needs a DP mode: add --set privacy.mode=record (DP-SGD) or privacy.mode=client (DP-FedAvg)", source=args.config
            )
        path = run_federation(config, options)
    print(render_result(json.loads((path / "summary.json").read_text()), path))
    point_latest(path)
    return 0
