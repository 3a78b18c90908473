"""Every redteam attack succeeds against a deliberately weakened component, so none is a check that
cannot fail; and where the current code already defends, the same attack is refused by it.

The weakened components are written here, next to the test that uses them: SecAgg clients that
skip the consistency check or the key-directory signatures, a client/server pair with t = k/2 and a
quorum of half the round, a client that does not check a frame's round and session, CKKS clients
without masks or the aggregate check, masks switched off, a node without any policy, a wire decoder
without its depth and integer bounds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.secagg import SecAggAggregator, SecAggClient, prg
from aggregation.secagg.messages import KeyDirectory, UnmaskRequest
from attacks.redteam import Target, ckks_attacks, dictation, malformed, passive, replay, secagg_attacks
from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.aggregators import build_aggregator

CONFIG = "configs/movielens.yaml"


def _target(tmp_path, kind="secagg", n=10, *sets, **kw) -> Target:
    config = load_config(CONFIG, [f"aggregation.kind={kind}", *sets])
    return Target(config, n, 16, tmp_path, **kw)


# ------------------------------------------------------------------------------- weakened parts


class UncheckedSetClient(SecAggClient):
    """Skips the consistency check: it reveals for whatever survivor set the unmask request names,
    whether or not it is the set this client signed and whoever signed it."""

    def _check_consistency(self, r: UnmaskRequest) -> frozenset[int]:
        return frozenset(int(i) for i in r.survivors)


class UnsignedKeysClient(SecAggClient):
    """Skips signature verification of the key directory: advertised keys are taken on trust."""

    def _check_directory(self, d: KeyDirectory, ids: list[int]) -> None:
        return None


class HalfQuorumClient(SecAggClient):
    """Accepts a survivor set signed by only half of the round (the shipped client demands a strict majority)."""

    def __init__(self, ctx: RoundContext, *args, quorum: int, **kw) -> None:
        super().__init__(ctx, *args, quorum=len(ctx.participants), **kw)  # past the constructor's majority check
        self.quorum = quorum


def weakened_secagg(client_cls, weaken_parameters=None):
    """An aggregator factory whose client halves are ``client_cls`` (and whose k, t, quorum are
    rewritten by ``weaken_parameters``, server and clients alike)."""

    def factory(config, ids):
        agg = build_aggregator(config, ids)

        class Weakened(SecAggAggregator):
            def parameters(self, ctx):
                p = super().parameters(ctx)
                return weaken_parameters(p) if weaken_parameters else p

            def client(self, ctx, client_id, vector, weight, *, integer_noise=None):
                p = self.parameters(ctx)
                ids_ = self.identities.for_client(client_id)
                return client_cls(ctx, client_id, vector, weight, self.quantizer, p.k, p.t, ids_, integer_noise, quorum=p.quorum)

        return Weakened(agg.config, agg.quantizer.max_clients, agg.identities)

    return factory


def _half_quorum(p):
    """t = k/2 (so 2t <= k: two disjoint groups of holders each reach t) and a quorum of n/2 (two
    disjoint halves of the round each endorse their own survivor set)."""
    return dataclasses.replace(p, t=p.k // 2, quorum=p.n // 2)


half_quorum_secagg = weakened_secagg(HalfQuorumClient, _half_quorum)


class Restamping:
    """A client half that does not check which round and session a frame is for: it rewrites both."""

    def __init__(self, inner, ctx: RoundContext) -> None:
        self.inner, self.ctx = inner, ctx

    def receive(self, data: bytes) -> list[bytes]:
        return self.inner.receive(self._restamp(data))

    def _restamp(self, data: bytes) -> bytes:
        f = wire.decode(data)
        header = {**f.header, "round": self.ctx.round}
        if "session" in header:
            header["session"] = self.ctx.session_id.hex()
        tensors = dict(f.tensors)
        if f.kind == "ckks/mask":  # CKKS carries the mask round's SecAgg+ frame inside; same session and round
            tensors["inner"] = wire.as_blob(self._restamp(f.blob("inner")))
        return wire.encode(wire.Frame(f.kind, header, tensors))

    @property
    def done(self):
        return self.inner.done

    def result(self):
        return self.inner.result()


def restamping(config, ids):
    agg = build_aggregator(config, ids)
    inner_client = agg.client
    agg.client = lambda ctx, cid, vector, weight, **kw: Restamping(inner_client(ctx, cid, vector, weight, **kw), ctx)
    return agg


def permissive_node(user_config, client_ids, task, workdir, **kwargs):
    """A node that skips its policy (tests/weakened_host.py): it runs whatever the setup frame says."""
    from weakened_host import ObedientHost

    from fedrlhf_secure.federation.policy import NodePolicy

    return ObedientHost(list(client_ids), state_dir=workdir, task=task, policy=NodePolicy.from_config(user_config), **kwargs)


# ------------------------------------------------------------------------------- the tests


def test_passive_server_reads_an_update_when_the_masks_are_switched_off(tmp_path, monkeypatch):
    assert passive.passive_server(_target(tmp_path)).verdict == "refused"
    monkeypatch.setattr(prg, "add_mask", lambda acc, seed, sign: None)
    r = passive.passive_server(_target(tmp_path))
    assert r.verdict == "recovered" and "masked-input" in r.summary


def test_dictation_recovers_from_a_node_without_policy_and_is_refused_by_the_shipped_one(tmp_path):
    rows = {r.name: r for r in dictation.dictation(_target(tmp_path, host_factory=permissive_node))}
    assert rows["dictate-plain"].verdict == "recovered" and rows["dictate-plain"].evidence["plain_read"]["max_abs_error"] == 0.0
    # a weaker colluder bound (γ = 0, failure 2^-2) is run as dictated by a node without policy
    weaker = rows["dictate-colluder-bound"]
    assert weaker.verdict == "recovered"
    runs = weaker.evidence["node_runs"]["aggregation"]
    assert (runs["colluders"], runs["failure_exponent"]) == (0.0, 2)
    # k = t = 1 is no longer something a node without policy can be made to run: the merged protocol's
    # parameter check (aggregation/secagg/params.py) refuses it before any policy is consulted
    assert rows["dictate-threshold-1"].verdict == "refused" and "ParameterError" in rows["dictate-threshold-1"].evidence["refusal"]
    rows = {r.name: r for r in dictation.dictation(_target(tmp_path))}  # the shipped node, its policy from the user's config
    for name in ("dictate-plain", "dictate-threshold-1", "dictate-colluder-bound"):
        assert rows[name].verdict == "refused" and "node policy refuses" in rows[name].evidence["refusal"]


def _forged_survivor_set(target: Target) -> dict:
    """The server has every masked input and the signatures on S (the victim in it), then tells the
    victim's holders S - {victim}: each would reveal its share of the victim's mask key although the
    victim's masked input is in hand. What the server collects and who refused."""
    from aggregation.secagg import crypto
    from attacks.redteam.harness import WorldLog, drive_world, kind_of, reconstruct_secret, shares_of

    run = secagg_attacks.honest_run(target)
    victim = secagg_attacks.VICTIM
    holders = run.neighbours(victim)
    server, clients = run.fork()
    log = WorldLog()
    pending = run.feed_masked(server, run.masked, log)

    def down(cid: int, data: bytes) -> bytes:
        if cid in holders and kind_of(data) == "secagg/unmask-request":
            r = UnmaskRequest.decode(data, run.ctx, cid)
            data = dataclasses.replace(r, survivors=np.setdiff1d(r.survivors, [victim]).astype(np.int64)).encode(run.ctx, cid)
        return data

    drive_world(server, clients, pending, down=down, log=log)
    _, keys = shares_of(log.sent, run.ctx, victim)
    s_sk = reconstruct_secret(keys, run.threshold, crypto.KEY_BYTES)
    return {
        "holders": len(holders),
        "threshold": run.threshold,
        "key_shares": len(keys),
        "mask_key_recovered": s_sk is not None and s_sk == crypto.private_bytes(clients[victim]._s_sk),
        "refusals": [log.refusals[c] for c in holders if c in log.refusals],
    }


