"""SecAgg against an active server and a network attacker: refusals, rejections, and what the server sees."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from scipy.stats import chisquare

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.driver import run_round
from aggregation.secagg import Identities, SecAggClient, SecAggConfig, build, crypto, prg, shamir
from aggregation.secagg.client import pair_mask_seed, share_point
from aggregation.secagg.graph import neighbours
from aggregation.secagg.messages import (
    SECRET_ELEMENTS as shamir_elements,
)
from aggregation.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyDirectory,
    Keys,
    MaskedInput,
    ShareBundle,
    Shares,
    Unmask,
    UnmaskRequest,
)


class Round:
    """A round driven step by step, so a test can play the server (forge, replay, reorder).

    ``weakened=True`` gives every client the protocol *without* the consistency round: it takes the
    survivor set the server shows at unmasking on trust (what SecAgg+ clients did before it).
    """

    def __init__(self, n=10, d=64, k=6, rnd=0, session=None, weakened=False, **bounds):
        self.n, self.d = n, d
        self.ids = list(range(n))
        self.agg = build(SecAggConfig(neighbours=k, max_weight=10.0, **bounds), self.ids, 0)
        self.ctx = RoundContext(session or os.urandom(16), rnd, tuple(self.ids), d)
        rng = np.random.default_rng(7)
        self.inputs = {c: (rng.uniform(-1, 1, d).astype(np.float32), 1.0 + c % 3) for c in self.ids}
        self.server = self.agg.server(self.ctx)
        self.params = self.agg.parameters(self.ctx)
        make = self.agg.client if not weakened else self._weak_client
        self.clients = {c: make(self.ctx, c, *self.inputs[c]) for c in self.ids}
        self.graph = neighbours(self.ctx.session_id, self.ctx.round, self.ctx.participants, self.params.k)
        self.t = self.params.t
        self.pending = self.server.start()
        self.sent: dict[int, list[bytes]] = {c: [] for c in self.ids}

    def _weak_client(self, ctx, cid, vector, weight):
        p = self.agg.parameters(ctx)
        ids = self.agg.identities.for_client(cid)
        return NoConsistencyCheck(ctx, cid, vector, weight, self.agg.quantizer, p.k, p.t, ids, quorum=p.quorum)

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

    def to_consistency(self, drop=()):
        self.step()  # keys -> directories
        self.step()  # shares -> bundles
        return {cid: data for cid, data in self.step(drop=drop)}  # masked inputs -> consistency requests

    def to_unmask(self, drop=()):
        self.to_consistency(drop)
        return {cid: data for cid, data in self.step()}  # signatures -> unmask requests

    def sign(self, signer: int, survivors) -> bytes:
        """A colluder's signature on any set the server likes (its identity key is the server's to use)."""
        return self.agg.identities.sign(signer, crypto.consistency_payload(self.ctx.session_id, self.ctx.round, sorted(survivors)))


class NoConsistencyCheck(SecAggClient):
    """Deliberately weakened client: unmasks for whatever survivor set it is shown, no quorum."""

    def _check_consistency(self, r):
        return frozenset(int(i) for i in r.survivors)


def _unmask_request(r: Round, cid: int, survivors, signatures: dict[int, bytes]) -> bytes:
    signers = sorted(signatures)
    sigs = np.frombuffer(b"".join(signatures[s] for s in signers), np.uint8).reshape(len(signers), crypto.SIG_BYTES)
    return UnmaskRequest(np.array(sorted(survivors), np.int64), np.array(signers, np.int64), sigs).encode(r.ctx, cid)


def _recover(r: Round, victim: int, seed_shares, key_shares) -> np.ndarray | None:
    """The attacker's last step: with t shares of the victim's self-mask seed AND t of its mask key,
    strip every mask from its masked input and decode its update; None if either is short."""
    if len(seed_shares) < r.t or len(key_shares) < r.t:
        return None
    secrets = []
    for shares in (seed_shares, key_shares):
        xs = np.array([[x for x, _ in shares[: r.t]]], np.uint64)
        ys = np.array([[y for _, y in shares[: r.t]]], np.uint64)
        secrets.append(shamir.reconstruct(xs, ys)[0])
    seed = shamir.elements_to_bytes(secrets[0], 32)
    s_sk = crypto.x25519_from_private(shamir.elements_to_bytes(secrets[1], crypto.KEY_BYTES))
    y = MaskedInput.decode(r.sent[victim][2], r.ctx, victim, r.agg.quantizer.dtype).vector.copy()
    prg.add_mask(y, seed, -1)
    for peer in sorted(r.graph[victim]):
        secret = crypto.agree(s_sk, Keys.decode(r.sent[peer][0], r.ctx, peer).s_pk, peer=peer)
        prg.add_mask(y, pair_mask_seed(secret, r.ctx, victim, peer), -1 if peer > victim else +1)
    weighted, weight = r.agg.quantizer.decode(y)
    return weighted / weight


def split_view(r: Round, victim: int, colluders: list[int]):
    """The split-view attack of issue 12 item 2, as a malicious server with ``colluders`` among the
    victim's share holders: it tells half the honest clients "the victim survived" (S1) and the
    other half "it dropped" (S2), gathers every signature it can (colluders sign both), asks the
    first group for the victim's self-mask-seed shares and the second for its mask-key shares,
    and adds the colluders' own shares of both. Returns (recovered update or None, refusals)."""
    survivors_all = set(r.ids)
    s1, s2 = survivors_all, survivors_all - {victim}
    honest = [c for c in r.ids if c not in colluders]
    holders = [h for h in sorted(r.graph[victim]) if h not in colluders]
    half = len(holders) // 2
    group1 = set(holders[:half]) | {victim}
    group2 = set(holders[half:])
    for i, c in enumerate(c for c in honest if c not in group1 | group2):
        (group1 if i % 2 else group2).add(c)
    sigs = {1: {c: r.sign(c, s1) for c in colluders}, 2: {c: r.sign(c, s2) for c in colluders}}
    for group, s, g in ((1, s1, group1), (2, s2, group2)):
        for c in sorted(g):
            (ans,) = r.clients[c].receive(ConsistencyRequest(np.array(sorted(s), np.int64)).encode(r.ctx, c))
            sigs[group][c] = ConsistencySignature.decode(ans, r.ctx, c).signature
    seed_shares, key_shares, refusals = [], [], []
    for c in colluders:  # a colluder simply hands over what it holds of the victim: both shares
        if victim in r.clients[c]._held:
            held = r.clients[c]._held[victim]
            seed_shares.append((share_point(c), held[shamir_elements:]))
            key_shares.append((share_point(c), held[:shamir_elements]))
    for group, s, g in ((1, s1, group1), (2, s2, group2)):
        for h in sorted(set(holders) & g):
            try:
                (ans,) = r.clients[h].receive(_unmask_request(r, h, s, sigs[group]))
            except ProtocolError as exc:
                refusals.append(str(exc))
                continue
            u = Unmask.decode(ans, r.ctx, h)
            if group == 1:
                seed_shares.append((share_point(h), u.seed_shares[list(u.seed_ids).index(victim)]))
            else:
                key_shares.append((share_point(h), u.key_shares[list(u.key_ids).index(victim)]))
    return _recover(r, victim, seed_shares, key_shares), refusals


