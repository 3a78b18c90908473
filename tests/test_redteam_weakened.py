"""Every redteam attack succeeds against a deliberately weakened component, so none is a check that
cannot fail; and where the current code already defends, the same attack is refused by it.

The weakened components are written here, next to the test that uses them: a SecAgg client that
answers an overlapping unmask request with both shares, a threshold with 2t = k, a client that
does not check a frame's round and session, masks switched off, a node without any policy, a wire
decoder without its depth and integer bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.secagg import SecAggAggregator, SecAggClient, prg
from aggregation.secagg.messages import SECRET_ELEMENTS, Unmask, UnmaskRequest
from attacks.redteam import Target, ckks_attacks, dictation, malformed, passive, replay, secagg_attacks
from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.aggregators import build_aggregator

CONFIG = "configs/movielens.yaml"


def _target(tmp_path, kind="secagg", n=10, *sets, **kw) -> Target:
    config = load_config(CONFIG, [f"aggregation.kind={kind}", *sets])
    return Target(config, n, 16, tmp_path, **kw)


# ------------------------------------------------------------------------------- weakened parts


class LeakyClient(SecAggClient):
    """Skips the overlap check: a peer listed as both survived and dropped gets both of its shares revealed."""

    def _unmask(self, data: bytes) -> list[bytes]:
        r = UnmaskRequest.decode(data, self.ctx, self.id)
        seed_ids = np.array(sorted(int(i) for i in r.survivors), dtype=np.int64)
        key_ids = np.array(sorted(int(i) for i in r.dropped), dtype=np.int64)
        seeds = np.stack([self._held[int(p)][SECRET_ELEMENTS:] for p in seed_ids])
        keys = np.zeros((0, SECRET_ELEMENTS), np.uint64)
        if key_ids.size:
            keys = np.stack([self._held[int(p)][:SECRET_ELEMENTS] for p in key_ids])
        self._stage = type(self._stage).DONE
        return [Unmask(seed_ids, seeds, key_ids, keys).encode(self.ctx, self.id)]


def leaky_secagg(config, ids):
    agg = build_aggregator(config, ids)

    class Leaky(SecAggAggregator):
        def client(self, ctx, client_id, vector, weight, *, integer_noise=None):
            ids_ = self.identities.for_client(client_id) if self.identities else None
            return LeakyClient(ctx, client_id, vector, weight, self.quantizer, self.degree(ctx), self.threshold(ctx), ids_, integer_noise)

    return Leaky(agg.config, agg.quantizer.max_clients, agg.identities)


class Restamping:
    """A client half that does not check which round and session a frame is for: it rewrites both."""

    def __init__(self, inner, ctx: RoundContext) -> None:
        self.inner, self.ctx = inner, ctx

    def receive(self, data: bytes) -> list[bytes]:
        f = wire.decode(data)
        header = {**f.header, "round": self.ctx.round}
        if "session" in header:
            header["session"] = self.ctx.session_id.hex()
        return self.inner.receive(wire.encode(wire.Frame(f.kind, header, f.tensors)))

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
    assert rows["dictate-threshold-1"].evidence["node_runs"]["aggregation"]["threshold"] == 1
    rows = {r.name: r for r in dictation.dictation(_target(tmp_path))}  # the shipped node, its policy from the user's config
    for name in ("dictate-plain", "dictate-threshold-1"):
        assert rows[name].verdict == "refused" and "node policy refuses" in rows[name].evidence["refusal"]


def test_overlapping_lists_recover_an_update_from_clients_that_skip_the_overlap_check(tmp_path):
    honest = secagg_attacks.overlap(_target(tmp_path))
    assert honest.verdict == "refused" and honest.evidence["refusals"] == honest.evidence["forged_requests"] == 9
    assert "both survived and dropped" in honest.evidence["refusal_example"]
    leaky = secagg_attacks.overlap(_target(tmp_path, aggregator_factory=leaky_secagg))
    assert leaky.verdict == "recovered" and leaky.evidence["revealed_both"] == 9
    assert leaky.evidence["max_abs_error"] <= 2 * leaky.evidence["quantisation_step"]


def test_split_view_needs_no_colluder_when_2t_is_at_most_k(tmp_path):
    weak = secagg_attacks.split_view(_target(tmp_path, "secagg", 10, "aggregation.neighbours=8", "aggregation.threshold=4"))
    assert weak.verdict == "recovered" and weak.evidence["trials"][0]["recovered"]
    strict = secagg_attacks.split_view(_target(tmp_path, "secagg", 10, "aggregation.neighbours=9", "aggregation.threshold=9"))
    assert strict.verdict == "refused"  # t = k: the two views need 2(t - c) + c > k honest-or-colluding holders for every c < t
    assert all(not t["recovered"] for t in strict.evidence["trials"].values()) and strict.evidence["c_max"] == 8


def test_key_substitution_reads_every_share_unless_keys_are_signed(tmp_path):
    open_keys = secagg_attacks.key_substitution(_target(tmp_path))
    assert open_keys.verdict == "recovered" and open_keys.evidence["shares_read"] == 9
    signed = secagg_attacks.key_substitution(_target(tmp_path, "secagg", 10, "aggregation.signatures=true"))
    assert signed.verdict == "refused" and signed.evidence["shares_read"] == 0
    assert "signature" in signed.evidence["refusal_example"]


def test_grinding_places_colluders_unless_the_threshold_needs_more_than_exist(tmp_path):
    weak = secagg_attacks.grinding(_target(tmp_path, "secagg", 20), budget=256)
    assert weak.verdict == "recovered" and weak.evidence["colluding_neighbours_best"] >= 2 * weak.evidence["t"] - weak.evidence["k"]
    strict = secagg_attacks.grinding(_target(tmp_path, "secagg", 20, "aggregation.threshold=18", "aggregation.neighbours=19"), budget=256)
    assert strict.verdict == "refused" and strict.evidence["colluders_total"] == 2


def test_ckks_oracle_returns_one_update_or_a_subset_as_the_aggregate(tmp_path):
    single = ckks_attacks.single_ciphertext(_target(tmp_path, "ckks"))
    assert single.verdict == "recovered" and single.evidence["summed_ciphertexts"] == 1 and single.evidence["claimed_contributors"] == 10
    subset = ckks_attacks.subset(_target(tmp_path, "ckks"))
    assert subset.verdict == "recovered" and subset.evidence["summed_ciphertexts"] == 3
    assert max(single.evidence["max_abs_error"], subset.evidence["max_abs_error"]) < 1e-6


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
