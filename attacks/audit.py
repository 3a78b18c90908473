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
2. **Empirical ε** (:mod:`.bounds`), one fixed policy, chosen and announced before any training
   (:func:`plan_epsilon_audit`):

   * **the run itself** when it was trained with ``privacy.audit_canaries: m``: its white-box Dirac
     gradient canaries (client level: added after clipping; record level: Poisson-sampled records
     inside each DP-SGD step; both before the noise, coins kept secret beside the run's ledger) are
     scored on the released model (:mod:`.gradient_canaries`). This audits the production run, not
     a re-run of its config;
   * else a **re-run** of its config (client or record level) with ``m`` gradient canaries in the
     audit block (``--gradient-canaries``; default: the smallest m on :data:`.bounds.CANARY_LADDER`
     whose ceiling exceeds the claim);
   * else (``--canaries M`` asked for without ``--gradient-canaries``, or ``--gradient-canaries 0``)
     a re-run with M record canaries (default 1,000; :func:`.shadows.run_canaries`; weak: their
     ceiling is 5.27 at m = 1,000).

   The one-run bound (Steinke, Nasr & Jagielski 2023) is ε̂. Every audit announces the largest ε it
   could refute at its m (:func:`.bounds.refutable_ceiling`) and the m the claim needs. There is
   no multi-run figure: canaries of one run are not independent trials, and re-running with other
   seeds until an audit passes is exactly what a fixed policy rules out (the seed and m are in
   ``audit.json``).
3. **Verdict**: ``fail`` when ε̂ > the ε the run's ledger claims (the largest ε any client spent,
   or the configured budget if larger); ``inconclusive`` when the audit's ceiling does not exceed
   the claim (it could not have failed); ``pass`` otherwise; ``no-claim`` for a non-private run.
