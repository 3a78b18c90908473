"""The MovieLens FedRLHF task on fixtures: clients, personal parameters, sparse rows, feedback, DP, audit hooks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from movielens_fixtures import write_ml100k

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.privacy.dpsgd import DPSGDReport, DPSGDSettings
from fedrlhf_secure.tasks.base import FitConfig
from fedrlhf_secure.tasks.movielens import MovieLensConfig, make_task
from fedrlhf_secure.tasks.movielens.feedback import (
    KeyedHumanNoise,
    direct_feedback,
    human_signal,
    pairwise_feedback,
    reward_table,
)
from fedrlhf_secure.tasks.movielens.metrics import spearman
from fedrlhf_secure.tasks.movielens.model import ITEM_EMBEDDING, build_policy, numpy_logits

SMALL = dict(user_dim=8, item_dim=8, genre_dim=4, hidden_dim=16, batch_size=8)


@pytest.fixture
def data_dir(tmp_path):
    write_ml100k(tmp_path, n_users=12, n_items=40, per_user=20)
    return tmp_path


def task_of(data_dir, seed=0, **overrides):
    return make_task(MovieLensConfig(**{**SMALL, **overrides}), data_dir, seed)


def fit(task, cid=0, round=0, epochs=2, seed=0, shared=None, dp=None):
    client = task.make_client(cid)
    return client, client.fit(shared or task.initial_shared(), FitConfig(round, epochs, seed, dp))


def test_one_client_per_user_by_default_and_groups_on_request(data_dir):
    assert task_of(data_dir).client_ids() == list(range(12))
    grouped = task_of(data_dir, users_per_client=5)
    assert grouped.client_ids() == [0, 1, 2]
    assert [len(grouped.make_client(c).users) for c in (0, 1, 2)] == [5, 5, 2]
    assert grouped.make_client(0).num_examples() == sum(task_of(data_dir).make_client(c).num_examples() for c in range(5))


def test_num_clients_picks_a_seeded_sample(data_dir):
    a = task_of(data_dir, num_clients=5).client_ids()
    assert len(a) == 5 and a == task_of(data_dir, num_clients=5).client_ids()
    assert a != task_of(data_dir, seed=1, num_clients=5).client_ids()


def test_more_clients_than_users_is_an_error_naming_both_numbers(data_dir):
    with pytest.raises(ConfigError, match=r"task.num_clients: must be at most 12: the data .* has only 12 users, got 13"):
        task_of(data_dir, num_clients=13)


def test_unknown_task_key_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="task.embedding_size"):
        config_from_dict({"task": {"kind": "movielens", "embedding_size": 3}})
    with pytest.raises(ConfigError, match="task.split must be one of"):
        config_from_dict({"task": {"kind": "movielens", "split": "u9"}})


def test_personal_user_embedding_never_appears_in_the_fit_result(data_dir):
    task = task_of(data_dir)
    client = task.make_client(3)
    before = client.personal_state()
    result = client.fit(task.initial_shared(), FitConfig(0, 2, 0))
    after = client.personal_state()
    assert set(result.delta) == set(task.shared_spec().names())
    assert not any("user" in name for name in result.delta)
    assert sorted(after) == ["4", "dp/4"]  # the embedding it predicts with, and the DP-trained one
    vec = after["4"]
    assert not np.allclose(vec, before["4"])  # it trained, and stayed here
    released = np.concatenate([v.ravel() for v in result.delta.values()] + [np.ravel(list(result.metrics.values()))])
    for value in vec:  # not one coordinate of the personal vector is in the release
        assert not np.any(released == value)


def test_untouched_item_rows_have_exactly_zero_delta_even_with_weight_decay(data_dir):
    task = task_of(data_dir, weight_decay=0.1)
    client, result = fit(task, cid=2)
    touched = result.touched_rows[ITEM_EMBEDDING]
    rated = np.unique(client.train.item)
    assert touched.sum() == len(rated) and touched[rated].all()
    delta = result.delta[ITEM_EMBEDDING]
    assert np.count_nonzero(delta[~touched]) == 0
    assert np.all(np.abs(delta[touched]).sum(axis=1) > 0)


def test_feedback_changes_the_update(data_dir):
    no_feedback = task_of(data_dir, feedback_lambda=(0.0, 0.0))
    feedback = task_of(data_dir, feedback_lambda=(0.5, 0.5))
    _, a = fit(no_feedback, cid=1)
    _, b = fit(feedback, cid=1)
    diff = max(np.abs(a.delta[k] - b.delta[k]).max() for k in a.delta)
    assert diff > 1e-4


def test_feedback_is_computed_from_each_records_own_rating():
    ratings = np.array([5, 1, 4, 2, 3, 5], dtype=np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(direct_feedback(ratings, 0.0, rng), (ratings - 3) / 2)
    users = np.array([0, 0, 1, 1, 2, 2])
    pref = pairwise_feedback(ratings, users, 0.0, rng)
    # pairs stay within a user, and the higher-rated item of each pair wins
    np.testing.assert_array_equal(pref, [1, -1, 1, -1, -1, 1])
    flipped = pairwise_feedback(ratings, users, 1.0, rng)
    np.testing.assert_array_equal(flipped, -pref)
    # a misaligned lookup (feedback of other records) would not match the record's own rating
    h = human_signal(ratings, users, 0.0, 0.0, rng)
    np.testing.assert_allclose(h, 0.5 * ((ratings - 3) / 2 + pref))
    assert not np.allclose(human_signal(ratings[::-1].copy(), users, 0.0, 0.0, rng), h)


def test_shaped_reward_is_intrinsic_plus_lambda_times_feedback():
    r = reward_table(np.array([1.0, 0.0]), np.array([0.5, -1.0]), 0.4)
    np.testing.assert_allclose(r, [[-1 - 0.2, 1 + 0.2], [1 + 0.4, -1 - 0.4]])


def test_same_seed_gives_the_same_delta_and_another_seed_does_not(data_dir):
    _, a = fit(task_of(data_dir), cid=5, seed=7)
    _, b = fit(task_of(data_dir), cid=5, seed=7)
    _, c = fit(task_of(data_dir), cid=5, seed=8)
    for k in a.delta:
        np.testing.assert_array_equal(a.delta[k], b.delta[k])
    assert any(not np.array_equal(a.delta[k], c.delta[k]) for k in a.delta)


def test_numpy_forward_matches_the_torch_policy(data_dir):
    task = task_of(data_dir)
    shared = task.initial_shared()
    users = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    items = np.array([0, 5, 39])
    genres = task.split.catalogue.genres[items]
    policy = build_policy(shared, users, None)
    with torch.no_grad():
        z_torch = policy(torch.arange(3), torch.from_numpy(items), torch.from_numpy(genres)).numpy()
    np.testing.assert_allclose(numpy_logits(shared, users, items, genres), z_torch, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_counts_rates_and_a_spearman_score(data_dir):
    task = task_of(data_dir)
    client = task.make_client(0)
    m = client.evaluate(task.initial_shared())
    assert m["n"] == len(client.test) and m["train_n"] == len(client.train)
    assert m["accuracy"] == m["correct"] / m["n"] and m["train_accuracy"] == m["train_correct"] / m["train_n"]
    assert -1 <= m["spearman"] <= 1


def test_spearman_is_exact_and_nan_safe_when_constant():
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([0.1, 0.4, 0.3, 0.9]), np.array([1, 3, 3, 5])) == pytest.approx(0.9486833)
    assert np.isnan(spearman(np.array([0.1, 0.2]), np.array([4, 4])))
    assert np.isnan(spearman(np.array([0.1]), np.array([4])))


def test_federated_rounds_improve_training_fit_on_fixture(data_dir):
    task = task_of(data_dir, batch_size=16)
    spec = task.shared_spec()
    shared = task.initial_shared()
    clients = [task.make_client(c) for c in task.client_ids()]
    first = None
    for rnd in range(4):
        results = [c.fit(shared, FitConfig(rnd, 3, 0)) for c in clients]
        weights = np.array([r.num_examples for r in results], dtype=np.float64)
        for e in spec.entries:
            stacked = np.stack([r.delta[e.name] for r in results])
            if e.sparse_rows:
                touch = np.stack([r.touched_rows[e.name] for r in results]) * weights[:, None]
                total = touch.sum(0)
                avg = np.einsum("k,k...->...", np.ones(len(results)), stacked * touch[..., None]) / np.maximum(total, 1e-12)[:, None]
            else:
                avg = np.einsum("k,k...->...", weights, stacked) / weights.sum()
            shared[e.name] = shared[e.name] + avg.astype(np.float32)
        metrics = [c.evaluate(shared) for c in clients]
        train_acc = sum(m["train_correct"] for m in metrics) / sum(m["train_n"] for m in metrics)
        first = train_acc if first is None else first
    assert train_acc > max(first, 0.6)


def test_baselines_run_on_the_same_split(data_dir):
    task = task_of(data_dir)
    out = {name: fn() for name, fn in task.baselines().items()}
    assert set(out) == {"centralized", "local", "majority"}
    n_test = sum(len(task.make_client(c).test) for c in task.client_ids())
    for res in out.values():
        assert res["heldout_n"] == n_test
        assert 0 <= res["heldout_accuracy"] <= 1 and 0 <= res["train_accuracy"] <= 1 and res["seconds"] > 0
    assert out["centralized"]["epochs"] == 25
    short = task.baselines()["centralized"](rounds=1, local_epochs=2)
    assert short["epochs"] == 2


def test_dp_fit_runs_opacus_noises_every_item_row_and_reports_its_parameters(data_dir):
    task = task_of(data_dir)
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.25)
    client, result = fit(task, cid=4, epochs=2, dp=dp)
    assert result.dp_sgd == DPSGDReport(steps=8, sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=0.5)
    assert result.touched_rows[ITEM_EMBEDDING].all()
    unrated = np.setdiff1d(np.arange(40), client.train.item)
    assert np.all(np.abs(result.delta[ITEM_EMBEDDING][unrated]).sum(axis=1) > 0)  # noise covers every row
    assert set(result.delta) == set(task.shared_spec().names())


def test_dp_noise_is_fresh_even_with_the_same_seed(data_dir):
    """Noise regenerable from the run seed (written to config.yaml) could be subtracted: it must not repeat."""
    task = task_of(data_dir)
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.25)
    _, first = fit(task, cid=4, epochs=2, dp=dp)
    _, again = fit(task, cid=4, epochs=2, dp=dp)
    assert np.abs(first.delta[ITEM_EMBEDDING] - again.delta[ITEM_EMBEDDING]).max() > 1e-4


def test_dp_noise_scales_the_update(data_dir):
    task = task_of(data_dir)
    quiet = fit(task, cid=4, epochs=1, dp=DPSGDSettings(0.0, 0.5, 0.25))[1]
    loud = fit(task, cid=4, epochs=1, dp=DPSGDSettings(50.0, 0.5, 0.25))[1]
    unrated = np.setdiff1d(np.arange(40), task.make_client(4).train.item)
    assert np.count_nonzero(quiet.delta[ITEM_EMBEDDING][unrated]) == 0
    assert np.abs(loud.delta[ITEM_EMBEDDING][unrated]).mean() > 1e-3


def test_training_records_subset_and_record_scores_for_audits(data_dir):
    task = task_of(data_dir)
    records = task.training_records()
    assert records.dtype == np.int64 and records.shape == (len(task.split.train), 3)
    keep = np.ones(len(records), dtype=bool)
    keep[records[:, 0] == 1] = False  # drop user 1's training records
    sub = task.with_training_subset(keep)
    assert sub.client_ids() == task.client_ids()
    assert sub.make_client(0).num_examples() == 0 and sub.make_client(1).num_examples() == task.make_client(1).num_examples()
    assert len(sub.make_client(0).test) == len(task.make_client(0).test)
    np.testing.assert_array_equal(sub.training_records(), records)
    empty = sub.make_client(0).fit(task.initial_shared(), FitConfig(0, 1, 0))
    assert empty.num_examples == 0 and not empty.touched_rows[ITEM_EMBEDDING].any()
    client = task.make_client(2)
    client.fit(task.initial_shared(), FitConfig(0, 2, 0))
    shared = task.initial_shared()
    mine = records[records[:, 0] == 3]
    z = numpy_logits(shared, np.zeros((len(mine), 8), np.float32), mine[:, 1] - 1, task.split.catalogue.genres[mine[:, 1] - 1])
    np.testing.assert_allclose(task.record_scores(shared, mine), np.where(mine[:, 2] >= 4, z, -z), rtol=1e-6)
    with_personal = task.record_scores(shared, mine, client.personal_state())
    assert not np.allclose(with_personal, task.record_scores(shared, mine))


def test_task_kind_is_registered_with_its_config():
    from fedrlhf_secure.tasks.base import task_spec

    spec = task_spec("movielens")
    assert spec.config_cls is MovieLensConfig and spec.factory is make_task
    assert dataclasses.asdict(MovieLensConfig())["split"] == "u1"


def test_dp_fit_takes_a_noisy_step_on_empty_poisson_batches(data_dir):
    task = task_of(data_dir)
    client = task.make_client(0)
    rate = 0.02  # ~0.3 expected records per batch: most batches are empty
    result = client.fit(task.initial_shared(), FitConfig(0, 1, 0, DPSGDSettings(1.0, 1.0, rate)))
    assert result.dp_sgd.steps == 50
    assert np.all(np.isfinite(result.delta[ITEM_EMBEDDING])) and np.abs(result.delta[ITEM_EMBEDDING]).min() > 0


@settings(max_examples=60, deadline=None)
@given(
    ratings=st.lists(st.integers(1, 5), min_size=0, max_size=40),
    n_users=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_pairwise_answers_pair_records_of_one_user_and_cancel(ratings, n_users, seed):
    r = np.array(ratings, dtype=np.float32)
    users = np.arange(len(r)) % n_users
    out = pairwise_feedback(r, users, 0.0, np.random.default_rng(seed))
    assert set(np.unique(out)) <= {-1.0, 0.0, 1.0}
    for u in range(n_users):
        mine = users == u
        assert out[mine].sum() == 0  # every +1 has its -1 within the same user
        assert np.count_nonzero(out[mine]) <= 2 * (mine.sum() // 2)
        # a winner never has a lower rating than the user's losers it could have been paired with
        if (out[mine] == 1).any() and (out[mine] == -1).any():
            assert r[mine][out[mine] == 1].max() > r[mine][out[mine] == -1].min()


def test_personal_state_round_trips_through_a_checkpoint(data_dir):
    task = task_of(data_dir)
    client = task.make_client(3)
    fit(task, cid=3, epochs=1)
    state = {k: v + 1.5 for k, v in client.personal_state().items()}
    fresh = task.make_client(3)
    fresh.load_personal_state(state)
    for k, v in fresh.personal_state().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(ValueError, match="no personal embedding '4'"):
        fresh.load_personal_state({})
    with pytest.raises(ValueError, match="no personal embedding 'dp/4'"):
        fresh.load_personal_state({k: v for k, v in state.items() if not k.startswith("dp/")})


def _deterministic_dp(clip: float) -> DPSGDSettings:
    """Noise off and every record in every batch (Poisson sampling at rate 1 is deterministic)."""
    return DPSGDSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0)


def test_ghost_clipping_gives_the_same_update_as_per_sample_gradients(data_dir):
    from fedrlhf_secure.tasks.movielens.train import train_epochs_dp

    task = task_of(data_dir)
    client = task.make_client(5)
    shared = task.initial_shared()
    deltas = {}
    for mode in ("ghost", "hooks"):
        policy = build_policy(shared, client._dp_user_rows, None)
        steps, _ = train_epochs_dp(
            policy,
            client._dp_data,
            client.feedback_profiles,
            task.settings,
            3,
            _deterministic_dp(0.05),
            human=KeyedHumanNoise(client._human_key, 0),
            grad_sample_mode=mode,
            engine="opacus",
        )
        assert steps == 3
        deltas[mode] = {
            k: v.detach().numpy() - shared_value for k, v, shared_value in [("item", policy.item_embedding.weight, shared[ITEM_EMBEDDING])]
        }
    moved = np.abs(deltas["hooks"]["item"]).max()
    assert moved > 1e-3  # clipped at 0.05, the records still moved the table
    np.testing.assert_allclose(deltas["ghost"]["item"], deltas["hooks"]["item"], atol=1e-6 + 1e-4 * moved)


def test_dp_update_never_depends_on_the_noiseless_prediction_embedding(data_dir):
    """Under record-level DP the client predicts with a user embedding fitted without noise; the
    released update must be computed from the DP-trained one only, or it would not be DP."""
    task = task_of(data_dir)
    shared = task.initial_shared()
    a, b = task.make_client(5), task.make_client(5)
    b._human_key = a._human_key  # one client: one secret key for its human's noise
    b._user_rows = b._user_rows + 3.0  # a wildly different prediction embedding
    ra = a.fit(shared, FitConfig(0, 2, 0, _deterministic_dp(0.5)))
    rb = b.fit(shared, FitConfig(0, 2, 0, _deterministic_dp(0.5)))
    for k in ra.delta:
        np.testing.assert_array_equal(ra.delta[k], rb.delta[k])
    assert np.abs(a._user_rows - task.initial_user_rows(a.users)).max() > 1e-3  # the prediction embedding was fitted
    assert not np.allclose(a._user_rows, a._dp_user_rows)
