"""Length-prefixed frames over a local Unix socket: the ClientApp <-> client host hop.

Only processes of the node's own user can open the socket (mode 0600), and the bytes are the
project's wire frames; this module only moves them. Kept free of heavy imports, because Flower
starts a new ClientApp process for every message.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

MAX_FRAME_BYTES = 1 << 31
_LEN = struct.Struct(">Q")


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf.extend(chunk)
    return bytes(buf)


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> bytes:
    (n,) = _LEN.unpack(read_exact(sock, _LEN.size))
    if n > limit:
        raise ConnectionError(f"frame of {n} bytes exceeds the limit {limit}")
    return read_exact(sock, n)


def relay(socket_path: Path, data: bytes, timeout: float | None = None) -> bytes:
    """Send one request to the client host at ``socket_path`` and return its response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        send_frame(sock, data)
        return recv_frame(sock)


def listen_private(socket_path: Path, backlog: int) -> socket.socket:
    """A listening Unix socket at ``socket_path`` only this user can open (created 0600 under a umask,
    so it is never world-accessible, not even between bind and chmod)."""
    socket_path = Path(socket_path)
    if socket_path.exists():
        socket_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(socket_path))
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    srv.listen(backlog)
    return srv
