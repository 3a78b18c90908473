"""The audit of one run directory: attacks on the released parameters, an ε lower bound, a verdict.

Steps (each a separate, reproducible piece; ``seed`` fixes every coin the audit flips):

1. **Released parameters** (threat model (a): anyone holding ``model.safetensors``). Candidates
   are the task's training records (members) and records from the same distribution it never
   trained on (non-members), through the task's
   :class:`~fedrlhf_secure.tasks.auditable.AuditableTask` interface (a task without it is refused
   with an :class:`~fedrlhf_secure.errors.InputError` before any work);
   ``num_shadows`` shadow runs of the same config train on random halves of all candidates
   (:mod:`.shadows`). Attacks: LOSS (:mod:`.loss`), reference-model (:mod:`.reference`), LiRA
   online/offline (:mod:`.lira`), RMIA online/offline (:mod:`.rmia`). Metrics: :mod:`.metrics`.
2. **Empirical ε** (:mod:`.bounds`). The released run has no canaries, and DP is a property of
   the *training procedure*, so the audit trains ``canary_runs`` fresh runs of the same config
   with ``num_canaries`` canaries each (:func:`.shadows.run_canaries`). The one-run bound
   (Steinke et al. 2023) of the first canary run is ε̂; when ``canary_runs ≥ 2`` the multi-run
   Clopper–Pearson bound (Jagielski et al. 2020) picks its threshold on the first run and counts
   errors on the others. With a single run, the Clopper–Pearson figure splits the canaries into a
   selection and an evaluation half and treats canaries as trials (valid for the analysis of
   Steinke et al. Thm 3.1 only in the pure-DP limit), so it is reported for comparison only.
3. **Verdict**: ``fail`` when ε̂ > the ε the run's ledger claims (the largest ε any client spent,
   or the configured budget if larger), ``pass`` otherwise, ``no-claim`` for a non-private run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedrlhf_secure.config import RunConfig
from fedrlhf_secure.configtypes import InputError
from fedrlhf_secure.rundir import atomic_write_json, load_tensors

from . import bounds
from .lira import lira_offline, lira_online
from .loss import loss_scores
from .metrics import summarize
from .reference import reference_scores
from .rmia import rmia_scores
from .server_view import MIN_AGGREGATE_CLIENTS, server_view_audit
from .shadows import candidate_pool, ensure_supported, load_run_config, run_canaries, shadow_inclusions, train_shadows

RMIA_POPULATION = 2000


@dataclass(frozen=True)
class AuditSettings:
    num_shadows: int = 16
    num_canaries: int = 1000
    canary_runs: int = 1
    confidence: float = 0.95
    seed: int = 0
    server_view: bool = False
    server_view_clients: int = 50
    server_view_kind: str = "secagg"
    plots: bool = True
    workers: int | None = None
    """Worker processes for the audit's own training runs (``federation.workers``; results do not
    depend on it, only the wall time does)."""

    def __post_init__(self) -> None:
        """Bad settings are bad user input (``fedrlhf audit`` exits 2), refused before any training run."""
        if self.num_shadows < 0 or self.num_shadows == 1:
            raise InputError(f"--shadows must be 0 (LOSS attack only) or >= 2, got {self.num_shadows}")
        if self.num_canaries < 0 or 0 < self.num_canaries < 20:
            raise InputError(f"--canaries must be 0 (no ε audit) or >= 20, got {self.num_canaries}")
        if self.canary_runs < 1:
            raise InputError(f"--canary-runs must be >= 1, got {self.canary_runs}")
        if self.server_view and self.server_view_clients < MIN_AGGREGATE_CLIENTS:
            raise InputError(
                f"--server-view-clients must be >= {MIN_AGGREGATE_CLIENTS} (an aggregate of fewer is not the claim), "
                f"got {self.server_view_clients}"
            )
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if not 0.5 <= self.confidence < 1:
            raise InputError(f"--confidence must be in [0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class Claim:
    """The ε a run claims, from its ledger (``ledger/``) and config."""

    epsilon: float
    delta: float
    mode: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        epsilon = None if math.isinf(self.epsilon) else self.epsilon
        return {"epsilon": epsilon, "delta": self.delta, "mode": self.mode, "source": self.source}


def claimed_privacy(run_dir: Path, config: RunConfig) -> Claim:
    """Non-private runs claim ε = ∞. A private run must have a ledger: its largest spent ε (or the
    configured budget, whichever is larger: a run may not have spent all of it) is the claim."""
    p = config.privacy
    if p.mode == "none":
        return Claim(math.inf, p.delta, "none", "config: privacy.mode = none")
    from fedrlhf_secure.privacy.ledger import read_ledger

    header, entries = read_ledger(Path(run_dir) / "ledger")
    spent = [e.epsilon_after for rows in entries.values() for e in rows]
    budget = header.get("epsilon_budget")
    eps = max([*spent, *([float(budget)] if budget is not None else [])], default=math.inf)
    delta = float(header.get("delta", p.delta))
    return Claim(eps, delta, p.mode, f"{Path(run_dir) / 'ledger'} (budget {budget}, max spent {max(spent, default=None)})")


def attack_scores(target: np.ndarray, shadows: np.ndarray | None, inclusions: np.ndarray | None, seed: int) -> dict[str, np.ndarray]:
    """Every attack's membership scores for the candidates (LOSS only when there are no shadows)."""
    out = {"loss": loss_scores(target)}
    if shadows is None or inclusions is None or len(shadows) < 2:
        return out
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x2A1A]))
    population = rng.choice(len(target), size=min(RMIA_POPULATION, len(target)), replace=False)
    out["reference"] = reference_scores(target, shadows, inclusions)
    out["lira_online"] = lira_online(target, shadows, inclusions)
    out["lira_offline"] = lira_offline(target, shadows, inclusions)
    out["rmia_online"] = rmia_scores(target, shadows, inclusions, population, online=True)
    out["rmia_offline"] = rmia_scores(target, shadows, inclusions, population, online=False)
    return out


