"""Client-level DP-FedAvg: clipping, sensitivity, noise shares, dropouts, bad inputs, the injected noise seam."""

from __future__ import annotations

import json

import numpy as np
import pytest
from broken_noise import SilentNoise
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from toy_task import toy_config

from aggregation.base import AggregateResult, AggregationAborted
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, build_aggregator, run_federation
from fedrlhf_secure.privacy.client_level import IntegerDomain
from fedrlhf_secure.privacy.clipping import clip_l2
from fedrlhf_secure.privacy.factory import build_client_privacy
from fedrlhf_secure.privacy.server import ServerPrivacy
from fedrlhf_secure.rundir import load_tensors

RNG = np.random.default_rng(0)


def _config(privacy: dict, **fed):
    raw = toy_config(**{"rounds": 2, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["privacy"] = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, **privacy}
    return config_from_dict(raw)


def _plan(tmp_path, n=4, **privacy):
    privacy.setdefault("accountant", "rdp")
    cfg = _config(privacy)
    return build_client_privacy(cfg, {c: 10 for c in range(n)}, tmp_path / "ledger", False, build_aggregator(cfg, list(range(n))))


def _release(plan, cid, rnd, vector, weight=1.0, participants=None):
    """The client's privacy layer as a Participant runs it: begin the round, clip, add the noise share."""
    plan.begin_round(rnd, participants if participants is not None else len(plan.admitted.get(rnd, ())))
    return plan.add_noise(cid, rnd, plan.clip(vector), weight)


def _build(cfg, sizes, tmp_path):
    return build_client_privacy(cfg, sizes, tmp_path / "ledger", False, build_aggregator(cfg, list(sizes)))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e6, 1e6, width=32)),
    st.floats(1e-3, 1e3),
)
def test_clipping_bounds_the_norm_and_keeps_the_direction(v, c):
    out = clip_l2(v, c)
    assert np.linalg.norm(out.astype(np.float64)) <= c
    norm = np.linalg.norm(v.astype(np.float64))
    if norm <= c:
        np.testing.assert_array_equal(out, v)
    else:
        np.testing.assert_allclose(
            out.astype(np.float64) * norm, v.astype(np.float64) * np.linalg.norm(out.astype(np.float64)), rtol=1e-4, atol=1e-3 * c
        )


def test_one_clients_influence_on_the_released_mean_is_at_most_c_over_n(tmp_path):
    n, dim, c = 8, 50, 1.0
    updates = RNG.normal(0, 3, (n, dim)).astype(np.float32)
    adversarial = np.full(dim, 1e4, np.float32)

    def released_mean(vectors):
        plan = _plan(tmp_path / str(len(list(tmp_path.iterdir()))), n=n, noise="central")
        for cid in range(n):
            plan.admit(cid, 0)
        privs = [_release(plan, cid, 0, v) for cid, v in enumerate(vectors)]
        total = AggregateResult(np.sum([p.vector for p in privs], axis=0, dtype=np.float64), sum(p.weight for p in privs), tuple(range(n)))
        return total.average

    honest = released_mean(updates)
    attacked = released_mean(np.vstack([adversarial, updates[1:]]))
    assert np.linalg.norm(attacked - honest) <= 2 * c / n  # both old and new update have norm <= C
    assert np.linalg.norm(attacked - honest) > c / n  # and the bound is nearly reached: the test can fail
    # example weighting would let a client with many examples move the mean by far more than C/n
    weights = np.array([100.0] + [1.0] * (n - 1))
    clipped = np.array([clip_l2(v, c) for v in updates])
    clipped_attacked = np.vstack([clip_l2(adversarial, c), clipped[1:]])
    weighted = lambda x: (weights[:, None] * x).sum(0) / weights.sum()
    assert np.linalg.norm(weighted(clipped_attacked) - weighted(clipped)) > 5 * c / n


def test_distributed_gaussian_shares_without_any_one_of_them_still_carry_the_calibrated_noise(tmp_path):
    n, dim = 10, 20_000
    plan = _plan(tmp_path, n=n, noise="distributed")
    for cid in range(n):
        plan.admit(cid, 0)
    shares = [_release(plan, cid, 0, np.zeros(dim, np.float32)).vector.astype(np.float64) for cid in range(n)]
    # a participant that reads the aggregate subtracts its own share: the other n - 1 must carry z·C
    for own in (0, n - 1):
        others = sum(s for c, s in enumerate(shares) if c != own)
        assert others.std() == pytest.approx(plan.z * plan.clip_norm, rel=0.03)
    assert sum(shares).std() == pytest.approx(plan.z * plan.clip_norm * np.sqrt(n / (n - 1)), rel=0.03)
    # a single share alone carries only 1/sqrt(n - 1) of it: no party sees the full noise, none sees the sum un-noised
    for cid in range(n):
        plan.admit(cid, 1)
    single = _release(plan, 0, 1, np.zeros(dim, np.float32)).vector
    assert single.std() == pytest.approx(plan.z / np.sqrt(n - 1), rel=0.05)


