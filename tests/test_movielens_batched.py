"""The vectorised client simulation (tasks/movielens/batched.py) against each client's own fit, on a generated fixture."""

from __future__ import annotations

import numpy as np
import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.tasks.base import FitConfig
from fedrlhf_secure.tasks.movielens import MovieLensConfig, make_task
from fedrlhf_secure.tasks.movielens.model import ITEM_EMBEDDING
from fedrlhf_secure.tasks.movielens.train import draw_phase, shaped_rewards

SMALL = dict(user_dim=8, item_dim=8, genre_dim=4, hidden_dim=16, batch_size=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    # per-user counts differ (the fixture draws per_user items each; the u1 split holds out a varying share),
    # so clients have different numbers of steps and shorter last batches
    write_ml100k(root, n_users=14, n_items=60, per_user=29)
    return root


def task_of(data_dir, **overrides):
    return make_task(MovieLensConfig(**{**SMALL, **overrides}), data_dir, 0)


def per_batch_loop(data, profiles, batch_size, epochs, rng):
    """The reward loop the per-client path ran before draw_phase: shaped_rewards batch by batch."""
    idx, rewards, sizes = [], [], []
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            idx.append(batch)
            rewards.append(shaped_rewards(data, batch, profiles, rng))
            sizes.append(len(batch))
    return np.concatenate(idx), np.concatenate(rewards), np.array(sizes)


@pytest.mark.parametrize("users_per_client", [1, 3])
def test_drawn_phase_is_bit_identical_to_the_per_batch_reward_loop(data_dir, users_per_client):
    task = task_of(data_dir, users_per_client=users_per_client)
    clients = [task.make_client(cid) for cid in task.client_ids()[:3]]
    assert any(len(c.local_data) % 7 for c in clients)  # a short last batch somewhere
    for client in clients:
        cid = client.client_id
        a, b = np.random.default_rng([5, cid]), np.random.default_rng([5, cid])
        phase = draw_phase(client.local_data, client.feedback_profiles, 7, 3, a)
        idx, rewards, sizes = per_batch_loop(client.local_data, client.feedback_profiles, 7, 3, b)
        np.testing.assert_array_equal(phase.idx, idx)
        np.testing.assert_array_equal(phase.rewards, rewards)
        np.testing.assert_array_equal(phase.sizes, sizes)
        assert phase.steps_per_epoch == -(-len(client.local_data) // 7)
        assert a.random() == b.random()  # the generator advanced exactly as far


def test_pairwise_feedback_of_a_drawn_phase_pairs_within_each_user_of_each_batch(data_dir):
    task = task_of(data_dir, users_per_client=4, feedback_noise=(0.0, 0.0), pairwise_flip=0.0, feedback_lambda=(1.0, 1.0))
    client = task.make_client(task.client_ids()[0])
    data = client.local_data
    phase = draw_phase(data, client.feedback_profiles, 8, 1, np.random.default_rng(1))
    # with λ = 1 and no noise: R_high - R_low = 2(2·label - 1) + 2h with h = 0.5·((r - 3)/2 + pairwise)
    ratings = data.ratings[phase.idx]
    h = (phase.rewards[:, 1] - phase.rewards[:, 0]) / 2 - (2 * data.labels[phase.idx] - 1)
    pair = 2 * h - (ratings - 3) / 2
    ends = np.cumsum(phase.sizes)
    for end, size in zip(ends, phase.sizes, strict=True):
        p, users = pair[end - size : end], data.user_key[phase.idx[end - size : end]]
        for u in np.unique(users):
            mine = np.round(p[users == u]).astype(int)
            assert mine.sum() == 0  # each +1 has its -1 partner of the same user in the same batch
            assert np.count_nonzero(mine == 0) <= 1 + np.count_nonzero(np.diff(np.sort(ratings[end - size : end][users == u])) == 0) * 2


def fresh_clients(task):
    return [task.make_client(c) for c in task.client_ids()]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"objective": "expected_reward", "weight_decay": 0.01}, {"users_per_client": 2, "personal_epochs": 1}],
    ids=["default", "expected-reward-weight-decay", "two-users-per-client"],
)
def test_batched_fits_equal_each_clients_own_fit_over_two_rounds(data_dir, overrides):
    task = task_of(data_dir, **overrides)
    own, batched = fresh_clients(task), fresh_clients(task)
    lengths = {len(c.train) for c in own}
    assert len(lengths) > 2  # clients with different numbers of steps
    shared = task.initial_shared()
    for rnd in range(2):
        configs = [FitConfig(rnd, 3, 100 + c.client_id) for c in own]
        expected = [c.fit(shared, cfg) for c, cfg in zip(own, configs, strict=True)]
        got = task.fit_clients(list(zip(batched, configs, strict=True)), shared)
        for e, g, c in zip(expected, got, own, strict=True):
            assert e.num_examples == g.num_examples == len(c.train)
            assert e.metrics["steps"] == g.metrics["steps"]
            assert g.metrics["loss"] == pytest.approx(e.metrics["loss"], rel=1e-5, abs=1e-6)
            np.testing.assert_array_equal(e.touched_rows[ITEM_EMBEDDING], g.touched_rows[ITEM_EMBEDDING])
            for name in e.delta:
                np.testing.assert_allclose(g.delta[name], e.delta[name], rtol=1e-4, atol=2e-6, err_msg=f"client {c.client_id} {name}")
            untouched = ~e.touched_rows[ITEM_EMBEDDING]
            assert not g.delta[ITEM_EMBEDDING][untouched].any()  # rows it never rated: exactly zero
        for a, b in zip(own, batched, strict=True):  # the personal embeddings trained alike
            for key, value in a.personal_state().items():
                np.testing.assert_allclose(b.personal_state()[key], value, rtol=1e-4, atol=2e-6)
        # the aggregate (FedAvg by examples) the server would apply
        weights = np.array([e.num_examples for e in expected], dtype=np.float64)
        aggregate = {}
        for name in expected[0].delta:
            agg_e = sum(w * e.delta[name] for w, e in zip(weights, expected, strict=True)) / weights.sum()
            agg_g = sum(w * g.delta[name] for w, g in zip(weights, got, strict=True)) / weights.sum()
            np.testing.assert_allclose(agg_g, agg_e, rtol=1e-4, atol=1e-6)
            assert np.abs(agg_e).max() > 1e-4  # training moved it
            aggregate[name] = agg_e
        shared = {k: (v + aggregate[k]).astype(np.float32) for k, v in shared.items()}  # round 2 starts from the new model


