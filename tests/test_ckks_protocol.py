"""The CKKS round: correct weighted sums, a server that cannot read, dropouts, binding, rotation."""

from __future__ import annotations

import os

import numpy as np
import pytest

from aggregation import wire
from aggregation.base import AggregationAborted, ProtocolError, RoundContext, spec_for
from aggregation.ckks import CKKSConfig, CKKSServer, codec, factory
from aggregation.driver import run_round
from aggregation.plain import PlainAggregator

CLIENTS = tuple(range(6))
DIM = 5000  # > 2 ciphertexts at N=4096: exercises chunking


def _inputs(seed=0, dim=DIM, clients=CLIENTS, scale=1e-2):
    rng = np.random.default_rng(seed)
    return {c: ((rng.normal(size=dim) * scale).astype(np.float32), float(rng.integers(1, 400))) for c in clients}


def _ctx(rnd=0, dim=DIM, clients=CLIENTS, session=None):
    return RoundContext(session or os.urandom(16), rnd, tuple(clients), dim)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_weighted_average_matches_plain_fedavg_within_1e4_relative():
    inputs = _inputs()
    ctx = _ctx()
    plain = run_round(PlainAggregator(), ctx, inputs).readable_result()
    out = run_round(factory(CKKSConfig(), CLIENTS, 0), ctx, inputs)
    enc = out.readable_result()
    assert out.server_result is None
    assert enc.contributors == plain.contributors == CLIENTS
    assert enc.total_weight == pytest.approx(plain.total_weight, rel=1e-6)
    assert _rel(enc.average, plain.average) < 1e-4
    assert _rel(enc.weighted_sum, plain.weighted_sum) < 1e-4
    # every client decrypts the same aggregate
    sums = [r.weighted_sum for r in out.client_results.values()]
    assert len(sums) == len(CLIENTS) and all(np.array_equal(s, sums[0]) for s in sums)


def test_registered_as_ckks_and_the_server_cannot_read_the_result():
    spec = spec_for("ckks")
    assert spec.config_cls is CKKSConfig
    agg = spec.factory(CKKSConfig(), CLIENTS, 0)
    assert agg.kind == "ckks" and agg.server_can_read_result is False


def test_server_context_holds_no_key_and_cannot_decrypt_what_it_sees():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = _ctx()
    seen: list[tuple[int, int, bytes]] = []
    inputs = _inputs()
    server = agg.server(ctx)
    assert not server._context.is_private() and not server._context.has_secret_key()
    run_round(agg, ctx, inputs, hook=lambda s, d, b: seen.append((s, d, b)))
    updates = [b for s, d, b in seen if d == -1]
    aggregate = next(b for s, d, b in seen if s == -1 and wire.decode(b).kind == "ckks/aggregate")
    for data in (updates[0], aggregate):
        frame = wire.decode(data)
        blobs = codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], agg.config, DIM + 1)
        chunks = codec.load_chunks(blobs, server._context, agg.config, DIM + 1)
        with pytest.raises(ValueError, match="secret"):
            chunks[0].decrypt()
    # and no update's float32 bytes appear anywhere in the server's view
    needle = inputs[0][0][:4].tobytes()
    assert not any(needle in b for _, _, b in seen)


def test_a_public_context_with_a_secret_key_is_refused_by_the_server():
    from aggregation.ckks.keys import KeyPackageError, PublicContext
    from aggregation.ckks.params import new_secret_context, secret_context_bytes

    cfg = CKKSConfig()
    leaky = PublicContext(b"\0" * 16, 0, secret_context_bytes(new_secret_context(cfg)), b"\0" * 64)
    with pytest.raises(KeyPackageError):
        CKKSServer(_ctx(), cfg, leaky)


def test_dropped_clients_contribute_nothing_and_the_rest_still_decrypt():
    inputs = _inputs(1)
    ctx = _ctx()
    # 1 drops before sending; 4 sends its update but never receives the aggregate
    out = run_round(factory(CKKSConfig(), CLIENTS, 0), ctx, inputs, drop_after={1: 0, 4: 1})
    res = out.readable_result()
    survivors = [c for c in CLIENTS if c != 1]
    assert res.contributors == tuple(survivors)
    assert sorted(out.client_results) == [c for c in survivors if c != 4]
    want_s = sum(inputs[c][1] * inputs[c][0].astype(np.float64) for c in survivors)
    want_w = sum(inputs[c][1] for c in survivors)
    assert res.total_weight == pytest.approx(want_w, rel=1e-6)
    assert _rel(res.weighted_sum, want_s) < 1e-4