def epsilon_audit(canary_runs: list, delta: float, confidence: float, seed: int) -> dict[str, Any]:
    first = canary_runs[0]
    one = bounds.one_run_audit(first.scores, first.included, delta, confidence, seed=seed)
    if len(canary_runs) >= 2:
        rest_s = np.concatenate([c.scores for c in canary_runs[1:]])
        rest_l = np.concatenate([c.included for c in canary_runs[1:]])
        multi = bounds.multi_run_audit(first.scores, first.included, rest_s, rest_l, delta, confidence)
        multi_note = f"threshold chosen on canary run 1, errors counted on runs 2..{len(canary_runs)}"
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC1]))
        half = rng.random(len(first.scores)) < 0.5
        multi = bounds.multi_run_audit(
            first.scores[half], first.included[half], first.scores[~half], first.included[~half], delta, confidence
        )
        multi_note = (
            "single canary run: threshold chosen on half of the canaries, errors counted on the other half "
            "(canaries as trials; for comparison only)"
        )
    return {
        "estimate": one.epsilon_lower_bound,
        "confidence": confidence,
        "method": "one-run (Steinke, Nasr & Jagielski 2023), Bonferroni over the guess grid",
        "one_run": one.to_dict(),
        "multi_run_clopper_pearson": {**multi.to_dict(), "note": multi_note},
        "canary_runs": len(canary_runs),
    }


def verdict(estimate: float | None, claim: Claim) -> str:
    if math.isinf(claim.epsilon):
        return "no-claim"
    if estimate is None:
        return "not-audited"
    return "fail" if estimate > claim.epsilon else "pass"


