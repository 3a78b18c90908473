"""``fedrlhf redteam --node-socket``: the dictation attacks against a running node process.

Before the node-side policy (main at the start of issue 12) the same process accepted ``plain``
and returned its client's update in the clear (error 0); with its policy file it refuses.

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
from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.policy import NodePolicy, write_policy
from fedrlhf_secure.keys import deal_secagg_identities

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
    policy = write_policy(NodePolicy.from_config(load_config(config)), tmp_path / "node-policy.yaml")  # the node accepts no less
    cmd = [sys.executable, "-m", "fedrlhf_secure.cli", "deploy", "client-host", "--client-ids", "2", "--socket", str(sock)]
    # the node's SecAgg identity registry (all 8 clients; the node holds client 2's key), as `fedrlhf keys` makes it
    keys = tmp_path / "node-keys"
    others = [c for c in range(8) if c != 2]
    deal_secagg_identities([[2], others], tmp_path / "server-keys", [keys, tmp_path / "other-keys"], tmp_path / "registry")
    cmd += ["--policy", str(policy), "--keys-dir", str(keys)]
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
    assert report["target"]["node_socket"] == str(sock)
    # the node process, with its own policy file, refuses every weaker setup the server asks for, naming the field
    assert code == 0, rows
    for name in ("dictate-plain", "dictate-threshold-1", "dictate-colluder-bound"):
        assert rows[name]["verdict"] == "refused" and "node policy refuses aggregation." in rows[name]["evidence"]["refusal"]
    # no config can switch signatures off or name an identity path any more: nothing to dictate
    assert rows["dictate-identity-dir"]["verdict"] == rows["dictate-signatures-off"]["verdict"] == "skipped"