"""

from __future__ import annotations

import logging
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
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditSettings:
    num_shadows: int = 16
    num_canaries: int | None = None
    """Record canaries of a re-run (``--canaries``): given without ``gradient_canaries`` it selects the
    record-canary audit instead of the gradient one (0: no ε audit); None: not asked for (1,000 when
    ``gradient_canaries`` is 0)."""
    gradient_canaries: int | None = None
    """Gradient canaries of the re-run audit of a client-level run (None: sized to the claim; 0: none)."""
    require_power: bool = False
    """Refuse (exit 2, before any training) an ε audit whose ceiling does not exceed the claim."""
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
        if self.num_canaries is not None and (self.num_canaries < 0 or 0 < self.num_canaries < 20):
            raise InputError(f"--canaries must be 0 (no ε audit) or >= 20, got {self.num_canaries}")
        if self.gradient_canaries is not None and (self.gradient_canaries < 0 or 0 < self.gradient_canaries < 20):
            raise InputError(f"--gradient-canaries must be 0 (none) or >= 20, got {self.gradient_canaries}")
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


def epsilon_audit(run, delta: float, confidence: float, seed: int) -> dict[str, Any]:
    """The one-run bound of a record-canary re-run, over the guess grid, with its ceiling."""
    one = bounds.one_run_audit(run.scores, run.included, delta, confidence, seed=seed)
    return {
        "estimate": one.epsilon_lower_bound,
        "confidence": confidence,
        "method": "one-run (Steinke, Nasr & Jagielski 2023) on record canaries, Bonferroni over the guess grid",
        "canary_kind": "record",
        "ceiling": bounds.refutable_ceiling(len(run.scores), delta, confidence, bounds.DEFAULT_GUESS_FRACTIONS),
        "one_run": one.to_dict(),
        "canary_runs": 1,
    }


@dataclass(frozen=True)
class EpsilonPlan:
    """The ε audit an invocation will run, fixed before any training: which canaries, how many,
    the largest ε they can refute (``ceiling``) and the m the claim needs (``needed``)."""

    kind: str
    """``run`` (the run's own gradient canaries), ``gradient`` / ``record`` (a re-run with canaries), ``none``."""
    canaries: int
    ceiling: float | None
    needed: int | None
    claim: Claim
    confidence: float

    @property
    def powerful(self) -> bool:
        """Could this audit refute the claim at all (ceiling above the claimed ε)?"""
        return self.ceiling is not None and (math.isinf(self.claim.epsilon) or self.ceiling > self.claim.epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "canaries": self.canaries, "ceiling": self.ceiling, "needed": self.needed, "powerful": self.powerful}

    def describe(self) -> str:
        if self.kind == "none":
            return "ε audit: none (no canaries)"
        what = {
            "run": "the run's own gradient canaries (privacy.audit_canaries), scored on its released model",
            "gradient": "a re-run of the config with white-box gradient canaries (privacy.audit_canaries)",
            "record": "a re-run of the config with record canaries",
        }[self.kind]
        claim = "no DP claim" if math.isinf(self.claim.epsilon) else f"claimed ε = {self.claim.epsilon:.3f} (δ = {self.claim.delta:g})"
        need = (
            f"the claim needs m >= {self.needed}"
            if self.needed is not None
            else "no m on the ladder reaches past the claim at this δ (the one-run bound saturates)"
        )
        text = (
            f"ε audit: {what}; m = {self.canaries}; largest ε it can refute: {self.ceiling:.3f} "
            f"({self.confidence:.0%} confidence); {claim}; {need}"
        )
        if not math.isinf(self.claim.epsilon) and not self.powerful:
            text += (
                f"\nWARNING: with m = {self.canaries} this audit CANNOT refute ε = {self.claim.epsilon:g} "
                f"(ceiling {self.ceiling:.3f}): its verdict will be INCONCLUSIVE, not a pass"
            )
        return text


def _linear_room(config: RunConfig, data_dir: Path | None) -> int:
    """How many coordinates of the run's update can carry a gradient canary (:func:`~fedrlhf_secure.privacy.canaries.linear_ranges`)."""
    from fedrlhf_secure.federation.engine import build_task, resolve_data_dir
    from fedrlhf_secure.federation.update import UpdateCodec
    from fedrlhf_secure.privacy.canaries import linear_ranges

    task = build_task(config, resolve_data_dir(data_dir))
    return sum(b - a for a, b in linear_ranges(UpdateCodec(task.shared_spec(), config.federation.sparse_rows)))


def plan_epsilon_audit(run_dir: Path, config: RunConfig, claim: Claim, settings: AuditSettings, data_dir: Path | None) -> EpsilonPlan:
    """The fixed policy (module docstring, step 2): the run's own canaries, else a gradient re-run
    (client or record level), else a record re-run; m from the run, the flag, or sized to the claim."""
    from fedrlhf_secure.privacy.canaries import CANARY_DIR, PLAN_FILE

    conf, delta = settings.confidence, claim.delta
    finite = not math.isinf(claim.epsilon)
    grad_need = bounds.canaries_needed(claim.epsilon, delta, conf) if finite else None
    plan_path = Path(run_dir) / CANARY_DIR / PLAN_FILE
    if plan_path.is_file():
        import json

        m = int(json.loads(plan_path.read_text())["canaries"])
        return EpsilonPlan("run", m, bounds.refutable_ceiling(m, delta, conf), grad_need, claim, conf)
    record_asked = settings.num_canaries is not None and settings.gradient_canaries is None
    if config.privacy.mode in ("client", "record") and settings.gradient_canaries != 0 and not record_asked:
        m = settings.gradient_canaries
        if m is None:
            m = grad_need or bounds.CANARY_LADDER[-1]
            if config.privacy.audit_coordinates == "model":
                m = min(m, _linear_room(config, data_dir))
        return EpsilonPlan("gradient", m, bounds.refutable_ceiling(m, delta, conf), grad_need, claim, conf)
    m = 1000 if settings.num_canaries is None else settings.num_canaries
    if m:
        grid = bounds.DEFAULT_GUESS_FRACTIONS
        need = bounds.canaries_needed(claim.epsilon, delta, conf, grid) if finite else None
        return EpsilonPlan("record", m, bounds.refutable_ceiling(m, delta, conf, grid), need, claim, conf)
    return EpsilonPlan("none", 0, None, None, claim, conf)


def verdict(estimate: float | None, claim: Claim, plan: EpsilonPlan | None = None) -> str:
    if math.isinf(claim.epsilon):
        return "no-claim"
    if estimate is None:
        return "not-audited"
    if estimate > claim.epsilon:
        return "fail"
    if plan is not None and not plan.powerful:
        return "inconclusive"
    return "pass"


def audit_run(
    run_dir: Path,
    data_dir: Path | None,
    settings: AuditSettings,
    *,
    progress: Callable[[str], None] | None = None,
    step: Callable[[], None] | None = None,
    noise=None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Audit ``run_dir``; write ``audit.json`` and ROC plots into it; return the report.

    ``noise``: the DP noise source of the audit's own shadow and canary runs (None: the secret
    one); tests pass the deliberately broken source the audited run was trained with.
    ``announce`` gets the ε audit's plan (its m, the largest ε it can refute, the m the claim
    needs) before any training; with ``settings.require_power`` an audit that cannot refute the
    claim is refused (:class:`~fedrlhf_secure.errors.InputError`) at that point."""
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
    plan = plan_epsilon_audit(run_dir, config, claim, settings, data_dir)
    (announce or logger.info)(plan.describe())
    if settings.require_power and plan.kind != "none" and not plan.powerful:
        raise InputError(
            f"the ε audit cannot refute the claim ε = {claim.epsilon:g}: its ceiling at m = {plan.canaries} is {plan.ceiling:.3f}"
            + (f"; use at least {plan.needed} canaries" if plan.needed else "; no canary count reaches past it at this δ")
        )

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
    if plan.kind != "none":
        say(f"ε audit ({plan.kind}, {plan.canaries} canaries)")
        report["epsilon"] = _run_epsilon_audit(plan, run_dir, config, data_dir, claim, settings, noise)
        report["epsilon"]["plan"] = plan.to_dict()
        estimate = report["epsilon"]["estimate"]
        tick()

    if settings.server_view:
        say(f"server view ({settings.server_view_clients} clients, {settings.server_view_kind})")
        sv = server_view_audit(
            config, data_dir, num_clients=settings.server_view_clients, secure_kind=settings.server_view_kind, seed=settings.seed
        )
        report["server_view"] = sv.to_dict()
        tick()
    else:
        sv = None

    report["verdict"] = verdict(estimate, claim, plan)
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
    return settings.num_shadows + 1 + int(settings.server_view)


def _run_epsilon_audit(
    plan: EpsilonPlan, run_dir: Path, config: RunConfig, data_dir: Path | None, claim: Claim, settings: AuditSettings, noise
) -> dict[str, Any]:
    from .gradient_canaries import gradient_canary_audit, rerun_with_gradient_canaries, run_canary_scores

    if plan.kind == "run":
        scored = run_canary_scores(run_dir, data_dir)
        assert scored is not None
        return gradient_canary_audit(scored, claim.delta, settings.confidence, settings.seed)
    if plan.kind == "gradient":
        scored = rerun_with_gradient_canaries(config, data_dir, plan.canaries, noise=noise)
        return gradient_canary_audit(scored, claim.delta, settings.confidence, settings.seed)
    run = run_canaries(config, data_dir, plan.canaries, settings.seed, noise=noise)
    return epsilon_audit(run, claim.delta, settings.confidence, settings.seed)