SPLIT = {"n": 12, "k": 11, "colluders": 0.3}  # classic SecAgg at n = 12 against up to 4 colluders: t = 7, quorum 9


@pytest.mark.parametrize("threshold", ["auto", 5])
@pytest.mark.parametrize("c", range(5))
def test_split_view_with_up_to_the_stated_colluders_is_refused_by_the_consistency_round(c, threshold):
    r = Round(**SPLIT, threshold=threshold)
    assert (r.params.colluders, r.params.quorum) == (4, 9) and r.t == (7 if threshold == "auto" else 5)
    victim = 0
    r.to_consistency()
    recovered, refusals = split_view(r, victim, colluders=list(range(1, c + 1)))
    assert recovered is None
    assert refusals and all("quorum is 9: refusing to unmask" in why for why in refusals)


@pytest.mark.parametrize(("threshold", "cs"), [("auto", [3, 4]), (5, [0, 1, 2, 3, 4])])
def test_split_view_recovers_a_survivor_from_a_client_without_the_consistency_round(threshold, cs):
    """The same attack against the weakened client: it succeeds as soon as 2 (t - c) <= k - c."""
    for c in cs:
        r = Round(**SPLIT, threshold=threshold, weakened=True)
        assert 2 * (r.t - c) <= r.params.k - c
        r.to_consistency()
        recovered, refusals = split_view(r, 0, colluders=list(range(1, c + 1)))
        assert not refusals and recovered is not None
        assert np.abs(recovered - r.inputs[0][0]).max() < 1e-6  # the honest survivor's exact update
    # ... and with fewer colluders even the weakened client holds: the counting bound 2t > k + c
    if threshold == "auto":
        r = Round(**SPLIT, weakened=True)
        r.to_consistency()
        assert split_view(r, 0, colluders=[1, 2])[0] is None


