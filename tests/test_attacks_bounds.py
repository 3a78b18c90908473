"""Known-answer tests for the ε lower bounds (attacks.bounds)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks import bounds


def brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. 2023 Thm 3.1 written out with exact binomial sums (no scipy)."""
    q = Fraction(1) / (1 + Fraction(math.exp(-eps)))

    def pmf(k: int) -> Fraction:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k)

    tail = sum((pmf(k) for k in range(v, r + 1)), Fraction(0))
    worst = Fraction(0)
    for i in range(1, v + 1):
        window = sum((pmf(k) for k in range(v - i, v)), Fraction(0))
        worst = max(worst, window / i)
    return float(min(Fraction(1), tail + worst * Fraction(delta) * 2 * m))


def test_all_guesses_right_with_delta_zero_matches_the_closed_form():
    # P[Bin(r, q) >= r] = q^r = α  =>  ε̂ = log(q / (1 - q)) with q = α^(1/r).
    for r in (10, 50, 100, 200):
        q = 0.05 ** (1 / r)
        assert bounds.one_run_epsilon(r, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert bounds.one_run_epsilon(100, 100, 100, 0.0, 0.95) == pytest.approx(3.49296, abs=1e-4)


@pytest.mark.parametrize("m,r,v,eps,delta", [(50, 30, 25, 1.0, 1e-3), (200, 40, 36, 2.0, 1e-5), (20, 20, 14, 0.3, 0.01)])
def test_p_value_equals_an_exact_binomial_sum(m, r, v, eps, delta):
    assert bounds.one_run_p_value(m, r, v, eps, delta) == pytest.approx(brute_force_p_value(m, r, v, eps, delta), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60).flatmap(lambda r: st.tuples(st.just(r), st.integers(0, r))), st.sampled_from([0.0, 1e-5, 1e-3]))
def test_estimate_sits_exactly_on_the_rejection_boundary(rv, delta):
    r, v = rv
    m = 2 * r
    eps = bounds.one_run_epsilon(m, r, v, delta, 0.95)
    if eps == 0.0:
        assert bounds.one_run_p_value(m, r, v, 0.0, delta) >= 0.05
    else:
        assert bounds.one_run_p_value(m, r, v, eps, delta) < 0.05
        assert bounds.one_run_p_value(m, r, v, eps + 1e-4, delta) >= 0.05


def test_delta_only_weakens_the_bound():
    assert (
        bounds.one_run_epsilon(1000, 200, 190, 1e-3)
        < bounds.one_run_epsilon(1000, 200, 190, 1e-5)
        < bounds.one_run_epsilon(1000, 200, 190, 0.0)
    )


def test_chance_guessing_never_certifies_leakage():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=2000)
    included = rng.random(2000) < 0.5
    assert bounds.one_run_audit(scores, included, 1e-5).epsilon_lower_bound == 0.0


def test_tied_scores_reveal_nothing():
    included = np.random.default_rng(1).random(500) < 0.5
    result = bounds.one_run_audit(np.zeros(500), included, 1e-5)
    assert result.epsilon_lower_bound == 0.0


def test_perfect_separation_pays_for_the_guess_grid():
    included = np.random.default_rng(2).random(1000) < 0.5
    result = bounds.one_run_audit(included.astype(float), included, 1e-5)
    best = max(result.per_fraction, key=lambda r: r["epsilon"])
    uncorrected = bounds.one_run_epsilon(1000, best["guesses"], best["correct"], 1e-5, 0.95)
    assert best["correct"] == best["guesses"]
    assert 4.0 < result.epsilon_lower_bound < uncorrected


def test_clopper_pearson_with_no_errors_has_a_closed_form():
    # P[Bin(n, p) = 0] = (1 - p)^n = α  =>  upper limit 1 - α^(1/n)
    assert bounds.clopper_pearson_upper(0, 100, 0.025) == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)
    assert bounds.clopper_pearson_upper(100, 100, 0.025) == 1.0


def test_epsilon_from_rates_is_the_hypothesis_testing_bound():
    assert bounds.epsilon_from_rates(0.01, 0.01, 0.0) == pytest.approx(math.log(0.99 / 0.01))
    assert bounds.epsilon_from_rates(0.5, 0.5, 0.0) == 0.0
    # the binding constraint is FNR + e^ε FPR >= 1 - δ: log((1 - δ - 0.2) / 0.05) > log((1 - δ - 0.05) / 0.2)
    assert bounds.epsilon_from_rates(0.05, 0.2, 1e-5) == pytest.approx(math.log((1 - 1e-5 - 0.2) / 0.05))


def test_clopper_pearson_epsilon_of_a_perfect_audit():
    # 0 errors out of 500 each side; each rate bounded at α/2 = 0.025.
    p = 1 - 0.025 ** (1 / 500)
    assert bounds.clopper_pearson_epsilon(0, 500, 0, 500, 0.0) == pytest.approx(math.log((1 - p) / p), rel=1e-9)


def test_multi_run_threshold_is_chosen_on_selection_scores_only():
    rng = np.random.default_rng(3)
    sel_labels = rng.random(400) < 0.5
    sel_scores = sel_labels + rng.normal(0, 0.1, 400)  # separable around 0.5
    ev_labels = rng.random(400) < 0.5
    ev_scores = rng.normal(size=400)  # pure noise: the held-out counts must show no leakage
    result = bounds.multi_run_audit(sel_scores, sel_labels, ev_scores, ev_labels, 1e-5)
    assert 0.0 < result.threshold < 1.0
    assert result.epsilon_lower_bound == 0.0
    assert result.false_positives + result.false_negatives > 100


def test_bad_counts_are_rejected_with_the_numbers():
    with pytest.raises(ValueError, match=r"correct \(5\) <= guesses \(4\)"):
        bounds.one_run_epsilon(10, 4, 5, 0.0)
    with pytest.raises(ValueError, match="one inclusion bit per canary"):
        bounds.one_run_audit(np.zeros(3), np.zeros(4, bool), 0.0)
