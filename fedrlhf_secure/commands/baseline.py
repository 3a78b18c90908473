"""``fedrlhf baseline CONFIG``: the non-federated baselines (centralized, local-only) of a config."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from ..rundir import RunDirectory, atomic_write_json, point_latest
from .options import add_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config whose task, split and model the baselines use")
    p.add_argument("--which", nargs="+", default=None, help="baselines to run (default: all the task offers)")
    add_overrides(p)
    p.add_argument("--out", type=Path, default=None, help="parent directory of run directories (default: ./runs)")
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")


def run(args: argparse.Namespace) -> int:
    from ..federation.engine import build_task, resolve_data_dir
    from ..federation.results import comparison_rows, format_table, package_versions, run_baselines

    config = load_config(args.config, args.overrides)
    task = build_task(config, resolve_data_dir(args.data_dir))
    names = args.which or sorted(task.baselines())
    rd = RunDirectory.create(args.out, f"{config.task.kind}-baselines")
    try:
        (rd.path / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        results = run_baselines(task, names, config.federation)
        atomic_write_json(
            rd.path / "summary.json", {"task": config.task.kind, "seed": config.seed, "baselines": results, "versions": package_versions()}
        )
    except BaseException:
        rd.discard()
        raise
    path = rd.finalize()
    metrics = type(task).metrics
    print(format_table(comparison_rows({}, results, metrics)[1:], metrics))
    print(f"results: {path}")
    point_latest(path)
    return 0
