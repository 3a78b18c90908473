"""The Unix-socket server a deployment node's participant host answers on.

Why a long-lived host next to the SuperNode: Flower 1.42 runs every ClientApp message in a fresh
``flwr-clientapp`` process, but a round of secure aggregation is a conversation — a SecAgg
client's ephemeral secret keys and mask seeds, or a CKKS client's secret context, must survive
from one stage to the next, and must never be serialised into Flower's ``Context`` (which the
SuperNode keeps and could write out). The task's private data and each client's personal
parameters also stay loaded for the whole run. So the node's participants live in one
:class:`~fedrlhf_secure.federation.participant.ParticipantHost`, in one process that never
listens on the network: the ClientApp (:mod:`.client_app`) relays the bytes of each Flower
Message to it over a Unix socket only the node's user can open.

The host is the same class the embedded simulation drives in process: one implementation of the
client's side of a round (:mod:`fedrlhf_secure.federation.participant`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..federation.participant import NodeError, ParticipantHost
from .local_socket import listen_private, recv_frame, send_frame

__all__ = ["NodeError", "ParticipantHost", "serve"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The Unix-socket server the ClientApp relays to
# ---------------------------------------------------------------------------------------------


def serve(host: ParticipantHost, socket_path: Path, *, ready_file: Path | None = None, max_requests: int | None = None) -> None:
    """Answer requests on ``socket_path`` (mode 0600) until killed (or ``max_requests`` were served)."""
    socket_path = Path(socket_path)
    srv = listen_private(socket_path, 8)
    if ready_file is not None:
        Path(ready_file).write_text(str(os.getpid()))
    logger.info("participant host for clients %s listening on %s", host.client_ids, socket_path)
    served = 0
    try:
        while max_requests is None or served < max_requests:
            conn, _ = srv.accept()
            served += 1
            with conn:
                try:
                    data = recv_frame(conn)
                except ConnectionError:
                    continue
                send_frame(conn, host.handle(data))
    finally:
        srv.close()
        if socket_path.exists():
            socket_path.unlink()