def test_shares_sized_for_m_survivors_counting_the_readers_own_share_fall_short_of_the_calibration(tmp_path):
    """The weakened rule (each share N(0, (zC)²/m), as before m - 1 was used): once a participant
    subtracts its own share, the rest carry only sqrt((m-1)/m) of the calibrated std — measurably less."""
    n, dim = 4, 200_000
    plan = _plan(tmp_path, n=n, noise="distributed")
    rng = np.random.default_rng(1)
    weakened = [rng.normal(0, plan.z * plan.clip_norm / np.sqrt(n), dim) for _ in range(n)]
    assert sum(weakened[1:]).std() < 0.9 * plan.z * plan.clip_norm
    for cid in range(n):
        plan.admit(cid, 0)
    shipped = [_release(plan, cid, 0, np.zeros(dim, np.float32)).vector.astype(np.float64) for cid in range(n)]
    assert sum(shipped[1:]).std() == pytest.approx(plan.z * plan.clip_norm, rel=0.02)


def test_dropouts_are_compensated_for_the_required_survivors_and_fewer_abort_the_round(tmp_path):
    n, dim = 10, 20_000
    plan = _plan(tmp_path, n=n, noise="distributed", survivor_fraction=0.8)
    for cid in range(n):
        plan.admit(cid, 0)
    shares = [_release(plan, cid, 0, np.zeros(dim, np.float32)).vector.astype(np.float64) for cid in range(8)]
    assert plan.survivors_required(0) == 8
    assert sum(shares[1:]).std() == pytest.approx(plan.z, rel=0.03)  # 8 survivors, less any one share, still carry the full noise
    server = ServerPrivacy(_config({"noise": "distributed", "survivor_fraction": 0.8, "accountant": "rdp"}))
    with pytest.raises(AggregationAborted, match="sized for 8"):
        server.finalize(0, AggregateResult(sum(shares[:7]), 7.0, tuple(range(7))), admitted=n)
    ok = AggregateResult(sum(shares), 8.0, tuple(range(8)))
    assert server.finalize(0, ok, admitted=n) is ok


def test_central_noise_is_added_by_the_server_after_aggregation(tmp_path):
    plan = _plan(tmp_path, noise="central")
    plan.admit(0, 0)
    clipped = _release(plan, 0, 0, np.full(10_000, 5.0, np.float32)).vector
    assert np.linalg.norm(clipped) <= 1.0  # the client sends its clipped update without noise
    server = ServerPrivacy(_config({"noise": "central", "accountant": "rdp"}))
    out = server.finalize(0, AggregateResult(np.zeros(10_000), 1.0, (0,)), admitted=1)
    assert out.weighted_sum.std() == pytest.approx(plan.z, rel=0.03)


def test_integer_noise_for_masking_is_skellam_in_the_quantised_domain(tmp_path):
    _config({"noise": "distributed"})
    from fedrlhf_secure.privacy.client_level import ClientLevelPlan
    from fedrlhf_secure.privacy.ledger import PrivacyLedger
    from fedrlhf_secure.privacy.noise import NoiseSource
    from fedrlhf_secure.privacy.replay import ReleaseStore

    plan = ClientLevelPlan(
        rounds=2,
        clip_norm=1.0,
        noise="distributed",
        budget=4.0,
        delta=1e-3,
        accountant="rdp",
        noise_multiplier=None,
        survivor_fraction=1.0,
        min_clients=2,
        integer=IntegerDomain(2.0**12),
        ledger=PrivacyLedger(tmp_path / "l", {"m": 1}, resume=False),
        releases=ReleaseStore(tmp_path / "r"),
        noise_source=NoiseSource(),
    )
    n, dim = 4, 30_000
    for cid in range(n):
        plan.admit(cid, 0)
    privs = [_release(plan, cid, 0, np.zeros(dim, np.float32)) for cid in range(n)]
    noise = sum(p.integer_noise for p in privs)
    assert noise.dtype == np.int64
    variance, l1, l2 = plan._skellam_params
    assert l2 == pytest.approx(2 * (2.0**12 + np.sqrt(dim)))  # replace-one: one client's update replaced
    # any n - 1 shares carry the calibrated variance (the reader's own share does not count)
    assert sum(p.integer_noise for p in privs[1:]).var() == pytest.approx(variance, rel=0.05)
    assert noise.var() == pytest.approx(variance * n / (n - 1), rel=0.05)
    eps = [plan.commit(cid, 0, privs[cid], None) for cid in range(n)]
    assert 0 < eps[0] < 4.0 and plan.ledger.entry(0, 0).mechanism == "skellam"


