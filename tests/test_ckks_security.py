"""CKKS without a decryption oracle (issue 12, item 4): a lying server with no key and no colluder.

Each attack is run twice: against the shipped client (refused, or noise) and against a deliberately
weakened client (no mask / no check / no flooding, as before issue 12), where it recovers the
victim's update — so no test here is a check that cannot fail.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from ckks_rounds import weak_client

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.ckks import CKKSConfig, factory, masking
from aggregation.ckks.protocol import AGGREGATE, _frame

CLIENTS = tuple(range(6))
DIM = 3000
VICTIM = 0


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {c: (rng.normal(size=DIM) * 0.5, float(rng.integers(1, 400))) for c in CLIENTS}


def _weak(**flags):
    return lambda agg, ctx, cid, vector, weight: weak_client(agg, ctx, cid, vector, weight, **flags)


def _round(config=None, make=None, seed=0):
    """An honest round up to the server's aggregate, which is captured and not delivered.

    Returns the aggregator, round context, inputs, client halves (waiting for an aggregate), each
    client's update frame and the honest aggregate frame."""
    agg = factory(config or CKKSConfig(), CLIENTS, 0)
    ctx = RoundContext(os.urandom(16), 0, CLIENTS, DIM)
    inputs = _inputs(seed)
    clients = {c: (make or (lambda a, x, c, v, w: a.client(x, c, v, w)))(agg, ctx, c, *inputs[c]) for c in CLIENTS}
    server = agg.server(ctx)
    pending, updates, aggregate = list(server.start()), {}, None
    while pending:
        nxt = []
        for cid, msg in pending:
            if wire.decode(msg).kind == AGGREGATE:
                aggregate = msg
                continue
            for reply in clients[cid].receive(msg):
                if wire.decode(reply).kind == "ckks/update":
                    updates[cid] = reply
                nxt.extend(server.receive(cid, reply))
        pending = nxt
    assert aggregate is not None and server.done
    return agg, ctx, inputs, clients, updates, aggregate


def _blobs(frame_bytes):
    f = wire.decode(frame_bytes)
    raw, lengths = f.tensors["ciphertexts"].tobytes(), f.tensors["lengths"].tolist()
    out, pos = [], 0
    for n in lengths:
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _forge(agg, ctx, blobs, unmask, contributors):
    return _frame(AGGREGATE, ctx, agg.keys.public(0).key_id, blobs, tensors={"unmask": unmask}, contributors=list(contributors))


def _honest_unmask(aggregate):
    return wire.decode(aggregate).tensors["unmask"]


def _victim(inputs):
    x, w = inputs[VICTIM]
    return np.append(w * x, w)


def _combine(agg, ctx, updates, members, extra=()):
    """The server's homomorphic sum of the chosen clients' ciphertexts (``extra``: added once more)."""
    client = next(iter(ctx.participants))
    context = agg.keys.client_key(client, 0).context  # any context with the parameters deserialises; no key is used
    from aggregation.ckks import codec

    length = ctx.dim + 1 + agg.plan.checks(ctx.dim + 1)
    acc = None
    for cid in list(members) + list(extra):
        chunks = codec.load_chunks(_blobs(updates[cid]), context, agg.config, length)
        if acc is None:
            acc = chunks
        else:
            for a, c in zip(acc, chunks, strict=True):
                a.add_(c)
    return [c.serialize() for c in acc]


def _readout(half):
    res = half.result()
    return np.append(res.weighted_sum, res.total_weight)


# ------------------------------------------------------------------ single-ciphertext oracle
def test_one_clients_ciphertext_returned_as_the_aggregate_is_refused():
    agg, ctx, _, clients, updates, aggregate = _round()
    forged = _forge(agg, ctx, _blobs(updates[VICTIM]), _honest_unmask(aggregate), CLIENTS)
    for cid in (1, 2):
        with pytest.raises(ProtocolError, match="not the sum"):
            clients[cid].receive(forged)
        assert clients[cid].result() is None
    # the honest aggregate is still accepted afterwards (the refusal changed no state)
    clients[1].receive(aggregate)
    assert clients[1].result().contributors == CLIENTS


