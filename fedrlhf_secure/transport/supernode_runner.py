"""The node's ``flower-supernode``: Flower's SuperNode unchanged, except that it polls sooner.

Why: flwr 1.42's SuperNode asks the SuperLink for new messages, and when there is none it sleeps
3 s (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``, no flag and no environment
variable); once a ClientApp is running it checks for the reply every 0.5 s. Every exchange of a
round waits for that poll, 1.5 s on average, so a secure-aggregation round (several exchanges)
loses seconds to it (issue 16). This runner caps those sleeps at :data:`DEFAULT_POLL_S`
(``FEDRLHF_SUPERNODE_POLL_S`` overrides it) and then runs Flower's own ``flower-supernode``;
nothing else changes: the same flags, TLS, node authentication, SuperExec and message handling.

The cost is more poll RPCs to the SuperLink while idle (about 3 per second per node at 0.3 s
instead of one every 3 s). A node's operator who prefers Flower's cadence runs Flower's own
``flower-supernode`` (or sets ``FEDRLHF_SUPERNODE_POLL_S=3``); the protocol does not depend on it.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import time
from pathlib import Path

DEFAULT_POLL_S = 0.3
ENV = "FEDRLHF_SUPERNODE_POLL_S"


class CappedSleep:
    """The ``time`` module as one Flower module sees it, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, real, cap: float) -> None:
        self._real = real
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        self._real.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def poll_interval(env: dict[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get(ENV)
    if raw is None:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.01 <= value <= 60.0):
        raise SystemExit(f"{ENV} must be a number of seconds between 0.01 and 60, got {raw!r}")
    return value


def patch(cap: float) -> None:
    """Cap the SuperNode loop's idle and reply-wait sleeps (the only uses of ``time`` in that module)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = CappedSleep(time, cap)


def main() -> None:
    patch(poll_interval())
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


def write_supernode_runner(bin_dir: Path) -> Path:
    """``BIN_DIR/flower-supernode``: Flower's SuperNode with the shorter poll, for the node's ``PATH``."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flower-supernode"
    path.write_text(
        f"#!{sys.executable}\n"
        "# fedrlhf: Flower's SuperNode, polling the SuperLink every 0.3 s instead of 3 s when idle\n"
        "from fedrlhf_secure.transport.supernode_runner import main\n\n"
        "main()\n",
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