def test_a_forged_survivor_set_gets_a_survivors_mask_key_only_from_clients_that_skip_the_consistency_check(tmp_path):
    """Replaces the overlapping-lists test: the unmask request no longer carries per-client survivor and
    dropout lists (each client derives both from the one signed set S), so an overlap cannot be sent and
    the overlap attack reports 'skipped'. The closest real attack: an unmask request naming a set the
    client did not sign, which tells it a survivor dropped."""
    assert secagg_attacks.overlap(_target(tmp_path)).verdict == "skipped"
    honest = _forged_survivor_set(_target(tmp_path))
    assert honest["key_shares"] == 0 and not honest["mask_key_recovered"]
    assert len(honest["refusals"]) == honest["holders"] and all("not the set" in m for m in honest["refusals"])
    weak = _forged_survivor_set(_target(tmp_path, aggregator_factory=weakened_secagg(UncheckedSetClient)))
    assert weak["refusals"] == [] and weak["key_shares"] == weak["holders"] >= weak["threshold"]
    assert weak["mask_key_recovered"]  # the survivor's s_sk, i.e. every pairwise mask of its masked input


def test_split_view_recovers_when_t_is_half_of_k_and_half_the_round_is_a_quorum(tmp_path):
    """Was 'needs no colluder when 2t <= k': explicit k/t that cannot hold now raise ParameterError, and a
    split view must also get a quorum of signatures on each view. So the weakened component is the client
    and server pair of ``_half_quorum`` (t = k/2, quorum = n/2); the shipped parameters refuse."""
    weak = secagg_attacks.split_view(_target(tmp_path, aggregator_factory=half_quorum_secagg))
    assert weak.verdict == "recovered" and (weak.evidence["k"], weak.evidence["t"]) == (6, 3)
    won = [t for t in weak.evidence["trials"].values() if t["recovered"]]
    assert won and won[0]["max_abs_error"] <= won[0]["tolerance"]
    strict = secagg_attacks.split_view(_target(tmp_path))
    assert strict.verdict == "refused" and (strict.evidence["k"], strict.evidence["t"]) == (6, 4)
    assert all(not t["recovered"] for t in strict.evidence["trials"].values()) and strict.evidence["c_max"] == 1


