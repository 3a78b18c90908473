"""LOSS, reference, LiRA and RMIA on synthetic shadow-model confidences with known ground truth.

The generative model is LiRA's own assumption (Carlini et al. 2022, §IV): each record has its own
difficulty ``μ_i`` (spread far wider than the membership effect), training on it shifts its
logit-scaled confidence by ``+1``, and training randomness adds N(0, 0.3²) noise. Attacks that
calibrate per record must then beat the uncalibrated LOSS attack by a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest

from attacks.lira import lira_offline, lira_online
from attacks.loss import loss_scores
from attacks.metrics import auc, tpr_at_fpr
from attacks.reference import reference_scores
from attacks.rmia import rmia_scores


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(11)
    n, k = 3000, 16
    difficulty = rng.normal(0, 3, n)
    shadow_in = rng.random((k, n)) < 0.5
    shadows = difficulty + 1.0 * shadow_in + rng.normal(0, 0.3, (k, n))
    member = rng.random(n) < 0.5
    target = difficulty + 1.0 * member + rng.normal(0, 0.3, n)
    return target, shadows, shadow_in, member.astype(int)


def test_loss_attack_is_weak_when_difficulty_dominates(world):
    target, _, _, y = world
    assert 0.5 < auc(loss_scores(target), y) < 0.65


def test_calibrated_attacks_beat_loss(world):
    target, shadows, shadow_in, y = world
    base = auc(loss_scores(target), y)
    assert auc(reference_scores(target, shadows, shadow_in), y) > base + 0.3
    assert auc(lira_offline(target, shadows, shadow_in), y) > base + 0.3
    assert auc(lira_online(target, shadows, shadow_in), y) > 0.95
    population = np.arange(0, len(target), 3)
    assert auc(rmia_scores(target, shadows, shadow_in, population, online=True), y) > base + 0.2
    # offline RMIA only approximates the missing IN half linearly (their a = 0.3): weaker, still better
    assert auc(rmia_scores(target, shadows, shadow_in, population, online=False), y) > base + 0.1


def test_lira_online_is_confident_at_low_fpr(world):
    target, shadows, shadow_in, y = world
    assert tpr_at_fpr(lira_online(target, shadows, shadow_in), y, 0.01) > 0.5
    assert tpr_at_fpr(lira_online(target, shadows, shadow_in, fixed_variance=True), y, 0.01) > 0.5


def test_lira_is_chance_when_training_leaves_no_trace():
    rng = np.random.default_rng(5)
    n, k = 3000, 16
    difficulty = rng.normal(0, 3, n)
    shadows = difficulty + rng.normal(0, 0.3, (k, n))
    target = difficulty + rng.normal(0, 0.3, n)
    y = (rng.random(n) < 0.5).astype(int)
    shadow_in = rng.random((k, n)) < 0.5
    assert abs(auc(lira_online(target, shadows, shadow_in), y) - 0.5) < 0.04
    assert abs(auc(lira_offline(target, shadows, shadow_in), y) - 0.5) < 0.04


def test_lira_separates_rows_that_only_a_member_can_move():
    # OUT confidence is constant (variance 0, e.g. an item nobody else rated): the variance floor
    # must still rank every moved record above every unmoved one.
    k, n = 8, 100
    shadow_in = np.tile(np.arange(k)[:, None] % 2 == 0, (1, n))
    shadows = np.where(shadow_in, 1.0, 0.0) + np.where(shadow_in, np.linspace(0, 0.1, k)[:, None], 0.0)
    member = np.arange(n) % 2 == 0
    target = np.where(member, 1.05, 0.0)
    assert auc(lira_online(target, shadows, shadow_in), member.astype(int)) == 1.0
    assert auc(lira_offline(target, shadows, shadow_in), member.astype(int)) == 1.0


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        lira_online(np.zeros(3), np.zeros((4, 5)), np.zeros((4, 5), bool))
