"""``fedrlhf redteam`` over the Flower loopback deployment: the dictation attacks against real SuperNodes.

A TLS SuperLink and two authenticated SuperNodes (each with its client host, the real node) are
started as in tests/test_flower_deployment.py; the attacker submits its own Flower App
(``attacks/redteam/flower-app``: the redteam ServerApp with the project's normal ClientApp) with
``flwr run``, which SuperNodes run today because nothing restricts which app they execute. Every
request reaches the node as a Flower Message, through the ClientApp, over the node's socket.
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


def test_a_submitted_serverapp_dictates_plain_aggregation_to_a_real_supernode(tmp_path, monkeypatch):
    config = tmp_path / "vector-secagg.yaml"
    config.write_text(
        yaml.safe_dump(
            {"seed": 5, "task": {"kind": "vector", "clients": 4, "dim": 16}, "aggregation": {"kind": "secagg"}, "federation": {"rounds": 1}}
        )
    )
    monkeypatch.setattr(local_deployment, "APP_DIR", REPO / "attacks" / "redteam" / "flower-app")
    out = tmp_path / "out"
    dep = LocalDeployment(tmp_path / "deployment", [[0, 1], [2, 3]], task_modules=["fedrlhf_secure.bench.vector_task"])
    try:
        dep.start()
        proc = dep.submit(config, out, extra={"clients": 4})
        proc.wait(timeout=900)
    finally:
        dep.close()
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "deployment" / "logs").glob("flwr-run*.log")))
    assert (out / "redteam.json").exists(), logs
    report = json.loads((out / "redteam.json").read_text())
    rows = {a["name"]: a for a in report["attacks"]}
    assert report["target"]["node_socket"].startswith("flower-supernode:")
    plain = rows["dictate-plain"]
    assert plain["verdict"] == "recovered", logs
    assert plain["evidence"]["max_abs_error"] == 0.0 and plain["evidence"]["update_peak"] > 0
    assert rows["dictate-threshold-1"]["verdict"] == "recovered"
