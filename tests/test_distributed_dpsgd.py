"""Record-level DP with distributed noise (``privacy.record_noise: distributed``/``central``): one DP-SGD
step per round on the sum of every client's per-record clipped gradients (Kairouz, Liu & Steinke 2021).

What is checked: the closed-form per-record gradients against torch autograd; per-record clipping
bounds one record's effect on the released sum by 2C; the clients' Gaussian shares, less any one of
them, carry the calibrated zC, while shares sized for m (the weakened rule) leave a curious
participant with less noise and a larger ε; the server discards an aggregate of fewer survivors;
ε per client against ``dp_accounting``'s PLD under replace-one; the refused combinations; and on the
real data, a crash and resume ending in the uninterrupted run's ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from broken_noise import SilentNoise
from crash_points import SimulatedCrash, crash_after
from dp_accounting.pld import pld_privacy_accountant
from toy_task import toy_config

from aggregation.base import AggregateResult, AggregationAborted
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, build_aggregator, resume_federation, run_federation
from fedrlhf_secure.federation.policy import NodePolicy, PolicyRefused
from fedrlhf_secure.privacy.accountants import GaussianAccountant, GaussianRelease
from fedrlhf_secure.privacy.distributed_dpsgd import DistributedRecordPlan, GradientSumSettings, effective_noise_std
from fedrlhf_secure.privacy.factory import build_client_privacy
from fedrlhf_secure.privacy.ledger import read_ledger
from fedrlhf_secure.privacy.server import ServerPrivacy
from fedrlhf_secure.tasks.movielens.gradients import clipped_gradient_sum, per_record_gradients
from fedrlhf_secure.tasks.movielens.model import DENSE_NAMES, ITEM_EMBEDDING, PolicyDims, build_policy
from fedrlhf_secure.tasks.movielens.train import policy_loss

TINY = Path(__file__).resolve().parents[1] / "configs" / "movielens-tiny.yaml"


def _config(record_noise: str = "distributed", aggregation: str = "plain", **fed):
    raw = toy_config(**{"rounds": 5, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["aggregation"] = {"kind": aggregation}
    raw["privacy"] = {"mode": "record", "epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 0.5, "record_noise": record_noise}
    return config_from_dict(raw)


def _plan(tmp_path, n=4, record_noise="distributed", aggregation="ckks", **fed) -> DistributedRecordPlan:
    cfg = _config(record_noise, aggregation, **fed)
    plan = build_client_privacy(cfg, {c: 10 for c in range(n)}, tmp_path / "ledger", False, build_aggregator(cfg, list(range(n))))
    assert isinstance(plan, DistributedRecordPlan)
    return plan


def _shares(plan, n, dim, rnd=0):
    for c in range(n):
        plan.admit(c, rnd)
    plan.begin_round(rnd, n)
    return [plan.add_noise(c, rnd, plan.clip(np.zeros(dim, np.float32)), 1.0).vector.astype(np.float64) for c in range(n)]


# ------------------------------------------------------------------ the gradient sum
def _small_problem(seed=0, n=7):
    dims = PolicyDims(num_items=9, num_genres=5, user_dim=3, item_dim=4, genre_dim=2, hidden_dim=6)
    shared = dims.init_shared(seed, 0.5)
    rng = np.random.default_rng(seed)
    users = rng.normal(0, 0.5, (n, dims.user_dim)).astype(np.float32)
    items = rng.integers(0, dims.num_items, n)
    genres = (rng.random((n, dims.num_genres)) < 0.4).astype(np.float32)
    rewards = rng.normal(0, 1, (n, 2)).astype(np.float32)
    return dims, shared, users, items, genres, rewards


def _autograd(shared, users, items, genres, rewards, objective):
    """Each record's gradient over every shared parameter, by torch autograd on the training module."""
    out = []
    for i in range(len(items)):
        policy = build_policy(shared, users[i : i + 1], None)
        logits = policy(torch.tensor([0]), torch.tensor([int(items[i])]), torch.tensor(genres[i : i + 1]))
        policy_loss(logits, torch.tensor(rewards[i : i + 1]), objective, 2.0).sum().backward()
        named = dict(policy.named_parameters())
        grads = {ITEM_EMBEDDING: named["item_embedding.weight"].grad.numpy().astype(np.float64)}
        for name in DENSE_NAMES:
            grads[name] = named[name.replace("mlp.", "")].grad.numpy().astype(np.float64)
        out.append(grads)
    return out


