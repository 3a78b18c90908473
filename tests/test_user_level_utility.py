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
        ("federation.server_optimizer.average_counts", "often"),
        ("task.validation", "u1.test"),
    ],
)
def test_bad_server_optimizer_or_touch_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
        load_config(TINY, [f"{key}={value}"])


def test_a_bad_average_counts_value_exits_2_naming_the_key(tmp_path, capsys):
    from fedrlhf_secure.cli import main

    code = main(["run", str(TINY), "--out", str(tmp_path), "--set", "federation.server_optimizer.average_counts=often"])
    assert code == 2
    err = capsys.readouterr().err
    assert "average_counts" in err and "Traceback" not in err


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


# ---------------------------------------------------------------------------------------------- touch counts averaged over rounds
def _released(counts: list[float], row_sum: float = 12.0) -> AggregateResult:
    """An aggregate whose item rows all sum to ``row_sum`` and whose (scale-1) indicator sums are ``counts``."""
    codec = UpdateCodec(SPEC)
    s = np.zeros(codec.dim)
    s[:24] = row_sum
    s[SPEC.size : SPEC.size + 6] = counts
    return AggregateResult(s, 20.0, tuple(range(20)))


def test_averaged_counts_divide_each_row_by_the_mean_of_the_counts_released_so_far():
    codec = UpdateCodec(SPEC, touch_floor=1.0)
    opt = ServerOptimizer(ServerOptimizerConfig("sgd", average_counts=True), lr=1.0)
    zero = {"items": np.zeros((6, 4), np.float32), "dense": np.zeros(3, np.float32)}
    first = opt.apply(zero, codec, _released([2, 4, 6, 8, 10, 12]))
    # round 0: the mean of one release is that release (the plain decoder's answer)
    np.testing.assert_allclose(first["items"][:, 0], 12.0 / np.array([2, 4, 6, 8, 10, 12]), rtol=1e-6)
    np.testing.assert_array_equal(first["items"], codec.decode(_released([2, 4, 6, 8, 10, 12]))["items"])
    step = opt.apply(zero, codec, _released([6, 8, 2, 8, 14, 12]))
    # round 1: each row divided by the mean of its two estimates (4, 6, 4, 8, 12, 12), not this round's alone
    np.testing.assert_allclose(step["items"][:, 0], 12.0 / np.array([4, 6, 4, 8, 12, 12]), rtol=1e-6)
    alone = codec.decode(_released([6, 8, 2, 8, 14, 12]))["items"][:, 0]
    assert alone[2] == pytest.approx(6.0) and step["items"][2, 0] == pytest.approx(3.0)
    # dense coordinates are a plain mean either way
    np.testing.assert_allclose(step["dense"], 0.0)


def test_averaged_counts_shrink_the_count_noise_by_the_square_root_of_the_rounds():
    """Noised counts (std 10 around 20 raters): after 9 releases the mean's error is about a third."""
    rng = np.random.default_rng(3)
    codec = UpdateCodec(SPEC, touch_floor=1.0)
    opt = ServerOptimizer(ServerOptimizerConfig("sgd", average_counts=True), lr=1.0)
    truth = 20.0
    zero = {"items": np.zeros((6, 4), np.float32), "dense": np.zeros(3, np.float32)}
    errs_alone, errs_mean = [], []
    for _ in range(400):
        opt = ServerOptimizer(ServerOptimizerConfig("sgd", average_counts=True), lr=1.0)
        for _r in range(9):
            counts = truth + rng.normal(0, 10.0, 6)
            out = opt.apply(zero, codec, _released(list(counts), row_sum=truth))
        errs_alone.append(counts - truth)
        errs_mean.append(opt.counts["items"] / opt.count_rounds - truth)
    ratio = np.std(errs_mean) / np.std(errs_alone)
    assert 0.28 < ratio < 0.39  # 1/√9 = 0.333
    assert out["items"].shape == (6, 4)


def test_averaged_counts_survive_a_checkpoint_and_a_malformed_state_is_refused():
    codec = UpdateCodec(SPEC, touch_floor=1.0)
    cfg = ServerOptimizerConfig("momentum", beta1=0.5, average_counts=True)
    opt = ServerOptimizer(cfg, lr=1.0)
    zero = {"items": np.zeros((6, 4), np.float32), "dense": np.zeros(3, np.float32)}
    p = opt.apply(zero, codec, _released([2, 4, 6, 8, 10, 12]))
    state = opt.state()
    assert int(state["count_rounds"][0]) == 1 and "n/items" in state and "m/items" in state
    again = ServerOptimizer(cfg, lr=1.0)
    again.load_state(state)
    nxt = _released([4, 4, 4, 4, 4, 4], row_sum=3.0)
    a, b = opt.apply(p, codec, nxt), again.apply(p, codec, nxt)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a resume that lost the round count (or the sums) would divide by the wrong mean: refused
    with pytest.raises(ValueError, match="count sums"):
        ServerOptimizer(cfg, lr=1.0).load_state({k: v for k, v in state.items() if k != "count_rounds"})
    # without averaging, nothing is kept (a plain sgd server has no state to checkpoint)
    plain = ServerOptimizer(ServerOptimizerConfig("sgd"), lr=1.0)
    plain.apply(zero, codec, _released([2, 4, 6, 8, 10, 12]))
    assert plain.state() == {}