def test_one_clients_ciphertext_decrypts_to_noise_for_a_client_that_skips_the_check():
    agg, ctx, inputs, clients, updates, aggregate = _round(make=_weak(skip_check=True))
    truth = _victim(inputs)
    outs = []  # with the honest mask sum R, and with R = 0
    for cid, unmask in ((1, _honest_unmask(aggregate)), (2, np.zeros_like(_honest_unmask(aggregate)))):
        clients[cid].receive(_forge(agg, ctx, _blobs(updates[VICTIM]), unmask, CLIENTS))
        outs.append(_readout(clients[cid]))
    half_range = 2.0 ** (agg.plan.b - 1)
    for got in outs:
        err = got - truth
        # uniform on [-2^(b-1), 2^(b-1)): mean |error| is 2^(b-2); the update itself is ~0.5 * w
        assert np.mean(np.abs(err)) > 0.4 * half_range
        assert abs(np.corrcoef(got[:DIM], truth[:DIM])[0, 1]) < 0.1


def test_one_clients_ciphertext_recovers_the_update_against_a_client_without_masks():
    agg, ctx, inputs, clients, updates, aggregate = _round(make=_weak(unmasked=True, skip_check=True, skip_flooding=True))
    unmask = np.zeros_like(_honest_unmask(aggregate))
    clients[1].receive(_forge(agg, ctx, _blobs(updates[VICTIM]), unmask, CLIENTS))
    err = _readout(clients[1]) - _victim(_inputs())
    assert float(np.max(np.abs(err))) < 1e-4  # the victim's exact update, up to CKKS precision
    assert agg.plan.fresh_error() < 1e-6


def test_a_server_that_learned_the_victims_mask_still_cannot_have_its_ciphertext_decrypted():
    """A broken mask round (e.g. substituted keys in an unsigned SecAgg round) gives the server r_j;
    the check still refuses c_j, and only a client that skips the check releases x_j."""
    agg, ctx, inputs, clients, updates, aggregate = _round(make=_weak())
    victim = clients[VICTIM]
    unmask = np.zeros_like(_honest_unmask(aggregate))
    unmask[victim.layout.data_slots()] = np.rint(victim.mask_seen * 2.0**agg.plan.f).astype(np.uint64)
    forged = _forge(agg, ctx, _blobs(updates[VICTIM]), unmask, CLIENTS)
    with pytest.raises(ProtocolError, match="not the sum"):
        clients[1].receive(forged)
    clients[2].weak["skip_check"] = True
    clients[2].receive(forged)
    err = _readout(clients[2]) - _victim(inputs)
    assert float(np.max(np.abs(err))) < 6 * agg.plan.flood_sigma(len(CLIENTS), DIM + 1) + agg.plan.tolerance(1)


# ------------------------------------------------------------------ subsets and duplicates
def test_an_aggregate_over_a_subset_of_the_survivors_is_refused():
    agg, ctx, _, clients, updates, aggregate = _round()
    subset = [c for c in CLIENTS if c != VICTIM]
    blobs = _combine(agg, ctx, updates, subset)
    for claim in (CLIENTS, subset):  # claiming everyone, or only the subset it summed
        with pytest.raises(ProtocolError, match="not the sum"):
            clients[1].receive(_forge(agg, ctx, blobs, _honest_unmask(aggregate), claim))
    twice = _combine(agg, ctx, updates, CLIENTS, extra=[VICTIM])
    with pytest.raises(ProtocolError, match="not the sum"):
        clients[2].receive(_forge(agg, ctx, twice, _honest_unmask(aggregate), CLIENTS))