def audit_run(
    run_dir: Path,
    data_dir: Path | None,
    settings: AuditSettings,
    *,
    progress: Callable[[str], None] | None = None,
    step: Callable[[], None] | None = None,
    noise=None,
) -> dict[str, Any]:
    """Audit ``run_dir``; write ``audit.json`` and ROC plots into it; return the report.

    ``noise``: the DP noise source of the audit's own shadow and canary runs (None: the secret
    one); tests pass the deliberately broken source the audited run was trained with."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    tick = step or (lambda: None)
    config = load_run_config(run_dir)
    ensure_supported(config)
    if settings.workers is not None:
        config = replace(config, federation=replace(config.federation, workers=settings.workers))
    claim = claimed_privacy(run_dir, config)
    model_path = run_dir / "model.safetensors"
    if not model_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no released model ({model_path} is missing): is the run complete?")
    released = load_tensors(model_path)

    say("candidates")
    pool = candidate_pool(config, data_dir)
    target = pool.scores(released)
    shadows = inclusions = None
    t0 = time.perf_counter()
    if settings.num_shadows:
        inclusions = shadow_inclusions(settings.num_shadows, len(pool.records), settings.seed)
        say(f"shadow runs (0/{settings.num_shadows})")

        def done(k: int) -> None:
            say(f"shadow runs ({k + 1}/{settings.num_shadows})")
            tick()

        shadows = train_shadows(pool, inclusions, on_done=done, noise=noise)
    shadow_seconds = time.perf_counter() - t0
    scores = attack_scores(target, shadows, inclusions, settings.seed)
    labels = pool.member.astype(int)
    attacks = {name: summarize(s, labels, settings.seed).to_dict() for name, s in scores.items()}

    report: dict[str, Any] = {
        "run": str(run_dir),
        "task": config.task.kind,
        "aggregation": config.aggregation.kind,
        "privacy_mode": config.privacy.mode,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "released_parameters": {
            "threat_model": "anyone holding model.safetensors (shared parameters only; personal parameters never released)",
            "candidates": int(len(pool.records)),
            "members": int(pool.member.sum()),
            "shadow_runs": settings.num_shadows,
            "shadow_seconds": shadow_seconds,
            "attacks": attacks,
        },
        "claimed": claim.to_dict(),
    }

    estimate = None
    if settings.num_canaries:
        runs = []
        for i in range(settings.canary_runs):
            say(f"canary run {i + 1}/{settings.canary_runs} ({settings.num_canaries} canaries)")
            runs.append(run_canaries(config, data_dir, settings.num_canaries, settings.seed + i, noise=noise))
            tick()
        report["epsilon"] = epsilon_audit(runs, claim.delta, settings.confidence, settings.seed)
        estimate = report["epsilon"]["estimate"]

    if settings.server_view:
        say(f"server view ({settings.server_view_clients} clients, {settings.server_view_kind})")
        sv = server_view_audit(
            config, data_dir, num_clients=settings.server_view_clients, secure_kind=settings.server_view_kind, seed=settings.seed
        )
        report["server_view"] = sv.to_dict()
        tick()
    else:
        sv = None

    report["verdict"] = verdict(estimate, claim)
    report["seconds"] = time.perf_counter() - t_start
    if settings.plots:
        from .plots import plot_roc

        plots = [
            str(
                plot_roc(
                    {k: (v, labels) for k, v in scores.items()},
                    run_dir / "plots" / "audit_roc.png",
                    "membership inference on released parameters",
                )
            )
        ]
        if sv is not None:
            plots.append(
                str(
                    plot_roc(
                        {
                            "plain update (one client)": (sv.plain_scores, sv.labels.astype(int)),
                            f"{sv.secure_kind} aggregate": (sv.secure_scores, sv.labels.astype(int)),
                        },
                        run_dir / "plots" / "audit_server_view_roc.png",
                        "what the server sees",
                    )
                )
            )
        report["plots"] = plots
    atomic_write_json(run_dir / "audit.json", report)
    return report


def progress_steps(settings: AuditSettings) -> int:
    return settings.num_shadows + (settings.canary_runs if settings.num_canaries else 0) + int(settings.server_view)
