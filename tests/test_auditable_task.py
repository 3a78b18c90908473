"""The AuditableTask interface: both tasks implement it, subsets really restrict training, the LOSS
attack and the one-run canary bound run on IMDb through it, and other tasks are refused clearly.

Built from generated fixtures (tests/movielens_fixtures.py, tests/imdb_fixtures.py); nothing here
needs the federation engine, so these tests exercise the interface itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import toy_task
from imdb_fixtures import tiny_task_mapping, write_imdb_parquet
from movielens_fixtures import write_ml100k

from attacks.bounds import one_run_audit
from attacks.loss import loss_scores
from attacks.metrics import summarize
from attacks.shadows import AuditUnsupported, candidate_pool, ensure_supported
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import from_mapping
from fedrlhf_secure.errors import InputError
from fedrlhf_secure.tasks.auditable import AuditableTask, check_auditable_kind, missing_methods, require_auditable
from fedrlhf_secure.tasks.base import FitConfig
from fedrlhf_secure.tasks.imdb import IMDbConfig, IMDbTask
from fedrlhf_secure.tasks.imdb.reward import encode
from fedrlhf_secure.tasks.imdb.task import REVIEW_WORDS
from fedrlhf_secure.tasks.movielens import MovieLensConfig, make_task

ML_SMALL = {"split": "u1", "user_dim": 4, "item_dim": 4, "genre_dim": 2, "hidden_dim": 8, "num_clients": 8}


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    data = write_ml100k(tmp_path_factory.mktemp("ml"), n_users=12, n_items=40, per_user=20)
    return make_task(MovieLensConfig(**ML_SMALL), data, 0)


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FEDRLHF_CACHE_DIR")
    os.environ["FEDRLHF_CACHE_DIR"] = str(cache)
    raw = tiny_task_mapping()
    raw.pop("kind")
    config = from_mapping(IMDbConfig, raw, key="task")
    yield IMDbTask(config, write_imdb_parquet(tmp_path_factory.mktemp("imdb")), seed=3, progress=False)
    if old is None:
        os.environ.pop("FEDRLHF_CACHE_DIR", None)
    else:
        os.environ["FEDRLHF_CACHE_DIR"] = old


@pytest.fixture(params=["movielens", "imdb"])
def task(request):
    return request.getfixturevalue(request.param)


def _rows(a: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(x) for x in r) for r in a}


# --------------------------------------------------------------------------- (1) the interface


def test_both_tasks_implement_the_interface(task):
    assert isinstance(task, AuditableTask) and missing_methods(task) == []
    assert require_auditable(task, task.name) is task
    check_auditable_kind(task.name)  # declared by the registered factory: accepted before any work
    records = task.training_records()
    assert records.dtype == np.int64 and records.ndim == 2 and len(records) > 0
    assert len(_rows(records)) == len(records)  # stable, distinct ids
    assert np.array_equal(task.with_records(np.ones(len(records), bool)).training_records(), records)
    cand = task.membership_candidates()
    cand_records = cand.task.training_records()
    assert np.array_equal(cand_records[cand.member], records)
    assert (~cand.member).sum() > 0 and not _rows(cand_records[~cand.member]) & _rows(records)
    owners = task.record_clients(records)
    assert set(owners.tolist()) <= set(task.client_ids())


def test_canaries_are_new_training_records_the_task_can_score(task):
    rng = np.random.default_rng(0)
    canaries = task.with_canaries(20, rng)
    records = canaries.task.training_records()
    assert np.array_equal(records[canaries.index], canaries.records) and len(canaries.records) == 20
    assert not _rows(canaries.records) & _rows(task.training_records())
    scores = canaries.task.canary_scores(canaries.task.initial_shared(), canaries.records)
    assert scores.shape == (20,) and np.allclose(scores, 0.0)  # nothing moved: no evidence of any canary


def test_too_many_canaries_is_an_input_error(task):
    with pytest.raises(InputError, match="--canaries"):
        task.with_canaries(10**6, np.random.default_rng(0))


# --------------------------------------------------------------------------- (2) with_records restricts


def test_movielens_with_records_keeps_left_out_records_from_every_client(movielens):
    cand = movielens.membership_candidates().task  # held-out records trainable too
    records = cand.training_records()
    keep = np.random.default_rng(1).random(len(records)) < 0.5
    sub = cand.with_records(keep)
    cat = sub.split.catalogue
    seen = []
    for cid in sub.client_ids():
        tr = sub.make_client(cid).train
        seen += [(int(cat.user_ids[u]), int(cat.item_ids[i])) for u, i in zip(tr.user, tr.item, strict=True)]
    assert sorted(seen) == sorted((int(u), int(i)) for u, i, _ in records[keep])
    # a subset of a subset never brings a record back
    again = sub.with_records(~keep)
    assert sum(again.make_client(c).num_examples() for c in again.client_ids()) == 0


def test_imdb_with_records_keeps_left_out_reviews_from_every_client(imdb):
    cand = imdb.membership_candidates().task
    records = cand.training_records()
    keep = np.random.default_rng(2).random(len(records)) < 0.5
    sub = cand.with_records(keep)
    for cid in sub.client_ids():
        mine = records[keep & (records[:, 0] == cid)]
        shard = sub.split.shards[cid]
        assert np.array_equal(shard.ids, mine[:, 1]) and np.array_equal(shard.label, mine[:, 2])
        client = sub.make_client(cid)  # what the client's reward classifier trains on
        ids, mask = encode([imdb.train_reviews.text[i] for i in mine[:, 1]], REVIEW_WORDS)
        assert client.num_examples() == len(mine)
        assert np.array_equal(client.review_ids.numpy(), ids.numpy()) and np.array_equal(client.review_mask.numpy(), mask.numpy())
        assert np.array_equal(client.review_labels.numpy(), mine[:, 2])


# --------------------------------------------------------------------------- (3) attacks on IMDb


def _imdb_run_config() -> object:
    return config_from_dict({"seed": 3, "task": tiny_task_mapping()})


def test_loss_attack_runs_on_imdb_through_the_interface(imdb):
    pool = candidate_pool(_imdb_run_config(), None, task=imdb)
    assert pool.member.sum() == len(imdb.training_records()) and (~pool.member).sum() > 0
    rng = np.random.default_rng(4)
    released = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in imdb.initial_shared().items()}
    scores = loss_scores(pool.scores(released))
    assert scores.shape == (len(pool.records),) and np.all(np.isfinite(scores)) and np.all(scores < 0)
    assert np.isfinite(scores[pool.member]).all() and np.isfinite(scores[~pool.member]).all()
    metrics = summarize(scores, pool.member.astype(int), 0)
    assert 0.0 <= metrics.auc <= 1.0


def test_one_run_canary_bound_runs_on_imdb(imdb):
    rng = np.random.default_rng([0, 0xCA4A])
    canaries = imdb.with_canaries(40, rng)
    included = rng.random(40) < 0.5
    keep = np.ones(len(canaries.task.training_records()), bool)
    keep[canaries.index] = included
    task = canaries.task.with_records(keep)
    shared = task.initial_shared()
    results = [task.make_client(c).fit(shared, FitConfig(round=0, local_epochs=1, seed=0)) for c in task.client_ids()]
    total = sum(r.num_examples for r in results)
    released = {k: shared[k] + sum(r.num_examples * r.delta[k] for r in results) / total for k in shared}
    scores = task.canary_scores(released, canaries.records)
    assert scores.shape == (40,) and np.all(np.isfinite(scores))
    bound = one_run_audit(scores, included, 1e-5, 0.95, seed=0)
    assert np.isfinite(bound.epsilon_lower_bound) and bound.epsilon_lower_bound >= 0


# --------------------------------------------------------------------------- (4) refusal


def test_a_task_without_the_interface_is_refused_with_input_error():
    toy = toy_task.ToyTask(toy_task.ToyConfig())
    with pytest.raises(InputError, match=r"task 'toy' \(ToyTask\) does not implement AuditableTask.*lacks .*record_scores"):
        require_auditable(toy, "toy")
    with pytest.raises(AuditUnsupported, match="task 'toy'"):  # from the config alone, before any work
        ensure_supported(config_from_dict(toy_task.toy_config()))
    with pytest.raises(InputError, match="does not implement AuditableTask"):
        candidate_pool(config_from_dict(toy_task.toy_config()), None, task=toy)  # type: ignore[arg-type]


def test_the_audit_cli_refuses_a_task_without_the_interface_with_exit_status_2(tmp_path, capsys):
    from fedrlhf_secure.cli import main

    run = tmp_path / "toy-run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\ntask: {kind: toy}\n")
    (run / "model.safetensors").write_bytes(b"")
    assert main(["audit", str(run), "--no-progress", "--no-plots"]) == 2
    assert "task 'toy' (ToyTask) does not implement AuditableTask" in capsys.readouterr().err