def test_client_unmasks_only_for_the_set_it_signed_with_a_quorum_of_valid_signatures():
    r = Round(n=10, k=6)
    assert (r.t, r.params.quorum) == (4, 6)
    requests = r.to_consistency()
    c = 5
    everyone = set(r.ids)
    with pytest.raises(ProtocolError, match="omits client 5"):
        r.clients[c].receive(ConsistencyRequest(np.array(sorted(everyone - {c}), np.int64)).encode(r.ctx, c))
    with pytest.raises(ProtocolError, match="below the quorum 6"):
        r.clients[c].receive(ConsistencyRequest(np.array([0, 1, 2, 3, c], np.int64)).encode(r.ctx, c))
    unmask = dict(r.step())  # the honest consistency round
    with pytest.raises(ProtocolError, match="expected a secagg/unmask-request frame"):  # it signs one set, once
        r.clients[c].receive(ConsistencyRequest(np.array(sorted(everyone - {0}), np.int64)).encode(r.ctx, c))
    good = UnmaskRequest.decode(unmask[c], r.ctx, c)
    sigs = {int(s): good.signatures[i].tobytes() for i, s in enumerate(good.signers)}
    with pytest.raises(ProtocolError, match="not the set of 10 client 5 signed"):
        r.clients[c].receive(_unmask_request(r, c, everyone - {0}, {s: v for s, v in sigs.items() if s != 0}))
    with pytest.raises(ProtocolError, match="only 5 signatures on the survivor set, quorum is 6"):
        r.clients[c].receive(_unmask_request(r, c, everyone, dict(list(sigs.items())[:5])))
    forged = dict(sigs)
    forged[min(forged)] = r.sign(max(forged), everyone)  # someone else's signature under this signer's id
    with pytest.raises(ProtocolError, match="on the survivor set is invalid"):
        r.clients[c].receive(_unmask_request(r, c, everyone, forged))
    stale = dict(sigs)
    stale[min(stale)] = r.sign(min(stale), everyone - {9})  # a real signature, on another set
    with pytest.raises(ProtocolError, match="on the survivor set is invalid"):
        r.clients[c].receive(_unmask_request(r, c, everyone, stale))
    assert requests and r.clients[c].receive(unmask[c])  # the honest request is still answered: rejections changed nothing
    with pytest.raises(ProtocolError, match="finished round"):
        r.clients[c].receive(unmask[c])  # ... once


