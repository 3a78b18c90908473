"""Accountants and calibration: known answers, whole-run calibration, the Skellam mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrlhf_secure.privacy.accountants import (
    GaussianAccountant,
    GaussianRelease,
    SkellamAccountant,
    SkellamRelease,
    merge,
    skellam_rdp,
)
from fedrlhf_secure.privacy.calibration import BudgetTooSmall, gaussian_noise_multiplier, skellam_variance
from fedrlhf_secure.privacy.discrete import integer_sensitivities, skellam_share


@pytest.mark.parametrize("name, expected", [("rdp", 7.3291), ("prv", 6.7791)])
def test_add_remove_accountants_match_opacus_known_answers(name, expected):
    # Opacus' own test values (add/remove-one): σ=1.5, q=0.04, 2,250 steps, δ=1e-5 -> RDP ε ≈ 7.33, PRV ε ≈ 6.78
    eps = GaussianAccountant(name, relation="add-remove").epsilon([GaussianRelease(1.5, 0.04, 2250)], 1e-5)
    assert eps == pytest.approx(expected, abs=0.01)


def test_prv_is_tighter_than_rdp():
    h = [GaussianRelease(1.1, 0.1, 300)]
    assert GaussianAccountant("prv").epsilon(h, 1e-5) < GaussianAccountant("rdp").epsilon(h, 1e-5)


def test_history_composes_in_steps_whatever_the_round_split():
    acc = GaussianAccountant("rdp")
    whole = acc.epsilon([GaussianRelease(1.2, 0.2, 125)], 1e-5)
    per_round = acc.epsilon([GaussianRelease(1.2, 0.2, 25)] * 5, 1e-5)
    assert per_round == pytest.approx(whole, rel=1e-12)
    assert merge([GaussianRelease(1.2, 0.2, 25)] * 5) == (GaussianRelease(1.2, 0.2, 125),)


def test_unknown_accountant_or_relation_is_rejected_by_name():
    with pytest.raises(ValueError, match="privacy.accountant"):
        GaussianAccountant("moments")
    with pytest.raises(ValueError, match="neighbouring relation"):
        GaussianAccountant("prv", relation="add-one")


def test_the_default_relation_is_replace_one():
    assert GaussianAccountant("prv").relation == "replace-one"


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_calibrated_noise_meets_the_budget_over_all_rounds_and_is_nearly_the_smallest(name):
    acc = GaussianAccountant(name)
    rounds, steps_per_round, q, target = 5, 25, 0.2, 8.0
    sigma = gaussian_noise_multiplier(acc, target, 1e-5, q, rounds * steps_per_round)
    total = acc.epsilon([GaussianRelease(sigma, q, steps_per_round)] * rounds, 1e-5)
    assert total <= target
    assert acc.epsilon([GaussianRelease(sigma * 0.99, q, rounds * steps_per_round)], 1e-5) > target
    # calibrating per round (Flower's example) would spend far more than the budget over the run
    per_round = gaussian_noise_multiplier(acc, target, 1e-5, q, steps_per_round)
    assert acc.epsilon([GaussianRelease(per_round, q, rounds * steps_per_round)], 1e-5) > 2 * target


def test_an_impossible_budget_is_reported():
    with pytest.raises(BudgetTooSmall):
        gaussian_noise_multiplier(GaussianAccountant("rdp"), 1e-9, 1e-300, 1.0, 10**6)


def test_skellam_rdp_tends_to_the_gaussian_rdp_for_fine_quantisation():
    # Gaussian RDP: α Δ² / (2σ²); Skellam adds a term that vanishes as Δ grows with μ = (zΔ)²
    z, alpha = 1.3, 8
    for l2 in (10.0, 1e3, 1e5):
        mu = (z * l2) ** 2
        gauss = alpha / (2 * z * z)
        assert skellam_rdp(alpha, mu, l2 * 3, l2) >= gauss
        if l2 >= 1e3:
            assert skellam_rdp(alpha, mu, l2 * 3, l2) == pytest.approx(gauss, rel=1e-3)


def test_skellam_calibration_meets_its_target_and_costs_about_what_the_gaussian_does():
    l1, l2 = integer_sensitivities(scale=2.0**16, clip_norm=1.0, dim=10_000)
    assert l2 == pytest.approx(2 * (2.0**16 + 100))  # replace-one: one client's quantised update replaced
    mu = skellam_variance(4.0, 1e-5, l1, l2, steps=5)
    eps = SkellamAccountant().epsilon([SkellamRelease(mu, l1, l2, 1)] * 5, 1e-5)
    assert eps <= 4.0
    z_gauss = gaussian_noise_multiplier(GaussianAccountant("rdp"), 4.0, 1e-5, 1.0, 5)
    # both under replace-one: the Gaussian's z is per unit of the clip C (sensitivity 2C), the
    # Skellam std per unit of one quantised update s·C + √d = l2 / 2
    assert math.sqrt(mu) / (l2 / 2) == pytest.approx(z_gauss, rel=0.05)


def test_skellam_shares_sum_to_the_planned_variance():
    # Skellam is closed under sums: m shares of variance μ/m add up to variance μ
    m, mu, dim = 8, 400.0, 20_000
    total = sum(skellam_share(dim, mu / m, np.random.default_rng(i)) for i in range(m))
    assert total.dtype == np.int64
    assert total.mean() == pytest.approx(0.0, abs=0.5)
    assert total.var() == pytest.approx(mu, rel=0.05)
