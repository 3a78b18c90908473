"""``fedrlhf redteam --node-socket``: the dictation attacks against a running node process.

The node is the real deployment process (``fedrlhf deploy client-host``, what a SuperNode's
ClientApp relays every Flower message to), reached over its Unix socket with the same bytes a
ServerApp's requests carry. The task is the synthetic ``vector`` task, so no data is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fedrlhf_secure.bench.vector_task  # noqa: F401  (registers task kind "vector" on the attacker's side too)
from fedrlhf_secure import cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_dictation_reaches_a_running_node_process_over_its_socket(tmp_path):
    config = tmp_path / "vector-secagg.yaml"
    config.write_text(
        yaml.safe_dump(
            {"seed": 3, "task": {"kind": "vector", "clients": 8, "dim": 16}, "aggregation": {"kind": "secagg"}, "federation": {"rounds": 1}}
        )
    )
    sock, ready = tmp_path / "node.sock", tmp_path / "ready"
    cmd = [sys.executable, "-m", "fedrlhf_secure.cli", "deploy", "client-host", "--client-ids", "2", "--socket", str(sock)]
    cmd += ["--task-module", "fedrlhf_secure.bench.vector_task", "--ready-file", str(ready), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the node did not start in 120 s"
            time.sleep(0.2)
        args = ["--clients", "8", "--only", "dictation", "--node-socket", str(sock), "--out", str(tmp_path)]
        code = cli.main(["redteam", str(config), *args])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = json.loads((tmp_path / "redteam.json").read_text())
    rows = {a["name"]: a for a in report["attacks"]}
    assert code == 1 and report["target"]["node_socket"] == str(sock)
    plain = rows["dictate-plain"]
    # the node process accepted plain aggregation and its client 2's update came back in the clear
    assert plain["verdict"] == "recovered" and plain["evidence"]["setup_reply"]["clients"] == [2]
    assert plain["evidence"]["plain_read"]["max_abs_error"] == 0.0 and plain["evidence"]["plain_read"]["update_peak"] > 0
    assert rows["dictate-threshold-1"]["verdict"] == "recovered"
    assert rows["dictate-identity-dir"]["verdict"] == "recovered"
    assert "node_runs" not in plain["evidence"]  # nothing read from inside the node: only its replies
