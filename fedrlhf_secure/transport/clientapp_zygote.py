"""A warm ``flwr-clientapp``: one process per node that has imported Flower once and forks per message.

Why: flwr 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message, and that
process spends most of an exchange importing Flower (``flwr/__init__`` alone pulls in its CLI,
FastAPI and the object store: 0.9-1.6 CPU s, 5-6 s wall on a loaded machine, measured with
``fedrlhf bench flower``'s timing split, issue 16). Here that import is paid once: the zygote
imports the ClientApp runtime and our relay app at start, listens on a Unix socket (mode 0600, the
node's user only), and for each request forks a child that runs exactly what the verifying runner
runs (:func:`~.verified_clientapp.main`: Flower's ``run_clientapp`` with the app bundle's signature
checked before installation), with the caller's argv, environment, working directory and standard
streams. The ``flwr-clientapp`` the SuperExec starts is then a small launcher
(:func:`~.verified_clientapp.write_runner` with ``zygote=``, :data:`~.verified_clientapp.LAUNCHER`) that hands over its stdin/stdout/stderr
(``SCM_RIGHTS``), forwards SIGTERM/SIGINT to the child and exits with the child's code. When no
zygote answers, the launcher runs the verifying runner itself: the zygote is only a speed-up.

Forking after imports is safe here because nothing has opened a connection or started a thread:
Flower's runtime client is HTTP (httpx) and is created in the child.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path

from .local_socket import listen_private, recv_frame

logger = logging.getLogger(__name__)

_INT = struct.Struct(">i")
MAX_REQUEST_BYTES = 1 << 20


def warm_up() -> None:
    """Import what every ClientApp message needs (the per-message cost this process exists to pay once)."""
    import flwr.common.args  # noqa: F401
    import flwr.supercore.constant  # noqa: F401
    import flwr.supercore.tls  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    from . import client_app, verified_clientapp  # noqa: F401


def serve(socket_path: Path, *, ready_file: Path | None = None) -> None:
    """Fork one verifying ClientApp runner per connection on ``socket_path`` until killed."""
    warm_up()
    socket_path = Path(socket_path)
    srv = listen_private(socket_path, 16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel; the launcher reports their code
    if ready_file is not None:
        Path(ready_file).write_text(str(os.getpid()))
    logger.info("ClientApp zygote listening on %s", socket_path)
    try:
        while True:
            conn, _ = srv.accept()
            try:
                _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                request = json.loads(recv_frame(conn, MAX_REQUEST_BYTES))
                if len(fds) != 3 or not isinstance(request, dict):
                    raise ValueError("a launch request is 3 descriptors and a JSON object")
            except (OSError, ValueError, ConnectionError) as exc:
                logger.warning("ClientApp zygote: bad launch request (%s)", exc)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                srv.close()
                _child(conn, fds, request)  # never returns
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        srv.close()
        if socket_path.exists():
            socket_path.unlink()


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, never closed here
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        for handler in logging.getLogger().handlers + logging.getLogger("flwr").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
                handler.setStream(sys.stderr)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request.get("env", {}).items()})
        os.chdir(str(request.get("cwd", "/")))
        sys.argv = [str(a) for a in request.get("argv", ["flwr-clientapp"])]
        conn.sendall(_INT.pack(os.getpid()))
        from .verified_clientapp import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(_INT.pack(code))
        except BaseException:
            pass
        os._exit(code)
