"""The frames between the server loop and one node (a SuperNode hosting one or more clients).

A node hosts several client ids, so one request carries the frames for all of them: the same
:mod:`aggregation.wire` format, with each client's payloads as uint8 tensors named
``msg/<client>/<i>`` and every other field in the typed JSON header. Nothing is pickled.

Operations (``op`` in the request header):

``setup``     run config (YAML), all client ids               -> the ids this node hosts (no example counts)
``admit``     round, the selected clients it hosts            -> which of them its privacy plan admits (a
              client whose next release would exceed its ε budget refuses) and each one's reported ε spent
``fit``       fit instruction, round context, the aggregator's opening messages per client
              -> per-client training metrics (numbers) and the first replies
``agg``       aggregator messages per client                  -> replies per client
``finish``    last aggregator messages (e.g. CKKS aggregate)   -> the contributors (CKKS: the node applies the
              aggregate it decrypted to the global model it holds; the server never sees it)
``evaluate``  global shared parameters (or none: client-held)  -> one ``fed/report`` frame per client
``release``   (CKKS, after the last round)                     -> the global model the node holds, for the
              run directory's ``model.safetensors`` (the deliberate release of the final model)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation import wire

from ..errors import RunFailed

REQUEST = "node/request"
RESPONSE = "node/response"
OPS = ("setup", "admit", "fit", "agg", "finish", "evaluate", "release")
MAX_MESSAGES_PER_CLIENT = 4096
MAX_ID_DIGITS = 18
"""Longest decimal client id or message index in a tensor name or a per-client header key (fits int64)."""


def client_key(text: object) -> int | None:
    """``"17"`` -> 17; anything else (``"²"``, ``"-1"``, 5000 digits, not a string) -> None.

    ``str.isdigit`` accepts Unicode digits that ``int`` refuses (``"²"``) and ``int`` refuses more
    than 4300 digits with ValueError, so per-client keys from a peer are read only through this."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_ID_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


@dataclass(frozen=True)
class NodeMessage:
    """One request or response: an op, a typed header, and per-client byte messages."""

    op: str
    header: Mapping[str, Any] = field(default_factory=dict)
    messages: Mapping[int, list[bytes]] = field(default_factory=dict)
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def encode(self, kind: str) -> bytes:
        if self.op not in OPS:
            raise wire.WireError(f"unknown node op {self.op!r}; expected one of {OPS}")
        tensors: dict[str, np.ndarray] = {}
        for cid, msgs in self.messages.items():
            for i, m in enumerate(msgs):
                tensors[f"msg/{int(cid)}/{i}"] = wire.as_blob(m)
        for name, data in self.blobs.items():
            tensors[f"blob/{name}"] = wire.as_blob(data)
        for name, arr in self.arrays.items():
            tensors[f"array/{name}"] = arr
        return wire.encode(wire.Frame(kind, {"op": self.op, **self.header}, tensors))

    @classmethod
    def decode(cls, data: bytes, kind: str) -> NodeMessage:
        frame = wire.decode(data, expect=kind)
        op = frame.field("op", str)
        if op not in OPS:
            raise wire.WireError(f"{kind}: unknown op {op!r}; expected one of {OPS}")
        messages: dict[int, dict[int, bytes]] = {}
        blobs: dict[str, bytes] = {}
        arrays: dict[str, np.ndarray] = {}
        for name in frame.tensors:
            prefix, _, rest = name.partition("/")
            if prefix == "msg":
                cid_s, _, idx_s = rest.partition("/")
                cid, idx = client_key(cid_s), client_key(idx_s)
                if cid is None or idx is None or idx >= MAX_MESSAGES_PER_CLIENT:
                    raise wire.WireError(f"{kind}: malformed message tensor name {name[:80]!r}")
                messages.setdefault(cid, {})[idx] = frame.blob(name)
            elif prefix == "blob" and rest:
                blobs[rest] = frame.blob(name)
            elif prefix == "array" and rest:
                arrays[rest] = frame.tensors[name]
            else:
                raise wire.WireError(f"{kind}: unexpected tensor {name[:80]!r}")
        ordered: dict[int, list[bytes]] = {}
        for cid, by_idx in messages.items():
            if sorted(by_idx) != list(range(len(by_idx))):
                raise wire.WireError(f"{kind}: messages for client {cid} are not numbered 0..{len(by_idx) - 1}")
            ordered[cid] = [by_idx[i] for i in range(len(by_idx))]
        header = {k: v for k, v in frame.header.items() if k != "op"}
        return cls(op, header, ordered, blobs, arrays)

    def int_list(self, name: str) -> list[int]:
        value = self.header.get(name)
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise wire.WireError(f"node {self.op}: header field {name!r} must be a list of non-negative ints")
        return list(value)

    def field(self, name: str, typ: type | tuple[type, ...]) -> Any:
        return wire.Frame(f"node/{self.op}", self.header).field(name, typ)

    def blob(self, name: str) -> bytes:
        if name not in self.blobs:
            raise wire.WireError(f"node {self.op}: blob {name!r} is missing")
        return self.blobs[name]


class NodeUnusable(RunFailed):
    """A host's response the round core cannot use: a malformed frame, or the host's own refusal.
    The message says which ("sent a malformed …" / "refused …"); the caller decides what it costs."""


def read_response(data: bytes, what: str) -> NodeMessage:
    """A host's response to the ``what`` request, decoded and checked for the host's ``error`` report.

    The one reader of responses for the round core and the stage driver: a malformed frame (the
    decoder bounds size, header depth and integer lengths first) or a refusal raises
    :class:`NodeUnusable` and never anything else."""
    try:
        msg = NodeMessage.decode(data, RESPONSE)
    except wire.WireError as exc:
        raise NodeUnusable(f"sent a malformed {what} response ({exc})") from exc
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # pragma: no cover - the decoder bounds all of these
        # defence in depth: whatever a decoder of a peer's bytes raises is that peer's malformed frame
        raise NodeUnusable(f"sent a malformed {what} response ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if "error" in msg.header:
        raise NodeUnusable(f"refused the {what}: {str(msg.header['error'])[:500]}")
    return msg


def group_by_node(outgoing: Iterable[tuple[int, bytes]], node_of: Mapping[int, int]) -> dict[int, dict[int, list[bytes]]]:
    """``[(client, bytes)]`` -> ``{node: {client: [bytes, ...]}}``, keeping each client's order."""
    out: dict[int, dict[int, list[bytes]]] = {}
    for cid, data in outgoing:
        if cid not in node_of:
            raise KeyError(f"aggregator addressed client {cid}, which no node hosts")
        out.setdefault(node_of[cid], {}).setdefault(cid, []).append(data)
    return out
