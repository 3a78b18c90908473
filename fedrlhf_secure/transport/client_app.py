"""The Flower ClientApp: a stateless relay from a Flower Message to the node's client host.

Flower starts a fresh ``flwr-clientapp`` process for every message (flwr 1.42), so this app holds
no state: it takes the project's frame out of the Message (``content["fedrlhf"]["frame"]``, raw
bytes in a ConfigRecord), hands it to the client host named by the SuperNode's node config
(``client-host="/path/to/socket"``), and puts the host's answer into the reply. The bytes are the
project's own wire frames (:mod:`fedrlhf_secure.federation.node_protocol`), so what the server
sees over Flower is exactly what it sees in process.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .local_socket import relay

RECORD = "fedrlhf"
FIELD = "frame"
TIMING_RECORD = "fedrlhf-timing"
"""Wall-clock stamps of the reply's way through the node (no content), for the server's timing split."""
MESSAGE_ACTION = "fedrlhf"
"""Messages are ``query.fedrlhf``: not Flower's train/evaluate, whose records Flower strategies read."""

app = ClientApp()


def pack(data: bytes, timing: dict[str, float] | None = None) -> RecordDict:
    records = {RECORD: ConfigRecord({FIELD: data})}
    if timing:
        records[TIMING_RECORD] = ConfigRecord(dict(timing))
    return RecordDict(records)


def unpack_timing(content: RecordDict) -> dict[str, float]:
    """The reply's timing stamps; an absent or malformed record gives ``{}`` (timing is advisory)."""
    record = content.config_records.get(TIMING_RECORD) if TIMING_RECORD in content.config_records else None
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, float) and k in _TIMING_KEYS}


_TIMING_KEYS = ("process_start", "handler", "relay_s", "reply_at")


def unpack(content: RecordDict) -> bytes:
    if RECORD not in content.config_records:
        raise ValueError(f"message has no {RECORD!r} config record")
    value = content.config_records[RECORD].get(FIELD)
    if not isinstance(value, bytes):
        raise ValueError(f"message record {RECORD!r} has no bytes field {FIELD!r}")
    return value


def process_start_time() -> float | None:
    """When this process was started (Unix time, 10 ms resolution), from ``/proc``; None elsewhere.

    ``/proc/self/stat`` gives the start in clock ticks since boot; ``/proc/uptime`` the time since
    boot now (10 ms), so the start is ``now - (uptime - start)`` (``btime`` is whole seconds only)."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        now = time.time()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@app.query(MESSAGE_ACTION)
def handle(msg: Message, context: Context) -> Message:
    handler = time.time()
    path = context.node_config.get("client-host")
    if not isinstance(path, str) or not path:
        raise ValueError("this SuperNode has no node config 'client-host' (the client host's socket path)")
    t0 = time.perf_counter()
    reply = relay(Path(path), unpack(msg.content))
    timing = {"handler": handler, "relay_s": time.perf_counter() - t0, "reply_at": time.time()}
    started = process_start_time()
    if started is not None:
        timing["process_start"] = started
    return Message(pack(reply, timing), reply_to=msg)
