"""``summary.json``: the final numbers of a run, its baselines, seed and package versions."""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Mapping
from typing import Any

from ..rundir import RunDirectory, atomic_write_json

_PACKAGES = ("fedrlhf-secure", "torch", "numpy", "opacus", "tenseal", "cryptography", "transformers", "trl", "peft", "flwr")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


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