def test_a_client_never_reveals_both_shares_of_a_neighbour():
    """The per-client overlap check kept from before (Flower's clients give both shares there)."""
    r = Round(n=10, k=6)
    r.to_unmask()
    c = 5
    held = set(r.clients[c]._held)
    victim = min(held)
    with pytest.raises(ProtocolError, match="both survived and dropped: refusing to reveal both shares"):
        r.clients[c]._reveal(held, {victim})
    with pytest.raises(ProtocolError, match="not exactly the"):
        r.clients[c]._reveal(held - {victim}, set())


def test_tampered_or_misrouted_share_ciphertexts_are_rejected():
    r = Round(n=8, k=6)
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
    r = Round(n=6, k=5)
    dirs = dict(r.step())
    d0 = KeyDirectory.decode(dirs[0], r.ctx, 0)
    _, mitm_pk = crypto.new_x25519()
    c_pks = d0.c_pks.copy()
    c_pks[0] = np.frombuffer(mitm_pk, np.uint8)
    with pytest.raises(ProtocolError, match=r"signature of client \d+ on its advertised keys is invalid"):
        r.clients[0].receive(KeyDirectory(d0.ids, c_pks, d0.s_pks, d0.signatures).encode(r.ctx, 0))
    with pytest.raises(ProtocolError, match="carries no signatures"):
        r.clients[0].receive(KeyDirectory(d0.ids, d0.c_pks, d0.s_pks, None).encode(r.ctx, 0))
    # the server refuses unsigned advertisements
    s = Round(n=6, k=5)
    with pytest.raises(ProtocolError, match="unsigned"):
        s.server.receive(1, Keys(b"\x01" * 32, b"\x02" * 32, None).encode(s.ctx, 1))
    # a full signed round still aggregates correctly
    r2 = Round(n=6, k=5)
    out = run_round(r2.agg, r2.ctx, r2.inputs)
    assert out.server_result.contributors == tuple(range(6))


class SkipsKeySignatures(SecAggClient):
    """Deliberately weakened client: takes its neighbours' advertised keys without checking signatures."""

    def _check_directory(self, d, ids):
        return None


def key_substitution(r: Round, victim: int) -> np.ndarray:
    """Issue 12 item 3: the server alone swaps every neighbour's keys in the victim's directory for
    its own, decrypts all the victim's shares, and strips every mask from its masked input."""
    dirs = dict(r.step())
    d = KeyDirectory.decode(dirs[victim], r.ctx, victim)
    fake = {int(p): (crypto.new_x25519(), crypto.new_x25519()) for p in d.ids}
    blob = lambda pks: np.frombuffer(b"".join(pks), np.uint8).reshape(len(pks), 32)  # noqa: E731
    c_pks = blob([fake[int(p)][0][1] for p in d.ids])
    s_pks = blob([fake[int(p)][1][1] for p in d.ids])
    (shares,) = r.clients[victim].receive(KeyDirectory(d.ids, c_pks, s_pks, d.signatures).encode(r.ctx, victim))
    victim_keys = Keys.decode(r.sent[victim][0], r.ctx, victim)
    sh = Shares.decode(shares, r.ctx, victim)
    opened, share_keys = [], {}
    for row, p in enumerate(int(i) for i in sh.ids):
        secret = crypto.agree(fake[p][0][0], victim_keys.c_pk, peer=victim)
        share_keys[p] = crypto.derive(secret, crypto.SHARE_LABEL, r.ctx.session_id, r.ctx.round, victim, p)
        ad = crypto.share_ad(r.ctx.session_id, r.ctx.round, victim, p)
        plain = crypto.open_sealed(share_keys[p], sh.ciphertexts[row].tobytes(), ad, sender=victim)
        opened.append((share_point(p), np.frombuffer(plain, ">u8", offset=16).astype(np.uint64)))
    xs = np.array([[x for x, _ in opened[: r.t]]], np.uint64)
    ys = np.array([[y for _, y in opened[: r.t]]], np.uint64)
    secrets = shamir.reconstruct(xs, ys)[0]
    seed = shamir.elements_to_bytes(secrets[shamir_elements:], 32)
    # forge the victim's bundle from "its neighbours" under the substituted keys, so it masks its input
    cts = []
    for p in (int(i) for i in sh.ids):
        plain = struct.pack(">qq", p, victim) + np.zeros(2 * shamir_elements, ">u8").tobytes()
        cts.append(np.frombuffer(crypto.seal(share_keys[p], plain, crypto.share_ad(r.ctx.session_id, r.ctx.round, p, victim)), np.uint8))
    (masked,) = r.clients[victim].receive(ShareBundle(sh.ids, np.stack(cts)).encode(r.ctx, victim))
    y = MaskedInput.decode(masked, r.ctx, victim, r.agg.quantizer.dtype).vector.copy()
    prg.add_mask(y, seed, -1)
    for p in (int(i) for i in sh.ids):
        secret = crypto.agree(fake[p][1][0], victim_keys.s_pk, peer=victim)
        prg.add_mask(y, pair_mask_seed(secret, r.ctx, victim, p), -1 if p > victim else +1)
    weighted, weight = r.agg.quantizer.decode(y)
    return weighted / weight