def test_round_aborts_when_every_client_drops():
    with pytest.raises(AggregationAborted):
        run_round(factory(CKKSConfig(), CLIENTS, 0), _ctx(), _inputs(), drop_after={c: 0 for c in CLIENTS})


def _one_update(agg, ctx, cid=0, inputs=None):
    inputs = inputs or _inputs()
    client = agg.client(ctx, cid, *inputs[cid])
    server = agg.server(ctx)
    request = dict(server.start())[cid]
    return server, client.receive(request)[0]


def test_replayed_update_and_other_round_or_session_are_rejected_without_changing_state():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = _ctx(rnd=3)
    server, update = _one_update(agg, ctx)
    assert server.receive(0, update) == []
    with pytest.raises(ProtocolError, match="already sent"):
        server.receive(0, update)
    # the same bytes from a different round / session are refused by the binding
    other_round = CKKSServer(_ctx(rnd=4, session=ctx.session_id), agg.config, agg.keys.public(0))
    with pytest.raises(ProtocolError, match="round"):
        other_round.receive(0, update)
    other_session = CKKSServer(_ctx(rnd=3), agg.config, agg.keys.public(0))
    with pytest.raises(ProtocolError, match="session"):
        other_session.receive(0, update)
    with pytest.raises(ProtocolError, match="not a participant"):
        server.receive(99, update)


def test_keys_rotate_per_round_when_configured_and_an_old_key_cannot_join():
    agg = factory(CKKSConfig(rotate_keys="round"), CLIENTS, 0)
    session = os.urandom(16)
    k0 = agg.keys.public(0).key_id
    out = run_round(agg, _ctx(0, session=session), _inputs())
    assert out.readable_result().contributors == CLIENTS
    k1 = agg.keys.public(1).key_id
    assert k0 != k1
    # an update encrypted under round 0's key is refused in round 1 (key_id binding)
    old = factory(CKKSConfig(rotate_keys="round"), CLIENTS, 0)
    server1 = agg.server(_ctx(1, session=session))
    _, update = _one_update(old, _ctx(1, session=session))
    with pytest.raises(ProtocolError, match="another CKKS key"):
        server1.receive(0, update)


def test_per_run_keys_differ_between_runs_and_stay_fixed_within_one():
    a, b = factory(CKKSConfig(), CLIENTS, 0), factory(CKKSConfig(), CLIENTS, 0)
    assert a.keys.public(a.epoch(0)).key_id == a.keys.public(a.epoch(7)).key_id
    assert a.keys.public(0).key_id != b.keys.public(0).key_id


def test_aggregate_overflowing_the_modulus_is_refused_before_encryption():
    cfg = CKKSConfig()
    agg = factory(cfg, CLIENTS, 0)
    big = np.full(DIM, 1e5, dtype=np.float32)
    with pytest.raises(ValueError, match="coeff_mod_bit_sizes"):
        agg.client(_ctx(), 0, big, 100.0)


def test_client_rejects_an_aggregate_with_a_forged_contributor_list():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = _ctx()
    inputs = _inputs()
    client = agg.client(ctx, 0, *inputs[0])
    server = agg.server(ctx)
    update = client.receive(dict(server.start())[0])[0]
    server.receive(0, update)
    msg = dict(server.close_stage())[0]
    frame = wire.decode(msg)
    forged = wire.encode(wire.Frame(frame.kind, {**frame.header, "contributors": [0, 77]}, frame.tensors))
    with pytest.raises(ProtocolError, match="contributor"):
        client.receive(forged)
    client.receive(msg)
    res = client.result()
    assert res.contributors == (0,)
    assert res.total_weight == pytest.approx(inputs[0][1], rel=1e-6)
    assert _rel(res.weighted_sum, inputs[0][1] * inputs[0][0].astype(np.float64)) < 1e-4