@pytest.mark.parametrize("objective", ["kl_regularised", "expected_reward"])
def test_closed_form_per_record_gradients_match_torch_autograd(objective):
    _, shared, users, items, genres, rewards = _small_problem()
    reference = _autograd(shared, users, items, genres, rewards, objective)
    for i in range(len(items)):
        one = clipped_gradient_sum(
            shared, users[i : i + 1], items[i : i + 1], genres[i : i + 1], rewards[i : i + 1],
            max_grad_norm=1e9, objective=objective, temperature=2.0,
        )  # fmt: skip
        for name, want in reference[i].items():
            np.testing.assert_allclose(one.gradient[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
    total = clipped_gradient_sum(shared, users, items, genres, rewards, max_grad_norm=1e9, objective=objective, temperature=2.0)
    for name in reference[0]:
        np.testing.assert_allclose(total.gradient[name], sum(r[name] for r in reference), rtol=1e-4, atol=1e-6)


def _flat(grad):
    return np.concatenate([np.ravel(grad[k]) for k in sorted(grad)])


def test_each_record_is_clipped_so_replacing_one_moves_the_sum_by_at_most_2c():
    _, shared, users, items, genres, rewards = _small_problem(seed=3, n=12)
    _, norms = per_record_gradients(shared, users, items, genres, rewards, objective="kl_regularised", temperature=2.0)
    c = 0.5 * float(norms.min())
    full = clipped_gradient_sum(shared, users, items, genres, rewards, max_grad_norm=c, objective="kl_regularised", temperature=2.0)
    assert full.clipped == 12  # every record's gradient was longer than C here: the bound is active
    for i in range(12):
        one = clipped_gradient_sum(
            shared, users[i : i + 1], items[i : i + 1], genres[i : i + 1], rewards[i : i + 1],
            max_grad_norm=c, objective="kl_regularised", temperature=2.0,
        )  # fmt: skip
        assert np.linalg.norm(_flat(one.gradient)) == pytest.approx(c, rel=1e-6)
    # replace record 0 by an adversarial one (flipped, extreme reward): the sum moves by <= 2C, and nearly 2C
    swapped = rewards.copy()
    swapped[0] = -100 * np.sign(rewards[0, 1] - rewards[0, 0]) * np.array([-1.0, 1.0])
    other = clipped_gradient_sum(shared, users, items, genres, swapped, max_grad_norm=c, objective="kl_regularised", temperature=2.0)
    moved = np.linalg.norm(_flat(other.gradient) - _flat(full.gradient))
    assert c < moved <= 2 * c + 1e-9
    # without per-record clipping the same replacement moves the sum far more than 2C
    raw = [
        clipped_gradient_sum(shared, users, items, genres, r, max_grad_norm=1e9, objective="kl_regularised", temperature=2.0)
        for r in (rewards, swapped)
    ]
    assert np.linalg.norm(_flat(raw[1].gradient) - _flat(raw[0].gradient)) > 4 * c


# ------------------------------------------------------------------ the noise shares and the survivors rule
def test_gaussian_shares_less_any_one_of_them_carry_the_calibrated_noise(tmp_path):
    n, dim = 6, 100_000
    plan = _plan(tmp_path, n=n)
    shares = _shares(plan, n, dim)
    central = plan.z * plan.clip_norm
    for own in range(n):  # a participant reading the aggregate knows its own share
        assert sum(s for c, s in enumerate(shares) if c != own).std() == pytest.approx(central, rel=0.02)
    assert shares[0].std() == pytest.approx(central / np.sqrt(n - 1), rel=0.02)  # no one share is the whole noise
    assert effective_noise_std(plan.z, plan.clip_norm, n, 1) == pytest.approx(central)


def test_shares_sized_for_m_instead_of_m_minus_1_leave_a_curious_participant_under_noised(tmp_path):
    """The weakened component: each share N(0, (zC)²/m). After subtracting its own share a participant
    is left with sqrt((m-1)/m) of zC, and the ε that noise really gives exceeds the budget."""
    n, dim = 6, 200_000
    plan = _plan(tmp_path, n=n)
    rng = np.random.default_rng(5)
    weakened = [rng.normal(0, plan.z * plan.clip_norm / np.sqrt(n), dim) for _ in range(n)]
    left = sum(weakened[1:]).std()  # participant 0 subtracted its own share
    assert left == pytest.approx(plan.z * plan.clip_norm * np.sqrt((n - 1) / n), rel=0.01)
    real_eps = GaussianAccountant("prv").epsilon([GaussianRelease(left / plan.clip_norm, 1.0, plan.rounds)], 1e-5)
    assert real_eps > 8.7  # claimed 8 (8.93 at m = 6 over 5 rounds)
    shipped = _shares(plan, n, dim)
    assert sum(shipped[1:]).std() == pytest.approx(plan.z * plan.clip_norm, rel=0.01)


def test_server_discards_an_aggregate_of_fewer_survivors_than_the_shares_were_sized_for(tmp_path):
    n, dim = 10, 1000
    cfg = _config("distributed", "ckks")
    cfg = config_from_dict({**cfg.to_mapping(), "privacy": {**cfg.to_mapping()["privacy"], "survivor_fraction": 0.8}})
    plan = build_client_privacy(cfg, {c: 10 for c in range(n)}, tmp_path / "ledger", False, build_aggregator(cfg, list(range(n))))
    shares = _shares(plan, n, dim)
    assert plan.survivors_required(0) == 8 and plan.minimum_contributors(0) == 8
    server = ServerPrivacy(cfg)
    with pytest.raises(AggregationAborted, match="sized for 8"):
        server.finalize(0, AggregateResult(sum(shares[:7]), 7.0, tuple(range(7))), admitted=n)
    kept = server.finalize(0, AggregateResult(sum(shares[:8]), 8.0, tuple(range(8))), admitted=n)
    assert kept.contributors == tuple(range(8))


def test_central_placement_sends_the_exact_sum_and_the_server_adds_zc(tmp_path):
    plan = _plan(tmp_path, n=3, record_noise="central", aggregation="plain")
    [share] = _shares(plan, 1, 10)
    assert not share.any()
    server = ServerPrivacy(_config("central", "plain"))
    assert server.central_std == pytest.approx(plan.z * plan.clip_norm)
    noised = server.finalize(0, AggregateResult(np.zeros(200_000), 3.0, (0, 1, 2)), admitted=3)
    assert noised.weighted_sum.std() == pytest.approx(plan.z * plan.clip_norm, rel=0.02)


# ------------------------------------------------------------------ accounting
def test_epsilon_per_client_matches_dp_accounting_pld_under_replace_one(tmp_path):
    plan = _plan(tmp_path, n=6, rounds=25)
    acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(plan.z), 25)
    ref = float(acc.get_epsilon(1e-5))
    ours = plan.history_epsilon([GaussianRelease(plan.z, 1.0, 25)])
    assert ref - 0.005 <= ours <= ref + 0.03
    assert 7.9 <= ref <= 8.0  # z is calibrated tightly to the budget of 8


# ------------------------------------------------------------------ refused combinations
@pytest.mark.parametrize(
    "record_noise, aggregation, fed, key",
    [
        ("distributed", "plain", {}, "privacy.record_noise"),  # the server would read each client's barely noised sum
        ("central", "ckks", {}, "privacy.noise"),  # nobody could add central noise to an aggregate only clients read
        ("distributed", "ckks", {"weighting": "examples"}, "federation.weighting"),
    ],
)
def test_unsound_placements_are_refused_naming_the_key(tmp_path, record_noise, aggregation, fed, key):
    cfg = _config(record_noise, aggregation, **fed)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_client_privacy(cfg, {c: 10 for c in range(6)}, tmp_path / "ledger", False, build_aggregator(cfg, list(range(6))))


def test_record_noise_is_validated_at_the_config_boundary():
    with pytest.raises((ConfigError, ValueError), match="record_noise"):
        _config("sideways")


def test_a_nodes_default_policy_refuses_central_record_noise_and_the_users_own_accepts_it():
    cfg = _config("central", "secagg")
    with pytest.raises(PolicyRefused, match="privacy.record_noise"):
        NodePolicy().admit_setup(cfg, 6)
    NodePolicy.from_config(cfg).admit_setup(cfg, 6)
    NodePolicy().admit_setup(_config("distributed", "secagg"), 6)


def test_the_task_is_asked_for_a_gradient_sum_with_the_plans_clip(tmp_path):
    plan = _plan(tmp_path, n=6)
    settings = plan.dpsgd_settings(0, 0)
    assert isinstance(settings, GradientSumSettings)
    assert (settings.max_grad_norm, settings.sample_rate, settings.noise_multiplier) == (0.5, 1.0, plan.z)


# ------------------------------------------------------------------ end to end on the real data
OVERRIDES = [
    "task.num_clients=6",
    "federation.rounds=3",
    "federation.weighting=uniform",
    "federation.server_optimizer.kind=adam",
    "federation.server_lr=0.01",
    "privacy.mode=record",
    "privacy.record_noise=distributed",
    "privacy.epsilon=8",
    "privacy.delta=1e-5",
    "privacy.max_grad_norm=0.5",
    "aggregation.kind=secagg",
    "aggregation.clip_range=64",
    "aggregation.max_weight=1",
    "aggregation.bits=64",
    "aggregation.noise_bound=8000000",
]


def _spend(run: Path):
    _, entries = read_ledger(run / "ledger")
    return {c: [(e.round, e.mechanism, round(e.epsilon_after, 9), e.steps) for e in es] for c, es in entries.items()}


def test_movielens_under_secagg_with_skellam_shares_releases_one_accounted_step_per_round(tmp_path, shared_datasets):
    config = load_config(TINY, OVERRIDES)
    silent = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "silent", progress=False, noise=SilentNoise()))
    run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "run", progress=False))
    spend = _spend(run)
    assert sorted(spend) == list(range(6)) or len(spend) == 6
    for rows in spend.values():
        assert [r[0] for r in rows] == [0, 1, 2] and {r[1] for r in rows} == {"skellam"} and {r[3] for r in rows} == {1}
        assert rows[-1][2] <= 8.0 and rows[-1][2] > 7.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["accountant"] == "skellam-rdp" and summary["privacy"]["record_noise"] == "distributed"
    from fedrlhf_secure.rundir import load_tensors

    a = load_tensors(silent / "model.safetensors")
    b = load_tensors(run / "model.safetensors")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 0  # the clients' integer noise survives unmasking