def test_averaged_counts_under_secagg_equal_plain_within_quantisation(tmp_path, ml_dir):
    """No noise (privacy.mode none), so the two runs differ only by SecAgg's fixed-point rounding."""
    models = {}
    for kind in ("plain", "secagg"):
        config = load_config(
            TINY,
            [
                "task.num_clients=8",
                "federation.rounds=3",
                "federation.weighting=uniform",
                "federation.touch_scale=0.1",
                "federation.server_optimizer.average_counts=true",
                f"aggregation.kind={kind}",
            ],
        )
        run = run_federation(config, RunOptions(data_dir=ml_dir, out=tmp_path / kind, progress=False))
        models[kind] = load_tensors(run / "model.safetensors")
    for name in models["plain"]:
        np.testing.assert_allclose(models["secagg"][name], models["plain"][name], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- validation split
def test_the_validation_split_holds_out_part_of_the_training_ratings_and_never_reads_the_test_file(tmp_path):
    from fedrlhf_secure.tasks.movielens.data import load_split

    data = write_ml100k(tmp_path, n_users=10, n_items=40, per_user=20).parent
    full = load_split(data / "ml-100k", "u1", 0.25, seed=0)
    val = load_split(data / "ml-100k", "u1", 0.25, seed=0, validation=True)
    records = {(int(u), int(i)) for u, i in zip(full.train.user, full.train.item, strict=True)}
    tr = {(int(u), int(i)) for u, i in zip(val.train.user, val.train.item, strict=True)}
    ho = {(int(u), int(i)) for u, i in zip(val.test.user, val.test.item, strict=True)}
    test = {(int(u), int(i)) for u, i in zip(full.test.user, full.test.item, strict=True)}
    assert tr | ho == records and not tr & ho and not ho & test and len(test) > 0
    assert abs(len(ho) - 0.25 * len(records)) <= full.catalogue.num_users  # per-user rounding
    (data / "ml-100k" / "u1.test").write_text("not a ratings file\n")  # the held-out file is not even read
    again = load_split(data / "ml-100k", "u1", 0.25, seed=0, validation=True)
    np.testing.assert_array_equal(again.test.item, val.test.item)


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
        tmp_path / "adam",
        ml_dir,
        [
            "federation.server_optimizer.kind=adam",
            "federation.server_lr=0.01",
            "federation.touch_scale=0.1",
            "federation.server_optimizer.average_counts=true",
        ],
    )
    assert len(base_ledger) == 8 and all(len(v) == 2 for v in base_ledger.values())
    assert adam_ledger == base_ledger  # same mechanism, same z, same C, same ε after every round
    eps = base_summary["privacy"]["epsilon_spent_max"]
    assert adam_summary["privacy"]["epsilon_spent_max"] == eps and 0 < eps <= 8
    m0, m1 = load_tensors(base_run / "model.safetensors"), load_tensors(adam_run / "model.safetensors")
    assert any(not np.allclose(m0[k], m1[k]) for k in m0)
    # control: the comparison does see a change that costs privacy (a larger clip norm is a larger
    # sensitivity, so the same ε needs other noise and the ledger's entries differ)
    wider_ledger, _, _ = _run(tmp_path / "wider", ml_dir, ["privacy.clip_norm=2"])
    assert wider_ledger != base_ledger


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
    assert config.federation.server_optimizer.average_counts and config.federation.server_lr == 2


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
    ``bench dp --utility`` applies (client level: touch_scale 0.1, touch_floor 10, server_lr 2 and the
    touch counts averaged over rounds; measured 0.6858 / 0.6845 / 0.6868 / 0.6854 at seeds 0-3, so a run can land a
    few hundredths of a point either side of the target); the ledger's ε stays within the budget."""
    from fedrlhf_secure.bench.dp import _run_overrides

    config = load_config(ROOT / "configs" / "movielens.yaml", _run_overrides(mode, 8.0, "plain", 1e-5))
    run = run_federation(config, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False))
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["privacy"]["epsilon_spent_max"] <= 8.0
    if mode == "record-distributed":  # 10 aggregations in the 5 rounds, each accounted
        assert summary["privacy"]["steps_per_round"] == 2 and summary["privacy"]["record_noise"] == "central"
    assert summary["final"]["heldout_accuracy"] >= target
