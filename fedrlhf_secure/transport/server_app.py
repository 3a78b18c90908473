"""The Flower ServerApp: the server's round loop, with Flower's Grid as the link to the nodes.

``flwr run`` starts it inside the SuperLink's deployment (see docs/deployment.md). It
waits for ``min-nodes`` SuperNodes, sends each the run config, learns which client ids each
hosts, and runs :func:`~fedrlhf_secure.federation.engine.run_remote_federation` (the one round core): every request is one Flower Message
per node (``query.fedrlhf``) whose only content is the project's own wire frame as raw bytes.
Flower's strategies, its SecAgg+ and its record types for model weights are not used: the
aggregation protocol is the project's own sans-IO state machine.

Run config keys (``[tool.flwr.app.config]`` in the app's pyproject.toml, overridable with
``flwr run -c 'key=value'``):

``config``         path of the fedrlhf YAML config on the SuperLink machine (required)
``data-dir``       dataset directory on the SuperLink machine (for the task's public layout)
``out``            where the run directory is written
``task-modules``   comma-separated modules to import first (task plug-ins that register a kind)
``keys-dir``       the server's key directory (CKKS: ``dealer.pub`` + ``public-context.frame``)
``min-nodes``      SuperNodes to wait for before starting
``node-wait``      seconds to wait for them
``fit-timeout``    deadline of the fit stage (local training) in seconds
``stage-timeout``  deadline of each aggregation stage in seconds; a node that misses it drops out
``fault-dir``/``fault-stop``  test-only fault injection, see :func:`_fault_hook`
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ..config import load_config
from ..federation.engine import RunOptions, run_remote_federation
from .client_app import MESSAGE_ACTION, pack, unpack

app = ServerApp()

DEFAULTS = {
    "task-modules": "",
    "keys-dir": "",
    "data-dir": "",
    "out": "runs",
    "min-nodes": 1,
    "node-wait": 120.0,
    "fit-timeout": 600.0,
    "stage-timeout": 60.0,
    "fault-dir": "",
    "fault-stop": "",
}


class GridLink:
    """A :class:`~fedrlhf_secure.federation.node_driver.NodeLink` over Flower: one Message per node, replies by deadline."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def exchange(self, requests: Mapping[int, bytes], timeout: float) -> dict[int, bytes]:
        # a node the SuperLink already reports offline cannot answer: do not wait a deadline for it
        online = {int(n) for n in self.grid.get_node_ids()}
        offline = sorted(set(requests) - online)
        if offline:
            print(f"nodes {offline} are offline; not waiting for them", file=sys.stderr, flush=True)
        msgs = [
            Message(pack(data), dst_node_id=int(n), message_type=f"query.{MESSAGE_ACTION}", ttl=max(timeout, 60.0) + 60.0)
            for n, data in requests.items()
            if n in online
        ]
        if not msgs:
            return {}
        out: dict[int, bytes] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=timeout):
            src = int(reply.metadata.src_node_id)
            if reply.has_error():
                print(f"node {src}: ClientApp error: {reply.error.reason}", file=sys.stderr, flush=True)
                continue
            try:
                data = unpack(reply.content)
            except ValueError as exc:
                print(f"node {src}: unreadable reply ({exc})", file=sys.stderr, flush=True)
                continue
            if src in requests:
                out[src] = data
        return out


def _setting(context: Context, key: str):
    value = context.run_config.get(key, DEFAULTS.get(key))
    if value is None:
        raise ValueError(f"run config key {key!r} is required (flwr run -c '{key}=...')")
    return value


def _wait_for_nodes(grid: Grid, want: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of the {want} SuperNodes connected within {seconds:.0f} s")
        time.sleep(0.5)


def _fault_hook(fault_dir: str, fault_stop: str) -> Callable[[int, str, int], None] | None:
    """Test-only: pause after stage ``STAGE`` of round ``ROUND`` so the test can stop a SuperNode.

    ``fault-stop = "ROUND:STAGE"``: the ServerApp writes ``fault-dir/stop-request`` and waits for
    ``fault-dir/stop-done`` (the test kills a SuperNode in between), so the node disappears at an
    exact point of the protocol instead of at a timing-dependent one.
    """
    if not fault_dir or not fault_stop:
        return None
    rnd_s, stage_s = fault_stop.split(":")
    want = (int(rnd_s), int(stage_s))
    folder = Path(fault_dir)

    def hook(rnd: int, op: str, stage: int) -> None:
        if (rnd, stage) != want:
            return
        (folder / "stop-request").write_text(f"{rnd}:{stage}")
        deadline = time.monotonic() + 300
        while not (folder / "stop-done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("fault injection: nobody answered the stop request")
            time.sleep(0.2)

    return hook


@app.main()
def main(grid: Grid, context: Context) -> None:
    import importlib

    for module in filter(None, str(_setting(context, "task-modules")).split(",")):
        importlib.import_module(module.strip())
    config = load_config(Path(str(_setting(context, "config"))))
    data_dir = str(_setting(context, "data-dir")) or None
    out = Path(str(_setting(context, "out")))
    nodes = _wait_for_nodes(grid, int(_setting(context, "min-nodes")), float(_setting(context, "node-wait")))
    print(f"fedrlhf: {len(nodes)} SuperNodes connected; starting {config.task.kind} · {config.aggregation.kind}", flush=True)
    link = GridLink(grid)
    path = run_remote_federation(
        config,
        link,
        {n: None for n in nodes},
        RunOptions(data_dir=Path(data_dir) if data_dir else None, out=out, progress=False),
        fit_timeout=float(_setting(context, "fit-timeout")),
        stage_timeout=float(_setting(context, "stage-timeout")),
        keys_dir=Path(str(_setting(context, "keys-dir"))) if _setting(context, "keys-dir") else None,
        on_stage=_fault_hook(str(_setting(context, "fault-dir")), str(_setting(context, "fault-stop"))),
    )
    print(f"fedrlhf: run directory {path}", flush=True)
