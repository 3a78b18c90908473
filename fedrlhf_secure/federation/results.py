"""``summary.json``: the final numbers of a run, its baselines, seed and package versions."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..rundir import RunDirectory, atomic_write_json
from ..tasks.base import Metric

logger = logging.getLogger(__name__)

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
    out = {}
    for i, name in enumerate(names):
        logger.info("baseline %d/%d: %s ...", i + 1, len(names), name)
        start = time.perf_counter()
        out[name] = dict(available[name](**kwargs))
        logger.info("baseline %d/%d: %s done in %.1f s", i + 1, len(names), name, time.perf_counter() - start)
    return out


def comparison_rows(
    final: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], metrics: Sequence[Metric]
) -> list[dict[str, Any]]:
    """The federated model's headline numbers, then each baseline's, one row per model."""
    rows = [{"model": "federated", **{m.key: final.get(m.key) for m in metrics}}]
    rows += [{"model": name, **{m.key: res.get(m.key) for m in metrics}} for name, res in baselines.items()]
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[Metric]) -> str:
    """A Markdown table a person reads in a terminal: one row per model, a column per metric."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else ("-" if v is None or isinstance(v, float) else str(v))

    lines = ["| model | " + " | ".join(m.label for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += ["| " + " | ".join([str(r["model"]), *(cell(r.get(m.key)) for m in metrics)]) + " |" for r in rows]
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
        "headline_metrics": [dataclasses.asdict(m) for m in type(fed.task).metrics],
        "comparison": comparison_rows(final, baselines, type(fed.task).metrics),
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


def render_result(summary: Mapping[str, Any], path: Any) -> str:
    """What ``fedrlhf run`` (and ``deploy local``, ``--resume``) print at the end of a run."""
    metrics = [Metric(**m) for m in summary["headline_metrics"]]
    final = summary.get("final", {})
    lines = [format_table(summary["comparison"], metrics)]
    per_client = sorted(
        (int(k[len("shaped_reward_client") : -len("_mean")]), v)
        for k, v in final.items()
        if k.startswith("shaped_reward_client") and k.endswith("_mean") and isinstance(v, (int, float))
    )
    if per_client:
        lines.append("shaped reward per client (own R0 + λ·H, last round): " + ", ".join(f"{c}: {v:.3f}" for c, v in per_client))
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon_spent_max") is not None:
        budget = privacy.get("epsilon_budget")
        lines.append(
            f"privacy: ε spent (max over clients) = {privacy['epsilon_spent_max']:.3f}"
            + (f" of a budget of {budget:g}" if isinstance(budget, (int, float)) else "")
            + f", δ = {privacy.get('delta')}"
        )
    if summary.get("stopped_early"):
        lines.append(f"stopped early: {summary['stopped_early']}")
    lines.append(
        f"rounds: {summary['rounds_completed']} of {summary['rounds_configured']}, seconds: {summary['seconds_total']:.1f}, "
        f"bytes up/down per client (last round): {final.get('bytes_up_per_client') or 0:.0f}/{final.get('bytes_down_per_client') or 0:.0f}"
    )
    lines.append(f"results: {path}  (plots: {path}/plots)")
    return "\n".join(lines)
