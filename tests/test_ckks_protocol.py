"""The CKKS round: correct weighted sums, a server that cannot read, dropouts, binding, rotation."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ckks_rounds import to_updates

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


def _bound(agg, ctx):
    """Six flooding standard deviations plus the check tolerance: what an honest aggregate may differ by."""
    return 6 * agg.plan.flood_sigma(len(ctx.participants), ctx.dim + 1) + agg.plan.tolerance(len(ctx.participants))


def test_weighted_sum_matches_plain_fedavg_within_ckks_precision_plus_flooding():
    inputs = _inputs()
    ctx = _ctx()
    agg = factory(CKKSConfig(), CLIENTS, 0)
    plain = run_round(PlainAggregator(), ctx, inputs).readable_result()
    out = run_round(agg, ctx, inputs)
    enc = out.readable_result()
    assert out.server_result is None
    assert enc.contributors == plain.contributors == CLIENTS
    bound = _bound(agg, ctx)
    assert abs(enc.total_weight - plain.total_weight) < bound
    err = enc.weighted_sum - plain.weighted_sum
    assert np.max(np.abs(err)) < bound
    # the error is the flooding noise: its standard deviation is sigma, not the (tiny) CKKS error
    sigma = agg.plan.flood_sigma(len(CLIENTS), DIM + 1)
    assert 0.9 * sigma < float(np.std(err)) < 1.1 * sigma
    # every client decrypts the same aggregate and adds the same noise: the hosts' models agree
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
    update = next(b for s, d, b in seen if d == -1 and wire.decode(b).kind == "ckks/update")
    aggregate = next(b for s, d, b in seen if s == -1 and wire.decode(b).kind == "ckks/aggregate")
    for data in (update, aggregate):
        frame = wire.decode(data)
        blobs = codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], agg.config, server.length)
        chunks = codec.load_chunks(blobs, server._context, agg.config, server.length)
        with pytest.raises(ValueError, match="secret"):
            chunks[0].decrypt()
    # and no update's float32 bytes appear anywhere in the server's view
    needle = inputs[0][0][:4].tobytes()
    assert not any(needle in b for _, _, b in seen)


def test_a_public_context_with_a_secret_key_is_refused_by_the_server():
    from aggregation.ckks.keys import KeyPackageError, PublicContext
    from aggregation.ckks.params import new_secret_context, secret_context_bytes

    cfg = CKKSConfig()
    agg = factory(cfg, CLIENTS, 0)
    leaky = PublicContext(b"\0" * 16, 0, secret_context_bytes(new_secret_context(cfg)), b"\0" * 64)
    with pytest.raises(KeyPackageError):
        CKKSServer(_ctx(), cfg, leaky, agg.plan, agg.masks)


def test_dropouts_before_and_after_the_masked_input_and_the_rest_still_decrypt_the_survivors_sum():
    inputs = _inputs(1)
    ctx = _ctx()
    agg = factory(CKKSConfig(), CLIENTS, 0)
    # 1 drops after sharing its keys (its pairwise masks are recovered from its neighbours' shares);
    # 4 answers the unmask request but never receives the aggregate; 5 drops before advertising
    out = run_round(agg, ctx, inputs, drop_after={1: 2, 4: 5, 5: 0})
    res = out.readable_result()
    survivors = [0, 2, 3, 4]
    assert res.contributors == tuple(survivors)
    assert sorted(out.client_results) == [0, 2, 3]
    want_s = sum(inputs[c][1] * inputs[c][0].astype(np.float64) for c in survivors)
    want_w = sum(inputs[c][1] for c in survivors)
    bound = _bound(agg, ctx)
    assert abs(res.total_weight - want_w) < bound
    assert np.max(np.abs(res.weighted_sum - want_s)) < bound


def test_round_aborts_when_every_client_drops():
    with pytest.raises(AggregationAborted):
        run_round(factory(CKKSConfig(), CLIENTS, 0), _ctx(), _inputs(), drop_after={c: 0 for c in CLIENTS})


def test_replayed_update_and_other_round_or_session_are_rejected_without_changing_state():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = _ctx(rnd=3)
    server, _, updates = to_updates(agg, ctx, _inputs())
    assert server.receive(0, updates[0]) == []
    with pytest.raises(ProtocolError, match="already sent"):
        server.receive(0, updates[0])
    # the same bytes from a different round / session are refused by the binding
    other_round = CKKSServer(_ctx(rnd=4, session=ctx.session_id), agg.config, agg.keys.public(0), agg.plan, agg.masks)
    with pytest.raises(ProtocolError, match="round"):
        other_round.receive(0, updates[0])
    other_session = CKKSServer(_ctx(rnd=3), agg.config, agg.keys.public(0), agg.plan, agg.masks)
    with pytest.raises(ProtocolError, match="session"):
        other_session.receive(0, updates[0])
    with pytest.raises(ProtocolError, match="not a participant"):
        server.receive(99, updates[0])
    # the rest of the round still completes with every client
    for cid in CLIENTS[1:]:
        server.receive(cid, updates[cid])


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
    _, _, updates = to_updates(old, _ctx(1, session=session), _inputs())
    with pytest.raises(ProtocolError, match="another CKKS key"):
        server1.receive(0, updates[0])


def test_per_run_keys_differ_between_runs_and_stay_fixed_within_one():
    a, b = factory(CKKSConfig(), CLIENTS, 0), factory(CKKSConfig(), CLIENTS, 0)
    assert a.keys.public(a.epoch(0)).key_id == a.keys.public(a.epoch(7)).key_id
    assert a.keys.public(0).key_id != b.keys.public(0).key_id


def test_an_update_above_max_abs_is_refused_before_encryption():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    big = np.full(DIM, 11.0, dtype=np.float32)
    with pytest.raises(ValueError, match="max_abs"):
        agg.client(_ctx(), 0, big, 100.0)


def test_parameters_without_room_for_the_masks_are_refused_naming_the_fields():
    with pytest.raises(ValueError, match="scale_bits"):
        factory(CKKSConfig(max_abs=1e6), tuple(range(1000)), 0)


def test_more_rounds_under_one_key_than_the_flooding_was_sized_for_are_refused():
    agg = factory(CKKSConfig(flood_queries=4), CLIENTS, 0)
    with pytest.raises(ValueError, match="flood_queries"):
        agg.prepare(5)
    factory(CKKSConfig(flood_queries=4, rotate_keys="round"), CLIENTS, 0).prepare(5)


def test_client_rejects_an_aggregate_with_a_forged_contributor_list():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = _ctx()
    inputs = _inputs()
    seen: list[bytes] = []
    run_round(agg, ctx, inputs, hook=lambda s, d, b: seen.append(b) if s == -1 and d == 0 else None)
    msg = seen[-1]
    frame = wire.decode(msg)
    assert frame.kind == "ckks/aggregate"
    fresh = to_updates(agg, ctx, inputs)[1][0]  # a client of the same round, waiting for its aggregate
    for bad in ([0, 77], [0, 0, 1], [1, 2, 3], [0, True]):
        forged = wire.encode(wire.Frame(frame.kind, {**frame.header, "contributors": bad}, frame.tensors))
        with pytest.raises(ProtocolError, match="contributor"):
            fresh.receive(forged)
