"""``fedrlhf redteam`` over Flower: the dictation attacks as a ServerApp, against real SuperNodes.

SECURITY.md's lying server is, on Flower, whoever submits the ServerApp: the SuperNodes run the
app the submitter ships (no ``--trusted-entities`` today). This ServerApp is such a submitter. It
uses the project's own Grid link (:class:`~fedrlhf_secure.transport.server_app.GridLink`): each
request is one Flower Message to one SuperNode, whose ClientApp relays it to the node's client host
— the real node — and the reply comes back the same way. It then runs the suite's dictation
attacks against the first SuperNode and writes ``redteam.json`` into the run config's ``out``.

The other side, a hostile SuperNode against the real ServerApp, is :mod:`.flower_hostile`.

Run config keys (``flwr run attacks/redteam/flower-app ... --run-config``): ``config`` (the user's
YAML on the SuperLink machine), ``out``, ``task-modules``, ``data-dir``, ``min-nodes``,
``node-wait``, ``clients`` (the run's client count).
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

try:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # only Flower starts this module (flwr run); it needs the flower extra
    raise ImportError("attacks.redteam.flower_app is a Flower ServerApp: pip install '.[flower]'") from exc

from fedrlhf_secure.config import load_config
from fedrlhf_secure.transport.server_app import GridLink, _wait_for_nodes

from .dictation import dictation
from .harness import Target
from .report import format_table, to_json, write_json

app = ServerApp()
TIMEOUT = 300.0


class GridNode:
    """One SuperNode behind the Grid, as a node object: ``handle(request bytes) -> response bytes``."""

    def __init__(self, link: GridLink, node_id: int) -> None:
        self.link, self.node_id = link, int(node_id)

    def handle(self, data: bytes) -> bytes:
        out = self.link.exchange({self.node_id: data}, TIMEOUT)
        if self.node_id not in out:
            raise TimeoutError(f"SuperNode {self.node_id} did not answer within {TIMEOUT:.0f} s")
        return out[self.node_id]

    def __repr__(self) -> str:
        return f"flower-supernode:{self.node_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    for module in filter(None, str(cfg.get("task-modules", "")).split(",")):
        importlib.import_module(module.strip())
    config = load_config(Path(str(cfg["config"])))
    nodes = _wait_for_nodes(grid, int(cfg.get("min-nodes", 1)), float(cfg.get("node-wait", 120.0)))
    out = Path(str(cfg["out"]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedrlhf-redteam-flower-") as tmp:
        data_dir = str(cfg.get("data-dir", "")) or None
        target = Target(
            config,
            int(cfg["clients"]),
            16,
            Path(tmp),
            n_source="run config 'clients'",
            remote_node=GridNode(GridLink(grid), nodes[0]),
            data_dir=Path(data_dir) if data_dir else None,
        )
        results = dictation(target)
        report = to_json(results, target.describe(), time.perf_counter() - t0)
    print(format_table(results), flush=True)
    write_json(report, out / "redteam.json")
    print(f"fedrlhf redteam: wrote {out / 'redteam.json'}", flush=True)
