"""``summary.json``: the final numbers of a run, its baselines, seed and package versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..rundir import RunDirectory, atomic_write_json
from .participant import LOCAL_METRICS_FILE
from .round_core import RoundLog, pool_metrics

_PACKAGES = ("fedrlhf-secure", "torch", "numpy", "opacus", "tenseal", "cryptography", "transformers", "trl", "peft", "flwr")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_local_metrics(folder: Path, round: int) -> dict[int, dict[str, float]]:
    """The evaluation numbers the participant hosts kept in their own file for ``round`` under DP
    (:class:`~.participant.PlaintextPolicy`); the last line per client wins (a resumed round)."""
    path = Path(folder) / LOCAL_METRICS_FILE
    out: dict[int, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("round") == round:
            out[int(row["client"])] = {k: (float("nan") if v is None else float(v)) for k, v in row["metrics"].items()}
    return {c: out[c] for c in sorted(out)}


def adopt_local_metrics(log: RoundLog, folder: Path) -> None:
    """The embedded simulation under DP: pool the held-out numbers the clients kept on their own disk.

    No frame carried them to the round core (the server's side of a round learns none of them); the
    in-process runner reads them here because in a simulation the run directory plays every client's
    disk as well as the server's. The row says so (``metrics_source``). Over Flower each node keeps
    its own file and the server's ``metrics.jsonl`` has no accuracy under DP."""
    per_client = read_local_metrics(folder, int(log.row["round"]))
    if not per_client:
        return
    log.row.update(pool_metrics(per_client))
    log.row["metrics_source"] = f"clients' local {LOCAL_METRICS_FILE} (embedded simulation; no frame carried them)"
    log.per_client = per_client


def run_baselines(task, names, federation=None) -> dict[str, dict[str, Any]]:
    """Run the named baselines; with ``federation`` given, at its rounds × local epochs."""
    available = task.baselines()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"baseline {unknown[0]!r} is not offered by task {task.name!r}; it offers {sorted(available)}")
    kwargs = {} if federation is None else {"rounds": federation.rounds, "local_epochs": federation.local_epochs}
    return {name: dict(available[name](**kwargs)) for name in names}


def comparison_rows(final: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = [{"model": "federated", "heldout_accuracy": final.get("heldout_accuracy"), "train_accuracy": final.get("train_accuracy")}]
    for name, res in baselines.items():
        rows.append({"model": name, "heldout_accuracy": res.get("heldout_accuracy"), "train_accuracy": res.get("train_accuracy")})
    return rows


def format_table(rows: list[Mapping[str, Any]]) -> str:
    def f(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| model | held-out accuracy | train accuracy |", "|---|---|---|"]
    lines += [f"| {r['model']} | {f(r['heldout_accuracy'])} | {f(r['train_accuracy'])} |" for r in rows]
    return "\n".join(lines)


def write_summary(fed, run: RunDirectory, timing: Mapping[str, Any]) -> dict[str, Any]:
    final = dict(fed.history[-1]) if fed.history else {}
    baselines = run_baselines(fed.task, fed.config.baselines, fed.config.federation) if fed.config.baselines else {}
    summary = {
        "task": fed.config.task.kind,
        "aggregation": fed.config.aggregation.kind,
        "privacy_mode": fed.config.privacy.mode,
        "seed": fed.config.seed,
        "rounds_completed": len(fed.history),
        "rounds_configured": fed.config.federation.rounds,
        "stopped_early": fed.stopped,
        "final": final,
        "privacy": fed.privacy.summary(),
        "baselines": baselines,
        "comparison": comparison_rows(final, baselines),
        "clients_final": {str(c): m for c, m in fed.final_clients.items()},
        "shared_parameters": int(fed.spec.size),
        "vector_dim": int(fed.codec.dim),
        "num_clients": len(fed.client_ids),
        "seconds_total": timing.get("seconds_total"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
    }
    atomic_write_json(run.path / "summary.json", summary)
    return summary
