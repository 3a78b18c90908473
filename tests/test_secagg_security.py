"""SecAgg against an active server and a network attacker: refusals, rejections, and what the server sees."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.stats import chisquare

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.driver import run_round
from aggregation.secagg import Identities, SecAggConfig, build, crypto, shamir
from aggregation.secagg.client import share_point
from aggregation.secagg.graph import neighbours
from aggregation.secagg.messages import Keys, MaskedInput, ShareBundle, Unmask, UnmaskRequest


class Round:
    """A round driven step by step, so a test can play the server (forge, replay, reorder)."""

    def __init__(self, n=10, d=64, k=6, rnd=0, signatures=False, session=None):
        self.n, self.d = n, d
        self.ids = list(range(n))
        self.agg = build(SecAggConfig(neighbours=k, signatures=signatures, max_weight=10.0), self.ids, 0)
        self.ctx = RoundContext(session or os.urandom(16), rnd, tuple(self.ids), d)
        rng = np.random.default_rng(7)
        self.inputs = {c: (rng.uniform(-1, 1, d).astype(np.float32), 1.0 + c % 3) for c in self.ids}
        self.server = self.agg.server(self.ctx)
        self.clients = {c: self.agg.client(self.ctx, c, *self.inputs[c]) for c in self.ids}
        self.graph = neighbours(self.ctx.session_id, self.ctx.round, self.ctx.participants, self.agg.degree(self.ctx))
        self.t = self.agg.threshold(self.ctx)
        self.pending = self.server.start()
        self.sent: dict[int, list[bytes]] = {c: [] for c in self.ids}

    def step(self, drop=()):
        replies = []
        for cid, data in self.pending:
            if cid in drop:
                continue
            for r in self.clients[cid].receive(data):
                replies.append((cid, r))
                self.sent[cid].append(r)
        nxt = []
        for cid, r in replies:
            nxt += self.server.receive(cid, r)
        if not nxt and not self.server.done:
            nxt = self.server.close_stage()
        self.pending = nxt
        return nxt

    def to_unmask(self, drop=()):
        self.step()  # keys -> directories
        self.step()  # shares -> bundles
        return {cid: data for cid, data in self.step(drop=drop)}  # masked inputs -> unmask requests


def _forge_unmask(r: Round, cid: int, survivors, dropped, total=None) -> bytes:
    return UnmaskRequest(
        np.array(sorted(survivors), np.int64), np.array(sorted(dropped), np.int64), total if total is not None else r.n
    ).encode(r.ctx, cid)


def test_server_cannot_unmask_a_surviving_client():
    r = Round(n=12, k=6)  # t = 4 > k / 2
    requests = r.to_unmask()
    victim = 0
    holders = sorted(r.graph[victim])
    assert len(holders) == 6 and r.t == 4
    # 1. Asking one holder for both shares of the victim is refused.
    j = holders[0]
    held = set(r.clients[j]._held)
    with pytest.raises(ProtocolError, match="both survived and dropped: refusing to reveal both shares"):
        r.clients[j].receive(_forge_unmask(r, j, held, {victim}))
    # 2. Lying consistently to half of the holders ("the victim dropped") and asking the rest for
    #    the self-mask share gets 3 < t shares of each secret: the mask key does not reconstruct.
    key_shares, seed_shares = [], []
    for idx, h in enumerate(holders):
        held = set(r.clients[h]._held)
        if idx < 3:
            ans = Unmask.decode(r.clients[h].receive(_forge_unmask(r, h, held - {victim}, {victim}))[0], r.ctx, h)
            key_shares.append((share_point(h), ans.key_shares[list(ans.key_ids).index(victim)]))
        else:
            ans = Unmask.decode(r.clients[h].receive(requests[h])[0], r.ctx, h)
            seed_shares.append((share_point(h), ans.seed_shares[list(ans.seed_ids).index(victim)]))
        # 3. ... and no holder answers a second request, e.g. for the other share.
        with pytest.raises(ProtocolError, match="finished round"):
            r.clients[h].receive(_forge_unmask(r, h, held, set()))
        assert r.clients[h].revealed[victim] in ("key", "seed")
    xs = np.array([[x for x, _ in key_shares]], np.uint64)
    ys = np.array([[s for _, s in key_shares]], np.uint64)
    guess = shamir.reconstruct(xs, ys)[0]
    advertised = Keys.decode(r.sent[victim][0], r.ctx, victim).s_pk
    try:
        sk = crypto.x25519_from_private(shamir.elements_to_bytes(guess, 32))
        assert crypto.public_bytes(sk) != advertised
    except ValueError:
        pass  # not even a well-formed key


def test_client_checks_the_server_lists_against_the_shares_it_holds():
    r = Round(n=10, k=6)
    requests = r.to_unmask()
    c = 5
    held = set(r.clients[c]._held)
    with pytest.raises(ProtocolError, match="not exactly the"):
        r.clients[c].receive(_forge_unmask(r, c, held - {min(held)}, set()))
    with pytest.raises(ProtocolError, match="below threshold"):
        r.clients[c].receive(_forge_unmask(r, c, held, set(), total=r.t - 1))
    with pytest.raises(ProtocolError, match="lists"):
        r.clients[c].receive(_forge_unmask(r, c, held, set(), total=len(held)))
    assert r.clients[c].receive(requests[c])  # the honest request is still answered: rejections changed nothing


def test_tampered_or_misrouted_share_ciphertexts_are_rejected():
    r = Round(n=8, k=4)
    r.step()
    bundles = dict(r.step())
    a = 0
    bundle = ShareBundle.decode(bundles[a], r.ctx, a)
    cts = bundle.ciphertexts.copy()
    cts[0, 20] ^= 1
    with pytest.raises(ProtocolError, match="fails authentication"):
        r.clients[a].receive(ShareBundle(bundle.ids, cts).encode(r.ctx, a))
    b, peer = next((b, p) for b in r.ids if b != a for p in sorted(r.graph[a] & r.graph[b]))
    other = ShareBundle.decode(bundles[b], r.ctx, b)
    row = list(other.ids).index(peer)
    stolen = ShareBundle(other.ids[row : row + 1], other.ciphertexts[row : row + 1])  # peer -> b, relabelled for a
    with pytest.raises(ProtocolError, match=f"share from client {peer} fails authentication"):
        r.clients[a].receive(stolen.encode(r.ctx, a))
    assert r.clients[a].receive(bundles[a])  # the genuine bundle still works


def test_replayed_wrong_round_wrong_session_and_wrong_size_messages_are_rejected():
    session = os.urandom(16)
    r = Round(n=6, k=5, rnd=3, session=session)
    r.step()
    keys_0 = r.sent[0][0]
    with pytest.raises(ProtocolError, match="expected a secagg/shares frame, got 'secagg/keys'"):
        r.server.receive(0, keys_0)  # replay of stage-0 message during stage 1
    old = Round(n=6, k=5, rnd=2, session=session)
    old.step()
    fresh = Round(n=6, k=5, rnd=3, session=session)
    with pytest.raises(ProtocolError, match="round 2, this is round 3"):
        fresh.server.receive(0, old.sent[0][0])
    other_session = Round(n=6, k=5, rnd=3)
    other_session.step()
    with pytest.raises(ProtocolError, match="session"):
        fresh.server.receive(0, other_session.sent[0][0])
    with pytest.raises(ProtocolError, match="names client 1 as sender, expected 0"):
        fresh.server.receive(0, fresh.clients[1].receive(fresh.server.start()[1][1])[0])
    with pytest.raises(ProtocolError, match="must be 32 bytes"):
        fresh.server.receive(2, Keys(b"\x01" * 31, b"\x02" * 32, None).encode(fresh.ctx, 2))
    with pytest.raises(ProtocolError, match="not a fedrlhf frame"):
        fresh.server.receive(2, b"garbage")
    # a client replies once per stage; the same request twice is refused
    first = fresh.server.start()[3][1]
    fresh.clients[3].receive(first)
    with pytest.raises(ProtocolError, match="expected a secagg/key-directory frame"):
        fresh.clients[3].receive(first)
    # wrong-size masked input
    s = Round(n=6, k=5)
    s.step()
    s.step()
    masked = [(c, s.clients[c].receive(data)[0]) for c, data in s.pending]
    c0, good = masked[0]
    vec = MaskedInput.decode(good, s.ctx, c0, s.agg.quantizer.dtype).vector
    with pytest.raises(ProtocolError, match=r"must have shape \(65,\)"):
        s.server.receive(c0, MaskedInput(vec[:-1]).encode(s.ctx, c0))
    with pytest.raises(ProtocolError, match="must be uint32"):
        s.server.receive(c0, MaskedInput(vec.astype(np.uint64)).encode(s.ctx, c0))
    s.server.receive(c0, good)
    with pytest.raises(ProtocolError, match="already answered stage 'masked input'"):
        s.server.receive(c0, good)


def test_signed_keys_stop_a_server_from_substituting_a_neighbours_key():
    r = Round(n=6, k=5, signatures=True)
    dirs = dict(r.step())
    from aggregation.secagg.messages import KeyDirectory

    d0 = KeyDirectory.decode(dirs[0], r.ctx, 0)
    _, mitm_pk = crypto.new_x25519()
    c_pks = d0.c_pks.copy()
    c_pks[0] = np.frombuffer(mitm_pk, np.uint8)
    with pytest.raises(ProtocolError, match=r"signature of client \d+ on its advertised keys is invalid"):
        r.clients[0].receive(KeyDirectory(d0.ids, c_pks, d0.s_pks, d0.signatures).encode(r.ctx, 0))
    with pytest.raises(ProtocolError, match="carries no signatures"):
        r.clients[0].receive(KeyDirectory(d0.ids, d0.c_pks, d0.s_pks, None).encode(r.ctx, 0))
    # the server refuses unsigned advertisements
    s = Round(n=6, k=5, signatures=True)
    with pytest.raises(ProtocolError, match="unsigned"):
        s.server.receive(1, Keys(b"\x01" * 32, b"\x02" * 32, None).encode(s.ctx, 1))
    # a full signed round still aggregates correctly
    r2 = Round(n=6, k=5, signatures=True)
    out = run_round(r2.agg, r2.ctx, r2.inputs)
    assert out.server_result.contributors == tuple(range(6))


def test_identity_keys_load_from_a_directory(tmp_path):
    ids = Identities.generate(range(4))
    ids.write(tmp_path)
    assert (tmp_path / "2.key").stat().st_mode & 0o777 == 0o600
    cfg = SecAggConfig(signatures=True, identity_dir=str(tmp_path))
    agg = build(cfg, list(range(4)), 0)
    assert {k: crypto.public_raw(v) for k, v in agg.identities.public.items()} == {k: crypto.public_raw(v) for k, v in ids.public.items()}
    (tmp_path / "3.pub").unlink()
    with pytest.raises(FileNotFoundError, match=r"3.pub: identity public key of client 3 is missing"):
        build(cfg, list(range(4)), 0)


def test_nothing_the_server_receives_equals_or_reveals_an_individual_update():
    n, d = 12, 20_000
    agg = build(SecAggConfig(neighbours=6, max_weight=10.0), list(range(n)), 0)
    ctx = RoundContext(os.urandom(16), 0, tuple(range(n)), d)
    rng = np.random.default_rng(11)
    inputs = {c: (rng.uniform(-1, 1, d).astype(np.float32), 5.0) for c in range(n)}
    seen: list[tuple[int, bytes]] = []
    run_round(agg, ctx, inputs, drop_after={4: 2}, hook=lambda src, dst, data: seen.append((src, data)) if dst == -1 else None)
    q = agg.quantizer
    for src, data in seen:
        vec = inputs[src][0]
        assert vec[:8].tobytes() not in data  # no plaintext float32 run of the update
        frame = wire.decode(data)
        if frame.kind == MaskedInput.KIND:
            masked = frame.tensors["masked"]
            expected_q = np.round(vec.astype(np.float64) * 5.0 * q.scale).astype(np.int64).astype(q.dtype)
            assert np.mean(masked[:-1] == expected_q) < 0.01  # not the quantised update
            signed = masked[:-1].view(np.int32).astype(np.float64)
            assert abs(np.corrcoef(signed, vec)[0, 1]) < 0.05  # and uncorrelated with it
        else:
            assert frame.kind in ("secagg/keys", "secagg/shares", "secagg/unmask")
            for t in frame.tensors.values():
                assert t.nbytes < 2_000  # keys, ciphertexts and field shares only, never vector-sized


def _chi_square_p(values: np.ndarray) -> float:
    counts = np.bincount(values.view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_masked_vectors_look_uniform_while_the_plain_encoding_does_not():
    n, d = 8, 50_000
    agg = build(SecAggConfig(neighbours=4, max_weight=1.0), list(range(n)), 0)
    ctx = RoundContext(os.urandom(16), 0, tuple(range(n)), d)
    inputs = {c: (np.zeros(d, np.float32), 1.0) for c in range(n)}  # the most structured input there is
    masked = []
    run_round(agg, ctx, inputs, hook=lambda s, t, data: masked.append(data) if t == -1 and b"masked-input" in data[:40] else None)
    assert len(masked) == n
    pvals = [_chi_square_p(wire.decode(m).tensors["masked"]) for m in masked]
    assert min(pvals) > 1e-6, pvals
    plain = agg.quantizer.encode(np.zeros(d), 1.0)
    assert _chi_square_p(plain) < 1e-6  # the check does fail on structured bytes
