"""Under record-level DP each record's simulated human feedback depends on that record alone.

The draws are keyed by (client's secret key, round, epoch, record position) (ChaCha20 via HKDF), not
taken in batch order from a generator seeded with the public run seed. So the reward of one record
is the same whichever other records share its batch, whatever their ratings (a replace-one
neighbour), and whether or not the noiseless personal phase ran before the DP phase. A weakened
version (the human's noise drawn in batch order from one generator, as before) fails the same check.
"""

from __future__ import annotations

import numpy as np
import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.privacy.dpsgd import DPSGDSettings
from fedrlhf_secure.privacy.randomness import keyed_uniforms, secret_key
from fedrlhf_secure.tasks.base import FitConfig
from fedrlhf_secure.tasks.movielens import MovieLensConfig, make_task
from fedrlhf_secure.tasks.movielens.feedback import KeyedHumanNoise, direct_feedback
from fedrlhf_secure.tasks.movielens.train import private_shaped_rewards


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    data = write_ml100k(tmp_path_factory.mktemp("ml"), n_users=8, n_items=40, per_user=20)
    cfg = MovieLensConfig(split="u1", user_dim=4, item_dim=4, genre_dim=2, hidden_dim=8, feedback_noise=(0.5, 0.5), pairwise_flip=0.3)
    return make_task(cfg, data, 0)


def test_keyed_uniforms_are_a_function_of_key_label_and_position_only():
    key = secret_key()
    long, short = keyed_uniforms(key, b"r0/e0", 1000), keyed_uniforms(key, b"r0/e0", 10)
    np.testing.assert_array_equal(long[:10], short)  # position i does not depend on how many were drawn
    assert not np.array_equal(keyed_uniforms(key, b"r0/e1", 10), short)
    assert not np.array_equal(keyed_uniforms(secret_key(), b"r0/e0", 10), short)
    assert 0.0 <= long.min() and long.max() < 1.0 and abs(long.mean() - 0.5) < 0.05


def test_one_records_reward_ignores_its_batch_mates_and_their_ratings(task):
    client = task.make_client(task.client_ids()[0])
    data, profiles = client._dp_data, client.feedback_profiles
    n = len(data)
    draws = KeyedHumanNoise(client._human_key, round=3).draws(epoch=1, n=n)
    i = 4
    alone = private_shaped_rewards(data, np.array([i]), profiles, draws)[0]
    with_others = private_shaped_rewards(data, np.array([0, 1, i, n - 1]), profiles, draws)[2]
    later = private_shaped_rewards(data, np.array([n - 1, 2, 3, 5, 6, i]), profiles, draws)[-1]
    np.testing.assert_array_equal(alone, with_others)
    np.testing.assert_array_equal(alone, later)
    # a replace-one neighbour: every other record's rating changed, record i's reward is not
    changed = data.ratings.copy()
    changed[np.arange(n) != i] = 6.0 - changed[np.arange(n) != i]
    neighbour = type(data)(**{**data.__dict__, "ratings": changed})
    np.testing.assert_array_equal(private_shaped_rewards(neighbour, np.array([0, 1, i]), profiles, draws)[2], alone)
    # the draws are really noisy (σ_k = 0.5, p_flip = 0.3): another epoch gives another reward
    other = private_shaped_rewards(data, np.array([i]), profiles, KeyedHumanNoise(client._human_key, 3).draws(2, n))[0]
    assert not np.array_equal(other, alone)


def test_the_weakened_batch_order_generator_couples_records(task):
    """What main did: the human's noise drawn from one seeded generator in batch order."""
    client = task.make_client(task.client_ids()[0])
    ratings = client._dp_data.ratings
    i = 4
    alone = direct_feedback(ratings[[i]], 0.5, np.random.default_rng(7))[0]
    with_others = direct_feedback(ratings[[0, 1, i]], 0.5, np.random.default_rng(7))[2]
    assert alone != with_others


def test_skipping_the_noiseless_phase_leaves_the_dp_update_unchanged(task, monkeypatch):
    """Deterministic DP-SGD (no noise, every record each step) isolates the feedback's randomness:
    with keyed draws the DP update is bit-identical whether or not the noiseless personal phase
    (which consumes the seeded generator) ran first."""
    cid = task.client_ids()[1]
    shared = task.initial_shared()
    dp = DPSGDSettings(noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0)
    a, b = task.make_client(cid), task.make_client(cid)
    b._human_key = a._human_key
    ra = a.fit(shared, FitConfig(round=0, local_epochs=2, seed=0, dp_sgd=dp))
    monkeypatch.setattr(type(b), "_fit_prediction_embedding", lambda self, shared, rng: self._user_rows)
    rb = b.fit(shared, FitConfig(round=0, local_epochs=2, seed=0, dp_sgd=dp))
    for k in ra.delta:
        np.testing.assert_array_equal(ra.delta[k], rb.delta[k])
    assert max(np.abs(v).max() for v in ra.delta.values()) > 1e-4  # the update is not trivially zero
    # another client key (another secret) gives other feedback, hence another update: the key matters
    c = task.make_client(cid)
    rc = c.fit(shared, FitConfig(round=0, local_epochs=2, seed=0, dp_sgd=dp))
    assert any(not np.array_equal(ra.delta[k], rc.delta[k]) for k in ra.delta)
