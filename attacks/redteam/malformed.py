"""Malformed frames from one node against the server loop (the round core).

One authenticated node can send anything in its responses. The server loop must treat any
malformed frame — not a frame, a header nested 50,000 deep (``json.loads`` recursion), a
5,000-digit integer (``int()`` refuses > 4,300 digits), or a well-formed frame with a wrong type at
any depth of its header or in its tensors — as that node's failure: its clients drop out, the
others' round completes. The attack runs the real :class:`~fedrlhf_secure.federation.round_core.RoundCore`
over real participant hosts, one of which rewrites its answer to one operation; it succeeds when
anything ends the run after setup, or when an exception outside the project's error family
escapes (a crash, not a refusal), at setup included.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import wire
from fedrlhf_secure.errors import exit_status
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.round_core import RoundCore
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.server import ServerPrivacy

from .harness import Target
from .report import AttackResult

CLAIM = "One node's malformed frame (deep nesting, huge integers, wrong types at any depth) costs only that node's clients, never the run."
NODES = 3
CLIENTS_PER_NODE = 2
WRONG = ("x", [], {}, None, True, -1, 10**30, 1.5)
"""Values of the wrong type put in place of each header field in turn."""
MAX_CASES_PER_OP = 48


def _raw(header: str) -> bytes:
    """A node/response frame whose header is written by hand (what a hostile node can send)."""
    kind, head = RESPONSE.encode(), header.encode()
    return wire.MAGIC + struct.pack(">BB", wire.WIRE_VERSION, len(kind)) + kind + struct.pack(">I", len(head)) + head + struct.pack(">I", 0)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    if isinstance(value, dict):
        return {**value, path[0]: _replace(value[path[0]], path[1:], new)}
    out = list(value)
    out[path[0]] = _replace(out[path[0]], path[1:], new)
    return out


def mutations(real: bytes) -> Iterator[tuple[str, Any]]:
    """(description, hostile response or a function of the real one) for one operation's response."""
    yield "not a frame", wire.MAGIC + b"\xff" * 40
    yield "header nested 50,000 deep", _raw('{"op":"fit","x":' + "[" * 50_000 + "]" * 50_000 + "}")
    yield "5,000-digit integer", _raw('{"op":"fit","round":' + "9" * 5000 + "}")
    try:
        msg = NodeMessage.decode(real, RESPONSE)
    except wire.WireError:
        return
    header = {"op": msg.op, **msg.header}
    paths = list(_paths({k: v for k, v in header.items() if k != "op"}))
    # every path with the first wrong value, then every path with the next one, ... (a cap keeps breadth)
    combos = [(path, new) for new in WRONG for path in paths][:MAX_CASES_PER_OP]
    for path, new in combos:
        hostile = _replace(header, path, new)
        yield f"header {'.'.join(map(str, path))} = {json.dumps(new)}", _raw(json.dumps(hostile))
    for cid in list(msg.messages)[:1]:
        junk = {**msg.messages, cid: [b"\x00garbage"]}
        yield f"client {cid}'s message replaced by junk", NodeMessage(msg.op, msg.header, junk, msg.blobs, msg.arrays).encode(RESPONSE)
        yield (
            "a message for a client the node does not host",
            NodeMessage(msg.op, msg.header, {**msg.messages, 10_000: [b"x"]}, msg.blobs, msg.arrays).encode(RESPONSE),
        )
    for name in list(msg.arrays)[:1]:
        bad = {**msg.arrays, name: np.zeros((2, 2), np.int8)}
        yield f"array {name} of the wrong dtype and shape", NodeMessage(msg.op, msg.header, msg.messages, msg.blobs, bad).encode(RESPONSE)