@pytest.mark.parametrize(
    "privacy, fed, key",
    [
        ({"epsilon": 0}, {}, "privacy"),
        ({"epsilon": -1.0}, {}, "privacy"),
        ({"clip_norm": 0.0}, {}, "privacy"),
        ({"delta": 0.25}, {}, "privacy.delta"),  # 4 clients: δ must be < 1/4
        ({}, {"weighting": "examples"}, "federation.weighting"),
        ({"survivor_fraction": 1.0}, {"dropout_rate": 0.2}, "privacy.survivor_fraction"),
    ],
)
def test_bad_privacy_inputs_are_rejected_with_an_error_naming_the_key(tmp_path, privacy, fed, key):
    with pytest.raises(ConfigError) as err:
        cfg = _config(privacy, **fed)
        _build(cfg, {c: 10 for c in range(4)}, tmp_path)
    assert key in str(err.value)
    name = next(iter(privacy), None)
    if name:
        assert name in str(err.value)


def test_record_level_delta_must_be_below_one_over_the_records_of_the_largest_client(tmp_path):
    raw = toy_config()
    raw["privacy"] = {"mode": "record", "epsilon": 2.0, "delta": 0.01}
    with pytest.raises(ConfigError, match=r"privacy.delta.*client 2 has n=200 records"):
        _build(config_from_dict(raw), {0: 5, 1: 50, 2: 200}, tmp_path)


def test_noise_cannot_be_switched_off_from_a_config_or_by_anything_the_package_ships():
    with pytest.raises(ConfigError, match="unknown key"):
        _config({"noise_disabled": True})
    import pkgutil

    import fedrlhf_secure.privacy as privacy_pkg

    modules = [m.name for m in pkgutil.iter_modules(privacy_pkg.__path__)]
    assert "testing" not in modules  # the old process-wide switch is gone
    from fedrlhf_secure.privacy.noise import NoiseSource

    assert NoiseSource().gaussian(1.0, 10_000).std() == pytest.approx(1.0, rel=0.05)
    assert NoiseSource().dpsgd_noise_multiplier(1.7) == 1.7


def test_an_injected_silent_noise_source_removes_the_noise_while_the_ledger_still_claims_the_budget(tmp_path):
    noisy = run_federation(_config({"noise": "distributed"}), RunOptions(out=tmp_path / "a", progress=False))
    broken = run_federation(_config({"noise": "distributed"}), RunOptions(out=tmp_path / "b", progress=False, noise=SilentNoise()))
    claims = [json.loads((r / "summary.json").read_text())["privacy"]["epsilon_spent_max"] for r in (noisy, broken)]
    assert claims[0] == claims[1] and 0 < claims[1] <= 4.0
    w_broken = load_tensors(broken / "model.safetensors")["w"]
    w_noisy = load_tensors(noisy / "model.safetensors")["w"]
    # without noise the toy's clipped updates (norm 1, pulling w towards c) give a deterministic, small model
    assert np.abs(w_broken).max() < 1.0
    assert np.abs(w_noisy - w_broken).max() > 0.05


def _secagg_config(noise_bound: int):
    raw = toy_config(rounds=2, weighting="uniform", sparse_rows="all")
    raw["aggregation"] = {"kind": "secagg", "levels": 65536, "noise_bound": noise_bound}
    raw["privacy"] = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed", "accountant": "rdp"}
    return config_from_dict(raw)


def test_masking_without_headroom_for_the_noise_is_refused_naming_noise_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"aggregation.noise_bound.*set aggregation.noise_bound >= \d+"):
        run_federation(_secagg_config(10), RunOptions(out=tmp_path, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_under_masking_the_skellam_noise_is_added_by_clients_and_accounted(tmp_path):
    silent = SilentNoise()
    clean = run_federation(_secagg_config(4_000_000), RunOptions(out=tmp_path / "a", progress=False, noise=silent))
    plain = run_federation(
        _config({"noise": "distributed", "accountant": "rdp"}), RunOptions(out=tmp_path / "b", progress=False, noise=silent)
    )
    noisy = run_federation(_secagg_config(4_000_000), RunOptions(out=tmp_path / "c", progress=False))
    w = {name: load_tensors(r / "model.safetensors")["w"] for name, r in (("clean", clean), ("plain", plain), ("noisy", noisy))}
    np.testing.assert_allclose(w["clean"], w["plain"], atol=1e-3)  # masking without noise = the plain clipped mean
    assert np.abs(w["noisy"] - w["clean"]).max() > 0.05  # the clients' integer noise survives unmasking
    summary = json.loads((noisy / "summary.json").read_text())["privacy"]
    assert summary["accountant"] == "skellam-rdp" and 3.5 < summary["epsilon_spent_max"] <= 4.0