@pytest.mark.slow
def test_movielens_distributed_dpsgd_killed_mid_round_resumes_to_the_uninterrupted_ledger(tmp_path, shared_datasets):
    config = load_config(TINY, OVERRIDES)
    whole = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "whole", progress=False))
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path / "crash", progress=False, on_commit=crash_after(9)))
    [partial] = list((tmp_path / "crash").glob("*.partial"))
    before = _spend(partial)
    resumed = resume_federation(partial, RunOptions(data_dir=shared_datasets, progress=False))
    after = _spend(resumed)
    assert after == _spend(whole)
    assert sum(len(v) for v in after.values()) == 18
    for c, rows in before.items():
        assert after[c][: len(rows)] == rows


def test_record_canaries_are_refused_where_the_distributed_step_would_drop_them(tmp_path):
    """The audit canaries live inside Opacus' DP-SGD step; the one-step distributed mode has none, so
    asking for both must exit 2 rather than audit a run that silently carries no canaries."""
    import subprocess
    import sys

    from movielens_fixtures import write_ml100k

    data = write_ml100k(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "seed: 0\ntask: {kind: movielens, split: u1}\nfederation: {rounds: 1, weighting: uniform}\n"
        "aggregation: {kind: secagg}\nprivacy: {mode: record, epsilon: 8, record_noise: distributed, audit_canaries: 100}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "fedrlhf_secure.cli", "run", str(cfg), "--out", str(tmp_path / "runs"), "--data-dir", str(data)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "privacy.audit_canaries" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
