"""Empirical lower bounds on ε from membership guesses, valid at a stated confidence.

Two audits, both turning an attack's *decisions* into a statistically valid statement
"with probability ≥ 95% over the audit's randomness, the mechanism is not (ε, δ)-DP for any
ε < ε̂". A lower bound above the ε a run claims is proof (at that confidence) that the claim is
wrong: a bug, a broken noise source, or a wrong accountant.

**One run** (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
Theorem 3.1 and their Algorithm for the p-value): ``m`` canaries are each included in the training
data independently with probability ½. The auditor scores every canary on the trained model and
guesses "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest and abstains on the rest.
If the mechanism is (ε, δ)-DP, the number ``W`` of correct guesses among ``r = k+ + k-`` satisfies
``P[W ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ · max_i P[v-i ≤ Binomial(r, ·) < v] / i``.
ε̂ is the largest ε whose p-value is still below ``1 - confidence``.

**Multi-run** (not used by ``fedrlhf audit``: its trials must be independent training runs, one
canary each; the canaries of one run are not independent trials, so counting them as such, as the
audit once did, overstates the confidence) (Jagielski, Ullman & Oprea 2020, "Auditing Differentially Private Machine Learning",
§4 / Kairouz et al. 2015): a threshold test with false-positive rate FPR and false-negative rate
FNR against an (ε, δ)-DP mechanism satisfies ``FPR + e^ε FNR ≥ 1 - δ`` and
``FNR + e^ε FPR ≥ 1 - δ``. With Clopper–Pearson upper bounds on FPR and FNR (each at
``1 - α/2``) the smallest ε consistent with both is a lower bound at confidence ``1 - α``.

**Choosing guesses honestly.** Picking the threshold (or ``k``) that gives the largest ε on the
same scores that are then counted is a multiple-comparisons error that inflates ε̂ (ML Privacy
Meter does this). Here the one-run audit tries a fixed grid of ``k`` chosen before looking at the
scores and pays for the grid with a Bonferroni correction (each ``k`` is tested at
``α / |grid|``); the multi-run audit picks its threshold on *selection* scores and counts errors
on separate *evaluation* scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from fedrlhf_secure.privacy.audit_power import (  # re-exported: the runtime sizes canaries with them
    CANARY_LADDER,
    GRADIENT_CANARY_FRACTION,
    canaries_needed,
    one_run_epsilon,
    one_run_p_value,
    refutable_ceiling,
)

__all__ = [
    "CANARY_LADDER",
    "DEFAULT_GUESS_FRACTIONS",
    "GRADIENT_CANARY_FRACTION",
    "OneRunResult",
    "canaries_needed",
    "ceiling_table",
    "clopper_pearson_epsilon",
    "multi_run_audit",
    "one_run_audit",
    "one_run_epsilon",
    "one_run_p_value",
    "refutable_ceiling",
]

DEFAULT_GUESS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5)
"""``k+ = k- = round(f·m)`` for each f: from a few very confident guesses to guessing on every canary."""


@dataclass(frozen=True)
class OneRunResult:
    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    guess_fractions: tuple[float, ...]
    per_fraction: tuple[dict, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
    seed: int = 0,
) -> OneRunResult:
    """The one-run audit over a fixed grid of guess counts, Bonferroni-corrected over the grid.

    ``scores``: one per canary (higher = "included"); ``included``: the coin flips. Ties are
    broken by a seeded permutation drawn independently of ``included``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    if s.shape != inc.shape or s.size == 0:
        raise ValueError(f"need one inclusion bit per canary score, got {s.size} scores and {inc.size} bits")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    m = s.size
    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(-s[perm], kind="stable")]  # descending, ties in random order
    grid_conf = 1.0 - (1.0 - confidence) / len(fractions)
    rows, best = [], None
    for f in fractions:
        k = max(1, min(m // 2, int(round(f * m))))
        top, bottom = order[:k], order[m - k :]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = one_run_epsilon(m, 2 * k, v, delta, grid_conf)
        row = {"fraction": float(f), "guesses": 2 * k, "correct": v, "epsilon": eps}
        rows.append(row)
        if best is None or eps > best["epsilon"]:
            best = row
    assert best is not None
    return OneRunResult(
        epsilon_lower_bound=float(best["epsilon"]),
        confidence=confidence,
        delta=delta,
        canaries=m,
        included=int(inc.sum()),
        guesses=int(best["guesses"]),
        correct=int(best["correct"]),
        guess_fractions=tuple(float(f) for f in fractions),
        per_fraction=tuple(rows),
    )


# ---------------------------------------------------------------------------------------------
# Multi-run: Clopper–Pearson on FPR and FNR
# ---------------------------------------------------------------------------------------------


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided upper confidence limit (level ``1 - alpha``) of a binomial proportion."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials}) and trials > 0")
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """Smallest ε consistent with a test of these error rates against (ε, δ)-DP (0 if any is)."""
    candidates = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        num = 1.0 - delta - a
        if num <= 0:
            continue
        candidates.append(math.inf if b <= 0 else math.log(num / b))
    return max(candidates)


def clopper_pearson_epsilon(
    false_positives: int, negatives: int, false_negatives: int, positives: int, delta: float, confidence: float = 0.95
) -> float:
    """ε lower bound from error counts (Jagielski et al. 2020): CP upper limits at ``1 - α/2`` each."""
    alpha = 1.0 - confidence
    fpr_hi = clopper_pearson_upper(false_positives, negatives, alpha / 2)
    fnr_hi = clopper_pearson_upper(false_negatives, positives, alpha / 2)
    return epsilon_from_rates(fpr_hi, fnr_hi, delta)


@dataclass(frozen=True)
class MultiRunResult:
    epsilon_lower_bound: float
    confidence: float
    delta: float
    threshold: float
    false_positives: int
    negatives: int
    false_negatives: int
    positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def multi_run_audit(
    select_scores: np.ndarray,
    select_labels: np.ndarray,
    eval_scores: np.ndarray,
    eval_labels: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> MultiRunResult:
    """Pick the threshold with the largest point-estimate ε on the selection trials, then bound ε
    with Clopper–Pearson on the *evaluation* trials only (predict "member" when score ≥ threshold)."""
    ss = np.asarray(select_scores, dtype=np.float64).reshape(-1)
    sl = np.asarray(select_labels, dtype=bool).reshape(-1)
    es = np.asarray(eval_scores, dtype=np.float64).reshape(-1)
    el = np.asarray(eval_labels, dtype=bool).reshape(-1)
    if ss.shape != sl.shape or es.shape != el.shape:
        raise ValueError("scores and labels must have the same length")
    for name, lab in (("selection", sl), ("evaluation", el)):
        if lab.all() or not lab.any():
            raise ValueError(f"the {name} trials need both members and non-members")
    best_t, best_eps = math.inf, -1.0
    for t in np.unique(ss):
        pred = ss >= t
        fpr = pred[~sl].mean()
        fnr = (~pred[sl]).mean()
        eps = epsilon_from_rates(max(fpr, 0.5 / (~sl).sum()), max(fnr, 0.5 / sl.sum()), delta)
        if eps > best_eps:
            best_t, best_eps = float(t), eps
    pred = es >= best_t
    fp, fn = int(pred[~el].sum()), int((~pred[el]).sum())
    eps = clopper_pearson_epsilon(fp, int((~el).sum()), fn, int(el.sum()), delta, confidence)
    return MultiRunResult(eps, confidence, delta, best_t, fp, int((~el).sum()), fn, int(el.sum()))


def ceiling_table(
    ms: Sequence[int] = (500, 1000, 2000, 5000, 10_000, 20_000, 30_000, 50_000),
    deltas: Sequence[float] = (1e-5, 1e-6),
    confidence: float = 0.95,
) -> str:
    """Markdown: the largest refutable ε per m (the gradient-canary policy, and the record-canary grid
    at the first δ), then the m each claim needs (docs/audits.md prints this table)."""
    head = (
        "| m | " + " | ".join(f"gradient canaries, δ = {d:g}" for d in deltas) + f" | record canaries (6-point grid), δ = {deltas[0]:g} |"
    )
    lines = [head, "|" + "---|" * (len(deltas) + 2)]
    for m in ms:
        row = [f"{refutable_ceiling(m, d, confidence):.3f}" for d in deltas]
        row.append(f"{refutable_ceiling(m, deltas[0], confidence, DEFAULT_GUESS_FRACTIONS):.3f}")
        lines.append(f"| {m:,} | " + " | ".join(row) + " |")
    lines += ["", "| claimed ε | " + " | ".join(f"m needed, δ = {d:g}" for d in deltas) + " |", "|" + "---|" * (len(deltas) + 1)]
    for eps in (1.0, 2.0, 4.0, 6.0, 8.0, 9.0):
        need = [canaries_needed(eps, d, confidence) for d in deltas]
        lines.append(f"| {eps:g} | " + " | ".join("none on the ladder" if n is None else f"{n:,}" for n in need) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(ceiling_table())
