"""User-level utility under DP (issue 13): the server optimizer and the scaled touch indicators.

Both levers must be free in privacy: the server optimizer reads only the released (noised) mean
(post-processing), and the scaled indicators stay inside the one clipped, noised vector each
client already releases. The tests check the mechanics by numbers and that the ledger, the only
source of ε, is unchanged by either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from movielens_fixtures import write_ml100k

from aggregation.base import AggregateResult
from fedrlhf_secure.config import ServerOptimizerConfig, load_config
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.federation.server_optimizer import ServerOptimizer
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.clipping import clip_l2
from fedrlhf_secure.privacy.ledger import read_ledger
from fedrlhf_secure.rundir import load_tensors
from fedrlhf_secure.tasks.base import FitResult, ParamEntry, ParamSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "movielens-tiny.yaml"


# ---------------------------------------------------------------------------------------------- server optimizer
def _params():
    return {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.zeros(2, np.float32)}


def test_sgd_server_step_is_fedavg():
    opt = ServerOptimizer(ServerOptimizerConfig("sgd"), lr=0.5)
    avg = {"w": np.array([0.2, 0.4, -1.0], np.float32), "b": np.array([1.0, 2.0], np.float32)}
    out = opt.step(_params(), avg)
    np.testing.assert_allclose(out["w"], [1.1, -1.8, 0.0], atol=1e-7)
    np.testing.assert_allclose(out["b"], [0.5, 1.0], atol=1e-7)
    assert opt.state() == {}


def test_momentum_accumulates_past_released_means():
    opt = ServerOptimizer(ServerOptimizerConfig("momentum", beta1=0.9), lr=1.0)
    d1 = {"w": np.array([1.0, 0.0, 0.0], np.float32), "b": np.zeros(2, np.float32)}
    d2 = {"w": np.array([0.0, 1.0, 0.0], np.float32), "b": np.zeros(2, np.float32)}
    p = opt.step(_params(), d1)
    p = opt.step(p, d2)
    # θ2 = θ0 + d1 + (0.9·d1 + d2)
    np.testing.assert_allclose(p["w"], [1.0 + 1.9, -2.0 + 1.0, 0.5], atol=1e-6)


def test_adam_normalises_each_coordinate_and_round_trips_its_state():
    cfg = ServerOptimizerConfig("adam", beta1=0.9, beta2=0.99, tau=1e-3)
    opt = ServerOptimizer(cfg, lr=0.01)
    small = {"w": np.array([1e-4, 1.0, -1e-1], np.float32), "b": np.zeros(2, np.float32)}
    out = opt.step(_params(), small)
    step = out["w"].astype(np.float64) - _params()["w"]
    m, v = 0.1 * small["w"].astype(np.float64), 0.01 * small["w"].astype(np.float64) ** 2
    np.testing.assert_allclose(step, 0.01 * m / (np.sqrt(v) + 1e-3), rtol=1e-4, atol=1e-7)
    # the 0.1 and 1.0 coordinates move by nearly the same amount (per-coordinate scale), unlike SGD
    assert abs(step[2]) > 0.8 * abs(step[1])
    again = ServerOptimizer(cfg, lr=0.01)
    again.load_state(opt.state())
    nxt = {"w": np.array([0.3, -0.1, 0.2], np.float32), "b": np.ones(2, np.float32)}
    a, b = opt.step(out, nxt), again.step(out, nxt)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("federation.server_optimizer.kind", "lamb"),
        ("federation.server_optimizer.beta1", 1.0),
        ("federation.server_optimizer.tau", 0),
        ("federation.touch_scale", 0),
        ("federation.touch_scale", 1.5),
        ("federation.touch_floor", 0),
    ],
)
def test_bad_server_optimizer_or_touch_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
        load_config(TINY, [f"{key}={value}"])


# ---------------------------------------------------------------------------------------------- touch indicators
SPEC = ParamSpec((ParamEntry("items", (6, 4), sparse_rows=True), ParamEntry("dense", (3,))))


def _fit(rows: list[int], seed: int) -> FitResult:
    rng = np.random.default_rng(seed)
    items = np.zeros((6, 4), np.float32)
    items[rows] = rng.normal(0, 0.3, (len(rows), 4))
    touched = np.zeros(6, bool)
    touched[rows] = True
    delta = {"items": items, "dense": rng.normal(0, 0.1, 3).astype(np.float32)}
    return FitResult(delta=delta, num_examples=1, touched_rows={"items": touched})


def test_scaled_touch_indicators_decode_to_the_same_mean_and_take_s_squared_of_their_norm_share():
    fits = [_fit([0, 1, 2], 0), _fit([1, 2, 3, 4], 1), _fit([2], 2)]
    full, scaled = UpdateCodec(SPEC), UpdateCodec(SPEC, touch_scale=0.1)
    means = []
    for codec in (full, scaled):
        vecs = [codec.encode(f) for f in fits]
        res = AggregateResult(np.sum(vecs, axis=0, dtype=np.float64), 3.0, (0, 1, 2))
        means.append(codec.decode(res))
    for k in means[0]:
        np.testing.assert_allclose(means[0][k], means[1][k], rtol=1e-5, atol=1e-7)
    # row 2 is averaged over its 3 touching clients, row 5 (untouched) does not move
    np.testing.assert_allclose(means[0]["items"][2], np.mean([f.delta["items"][2] for f in fits], axis=0), rtol=1e-5)
    assert not means[0]["items"][5].any()
    v_full, v_scaled = full.encode(fits[1]), scaled.encode(fits[1])
    ind = slice(SPEC.size, None)
    assert np.sum(v_scaled[ind] ** 2) == pytest.approx(0.01 * np.sum(v_full[ind] ** 2))
    # after clipping at C, the model delta keeps more of its norm when the indicators are scaled down
    delta = slice(0, SPEC.size)
    c = 1.0
    kept_full = np.linalg.norm(clip_l2(v_full, c)[delta]) / np.linalg.norm(v_full[delta])
    kept_scaled = np.linalg.norm(clip_l2(v_scaled, c)[delta]) / np.linalg.norm(v_scaled[delta])
    assert kept_full < 0.5 and kept_scaled > 0.95


def test_a_noisy_count_near_zero_is_floored_not_divided_by():
    codec = UpdateCodec(SPEC, touch_scale=0.5, touch_floor=4.0)
    s = np.zeros(codec.dim)
    s[:24] = 1.0  # every item coordinate sums to 1
    s[SPEC.size : SPEC.size + 6] = 0.5 * np.array([0.6, 10.0, 0.2, 4.0, 2.0, 8.0])  # noisy counts, scaled
    out = codec.decode(AggregateResult(s, 10.0, tuple(range(10))))["items"][:, 0]
    np.testing.assert_allclose(out, [1 / 4, 1 / 10, 0.0, 1 / 4, 1 / 4, 1 / 8], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- post-processing, end to end
CLIENT_DP = [
    "task.num_clients=8",
    "federation.rounds=2",
    "federation.weighting=uniform",
    "privacy.mode=client",
    "privacy.epsilon=8",
    "privacy.delta=1e-5",
    "privacy.accountant=rdp",
    "privacy.noise=distributed",
]


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    return write_ml100k(tmp_path_factory.mktemp("ml"), n_users=8, n_items=40, per_user=20).parent


def _run(tmp: Path, data: Path, extra: list[str]) -> tuple[dict, dict, Path]:
    config = load_config(TINY, CLIENT_DP + extra)
    run = run_federation(config, RunOptions(data_dir=data, out=tmp, progress=False))
    _, entries = read_ledger(run / "ledger")
    ledger = {
        c: [(e.round, e.mechanism, e.noise_multiplier, e.sensitivity, round(e.epsilon_after, 12)) for e in es] for c, es in entries.items()
    }
    return ledger, json.loads((run / "summary.json").read_text()), run


def test_server_adam_and_scaled_indicators_leave_the_ledger_unchanged_but_change_the_model(tmp_path, ml_dir):
    base_ledger, base_summary, base_run = _run(tmp_path / "sgd", ml_dir, [])
    adam_ledger, adam_summary, adam_run = _run(
        tmp_path / "adam", ml_dir, ["federation.server_optimizer.kind=adam", "federation.server_lr=0.01", "federation.touch_scale=0.1"]
    )
    assert len(base_ledger) == 8 and all(len(v) == 2 for v in base_ledger.values())
    assert adam_ledger == base_ledger  # same mechanism, same z, same C, same ε after every round
    eps = base_summary["privacy"]["epsilon_spent_max"]
    assert adam_summary["privacy"]["epsilon_spent_max"] == eps and 0 < eps <= 8
    m0, m1 = load_tensors(base_run / "model.safetensors"), load_tensors(adam_run / "model.safetensors")
    assert any(not np.allclose(m0[k], m1[k]) for k in m0)


def test_under_ckks_the_hosts_apply_the_same_server_optimizer_as_a_server_that_reads_the_mean(tmp_path):
    """CKKS: only the hosts read the aggregate, so each keeps the optimizer state; the model must match plain."""
    from toy_task import toy_config

    from fedrlhf_secure.config import config_from_dict

    models = {}
    for kind in ("plain", "ckks"):
        raw = toy_config(rounds=3)
        raw["aggregation"] = {"kind": kind}
        raw["federation"].update(server_lr=0.05, server_optimizer={"kind": "adam", "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
        run = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / kind, progress=False))
        models[kind] = load_tensors(run / "model.safetensors")
    raw = toy_config(rounds=3)
    sgd = load_tensors(run_federation(config_from_dict(raw), RunOptions(out=tmp_path / "sgd", progress=False)) / "model.safetensors")
    for name in models["plain"]:
        assert models["ckks"][name] == pytest.approx(models["plain"][name], rel=1e-3, abs=1e-5)
    assert any(not np.allclose(models["plain"][k], sgd[k]) for k in sgd)


# ---------------------------------------------------------------------------------------------- the bench grid
def test_the_utility_grid_applies_the_levers_per_mode_and_no_levers_reproduces_the_plain_mechanisms():
    from fedrlhf_secure.bench.dp import USER_LEVEL_LEVERS, _run_overrides

    with_levers = _run_overrides("client", 8.0, "plain", 1e-5)
    assert set(USER_LEVEL_LEVERS["client"]) <= set(with_levers) and USER_LEVEL_LEVERS["client"]
    plain = _run_overrides("client", 8.0, "plain", 1e-5, levers=False)
    assert not any(o.startswith(("federation.touch", "federation.server")) for o in plain)
    assert _run_overrides("client", math.inf, "plain", 1e-5) == ["aggregation.kind=plain", "privacy.mode=none"]
    config = load_config(ROOT / "configs" / "movielens.yaml", with_levers)
    assert config.federation.touch_scale < 1 and config.privacy.mode == "client"


# ---------------------------------------------------------------------------------------------- the targets, real data
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "target"),
    [
        ("client", 0.685),
        # record level: distributed DP-SGD, 5 rounds x 2 aggregated steps (central noise under plain
        # aggregation; 0.68365 measured, docs/dp.md); the local Opacus mechanism stays at 0.640
        ("record-distributed", 0.665),
    ],
)
def test_user_level_dp_at_epsilon_8_reaches_the_issue_13_target_on_u1(tmp_path, shared_datasets, mode, target):
    """u1, one client per user (943), 5 rounds, ε = 8, δ = 1e-5, plain aggregation, with the levers
    ``bench dp --utility`` applies; the ledger's ε stays within the budget."""
    from fedrlhf_secure.bench.dp import _run_overrides

    config = load_config(ROOT / "configs" / "movielens.yaml", _run_overrides(mode, 8.0, "plain", 1e-5))
    run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False))
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["privacy"]["epsilon_spent_max"] <= 8.0
    if mode == "record-distributed":  # 10 aggregations in the 5 rounds, each accounted
        assert summary["privacy"]["steps_per_round"] == 2 and summary["privacy"]["record_noise"] == "central"
    assert summary["final"]["heldout_accuracy"] >= target