def test_key_substitution_recovers_the_update_of_a_client_that_skips_signature_checks():
    r = Round(n=6, k=5)
    victim = 2
    ids = r.agg.identities.for_client(victim)
    r.clients[victim] = SkipsKeySignatures(r.ctx, victim, *r.inputs[victim], r.agg.quantizer, r.params.k, r.t, ids, quorum=r.params.quorum)
    recovered = key_substitution(r, victim)
    assert np.abs(recovered - r.inputs[victim][0]).max() < 1e-6


def test_key_substitution_is_refused_by_a_client_that_checks_signatures():
    r = Round(n=6, k=5)
    with pytest.raises(ProtocolError, match="on its advertised keys is invalid"):
        key_substitution(r, 2)


def test_identity_registry_round_trips_through_a_directory(tmp_path):
    ids = Identities.generate(range(4))
    ids.write(tmp_path)
    assert (tmp_path / "2.key").stat().st_mode & 0o777 == 0o600
    loaded = Identities.load(tmp_path, range(4))
    assert {k: crypto.public_raw(v) for k, v in loaded.public.items()} == {k: crypto.public_raw(v) for k, v in ids.public.items()}
    (tmp_path / "3.pub").unlink()
    with pytest.raises(FileNotFoundError, match=r"3.pub: identity public key of client 3 is missing"):
        Identities.load(tmp_path, range(4))


def test_nothing_the_server_receives_equals_or_reveals_an_individual_update():
    n, d = 12, 20_000
    agg = build(SecAggConfig(neighbours=10, max_weight=10.0), list(range(n)), 0)
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
            assert frame.kind in ("secagg/keys", "secagg/shares", "secagg/consistency-signature", "secagg/unmask")
            for t in frame.tensors.values():
                assert t.nbytes < 2_000  # keys, ciphertexts and field shares only, never vector-sized


def _chi_square_p(values: np.ndarray) -> float:
    counts = np.bincount(values.view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_masked_vectors_look_uniform_while_the_plain_encoding_does_not():
    n, d = 8, 50_000
    agg = build(SecAggConfig(neighbours=6, max_weight=1.0), list(range(n)), 0)
    ctx = RoundContext(os.urandom(16), 0, tuple(range(n)), d)
    inputs = {c: (np.zeros(d, np.float32), 1.0) for c in range(n)}  # the most structured input there is
    masked = []
    run_round(agg, ctx, inputs, hook=lambda s, t, data: masked.append(data) if t == -1 and b"masked-input" in data[:40] else None)
    assert len(masked) == n
    pvals = [_chi_square_p(wire.decode(m).tensors["masked"]) for m in masked]
    assert min(pvals) > 1e-6, pvals
    plain = agg.quantizer.encode(np.zeros(d), 1.0)
    assert _chi_square_p(plain) < 1e-6  # the check does fail on structured bytes