def test_a_client_without_training_records_still_gets_its_zero_update_in_a_batch(data_dir):
    task = task_of(data_dir)
    clients = fresh_clients(task)
    clients[2].train = clients[2].train.subset(np.zeros(0, dtype=np.int64))
    got = task.fit_clients([(c, FitConfig(0, 2, 1)) for c in clients], task.initial_shared())
    assert got[2].num_examples == 0 and all(not d.any() for d in got[2].delta.values())
    assert got[3].num_examples > 0 and np.abs(got[3].delta[ITEM_EMBEDDING]).max() > 0


def test_every_fit_is_reported_once_for_progress_batched_or_not(data_dir):
    """``on_fit(i)`` drives the run's in-round progress: each client's fit is reported exactly once,
    the batched ones when the batch ends and a one-by-one fit (here: no training records) when it ends."""
    from fedrlhf_secure.tasks.base import Task

    task = task_of(data_dir)
    clients = fresh_clients(task)
    clients[2].train = clients[2].train.subset(np.zeros(0, dtype=np.int64))
    fits = [(c, FitConfig(0, 2, 1)) for c in clients]
    seen: list[int] = []
    task.fit_clients(fits, task.initial_shared(), seen.append)
    assert sorted(seen) == list(range(len(clients))) and seen[-1] == 2
    seen.clear()
    Task.fit_clients(task, fits, task.initial_shared(), seen.append)  # the default: one by one, in order
    assert seen == list(range(len(clients)))