def test_key_substitution_reads_every_share_unless_keys_are_signed(tmp_path):
    """Signatures are always on now; the weakened component is a client that skips verifying them."""
    open_keys = secagg_attacks.key_substitution(_target(tmp_path, aggregator_factory=weakened_secagg(UnsignedKeysClient)))
    assert open_keys.verdict == "recovered" and open_keys.evidence["shares_read"] == 6  # k = 6 at n = 10
    assert open_keys.evidence["max_abs_error"] <= open_keys.evidence["tolerance"]
    signed = secagg_attacks.key_substitution(_target(tmp_path))
    assert signed.verdict == "refused" and signed.evidence["shares_read"] == 0
    assert "signature" in signed.evidence["refusal_example"]


def test_grinding_places_colluders_unless_the_threshold_and_quorum_hold(tmp_path):
    """The same grinding budget against the shipped parameters (k=10, t=6 at n=20) and the half-quorum
    weakening (t = k/2, quorum = n/2): two colluders placed next to the victim suffice only for the latter."""
    weak = secagg_attacks.grinding(_target(tmp_path, "secagg", 20, aggregator_factory=half_quorum_secagg), budget=256)
    assert weak.verdict == "recovered" and weak.evidence["colluding_neighbours_best"] >= 2 * weak.evidence["t"] - weak.evidence["k"]
    strict = secagg_attacks.grinding(_target(tmp_path, "secagg", 20), budget=256)
    assert strict.verdict == "refused" and strict.evidence["colluders_total"] == 2
    assert strict.evidence["colluding_neighbours_best"] == weak.evidence["colluding_neighbours_best"]


def unmasked_ckks(config, ids):
    """CKKS clients as before issue 12 (tests/ckks_rounds.WeakCKKSClient): no mask on the plaintext, no
    check that the aggregate is the claimed sum, no flooding noise on what they release."""
    from ckks_rounds import weak_client

    agg = build_aggregator(config, ids)
    agg.client = lambda ctx, cid, vector, weight, **kw: weak_client(
        agg, ctx, cid, vector, weight, unmasked=True, skip_check=True, skip_flooding=True
    )
    return agg


