"""Fuzzing the whole node protocol, both directions, with hypothesis.

Issue 12, item 6: one authenticated node ended a run with one frame (a deeply nested header, a
5000-digit integer), because the server loop skipped only ``WireError``. Here every op's response
is replaced by hostile bytes — raw garbage, mutated real frames, hand-written headers that nest
deep or hold huge integers, and well-formed frames with wrong types and sizes at any depth — and
the server must treat it as that node's failure: the round completes with the honest nodes'
clients (numbers asserted), and nothing but the documented errors ever escapes. In the other
direction every op's request is fuzzed against a real participant host, which must answer with a
well-formed refusal and keep serving.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_task import toy_config

from aggregation import wire
from aggregation.base import AggregateResult, Aggregator, Capabilities, ProtocolError, RoundContext, ServerHalf
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.messages import FitInstruction, Report
from fedrlhf_secure.federation.node_protocol import OPS, REQUEST, RESPONSE, NodeMessage, client_key, read_response
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.federation.policy import NodePolicy
from fedrlhf_secure.federation.round_core import RoundCore, TransportError
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.server import ServerPrivacy
from fedrlhf_secure.tasks.base import ParamEntry, ParamSpec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ------------------------------------------------------------------------------------ strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**80), 10**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12
)
FIELDS = [
    "round", "clients", "admitted", "epsilon_spent", "fit", "contributors", "discarded", "dim", "error", "session",
    "participants", "model_round", "client_ids", "reader", "metrics", "loss",
]  # fmt: skip
ids_like = st.one_of(st.sampled_from(["0", "1", "2", "3", "²", "٣", "-1", "9" * 5000, "", "0x1", " 1"]), st.text(max_size=4))
per_client = st.dictionaries(ids_like, json_values, max_size=4)
header_values = st.one_of(
    json_values, st.lists(st.integers(-3, 6), max_size=5), per_client, st.dictionaries(ids_like, per_client, max_size=3)
)
headers = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), header_values, max_size=6)
tensor_names = st.one_of(
    st.builds(lambda c, i: f"msg/{c}/{i}", ids_like, st.sampled_from(["0", "1", "4096", "²", "9" * 30])),
    st.sampled_from(["blob/config", "blob/instruction", "blob/shared", "array/w", "array/x", "weird", "msg/0", "msg//0"]),
    st.text(min_size=1, max_size=10),
)
arrays = st.one_of(
    st.binary(max_size=24).map(wire.as_blob),
    st.sampled_from(
        [
            np.zeros(3, np.float32),
            np.ones((2, 2), np.float32),
            np.arange(4, dtype=np.int64),
            np.array([np.nan, np.inf, 1.0], np.float32),
            np.zeros(0, np.uint8),
            np.zeros(5, np.float64),
        ]
    ),
)
tensor_maps = st.dictionaries(tensor_names, arrays, max_size=4)


def _head(op: str) -> str:
    """The start of a hand-written header: ``{"op":"<op>"``."""
    return '{"op":"' + op + '"'


def _raw_frame(kind: str, header_json: str, payload: bytes = b"") -> bytes:
    k, h = kind.encode(), header_json.encode()
    return b"FRLH" + struct.pack(">BB", 1, len(k)) + k + struct.pack(">I", len(h)) + h + struct.pack(">I", len(payload)) + payload


@st.composite
def hostile_frames(draw, kind: str, op: str) -> bytes:
    """Bytes a hostile peer can send in place of a ``kind`` frame for ``op``."""
    shape = draw(st.sampled_from(["structured", "structured", "structured", "hand-written", "mutated", "garbage"]))
    if shape == "garbage":
        return draw(st.binary(max_size=200))
    if shape == "hand-written":  # what no encoder writes: deep nesting, huge integers, non-objects
        text = draw(
            st.sampled_from(
                [
                    _head(op) + ',"x":' + "[" * 50_000 + "]" * 50_000 + "}",
                    _head(op) + ',"round":' + "9" * 5000 + "}",
                    _head(op) + ',"clients":[' + "1" * 400 + "]}",
                    _head(op) + ',"fit":{"' + "1" * 5000 + '":{}}}',
                    _head(op) + ',"admitted":[1e400]}',
                    _head(op) + ',"round":NaN}',
                    '["op"]',
                    _head(op),
                    _head(op) + ',"x":"\\ud800"}',
                ]
            )
        )
        return _raw_frame(kind, text)
    if shape == "mutated":
        good = NodeMessage(op, draw(headers), {0: [b"abc"]}).encode(kind)
        pos = draw(st.integers(0, len(good) - 1))
        return good[:pos] + bytes([draw(st.integers(0, 255))]) + good[pos + 1 :]
    header = {"op": draw(st.sampled_from([op, op, "exec", 7, None])), **draw(headers)}
    try:
        return wire.encode(wire.Frame(kind, header, draw(tensor_maps)))
    except (wire.WireError, ValueError):  # a header json cannot write (e.g. an unpaired surrogate): send garbage instead
        return draw(st.binary(max_size=64))


# ------------------------------------------------------------------------------------ decoders


@FUZZ
@given(data=st.data(), kind=st.sampled_from([REQUEST, RESPONSE]), op=st.sampled_from(OPS))
def test_the_node_message_decoder_raises_only_wire_errors(data, kind, op):
    frame = data.draw(hostile_frames(kind, op))
    try:
        msg = NodeMessage.decode(frame, kind)
    except wire.WireError:
        return
    assert msg.op in OPS
    assert all(isinstance(c, int) and 0 <= c for c in msg.messages)
    assert all(isinstance(b, bytes) for msgs in msg.messages.values() for b in msgs)


@st.composite
def hostile_inner_frames(draw, kind: str) -> bytes:
    """A ``fed/fit`` or ``fed/report`` frame (carried inside node messages) as a hostile peer writes it."""
    shape = draw(st.sampled_from(["structured", "structured", "garbage", "hand-written"]))
    if shape == "garbage":
        return draw(st.binary(max_size=120))
    if shape == "hand-written":
        body = draw(st.sampled_from(['{"metrics":{"n":' + "9" * 5000 + "}}", '{"metrics":' + "[" * 40_000 + "]" * 40_000 + "}", "[]"]))
        return _raw_frame(kind, body)
    header = draw(st.dictionaries(st.sampled_from(["round", "client", "metrics", "local_epochs", "seed", "client_held"]), header_values))
    try:
        return wire.encode(
            wire.Frame(kind, header, draw(st.dictionaries(st.sampled_from(["shared/w", "shared/x", "w"]), arrays, max_size=2)))
        )
    except (wire.WireError, ValueError):
        return draw(st.binary(max_size=64))


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["fed/fit", "fed/report"]))
def test_the_fit_instruction_and_report_decoders_raise_only_wire_errors(data, kind):
    frame = data.draw(hostile_inner_frames(kind))
    try:
        if kind == "fed/fit":
            fit = FitInstruction.decode(frame, ["w"])
            assert fit.client_held or fit.shared["w"].dtype == np.float32
        else:
            rep = Report.decode(frame)
            assert all(isinstance(v, float) for v in rep.metrics.values())
    except wire.WireError:
        pass


@pytest.mark.parametrize(
    "name", ["msg/²/0", "msg/0/²", "msg/" + "9" * 5000 + "/0", "msg/0/" + "9" * 5000, "msg/-1/0", "msg/0/4096", "msg/0", "array/", "x"]
)
@pytest.mark.parametrize("kind", [REQUEST, RESPONSE])
def test_tensor_names_a_peer_writes_are_wire_errors_never_value_errors(name, kind):
    data = wire.encode(wire.Frame(kind, {"op": "agg"}, {name: wire.as_blob(b"x")}))
    with pytest.raises(wire.WireError, match="malformed message tensor name|unexpected tensor"):
        NodeMessage.decode(data, kind)


@pytest.mark.parametrize(
    "text, value", [("17", 17), ("0", 0), ("²", None), ("٣", None), ("-1", None), ("9" * 5000, None), ("", None), (3, None)]
)
def test_client_keys_from_a_peer_are_ascii_decimal_and_short(text, value):
    assert client_key(text) == value


def test_read_response_turns_every_hostile_frame_into_node_unusable():
    from fedrlhf_secure.federation.node_protocol import NodeUnusable

    for frame in (b"", b"FRLH", _raw_frame(RESPONSE, '{"op":"fit","x":' + "[" * 50_000 + "]" * 50_000 + "}")):
        with pytest.raises(NodeUnusable, match="malformed"):
            read_response(frame, "fit stage")
    name = wire.encode(wire.Frame(RESPONSE, {"op": "agg"}, {"msg/²/0": wire.as_blob(b"x")}))
    with pytest.raises(NodeUnusable, match="malformed message tensor name"):
        read_response(name, "agg stage")


# ------------------------------------------------------------------------------------ server side

SPEC = ParamSpec((ParamEntry("w", (3,)),))
DIM = 3


class ScriptedServer(ServerHalf):
    """A two-stage aggregation: open (s0) -> r0 replies, agg (s1) -> r1 replies, then finish (fin)."""

    def __init__(self, ctx: RoundContext, readable: bool) -> None:
        self.ctx, self.readable = ctx, readable
        self.stage, self.got = 0, {0: set(), 1: set()}
        self._done = False

    def start(self):
        return [(c, b"s0") for c in self.ctx.participants]

    def receive(self, sender, data):
        want = {0: b"r0", 1: b"r1"}.get(self.stage)
        if sender not in self.ctx.participants or data != want or sender in self.got[self.stage]:
            raise ProtocolError(f"unexpected {data[:8]!r} from {sender} in stage {self.stage}")
        if self.stage == 1 and sender not in self.got[0]:
            raise ProtocolError(f"client {sender} skipped stage 0")
        self.got[self.stage].add(sender)
        return []

    def close_stage(self):
        if self.stage == 0:
            self.stage = 1
            return [(c, b"s1") for c in sorted(self.got[0])]
        self._done = True
        return [(c, b"fin") for c in sorted(self.got[1])]

    @property
    def done(self):
        return self._done

    def result(self):
        if not self.readable:
            return None
        contributors = tuple(sorted(self.got[1]))
        # each contributor's update is the all-ones vector with weight 1
        return AggregateResult(np.full(DIM, float(len(contributors))), float(len(contributors)), contributors)


class ScriptedAggregator(Aggregator):
    kind = "scripted"

    def __init__(self, readable: bool) -> None:
        self.capabilities = Capabilities(server_reads_result=readable)

    def server(self, ctx):
        return ScriptedServer(ctx, self.capabilities.server_reads_result)

    def client(self, ctx, client_id, vector, weight, *, integer_noise=None):  # pragma: no cover - the hosts below play clients
        raise AssertionError


MODEL = {"w": np.full(DIM, 7.0, np.float32)}


class HonestHost:
    """Answers every op correctly for the clients it hosts."""

    def __init__(self, clients: list[int]) -> None:
        self.clients = clients

    def handle(self, data: bytes) -> bytes:
        req = NodeMessage.decode(data, REQUEST)
        op, h = req.op, req.header
        if op == "setup":
            return NodeMessage("setup", {"clients": self.clients, "dim": DIM}).encode(RESPONSE)
        if op == "admit":
            return NodeMessage(
                "admit", {"round": h["round"], "admitted": h["clients"], "epsilon_spent": {str(c): 0.5 for c in self.clients}}
            ).encode(RESPONSE)
        if op == "fit":
            summary = {str(c): {"metrics": {"loss": 1.0}, "epsilon_spent": 0.5} for c in h["clients"]}
            return NodeMessage("fit", {"round": h["round"], "fit": summary}, {c: [b"r0"] for c in req.messages}).encode(RESPONSE)
        if op == "agg":
            return NodeMessage("agg", {"round": h["round"]}, {c: [b"r1"] for c in req.messages}).encode(RESPONSE)
        if op == "finish":
            return NodeMessage("finish", {"round": h["round"], "contributors": [0, 1, 2, 3, 4, 5], "reader": self.clients[0]}).encode(
                RESPONSE
            )
        if op == "evaluate":
            reports = {c: [Report(c, h["round"], {"correct": 1.0, "n": 2.0}).encode()] for c in h["clients"]}
            return NodeMessage("evaluate", {"round": h["round"]}, reports).encode(RESPONSE)
        if op == "release":
            return NodeMessage("release", {"round": 0}, arrays=dict(MODEL)).encode(RESPONSE)
        raise AssertionError(op)


class HostileHost(HonestHost):
    """Honest, except that its answer to ``op`` is replaced by ``frame``."""

    def __init__(self, clients: list[int], op: str, frame: bytes) -> None:
        super().__init__(clients)
        self.op, self.frame = op, frame

    def handle(self, data: bytes) -> bytes:
        if NodeMessage.decode(data, REQUEST).op == self.op:
            return self.frame
        return super().handle(data)


NODES = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
HOSTILE = 2


@dataclass
class Outcome:
    core: RoundCore
    row: dict
    per_client: dict


def _core(hosts, *, dp: bool, readable: bool) -> RoundCore:
    raw = toy_config(rounds=1, sparse_rows="all", min_clients=2)
    if dp:
        raw["privacy"] = {"mode": "record", "noise_multiplier": 1.0, "delta": 1e-3}
    cfg = config_from_dict(raw)
    agg = ScriptedAggregator(readable)
    return RoundCore(
        cfg,
        UpdateCodec(SPEC, "all"),
        sorted(c for cs in NODES.values() for c in cs),
        {"w": np.zeros(DIM, np.float32)},
        _Link(hosts),
        NODES,
        agg,
        ServerPrivacy(cfg, aggregator=agg),
        fit_timeout=1.0,
        stage_timeout=1.0,
    )


class _Link:
    def __init__(self, hosts):
        self.hosts = hosts

    def exchange(self, requests, timeout):
        return {n: self.hosts[n].handle(b) for n, b in requests.items()}


# which ops a round exercises, and under which configuration: admit needs DP on; finish and
# release are the client-held (CKKS-like) path
ROUND_OPS = {"admit": (True, True), "fit": (False, True), "agg": (False, True), "evaluate": (False, True), "finish": (False, False)}


@FUZZ
@given(data=st.data(), op=st.sampled_from(sorted(ROUND_OPS)))
def test_a_hostile_response_to_any_round_op_costs_only_that_nodes_clients(data, op):
    frame = data.draw(hostile_frames(RESPONSE, data.draw(st.sampled_from([op, op, "fit", "agg"]))))
    dp, readable = ROUND_OPS[op]
    hosts = {n: HonestHost(c) for n, c in NODES.items()}
    hosts[HOSTILE] = HostileHost(NODES[HOSTILE], op, frame)
    core = _core(hosts, dp=dp, readable=readable)
    log = core.run_round(0)  # nothing escapes: the round completes
    row = log.row
    honest = [c for n, cs in NODES.items() if n != HOSTILE for c in cs]
    assert row["round"] == 0 and row["aggregation_aborted"] is None
    if readable:
        # the aggregate holds every honest client (and the hostile node's only if its answer was usable)
        assert 4 <= row["clients_aggregated"] <= 6
        np.testing.assert_allclose(core.global_params["w"], np.ones(DIM))  # the mean of all-ones updates
    assert set(honest) <= set(log.per_client)  # every honest client's report arrived
    assert row["heldout_accuracy"] == 0.5


@FUZZ
@given(data=st.data())
def test_a_hostile_release_is_outvoted_and_the_majoritys_model_is_released(data):
    frame = data.draw(hostile_frames(RESPONSE, "release"))
    hosts = {n: HonestHost(c) for n, c in NODES.items()}
    hosts[HOSTILE] = HostileHost(NODES[HOSTILE], "release", frame)
    core = _core(hosts, dp=False, readable=False)
    model = core.release_model(0)
    np.testing.assert_array_equal(model["w"], MODEL["w"])


def test_a_different_model_from_one_node_is_outvoted_but_two_nodes_split_evenly_release_nothing(caplog):
    other = NodeMessage("release", {"round": 0}, arrays={"w": np.zeros(DIM, np.float32)}).encode(RESPONSE)
    hosts = {n: HonestHost(c) for n, c in NODES.items()}
    hosts[HOSTILE] = HostileHost(NODES[HOSTILE], "release", other)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(_core(hosts, dp=False, readable=False).release_model(0)["w"], MODEL["w"])
    assert "nodes [2] released a final model that differs" in caplog.text
    hosts[1] = HostileHost(
        NODES[1], "release", NodeMessage("release", {"round": 0}, arrays={"w": np.ones(DIM, np.float32)}).encode(RESPONSE)
    )
    with pytest.raises(TransportError, match="no copy has a majority"):
        _core(hosts, dp=False, readable=False).release_model(0)


@FUZZ
@given(data=st.data())
def test_a_hostile_setup_response_is_a_transport_error_naming_the_node(data):
    frame = data.draw(hostile_frames(RESPONSE, "setup"))
    hosts = {n: HonestHost(c) for n, c in NODES.items()}
    hosts[HOSTILE] = HostileHost(NODES[HOSTILE], "setup", frame)
    try:
        _core(hosts, dp=False, readable=True)
    except TransportError as exc:
        assert "node 2" in str(exc)


@pytest.mark.parametrize("op", sorted(ROUND_OPS))
def test_the_numbers_with_one_node_answering_garbage_every_round(op):
    """The concrete numbers: node 2 answers ``op`` with a 5000-digit integer in every one of 3
    rounds; all 3 rounds complete, its 2 clients are dropped (or only their reports lost), and the
    other 4 aggregate each round."""
    frame = _raw_frame(RESPONSE, _head(op) + ',"round":' + "9" * 5000 + "}")
    dp, readable = ROUND_OPS[op]
    hosts = {n: HonestHost(c) for n, c in NODES.items()}
    hosts[HOSTILE] = HostileHost(NODES[HOSTILE], op, frame)
    core = _core(hosts, dp=dp, readable=readable)
    rows = [core.run_round(r).row for r in range(3)]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["aggregation_aborted"] is None for r in rows)
    for row in rows:
        if op in ("fit", "agg"):
            assert (row["clients_aggregated"], row["clients_dropped"], row["nodes_dropped"]) == (4, 2, 1)
        elif op == "admit":
            assert (row["clients_refused"], row["clients_aggregated"]) == (2, 4)
        elif op == "evaluate":
            assert row["clients_aggregated"] == 6
        else:  # finish: the other nodes still say whom the aggregate holds
            assert row["clients_aggregated"] == 6


class _GarbleAfterSetup:
    """A real participant host whose answer to every ``op`` request becomes ``frame``."""

    def __init__(self, host: ParticipantHost, op: str, frame: bytes) -> None:
        self.host, self.op, self.frame = host, op, frame

    def handle(self, data: bytes) -> bytes:
        resp = self.host.handle(data)
        return self.frame if NodeMessage.decode(data, REQUEST).op == self.op else resp


@pytest.mark.parametrize("frame_name", ["deep-nesting", "huge-integer", "unicode-client-id", "metrics-not-a-mapping"])
def test_real_secagg_rounds_complete_without_the_node_that_sends_a_malformed_frame(frame_name, tmp_path):
    """Real participant hosts and real SecAgg: node 1 answers SecAgg's second stage with a malformed
    frame in every round; both rounds complete through dropout recovery with the other 4 clients."""
    from fedrlhf_secure.federation.engine import RunOptions, run_remote_federation
    from fedrlhf_secure.federation.links import InProcessLink

    raw = toy_config(rounds=2, sparse_rows="all")
    raw["task"]["clients"] = 6
    raw["aggregation"] = {"kind": "secagg", "clip_range": 8.0}
    nodes = {0: [0, 3], 1: [1, 4], 2: [2, 5]}
    frames = {
        "deep-nesting": ("agg", _raw_frame(RESPONSE, '{"op":"agg","x":' + "[" * 50_000 + "]" * 50_000 + "}")),
        "huge-integer": ("agg", _raw_frame(RESPONSE, '{"op":"agg","round":' + "9" * 5000 + "}")),
        "unicode-client-id": ("agg", wire.encode(wire.Frame(RESPONSE, {"op": "agg", "round": 0}, {"msg/²/0": wire.as_blob(b"x")}))),
        "metrics-not-a-mapping": ("fit", None),
    }
    op, frame = frames[frame_name]
    policy = NodePolicy.from_config(config_from_dict(raw))
    from fedrlhf_secure.keys import deal_secagg_identities

    server_keys, node_keys = tmp_path / "keys-server", {n: tmp_path / f"keys-{n}" for n in nodes}
    deal_secagg_identities(list(nodes.values()), server_keys, list(node_keys.values()), tmp_path / "registry")
    hosts = {n: ParticipantHost(c, None, node_keys[n], policy=policy) for n, c in nodes.items()}
    if frame is None:  # the fit answer is real, but client 1's metrics are a list and client 4's key is "٤"

        class _Summary(_GarbleAfterSetup):
            def handle(self, data):
                resp = NodeMessage.decode(self.host.handle(data), RESPONSE)
                if resp.op == "fit":
                    resp = NodeMessage("fit", {**resp.header, "fit": {"1": {"metrics": [1, 2]}, "٤": {}}}, resp.messages)
                return resp.encode(RESPONSE)

        link = InProcessLink({**hosts, 1: _Summary(hosts[1], op, b"")})
    else:
        link = InProcessLink({**hosts, 1: _GarbleAfterSetup(hosts[1], op, frame)})
    run = run_remote_federation(config_from_dict(raw), link, nodes, RunOptions(out=tmp_path / "runs", progress=False), keys_dir=server_keys)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    if frame is None:  # its updates still count: only the malformed metrics were ignored
        assert [(r["clients_aggregated"], r["nodes_dropped"]) for r in rows] == [(6, 0), (6, 0)]
    else:
        assert [(r["clients_aggregated"], r["clients_dropped"], r["nodes_dropped"]) for r in rows] == [(4, 2, 1), (4, 2, 1)]


# ------------------------------------------------------------------------------------ client side

ALLOWED_REFUSALS = ("WireError", "NodeError", "ProtocolError", "PolicyRefused", "ConfigError")


@pytest.fixture(scope="module")
def plain_raw():
    return toy_config(sparse_rows="all")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@st.composite
def hostile_requests(draw, op: str) -> bytes:
    """A request for ``op`` with real-looking fields that have the wrong types, sizes or values."""
    if draw(st.booleans()):
        return draw(hostile_frames(REQUEST, op))
    good = {
        "round": 0,
        "session": "00" * 16,
        "participants": [0, 1, 2, 3],
        "dim": 16,
        "clients": [0, 2],
        "client_ids": [0, 1, 2, 3],
        "model_round": -1,
    }
    header = dict(good)
    for key in draw(st.lists(st.sampled_from(sorted(good)), max_size=3)):
        header[key] = draw(header_values)
    blobs = draw(
        st.dictionaries(
            st.sampled_from(["instruction", "shared", "config"]),
            st.one_of(
                st.binary(max_size=40),
                st.just(FitInstruction(0, 1, 0, {}, True).encode()),
                st.just(yaml.safe_dump({"task": {"kind": "toy"}, "aggregation": {"kind": "plain"}}).encode()),
                st.just(b"task: [unclosed"),
                st.just(b"\xff\xfe"),
            ),
            max_size=2,
        )
    )
    messages = draw(st.dictionaries(st.integers(0, 5), st.lists(st.binary(max_size=16), min_size=1, max_size=2), max_size=2))
    try:
        return NodeMessage(op, header, messages, blobs).encode(REQUEST)
    except (wire.WireError, ValueError):
        return draw(st.binary(max_size=64))


@FUZZ
@given(data=st.data(), op=st.sampled_from(OPS))
def test_a_participant_host_refuses_any_hostile_request_and_keeps_serving(data, op, plain_raw):
    host = ParticipantHost([0, 2], None, policy=NodePolicy.from_config(config_from_dict(plain_raw)))
    setup = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": yaml.safe_dump(plain_raw).encode()})
    assert "error" not in NodeMessage.decode(host.handle(setup.encode(REQUEST)), RESPONSE).header
    errors = _Collect()
    log = logging.getLogger("fedrlhf_secure.federation.participant")
    log.addHandler(errors)
    try:
        resp = NodeMessage.decode(host.handle(data.draw(hostile_requests(op))), RESPONSE)
    finally:
        log.removeHandler(errors)
    if "error" in resp.header:
        assert resp.header["error"].startswith(ALLOWED_REFUSALS), resp.header["error"]
    # the host's catch-all logs a request that failed outside the validated refusals: none may
    assert not errors.records, errors.records[0].getMessage() + str(errors.records[0].exc_info)
    # and the host still serves: a correct evaluate request after the hostile one is answered
    shared = FitInstruction(0, 0, 3, {"table": np.zeros((6, 2), np.float32), "w": np.zeros(4, np.float32)}).encode()
    ok = NodeMessage("evaluate", {"round": 0, "clients": [0, 2], "model_round": -1}, blobs={"shared": shared})
    reply = NodeMessage.decode(host.handle(ok.encode(REQUEST)), RESPONSE)
    assert "error" not in reply.header and sorted(reply.messages) == [0, 2]


def test_json_huge_integer_control():
    """Positive control for the hand-written frames: without the decoder's bounds json.loads fails
    with ValueError (and RecursionError on deep nesting), which is what ended runs on main."""
    with pytest.raises(ValueError):
        json.loads('{"round":' + "9" * 5000 + "}")
