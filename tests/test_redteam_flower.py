"""``fedrlhf redteam`` over the Flower loopback deployment: the attacks against real SuperNodes.

A TLS SuperLink and two authenticated SuperNodes (each with its client host, the real node) are
started as in tests/test_flower_deployment.py, once for both attacks:

* **config dictation**: the attacker submits its own Flower App (``attacks/redteam/flower-app``:
  the redteam ServerApp with the project's normal ClientApp) with ``flwr run``, which SuperNodes
  run today because nothing restricts which app they execute; every request reaches the node as a
  Flower Message, through the ClientApp, over the node's socket;
* **malformed frame**: the project's real ServerApp runs a round while one SuperNode answers its
  fit request with a wrong type deep in the header (``attacks/redteam/flower-app-hostile-node``).

:data:`EXPECTED` holds the verdicts on the current code: both recovered on main at the start of
issue 12 and are refused since the node-side policy and the robust server loop. (``deploy local``
signs the submitted app with the operator's key; here the operator submits the attacker's apps.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

import fedrlhf_secure.bench.vector_task  # noqa: F401  (task kind "vector": the deployment reads the config here too)
from fedrlhf_secure.transport import local_deployment
from fedrlhf_secure.transport.local_deployment import LocalDeployment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None or shutil.which("flwr") is None:
    pytest.skip("Flower's command-line tools are not on PATH", allow_module_level=True)

EXPECTED = {
    "dictate-plain": "refused",  # recovered before the node-side policy (error 0: the update in the clear)
    "node-malformed-frames": "refused",  # recovered before the robust server loop (the ServerApp ended on the frame)
}


def _logs(dep_dir: Path, pattern: str) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted((dep_dir / "logs").glob(pattern)))


def test_dictation_and_a_hostile_node_against_real_supernodes(tmp_path, monkeypatch):
    config = tmp_path / "vector-secagg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 5,
                "task": {"kind": "vector", "clients": 4, "dim": 16},
                "aggregation": {"kind": "secagg"},
                "federation": {"rounds": 1, "min_clients": 2},
            }
        )
    )
    dep_dir = tmp_path / "deployment"
    dep = LocalDeployment(dep_dir, [[0, 1], [2, 3]], task_modules=["fedrlhf_secure.bench.vector_task"])
    try:
        dep.start()
        monkeypatch.setattr(local_deployment, "APP_DIR", REPO / "attacks" / "redteam" / "flower-app")
        dictation_out = tmp_path / "dictation"
        dep.submit(config, dictation_out, extra={"clients": 4}).wait(timeout=900)
        monkeypatch.setattr(local_deployment, "APP_DIR", REPO / "attacks" / "redteam" / "flower-app-hostile-node")
        hostile_out = tmp_path / "hostile"
        dep.submit(config, hostile_out, stage_timeout=60.0, extra={"hostile-node": str(dep.nodes[1].socket)}).wait(timeout=900)
    finally:
        dep.close()

    # config dictation: the SuperNode's client host accepted plain aggregation and its client's update came back in the clear
    assert (dictation_out / "redteam.json").exists(), _logs(dep_dir, "flwr-run*.log")
    report = json.loads((dictation_out / "redteam.json").read_text())
    rows = {a["name"]: a for a in report["attacks"]}
    assert report["target"]["node_socket"].startswith("flower-supernode:")
    plain = rows["dictate-plain"]
    assert plain["verdict"] == EXPECTED["dictate-plain"]
    if plain["verdict"] == "recovered":
        assert plain["evidence"]["plain_read"]["max_abs_error"] == 0.0 and plain["evidence"]["plain_read"]["update_peak"] > 0
        assert rows["dictate-threshold-1"]["verdict"] == "recovered"

    # one hostile node's fit reply: the run must finish (with at least the other node's clients)
    runs = [p for p in hostile_out.glob("*") if p.is_dir() and not p.name.endswith(".partial")] if hostile_out.exists() else []
    verdict = "refused" if runs else "recovered"
    logs = _logs(dep_dir, "*.log")
    assert verdict == EXPECTED["node-malformed-frames"], logs[-3000:]
    if verdict == "refused":
        rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
        # the round completed: the hostile node's malformed summary was ignored (at most its clients drop out)
        assert rows[0]["aggregation_aborted"] is None and rows[0]["clients_aggregated"] >= 2
    else:
        assert "AttributeError" in logs  # the ServerApp ended on the frame: 'str' object has no attribute 'get'