def test_ckks_oracle_returns_one_update_or_a_subset_as_the_aggregate(tmp_path):
    single = ckks_attacks.single_ciphertext(_target(tmp_path, "ckks", aggregator_factory=unmasked_ckks))
    assert single.verdict == "recovered" and single.evidence["summed_ciphertexts"] == 1 and single.evidence["claimed_contributors"] == 10
    subset = ckks_attacks.subset(_target(tmp_path, "ckks", aggregator_factory=unmasked_ckks))
    assert subset.verdict == "recovered" and subset.evidence["summed_ciphertexts"] == 3
    for r in (single, subset):  # the victim's update up to CKKS precision
        assert r.evidence["max_abs_error"] <= r.evidence["tolerance"]
    for attack in (ckks_attacks.single_ciphertext, ckks_attacks.subset):  # the shipped client: masked, checked
        shipped = attack(_target(tmp_path, "ckks"))
        assert shipped.verdict == "refused" and shipped.evidence["stage"] == "finish"
        assert "is not the sum of its 10 claimed contributors" in shipped.evidence["refusal"]


@pytest.mark.parametrize("kind", ["secagg", "ckks"])
def test_replay_is_accepted_by_clients_that_do_not_check_round_and_session(kind, tmp_path):
    honest = replay.replay(_target(tmp_path, kind))
    assert honest.verdict == "refused" and honest.evidence["earlier_round_same_session"]["offered"] > 0
    weak = replay.replay(_target(tmp_path, kind, aggregator_factory=restamping))
    assert weak.verdict == "recovered" and "client" in weak.summary


def _reader_that_skips_only_wire_errors(data: bytes, what: str):
    """The server loop's response reader as it was before the robust loop: only WireError is a bad frame."""
    from fedrlhf_secure.federation.node_protocol import RESPONSE, NodeMessage, NodeUnusable

    try:
        msg = NodeMessage.decode(data, RESPONSE)
    except wire.WireError as exc:
        raise NodeUnusable(f"sent a malformed {what} response ({exc})") from exc
    if "error" in msg.header:
        raise NodeUnusable(f"refused the {what}: {msg.header['error']}")
    return msg


def test_malformed_frames_end_the_run_when_the_decoder_loses_its_bounds(tmp_path, monkeypatch):
    from fedrlhf_secure.federation import node_driver, round_core

    monkeypatch.setattr(malformed, "MAX_CASES_PER_OP", 0)  # only the three raw frames per operation
    monkeypatch.setattr(wire, "MAX_HEADER_DEPTH", 10**9)
    monkeypatch.setattr(wire, "MAX_INT_DIGITS", 10**9)
    for module in (node_driver, round_core):  # and the loop skips only WireError, as it did on main before issue 12
        monkeypatch.setattr(module, "read_response", _reader_that_skips_only_wire_errors)
    r = malformed.malformed_frames(_target(tmp_path, "plain", 6))
    assert r.verdict == "recovered"
    ended = {(f["op"], f["frame"]): f["ended"] for f in r.evidence["failures"]}
    assert ended[("fit", "header nested 50,000 deep")].startswith("RecursionError")
    assert ended[("fit", "5,000-digit integer")].startswith("ValueError")


def test_malformed_raw_frames_are_refused_with_the_bounds_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(malformed, "MAX_CASES_PER_OP", 0)
    r = malformed.malformed_frames(_target(tmp_path, "plain", 6))
    assert r.verdict == "refused" and r.evidence["cases"] >= 12 and r.evidence["failures_total"] == 0


def test_a_refusing_client_is_recorded_not_raised(tmp_path):
    """The harness records a ProtocolError as that client's refusal (what every 'refused' verdict rests on)."""
    from attacks.redteam.harness import WorldLog, _deliver

    class Refuses:
        def receive(self, data):
            raise ProtocolError("no")

    log = WorldLog()
    assert _deliver({0: Refuses()}, [(0, b"x")], log, None, None) == [] and log.refusals == {0: "no"}
