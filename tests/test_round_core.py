"""One round of the round core against fake participants: no run directory, no disk, no task code.

The fakes speak the node protocol with hand-made frames, so these tests pin down what the server's
side of a round does on its own: whom it selects, what it broadcasts, how it drives the aggregator's
server half, how it applies the aggregate, and what it does with a host that misbehaves.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from toy_task import toy_config

from aggregation.base import RoundContext
from aggregation.plain import PlainAggregator
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.messages import FitInstruction, Report
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.round_core import RoundCore, RoundStopped
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.server import ServerPrivacy
from fedrlhf_secure.tasks.base import ParamEntry, ParamSpec

SPEC = ParamSpec((ParamEntry("w", (3,)),))


class FakeHost:
    """Hosts clients whose 'update' is a fixed vector; answers each op the way a participant host does."""

    def __init__(self, updates: dict[int, np.ndarray], weights: dict[int, float]) -> None:
        self.updates, self.weights = updates, weights
        self.halves = {}
        self.seen_ops: list[str] = []
        self.seen_models: list[np.ndarray] = []

    def handle(self, data: bytes) -> bytes:
        req = NodeMessage.decode(data, REQUEST)
        self.seen_ops.append(req.op)
        if req.op == "setup":
            return NodeMessage("setup", {"clients": sorted(self.updates), "dim": 3}).encode(RESPONSE)
        if req.op == "fit":
            ctx = RoundContext(bytes.fromhex(req.header["session"]), req.header["round"], tuple(req.header["participants"]), 3)
            fit = FitInstruction.decode(req.blobs["instruction"], ["w"])
            self.seen_models.append(fit.shared["w"].copy())
            agg = PlainAggregator()
            self.halves = {c: agg.client(ctx, c, self.updates[c], self.weights[c]) for c in req.header["clients"]}
            replies = {c: [r for m in msgs for r in self.halves[c].receive(m)] for c, msgs in req.messages.items()}
            return NodeMessage(
                "fit", {"round": ctx.round, "fit": {str(c): {"metrics": {"loss": 1.0}} for c in self.halves}}, replies
            ).encode(RESPONSE)
        if req.op == "evaluate":
            rnd = req.header["round"]
            reports = {c: [Report(c, rnd, {"correct": 1.0, "n": 2.0}).encode()] for c in req.header["clients"]}
            return NodeMessage("evaluate", {"round": rnd}, reports).encode(RESPONSE)
        raise AssertionError(f"unexpected op {req.op}")


class Link:
    def __init__(self, hosts):
        self.hosts = hosts

    def exchange(self, requests, timeout):
        return {n: self.hosts[n].handle(b) for n, b in requests.items()}


def _core(hosts, nodes, **fed):
    cfg = config_from_dict(toy_config(**{"rounds": 2, "sparse_rows": "all", **fed}))
    return RoundCore(
        cfg,
        UpdateCodec(SPEC, "all"),
        sorted(c for cs in nodes.values() for c in cs),
        {"w": np.zeros(3, np.float32)},
        Link(hosts),
        nodes,
        PlainAggregator(),
        ServerPrivacy(cfg),
    )


def test_one_round_applies_the_weighted_mean_of_the_participants_updates():
    updates = {0: np.array([1, 0, 0], np.float32), 1: np.array([0, 2, 0], np.float32), 2: np.array([0, 0, 4], np.float32)}
    weights = {0: 1.0, 1: 1.0, 2: 2.0}
    hosts = {7: FakeHost({0: updates[0], 1: updates[1]}, weights), 9: FakeHost({2: updates[2]}, weights)}
    core = _core(hosts, {7: [0, 1], 9: [2]})
    log = core.run_round(0)
    np.testing.assert_allclose(core.global_params["w"], [0.25, 0.5, 2.0])  # (1·u0 + 1·u1 + 2·u2) / 4
    assert core.model_round == 0
    assert log.row["clients_aggregated"] == 3 and log.row["heldout_accuracy"] == 0.5 and log.row["train_loss_mean"] == 1.0
    assert hosts[7].seen_ops == ["setup", "fit", "evaluate"]  # no admission round-trip without DP
    core.run_round(1)
    np.testing.assert_allclose(hosts[9].seen_models[1], [0.25, 0.5, 2.0])  # round 1 starts from round 0's model


def test_a_host_that_reports_clients_it_does_not_host_is_refused_at_setup():
    hosts = {0: FakeHost({0: np.zeros(3, np.float32), 1: np.zeros(3, np.float32)}, {0: 1.0, 1: 1.0})}
    with pytest.raises(Exception, match="reports clients"):
        _core(hosts, {0: [0]}, min_clients=1)


def test_fewer_clients_than_min_clients_stop_the_run_before_any_message():
    hosts = {0: FakeHost({0: np.zeros(3, np.float32)}, {0: 1.0})}
    with pytest.raises(RoundStopped, match="min_clients"):
        _core(hosts, {0: [0]}, min_clients=2)
    assert hosts[0].seen_ops == []


def _raw_response(header_json: str) -> bytes:
    """A node/response frame with a header written by hand (what a hostile node can send)."""
    kind, header = RESPONSE.encode(), header_json.encode()
    return b"FRLH" + struct.pack(">BB", 1, len(kind)) + kind + struct.pack(">I", len(header)) + header + struct.pack(">I", 0)


HOSTILE = {
    "not-a-frame": b"FRLH" + b"\xff" * 40,
    # json.loads gives up with RecursionError, not a ValueError
    "deep-nesting": _raw_response('{"op":"fit","x":' + "[" * 50_000 + "]" * 50_000 + "}"),
    # int() of more than 4300 digits raises ValueError
    "huge-integer": _raw_response('{"op":"fit","round":' + "9" * 5000 + "}"),
}


@pytest.mark.parametrize("op", ["fit", "evaluate"])
@pytest.mark.parametrize("frame", sorted(HOSTILE))
def test_one_hostile_frame_from_a_host_drops_only_that_hosts_clients(frame, op):
    class Hostile(FakeHost):
        def handle(self, data):
            if NodeMessage.decode(data, REQUEST).op == op:
                return HOSTILE[frame]
            return super().handle(data)

    weights = {0: 1.0, 1: 1.0}
    hosts = {0: FakeHost({0: np.ones(3, np.float32)}, weights), 1: Hostile({1: np.full(3, 9.0, np.float32)}, weights)}
    core = _core(hosts, {0: [0], 1: [1]}, min_clients=1)
    log = core.run_round(0)
    if op == "fit":  # its client's update never reached the aggregate
        np.testing.assert_allclose(core.global_params["w"], [1.0, 1.0, 1.0])
        assert log.row["clients_aggregated"] == 1 and log.row["nodes_dropped"] == 1
    else:  # aggregated normally; only its report is lost
        np.testing.assert_allclose(core.global_params["w"], [5.0, 5.0, 5.0])
        assert log.per_client.keys() == {0}


@pytest.mark.parametrize("frame, escapes", [("deep-nesting", RecursionError), ("huge-integer", ValueError)])
def test_the_hostile_frames_are_refused_by_the_decoders_bounds_not_by_luck(frame, escapes):
    """The positive control: parsed without the decoder's depth and integer bounds (plain json.loads,
    as the decoder did before), these headers raise RecursionError / ValueError, which are not
    WireErrors, and the server loop that skipped only WireError ended the whole run on them. With the
    bounds they are WireErrors like any other malformed frame."""
    from aggregation.wire import WireError

    header = HOSTILE[frame][4 + 2 + len(RESPONSE) + 4 : -4].decode()
    with pytest.raises(escapes):
        json.loads(header)
    with pytest.raises(WireError, match="levels deep|digits"):
        NodeMessage.decode(HOSTILE[frame], RESPONSE)
