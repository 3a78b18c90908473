"""The Flower ClientApp: a stateless relay from a Flower Message to the node's client host.

Flower starts a fresh ``flwr-clientapp`` process for every message (flwr 1.42), so this app holds
no state: it takes the project's frame out of the Message (``content["fedrlhf"]["frame"]``, raw
bytes in a ConfigRecord), hands it to the client host named by the SuperNode's node config
(``client-host="/path/to/socket"``), and puts the host's answer into the reply. The bytes are the
project's own wire frames (:mod:`fedrlhf_secure.federation.node_protocol`), so what the server
sees over Flower is exactly what it sees in process.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .local_socket import relay

RECORD = "fedrlhf"
FIELD = "frame"
MESSAGE_ACTION = "fedrlhf"
"""Messages are ``query.fedrlhf``: not Flower's train/evaluate, whose records Flower strategies read."""

app = ClientApp()


def pack(data: bytes) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({FIELD: data})})


def unpack(content: RecordDict) -> bytes:
    if RECORD not in content.config_records:
        raise ValueError(f"message has no {RECORD!r} config record")
    value = content.config_records[RECORD].get(FIELD)
    if not isinstance(value, bytes):
        raise ValueError(f"message record {RECORD!r} has no bytes field {FIELD!r}")
    return value


@app.query(MESSAGE_ACTION)
def handle(msg: Message, context: Context) -> Message:
    path = context.node_config.get("client-host")
    if not isinstance(path, str) or not path:
        raise ValueError("this SuperNode has no node config 'client-host' (the client host's socket path)")
    reply = relay(Path(path), unpack(msg.content))
    return Message(pack(reply), reply_to=msg)