def test_a_subset_aggregate_is_noise_without_the_check_and_the_difference_attack_works_without_masks():
    subset = [c for c in CLIENTS if c != VICTIM]
    # shipped masks, check skipped: the subset's sum minus the full set's mask sum is uniform noise
    agg, ctx, inputs, clients, updates, aggregate = _round(make=_weak(skip_check=True))
    clients[1].receive(_forge(agg, ctx, _combine(agg, ctx, updates, subset), _honest_unmask(aggregate), CLIENTS))
    clients[2].receive(aggregate)
    diff = _readout(clients[2]) - _readout(clients[1])
    assert np.mean(np.abs(diff - _victim(inputs))) > 0.4 * 2.0 ** (agg.plan.b - 1)
    # no masks, no check, no flooding: two hosts shown S and S \ {victim} reveal the victim exactly
    agg, ctx, inputs, clients, updates, aggregate = _round(make=_weak(unmasked=True, skip_check=True, skip_flooding=True))
    zero = np.zeros_like(_honest_unmask(aggregate))
    clients[1].receive(_forge(agg, ctx, _combine(agg, ctx, updates, subset), zero, subset))
    clients[2].receive(_forge(agg, ctx, _combine(agg, ctx, updates, CLIENTS), zero, CLIENTS))
    diff = _readout(clients[2]) - _readout(clients[1])
    assert float(np.max(np.abs(diff - _victim(inputs)))) < 1e-4


# ------------------------------------------------------------------ minimum contributors
def test_an_aggregate_claiming_fewer_than_the_minimum_contributors_is_refused_before_decryption():
    agg, ctx, _, clients, updates, aggregate = _round(CKKSConfig(min_contributors=5))
    # garbage ciphertexts: the claim is refused before any ciphertext is parsed or decrypted
    garbage = _forge(agg, ctx, [b"\0" * 64], _honest_unmask(aggregate), [0, 1, 2, 3])
    with pytest.raises(ProtocolError, match="at least 5"):
        clients[1].receive(garbage)
    assert clients[1].result() is None
    clients[1].receive(aggregate)  # six contributors: accepted
    assert len(clients[1].result().contributors) == 6


def test_the_automatic_minimum_is_the_mask_rounds_threshold():
    agg = factory(CKKSConfig(), CLIENTS, 0)
    ctx = RoundContext(os.urandom(16), 0, CLIENTS, DIM)
    half = agg.client(ctx, 0, np.zeros(DIM), 1.0)
    assert half.threshold == agg.masks.threshold(RoundContext(ctx.session_id, 0, CLIENTS, half.layout.length)) == 3
    assert agg.plan.minimum(len(CLIENTS), half.threshold) == 3


# ------------------------------------------------------------------ flooding
def test_flooding_noise_is_a_prf_of_the_aggregate_bytes_and_the_check_key():
    key_a, key_b = os.urandom(32), os.urandom(32)
    a1 = masking.flooding(key_a, b"aggregate", 100_000, 2.0)
    assert np.array_equal(a1, masking.flooding(key_a, b"aggregate", 100_000, 2.0))
    other = masking.flooding(key_a, b"aggregatE", 100_000, 2.0)
    assert abs(np.corrcoef(a1, other)[0, 1]) < 0.02
    assert abs(np.corrcoef(a1, masking.flooding(key_b, b"aggregate", 100_000, 2.0))[0, 1]) < 0.02
    assert abs(float(np.mean(a1))) < 0.03 and 1.97 < float(np.std(a1)) < 2.03
    # Gaussian tails: about 4.55% beyond 2 sigma
    assert 0.040 < float(np.mean(np.abs(a1) > 4.0)) < 0.051


def test_without_flooding_the_released_value_carries_only_the_ckks_error():
    agg, ctx, inputs, clients, _, aggregate = _round(make=_weak(skip_flooding=True))
    clients[1].receive(aggregate)
    truth = sum(_victim_of(inputs, c) for c in CLIENTS)
    err = _readout(clients[1]) - truth
    sigma = agg.plan.flood_sigma(len(CLIENTS), DIM + 1)
    assert float(np.std(err)) < agg.plan.tolerance(len(CLIENTS)) < sigma / 100


def _victim_of(inputs, c):
    x, w = inputs[c]
    return np.append(w * x, w)