class _Hostile:
    """A real participant host whose answer to one operation is replaced."""

    def __init__(self, inner: Any, op: str, forge) -> None:
        self.inner, self.op, self.forge = inner, op, forge
        self.real: bytes | None = None

    def handle(self, data: bytes) -> bytes:
        out = self.inner.handle(data)
        if NodeMessage.decode(data, REQUEST).op == self.op and self.real is None:
            self.real = out
            return self.forge(out) if callable(self.forge) else self.forge
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _round(target: Target, config, aggregator, workdir: Path, op: str | None, forge) -> tuple[dict[str, Any], bytes | None]:
    """One round over ``NODES`` real hosts, the last hostile at ``op``; what happened, and its real answer."""
    n = NODES * CLIENTS_PER_NODE
    ids = list(range(n))
    task = target.task(n)
    groups = {h: ids[h::NODES] for h in range(NODES)}
    hosts: dict[int, Any] = {
        h: target.make_host(groups[h], task, workdir / f"node{h}", user_config=config, aggregator=aggregator) for h in groups
    }
    hostile = _Hostile(hosts[NODES - 1], op or "-", forge)
    hosts[NODES - 1] = hostile
    out: dict[str, Any] = {}
    try:
        codec = UpdateCodec(task.shared_spec(), config.federation.sparse_rows)
        privacy = ServerPrivacy(config, None, aggregator)
        core = RoundCore(config, codec, ids, task.initial_shared(), InProcessLink(hosts), groups, aggregator, privacy)
        log = core.run_round(0)
        out["clients_aggregated"] = log.row["clients_aggregated"]
        out["nodes_dropped"] = log.row["nodes_dropped"]
        if core.client_held:
            core.release_model(0)
    except Exception as exc:  # noqa: BLE001 - exactly what the attack looks for
        out["ended"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out["family"] = exit_status(exc) is not None  # the CLI reports it as an error (not a crash with a traceback)
    return out, hostile.real


def malformed_frames(target: Target) -> AttackResult:
    name = "node-malformed-frames"
    config = target.protocol_config()
    raw = config.to_mapping()
    raw["federation"] = {**raw["federation"], "rounds": 1, "fraction": 1.0, "workers": 1, "dropout_rate": 0.0}
    from fedrlhf_secure.config import build_config

    config = build_config(raw, source="<redteam>")
    ops = ["setup", "fit", "agg", "finish", "evaluate"] + (["release"] if config.aggregation.kind == "ckks" else [])
    aggregator = target.aggregator(config, list(range(NODES * CLIENTS_PER_NODE)))
    aggregator.prepare(1)
    quiet = logging.getLogger("fedrlhf_secure")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the round core logs every hostile frame it skips: that is the point
    try:
        return _malformed(target, config, aggregator, ops, name)
    finally:
        quiet.setLevel(level)


def _malformed(target: Target, config, aggregator, ops: list[str], name: str) -> AttackResult:
    failures, cases, per_op = [], 0, {}
    with tempfile.TemporaryDirectory(dir=target.workdir) as tmp:
        base, _ = _round(target, config, aggregator, Path(tmp) / "honest", None, None)
        if "ended" in base:
            return AttackResult(name, "error", f"the honest round does not complete: {base['ended'][:100]}", CLAIM, {"honest": base})
        for op in ops:
            _, real = _round(target, config, aggregator, Path(tmp) / f"probe-{op}", op, lambda b: b)
            if real is None:
                per_op[op] = "not used by this aggregation"
                continue
            count = 0
            for i, (what, forged) in enumerate(mutations(real)):
                outcome, _ = _round(target, config, aggregator, Path(tmp) / f"{op}-{i}", op, forged)
                cases += 1
                count += 1
                ended = outcome.get("ended")
                crash = ended is not None and (op != "setup" or not outcome.get("family"))
                if crash:
                    failures.append({"op": op, "frame": what, "ended": ended})
            per_op[op] = count
    ev = {"cases": cases, "per_op": per_op, "honest_round": base, "failures": failures[:20], "failures_total": len(failures)}
    if failures:
        f = failures[0]
        example = f"{f['op']}: {f['frame']} -> {f['ended'][:60]}"
        return AttackResult(name, "recovered", f"{len(failures)} of {cases} hostile frames ended the run (e.g. {example})", CLAIM, ev)
    return AttackResult(name, "refused", f"all {cases} hostile frames (6 operations) cost only the hostile node's clients", CLAIM, ev)
