"""Synthetic users for `fedrlhf bench scale` (data.resample_users) and the growth fit, on a generated fixture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.bench.scale import fit_growth
from fedrlhf_secure.tasks.movielens import MovieLensConfig
from fedrlhf_secure.tasks.movielens.data import load_split, resample_users
from fedrlhf_secure.tasks.movielens.model import numpy_logits, torch_logits
from fedrlhf_secure.tasks.movielens.task import MovieLensTask


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    write_ml100k(root, n_users=12, n_items=40, per_user=20)
    real = load_split(root, "u1")
    # the fixture's random genre flags make nearly every item's signature unique; real ML-100k has
    # large classes (Drama alone, Comedy alone...): give the items three signatures, as classes go
    genres = np.zeros_like(real.catalogue.genres)
    genres[np.arange(len(genres)), 1 + np.arange(len(genres)) % 3] = 1.0
    return dataclasses.replace(real, catalogue=dataclasses.replace(real.catalogue, genres=genres))


def per_user(ratings, n):
    return [np.flatnonzero(ratings.user == u) for u in range(n)]


def test_synthetic_users_keep_a_real_users_ratings_with_items_exchanged_within_genre_signature(split):
    synth = resample_users(split, 50, seed=3)
    cat = split.catalogue
    assert synth.catalogue.num_users == 50 and synth.catalogue.num_items == cat.num_items
    signature = {i: cat.genres[i].tobytes() for i in range(cat.num_items)}
    real_train, real_test = per_user(split.train, cat.num_users), per_user(split.test, cat.num_users)
    moved = 0
    for s, (tr, te) in enumerate(zip(per_user(synth.train, 50), per_user(synth.test, 50), strict=True)):
        # the real user it copies: same train/test sizes and the same stars in the same order
        matches = [
            u
            for u in range(cat.num_users)
            if len(real_train[u]) == len(tr)
            and len(real_test[u]) == len(te)
            and np.array_equal(split.train.rating[real_train[u]], synth.train.rating[tr])
            and np.array_equal(split.test.rating[real_test[u]], synth.test.rating[te])
            and all(
                signature[int(a)] == signature[int(b)] for a, b in zip(split.train.item[real_train[u]], synth.train.item[tr], strict=True)
            )
        ]
        assert matches, f"synthetic user {s} copies no real user"
        u = matches[0]
        items = np.r_[synth.train.item[tr], synth.test.item[te]]
        assert len(np.unique(items)) == len(items)  # still at most one rating per item
        moved += int(np.count_nonzero(synth.train.item[tr] != split.train.item[real_train[u]]))
    assert moved > 0  # items were actually exchanged


def test_resampling_is_deterministic_in_its_seed_and_the_task_runs_on_it(split):
    a, b, c = resample_users(split, 30, 1), resample_users(split, 30, 1), resample_users(split, 30, 2)
    np.testing.assert_array_equal(a.train.item, b.train.item)
    assert len(a.train) != len(c.train) or not np.array_equal(a.train.item, c.train.item)
    task = MovieLensTask(MovieLensConfig(user_dim=4, item_dim=4, genre_dim=2, hidden_dim=8), a, 0)
    assert len(task.client_ids()) == 30
    assert sum(task.make_client(c).num_examples() for c in task.client_ids()) == len(a.train)


def test_torch_evaluation_logits_equal_the_numpy_forward(split):
    task = MovieLensTask(MovieLensConfig(user_dim=4, item_dim=4, genre_dim=2, hidden_dim=8), split, 0)
    shared = task.initial_shared()
    rng = np.random.default_rng(0)
    items = rng.integers(0, split.catalogue.num_items, 64)
    users = rng.standard_normal((64, 4)).astype(np.float32)
    genres = split.catalogue.genres[items]
    np.testing.assert_allclose(torch_logits(shared, users, items, genres), numpy_logits(shared, users, items, genres), rtol=1e-5, atol=1e-6)


def test_growth_fit_recovers_a_line_and_its_exponent():
    g = fit_growth([100, 1000, 10000], [0.5 + 0.004 * n for n in (100, 1000, 10000)])
    assert g["cpu_seconds_per_1000_clients"] == pytest.approx(4.0)
    assert g["intercept_cpu_seconds"] == pytest.approx(0.5)
    assert 0.75 < g["loglog_exponent"] < 1.0  # the intercept bends a log-log fit below 1
    quadratic = fit_growth([100, 1000, 10000], [1e-6 * n**2 for n in (100, 1000, 10000)])
    assert quadratic["loglog_exponent"] == pytest.approx(2.0)
    assert fit_growth([100], [1.0])["loglog_exponent"] is None
