"""SecAgg / SecAgg+ through the in-process driver: the masked weighted average equals plain FedAvg
within quantisation error, with dropouts at every stage, and aborts (revealing nothing) below t."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregation.base import AggregationAborted, RoundContext, spec_for
from aggregation.driver import run_round
from aggregation.plain import PlainAggregator
from aggregation.secagg import SecAggAggregator, SecAggConfig, build
from aggregation.secagg.graph import neighbours

ADVERTISE, SHARE, MASK, CONSISTENCY, UNMASK = 0, 1, 2, 3, 4  # drop_after: the client stops before answering that stage


def _mechanics(**kw) -> SecAggConfig:
    """Explicit k / t for protocol mechanics, stated bounds of 0 colluders and 0 planned dropouts (so
    any k, t is admitted; the bounds themselves are tested in test_secagg_params.py)."""
    return SecAggConfig(colluders=0.0, dropouts=0.0, **kw)


def _inputs(n, d, seed=0, max_weight=700):
    rng = np.random.default_rng(seed)
    return {c: (rng.uniform(-1, 1, d).astype(np.float32), float(rng.integers(1, max_weight + 1))) for c in range(n)}


def _ctx(n, d, rnd=0):
    """A fixed session per (n, d, round): the public graph, and so which dropout patterns a round
    survives, is deterministic; keys, seeds and masks stay random."""
    return RoundContext(hashlib.sha256(f"{n}/{d}/{rnd}".encode()).digest()[:16], rnd, tuple(range(n)), d)


def _plain(ctx, inputs, contributors):
    pctx = RoundContext(ctx.session_id, ctx.round, tuple(contributors), ctx.dim)
    return run_round(PlainAggregator(), pctx, {c: inputs[c] for c in contributors}).server_result


def _tolerance(agg: SecAggAggregator, inputs, contributors) -> float:
    """Stochastic rounding: at most one unit (1/scale) per client in the weighted sum."""
    total = sum(inputs[c][1] for c in contributors)
    return len(contributors) / agg.quantizer.scale / total + 1e-6


def _check_against_plain(agg, ctx, inputs, drop_after):
    p = agg.parameters(ctx)
    graph = neighbours(ctx.session_id, ctx.round, ctx.participants, p.k)
    assert _model(graph, len(ctx.participants), p.t, p.quorum, drop_after) is not None  # the scenario is survivable
    out = run_round(agg, ctx, inputs, drop_after=drop_after)
    res = out.server_result
    plain = _plain(ctx, inputs, res.contributors)
    assert res.contributors == plain.contributors
    assert res.total_weight == pytest.approx(plain.total_weight, abs=1e-9)
    err = np.abs(res.average - plain.average).max()
    assert err <= _tolerance(agg, inputs, res.contributors)
    return res, out


def test_weighted_average_equals_plain_fedavg_without_dropouts():
    n, d = 40, 500
    agg = build(SecAggConfig(), list(range(n)), 0)
    res, out = _check_against_plain(agg, _ctx(n, d), _inputs(n, d), {})
    assert res.contributors == tuple(range(n))
    assert out.stats.bytes_up[0] < 4 * (d + 1) + 4096 + 40 * 200  # uint32 masked vector + keys + shares


@pytest.mark.parametrize("stage", [ADVERTISE, SHARE, MASK, CONSISTENCY, UNMASK])
def test_dropouts_at_each_stage_still_give_the_weighted_average(stage):
    n, d = 30, 200
    agg = build(_mechanics(neighbours=8), list(range(n)), 0)
    drops = {3: stage, 11: stage, 20: stage}
    res, _ = _check_against_plain(agg, _ctx(n, d), _inputs(n, d, seed=stage), drops)
    expected_in = stage >= CONSISTENCY  # a client that masked its input counts even if it drops afterwards
    assert (3 in res.contributors) is expected_in and len(res.contributors) == (n if expected_in else n - 3)


def test_dropouts_mixed_across_all_stages_in_one_round():
    n, d = 50, 300
    agg = build(_mechanics(neighbours=10), list(range(n)), 0)
    drops = {0: ADVERTISE, 1: SHARE, 2: MASK, 3: UNMASK, 4: CONSISTENCY, 17: MASK, 33: SHARE}
    res, _ = _check_against_plain(agg, _ctx(n, d), _inputs(n, d, seed=5), drops)
    assert set(res.contributors) == set(range(n)) - {0, 1, 2, 17, 33}


def test_classic_secagg_full_graph():
    n, d = 12, 100
    cfg = SecAggConfig(neighbours=n - 1)
    agg = build(cfg, list(range(n)), 0)
    # 2 colluders, 2 dropouts: t in 3..9 all hold exactly; the middle one is taken
    assert cfg.degree(n) == 11 and cfg.shamir_threshold(n) == 6 and cfg.parameters(n).quorum == 8
    _check_against_plain(agg, _ctx(n, d), _inputs(n, d), {4: MASK, 5: ADVERTISE})


def test_moderate_n_200():
    n, d = 200, 1000
    agg = build(_mechanics(neighbours=7), list(range(n)), 0)
    drops = {c: MASK for c in range(0, n, 20)}
    res, _ = _check_against_plain(agg, _ctx(n, d), _inputs(n, d), drops)
    assert len(res.contributors) == n - 10


@pytest.mark.slow
def test_n_1000_with_ten_percent_dropout():
    n, d = 1000, 2000
    agg = build(SecAggConfig(), list(range(n)), 0)
    rng = np.random.default_rng(3)
    drops = {int(c): int(rng.integers(0, 5)) for c in rng.choice(n, 100, replace=False)}
    res, _ = _check_against_plain(agg, _ctx(n, d), _inputs(n, d), drops)
    assert len(res.contributors) >= 900 - 100


def test_too_few_survivors_abort_with_a_clear_error():
    n, d = 10, 50
    agg = build(SecAggConfig(neighbours=9), list(range(n)), 0)  # t = 5, quorum 6
    drops = {c: MASK for c in range(6)}  # 4 masked inputs < t
    with pytest.raises(AggregationAborted, match=r"only 4 clients sent masked inputs, threshold is 5"):
        run_round(agg, _ctx(n, d), _inputs(n, d), drop_after=drops)


def test_too_few_advertisers_abort_before_anything_is_shared():
    n = 10
    agg = build(SecAggConfig(neighbours=9), list(range(n)), 0)
    with pytest.raises(AggregationAborted, match="advertised keys, threshold is 5"):
        run_round(agg, _ctx(n, 5), _inputs(n, 5), drop_after={c: ADVERTISE for c in range(6)})


def test_a_lone_client_cannot_be_securely_aggregated():
    agg = build(SecAggConfig(), [0], 0)
    with pytest.raises(AggregationAborted, match="at least 2 participants"):
        run_round(agg, _ctx(1, 5), _inputs(1, 5))


def test_distributed_dp_integer_noise_enters_the_sum_exactly():
    n, d = 8, 20
    agg = build(SecAggConfig(noise_bound=1000, max_weight=10.0), list(range(n)), 0)
    ctx = _ctx(n, d)
    inputs = {c: (np.zeros(d, np.float32), 1.0) for c in range(n)}
    noise = {c: np.random.default_rng(c).integers(-50, 51, d).astype(np.int64) for c in range(n)}

    class WithNoise(SecAggAggregator):
        def client(self, ctx, cid, vector, weight):
            return super().client(ctx, cid, vector, weight, integer_noise=noise[cid])

    noisy = WithNoise(agg.config, n, agg.identities)
    res = run_round(noisy, ctx, inputs).server_result
    expected = sum(noise.values()) / noisy.quantizer.scale
    np.testing.assert_allclose(res.weighted_sum, expected, atol=1e-12)


def test_registry_and_config_section_build_secagg():
    from fedrlhf_secure.config import _plugin

    section = _plugin(
        "aggregation",
        {"kind": "secagg", "neighbours": 18, "threshold": "auto", "clip_range": 2.0, "bits": "auto", "colluders": 0.05},
        spec_for,
        "test.yaml",
    )
    assert section.params == SecAggConfig(neighbours=18, clip_range=2.0, colluders=0.05)
    agg = spec_for("secagg").factory(section.params, list(range(20)), 0)
    assert agg.kind == "secagg" and agg.quantizer.clip == 2.0
    from fedrlhf_secure.configtypes import ConfigError

    with pytest.raises(ConfigError, match="aggregation.*threshold 9 exceeds neighbours 6"):
        _plugin("aggregation", {"kind": "secagg", "neighbours": 6, "threshold": 9}, spec_for, "test.yaml")


def _model(graph, n, t, q, drops):
    """Reference model of who survives each stage (clients sit out with < t live neighbours; the
    consistency round needs q survivors and q signers)."""
    alive = lambda c, stage: drops.get(c, 5) > stage  # noqa: E731  (answers the message of that stage)
    u1 = {c for c in range(n) if alive(c, 0)}
    if len(u1) < t:
        return None
    u2 = {c for c in u1 if alive(c, 1) and len(graph[c] & u1) >= t}
    if len(u2) < t:
        return None
    u3 = {c for c in u2 if alive(c, 2) and len(graph[c] & u2) >= t}
    if len(u3) < max(t, q):
        return None
    u4 = {c for c in u3 if alive(c, 3)}
    if len(u4) < max(t, q):
        return None
    responders = {c for c in u4 if alive(c, 4)}
    for v in u3:
        if len(graph[v] & u2 & responders) < t:
            return None
    for v in u2 - u3:
        if graph[v] & u3 and len(graph[v] & responders) < t:
            return None
    return u3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 24),
    k=st.integers(2, 30),
    t_offset=st.integers(0, 3),
    d=st.integers(1, 64),
    data=st.data(),
)
def test_property_masked_sum_matches_plain_or_aborts_exactly_when_secrets_are_lost(n, k, t_offset, d, data):
    """Over n, k (even, odd, and n < k), t and dropout sets at every stage: the round aborts exactly
    when the reference model says fewer than t parties (or share holders) are left, and otherwise
    returns the weighted average of exactly the clients that masked their input."""
    kk = min(k, n - 1)
    t = max(1, kk // 2 + 1 - t_offset)
    agg = build(_mechanics(neighbours=k, threshold=t), list(range(n)), 0)
    drops = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 4), max_size=n))
    inputs = _inputs(n, d, seed=n * 100 + d)
    ctx = RoundContext(os.urandom(16), 0, tuple(range(n)), d)
    expected = _model(neighbours(ctx.session_id, ctx.round, ctx.participants, kk), n, t, n // 2 + 1, drops)
    if expected is None:
        with pytest.raises(AggregationAborted, match="threshold|shares|quorum"):
            run_round(agg, ctx, inputs, drop_after=drops)
        return
    res = run_round(agg, ctx, inputs, drop_after=drops).server_result
    assert set(res.contributors) == expected
    plain = _plain(ctx, inputs, res.contributors)
    assert res.total_weight == pytest.approx(plain.total_weight)
    assert np.abs(res.average - plain.average).max() <= _tolerance(agg, inputs, res.contributors)
