"""The adversarial server's side of the node protocol: the frames a server sends a deployment node.

A node (:class:`~fedrlhf_secure.federation.participant.ParticipantHost`) answers the server's
requests (:mod:`fedrlhf_secure.federation.node_protocol`); a lying server writes those requests
itself. These helpers build them exactly as the round core does, so only what the attack changes
differs from an honest server's frames.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregation.base import RoundContext, ServerHalf
from fedrlhf_secure.config import RunConfig
from fedrlhf_secure.federation.messages import FitInstruction
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage, group_by_node


@dataclass
class Answer:
    """A node's response: the message, or its refusal (the ``error`` it reported)."""

    message: NodeMessage | None
    error: str | None

    @property
    def accepted(self) -> bool:
        return self.error is None


def ask(host: Any, op: str, header: Mapping[str, Any] | None = None, messages=None, blobs=None) -> Answer:
    data = host.handle(NodeMessage(op, dict(header or {}), dict(messages or {}), dict(blobs or {})).encode(REQUEST))
    msg = NodeMessage.decode(data, RESPONSE)
    if "error" in msg.header:
        return Answer(None, str(msg.header["error"]))
    return Answer(msg, None)


def setup(host: Any, config: RunConfig, client_ids: Sequence[int]) -> Answer:
    """The setup frame: the run config the server chooses, and every client id of the run."""
    return ask(host, "setup", {"client_ids": list(client_ids)}, blobs={"config": config.to_yaml().encode("utf-8")})


def fit(
    host: Any,
    ctx: RoundContext,
    server: ServerHalf,
    hosted: Sequence[int],
    instruction: FitInstruction,
    model_round: int = -1,
) -> tuple[Answer, list[tuple[int, bytes]]]:
    """The fit request carrying the aggregator's opening messages for ``hosted``; the replies per client."""
    opening = server.start()
    grouped = group_by_node(((c, m) for c, m in opening if c in hosted), {c: 0 for c in hosted}).get(0, {})
    header = {
        "round": ctx.round,
        "session": ctx.session_id.hex(),
        "participants": list(ctx.participants),
        "dim": ctx.dim,
        "clients": list(hosted),
        "model_round": model_round,
    }
    ans = ask(host, "fit", header, grouped, {"instruction": instruction.encode()})
    replies = [] if ans.message is None else [(c, m) for c, ms in sorted(ans.message.messages.items()) for m in ms]
    return ans, replies


class SocketNode:
    """A running deployment node (``fedrlhf deploy client-host``) reached over its Unix socket:
    the same requests, the same bytes, to the real node process instead of an object in this one."""

    def __init__(self, socket_path: Path, timeout: float = 600.0) -> None:
        self.socket_path, self.timeout = Path(socket_path), timeout

    def handle(self, data: bytes) -> bytes:
        from fedrlhf_secure.transport.local_socket import relay

        return relay(self.socket_path, data, self.timeout)


def new_session() -> bytes:
    return os.urandom(16)
