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

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ..config import load_config
from ..federation.engine import RunOptions, run_remote_federation
from .client_app import MESSAGE_ACTION, pack, unpack, unpack_timing

app = ServerApp()
TIMING_FILE = "flower_timing.json"

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


POLL_FIRST_S = 0.05
POLL_MAX_S = 0.25
"""The ServerApp's pull back-off: first retry after 50 ms, growing ×1.5 to at most 250 ms.

``Grid.send_and_receive`` sleeps 3 s between pulls in flwr 1.42 (1.5 s lost per exchange on
average); Flower's own ``InMemoryGrid`` pulls every 0.1 s. A pull is one small RPC to the
SuperLink, so a short back-off costs little and an exchange ends at most 0.25 s after its last reply."""


class GridLink:
    """A :class:`~fedrlhf_secure.federation.node_driver.NodeLink` over Flower: one Message per node, replies by deadline.

    Each exchange pushes all requests (``Grid.push_messages``) and pulls the replies
    (``Grid.pull_messages``) with the short back-off above. :attr:`timings` keeps one record per
    exchange (see :func:`exchange_timing`) for ``fedrlhf bench flower``."""

    def __init__(self, grid: Grid, *, poll_first: float = POLL_FIRST_S, poll_max: float = POLL_MAX_S) -> None:
        self.grid = grid
        self.poll_first = poll_first
        self.poll_max = poll_max
        self.timings: list[dict] = []

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
        t_start = time.time()
        deadline = time.monotonic() + timeout
        ids = list(self.grid.push_messages(msgs))
        t_pushed = time.time()
        pending = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, msgs, strict=True) if mid}
        for m, mid in zip(msgs, ids, strict=True):
            if not mid:
                print(f"node {m.metadata.dst_node_id}: the SuperLink did not accept the request", file=sys.stderr, flush=True)
        out: dict[int, bytes] = {}
        nodes: dict[int, dict] = {}
        pulls = 0
        delay = self.poll_first
        while pending:
            pulls += 1
            for reply in self.grid.pull_messages(list(pending)):
                src = pending.pop(reply.metadata.reply_to_message_id, None)
                if src is None:
                    continue
                if int(reply.metadata.src_node_id) != src:  # only the node asked may answer its request
                    print(f"node {reply.metadata.src_node_id} answered a request for node {src}; ignored", file=sys.stderr, flush=True)
                    continue
                t_pulled = time.time()
                if reply.has_error():
                    print(f"node {src}: ClientApp error: {reply.error.reason}", file=sys.stderr, flush=True)
                    continue
                try:
                    data = unpack(reply.content)
                except ValueError as exc:
                    print(f"node {src}: unreadable reply ({exc})", file=sys.stderr, flush=True)
                    continue
                out[src] = data
                nodes[src] = {**unpack_timing(reply.content), "pulled": t_pulled}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, self.poll_max)
        self.timings.append(exchange_timing(t_start, t_pushed, time.time(), nodes, len(msgs), pulls))
        return out


def exchange_timing(t_start: float, t_pushed: float, t_end: float, nodes: Mapping[int, dict], asked: int, pulls: int) -> dict:
    """One exchange's wall time split into where it went, from the slowest node's point of view.

    From the ServerApp's clock: ``push`` (requests to the SuperLink) and ``wall``. From the
    ClientApp's reply (:func:`~.client_app.timing_record`, wall-clock stamps): ``node_poll`` (from
    the push until Flower started the ``flwr-clientapp`` process: the SuperNode's idle poll, which
    is 3 s hard-coded in flwr 1.42, its object pull and the SuperExec's task poll), ``process_start``
    (interpreter, Flower imports, app bundle check, up to our handler), ``compute`` (our relay to the
    client host and its work) and ``return`` (from our reply until the ServerApp had it: the
    ClientApp's push, the SuperNode's 0.5 s reply poll, our pull back-off). Stamps from two clocks
    are only comparable on one machine (loopback); on several machines read ``wall`` and ``compute``.
    """
    rec: dict = {"wall": t_end - t_start, "push": t_pushed - t_start, "asked": asked, "answered": len(nodes), "pulls": pulls}
    timed = [t for t in nodes.values() if {"process_start", "handler", "relay_s", "reply_at"} <= t.keys()]
    if timed:
        last = max(timed, key=lambda t: t["pulled"])
        rec.update(
            node_poll=last["process_start"] - t_pushed,
            process_start=last["handler"] - last["process_start"],
            compute=last["relay_s"],
            **{"return": last["pulled"] - last["reply_at"]},
            compute_max=max(t["relay_s"] for t in timed),
        )
    return rec


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
    # the per-exchange timing (issue 16): wall-clock splits, no content; read by `fedrlhf bench flower`
    (path / TIMING_FILE).write_text(json.dumps({"exchanges": link.timings}, indent=1), encoding="utf-8")
    print(f"fedrlhf: run directory {path}", flush=True)
