"""The white-box gradient-canary ε audit of one run (Steinke, Nasr & Jagielski 2023, §6 white-box;
Nasr et al. 2023 Dirac canaries): read the run's canaries, score them on its released model, bound ε.

The run inserted ``m`` Dirac canaries ``s_j·C·e_{c_j}`` before the noise
(``privacy.audit_canaries``, :mod:`fedrlhf_secure.privacy.canaries`), each kept by a secret fair
coin: client level after clipping, in every round its holder takes part in; record level as a
record of the holder's DP-SGD, Poisson-sampled into each step, a dropped canary being the kept one's
mirror image ``-s_j·C·e_{c_j}``. Every released model change is a post-processing of the noised
sums, so the projection of the total change ``θ_released − θ_initial`` onto a canary's direction,

    score_j = s_j · (θ_released − θ_initial)[c_j]     (record level: −s_j · ..., the optimizer descends),

is the auditor's test statistic (the sum over rounds of the per-round changes on that coordinate). Under
the claimed ε the guesses "in" for the ``⌊0.45 m⌋`` highest scores and "out" for the ``⌊0.45 m⌋``
lowest may be right no more often than the one-run bound allows (:func:`.bounds.one_run_audit`
with the single fixed guess fraction :data:`.bounds.GRADIENT_CANARY_FRACTION`).

Only public information is used for the scores (the initial parameters are a function of the
config, the placement of the run seed); the coins are read only to count correct guesses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrlhf_secure.configtypes import InputError
from fedrlhf_secure.privacy.canaries import CanaryPlacement, read_canaries
from fedrlhf_secure.rundir import load_tensors

from . import bounds


@dataclass(frozen=True)
class GradientCanaryScores:
    placement: CanaryPlacement
    included: np.ndarray
    scores: np.ndarray


def score_canaries(placement: CanaryPlacement, initial: dict[str, np.ndarray], released: dict[str, np.ndarray], spec) -> np.ndarray:
    """``s_j · (θ_released − θ_initial)[c_j]`` for every canary (float64); record level
    ``-s_j · (...)``: there a canary is a *gradient*, and the optimizer steps against it."""
    change = spec.flatten(released).astype(np.float64) - spec.flatten(initial).astype(np.float64)
    if change.size != placement.dim:
        raise InputError(f"the released model has {change.size} shared coordinates, the canary plan {placement.dim}")
    direction = -1.0 if placement.mechanism == "record" else 1.0
    return direction * placement.signs.astype(np.float64) * change[placement.coordinates]


def run_canary_scores(run_dir: Path, data_dir: Path | None) -> GradientCanaryScores | None:
    """The canaries of a run that was trained with ``privacy.audit_canaries`` (None when it was not)."""
    from fedrlhf_secure.federation.engine import build_task, resolve_data_dir

    from .shadows import load_run_config

    found = read_canaries(run_dir)
    if found is None:
        return None
    placement, included = found
    config = load_run_config(run_dir)
    task = build_task(config, resolve_data_dir(data_dir))
    released = load_tensors(Path(run_dir) / "model.safetensors")
    scores = score_canaries(placement, task.initial_shared(), released, task.shared_spec())
    return GradientCanaryScores(placement, included, scores)


def gradient_canary_audit(canaries: GradientCanaryScores, delta: float, confidence: float, seed: int) -> dict[str, Any]:
    """The one-run bound with the fixed guess policy, with the ceiling this m could reach."""
    m = int(canaries.scores.size)
    one = bounds.one_run_audit(
        canaries.scores, canaries.included, delta, confidence, fractions=(bounds.GRADIENT_CANARY_FRACTION,), seed=seed
    )
    inc = canaries.included
    return {
        "estimate": one.epsilon_lower_bound,
        "confidence": confidence,
        "method": "one-run (Steinke, Nasr & Jagielski 2023) on white-box Dirac gradient canaries, fixed guess fraction "
        f"{bounds.GRADIENT_CANARY_FRACTION}",
        "mechanism": canaries.placement.mechanism,
        "canary_kind": "gradient",
        "ceiling": bounds.refutable_ceiling(m, delta, confidence),
        "one_run": one.to_dict(),
        "score_means": {
            "included": float(canaries.scores[inc].mean()) if inc.any() else None,
            "excluded": float(canaries.scores[~inc].mean()) if (~inc).any() else None,
        },
        "score_separation": {  # noise off on the audit block: every included score above every excluded one
            "included_min": float(canaries.scores[inc].min()) if inc.any() else None,
            "excluded_max": float(canaries.scores[~inc].max()) if (~inc).any() else None,
        },
        "canary_norm": canaries.placement.norm,
        "canary_runs": 1,
    }


def rerun_with_gradient_canaries(config, data_dir: Path | None, m: int, *, noise=None) -> GradientCanaryScores:
    """Train the audited config once more with ``privacy.audit_canaries: m`` in a scratch directory and
    score its canaries (the re-run mode; ``noise``: see :func:`.shadows.train_released`)."""
    import tempfile
    from dataclasses import replace

    from fedrlhf_secure.federation.engine import RunOptions, run_federation

    config = replace(config, privacy=replace(config.privacy, audit_canaries=int(m)), baselines=())
    with tempfile.TemporaryDirectory(prefix="fedrlhf-audit-canaries-") as tmp:
        run = run_federation(config, RunOptions(data_dir=data_dir, out=Path(tmp), progress=False, name="gradient-canaries", noise=noise))
        scored = run_canary_scores(run, data_dir)
    assert scored is not None
    return scored
