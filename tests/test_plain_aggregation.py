"""Plain FedAvg through the sans-IO driver: weighted sums, dropouts, and rejected messages."""

from __future__ import annotations

import os

import numpy as np
import pytest

from aggregation import wire
from aggregation.base import AggregationAborted, ProtocolError, RoundContext, spec_for
from aggregation.driver import run_round
from aggregation.plain import UPDATE, PlainAggregator


def _ctx(n=3, dim=5, rnd=0):
    return RoundContext(os.urandom(16), rnd, tuple(range(n)), dim)


def test_weighted_sum_and_total_weight_over_the_clients_that_answered():
    ctx = _ctx()
    inputs = {i: (np.full(5, float(i), np.float32), float(i + 1)) for i in range(3)}
    out = run_round(PlainAggregator(), ctx, inputs, drop_after={1: 0})
    res = out.server_result
    assert res.contributors == (0, 2)
    assert res.total_weight == 4.0
    np.testing.assert_allclose(res.weighted_sum, np.full(5, 0 * 1 + 2 * 3.0))
    np.testing.assert_allclose(res.average, np.full(5, 1.5))
    assert out.stats.bytes_up[1] == 0 and out.stats.bytes_up[0] > 5 * 4


def test_a_round_in_which_every_client_dropped_aborts_instead_of_releasing_an_empty_sum():
    ctx = _ctx(rnd=4)
    inputs = {i: (np.ones(5, np.float32), 1.0) for i in range(3)}
    with pytest.raises(AggregationAborted, match="round 4: no client's update arrived"):
        run_round(PlainAggregator(), ctx, inputs, drop_after={0: 0, 1: 0, 2: 0})


def test_replayed_wrong_round_wrong_session_and_wrong_size_updates_are_rejected():
    ctx = _ctx()
    server = PlainAggregator().server(ctx)
    server.start()
    sid = ctx.session_id.hex()

    def update(rnd=0, session=sid, vector=None):
        vector = np.zeros(5, np.float32) if vector is None else vector
        return wire.encode(wire.Frame(UPDATE, {"round": rnd, "session": session, "weight": 1.0}, {"vector": vector}))

    good = update()
    server.receive(0, good)
    with pytest.raises(ProtocolError, match="already sent"):
        server.receive(0, good)
    with pytest.raises(ProtocolError, match="round 7"):
        server.receive(1, update(rnd=7))
    with pytest.raises(ProtocolError, match="another session"):  # a frame of an earlier run (redteam plain-replay)
        server.receive(1, update(session="00" * 16))
    with pytest.raises(ProtocolError, match=r"shape \(5,\)"):
        server.receive(1, update(vector=np.zeros(6, np.float32)))
    with pytest.raises(ProtocolError, match="non-finite"):
        server.receive(1, update(vector=np.full(5, np.nan, np.float32)))
    with pytest.raises(ProtocolError, match="not a participant"):
        server.receive(9, good)
    assert server.done is False


def test_registry_builds_plain_from_its_kind():
    agg = spec_for("plain").factory(spec_for("plain").config_cls(), [0, 1], 0)
    assert agg.kind == "plain" and agg.server_can_read_result


def test_aggregators_declare_capabilities_and_float_sums_refuse_an_integer_noise_share():
    """The runtime knows aggregators only by their Capabilities; a float aggregator handed a Skellam
    share must refuse it rather than silently drop the noise."""
    from aggregation.secagg import SecAggConfig

    ctx = RoundContext(os.urandom(16), 0, (0, 1), 4)
    plain = spec_for("plain").factory(spec_for("plain").config_cls(), [0, 1], 0)
    assert plain.capabilities.server_reads_result and plain.capabilities.integer_scale is None
    with pytest.raises(ProtocolError, match="takes no integer noise"):
        plain.client(ctx, 0, np.zeros(4, np.float32), 1.0, integer_noise=np.zeros(4, np.int64))
    secagg = spec_for("secagg").factory(SecAggConfig(), list(range(10)), 0)  # 2 clients cannot hold 1 colluder
    assert secagg.capabilities.integer_scale == secagg.quantizer.scale > 0
    ckks = spec_for("ckks").factory(spec_for("ckks").config_cls(), list(range(10)), 0)  # its mask round is SecAgg+
    assert not ckks.capabilities.server_reads_result and ckks.capabilities.integer_scale is None
    with pytest.raises(ProtocolError, match="takes no integer noise"):
        ckks.client(ctx, 0, np.zeros(4, np.float32), 1.0, integer_noise=np.zeros(4, np.int64))
