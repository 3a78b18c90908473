"""A real Flower deployment on loopback: TLS SuperLink, 3 authenticated SuperNodes, `flwr run`.

One deployment serves three runs of a 6-client MovieLens federation (2 clients per SuperNode):
masking (SecAgg) and CKKS must give the in-process run's numbers for the same seed, and a
SuperNode stopped in the middle of a SecAgg round must leave a round that still completes
through dropout recovery. Every process is stopped in ``finally`` (and at exit).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("flwr")

from conftest import SHARED_DATASETS
from movielens_fixtures import write_ml100k
from test_flower_transport import _live_members, _live_processes_mentioning

from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import RunOptions, build_task, run_federation, run_remote_federation
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.rundir import load_tensors
from fedrlhf_secure.transport.local_deployment import LocalDeployment, finished_run, partition

pytestmark = pytest.mark.slow

if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None or shutil.which("flwr") is None:
    pytest.skip("Flower's command-line tools are not on PATH", allow_module_level=True)


def _config(tmp: Path, kind: str, rounds: int) -> Path:
    raw = {
        "seed": 11,
        "task": {"kind": "movielens", "split": "u1", "num_clients": 6},
        "federation": {"rounds": rounds, "local_epochs": 1, "min_clients": 3},
        "aggregation": {"kind": kind},
    }
    path = tmp / f"{kind}-{rounds}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(flower: Path, local: Path, atol: float, data: Path) -> None:
    a, b = _rows(flower), _rows(local)
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1]
    for ra, rb in zip(a, b, strict=False):
        assert ra["clients_aggregated"] == rb["clients_aggregated"] == 6
        # CKKS floods each decryption with noise keyed by its own run's key (docs/ckks.md): metrics agree
        # to what a model difference of atol allows, not to the last bit
        metric_tol = 1e-9 if atol < 1e-3 else 1e-2  # measured: spearman_mean differed by 1.0e-4 and 3.4e-3 in two pairs
        assert ra["heldout_accuracy"] == pytest.approx(rb["heldout_accuracy"], abs=metric_tol)
        # timings, byte counts and the transport's own envelope (one in-process host vs 3 SuperNodes) differ by design
        shared = [k for k in rb if k in ra and not k.startswith(("seconds", "bytes", "privacy", "transport"))]
        assert len(shared) >= 8
        for k in shared:
            if ra[k] is None or rb[k] is None:  # e.g. aggregation_aborted: null in both when the round aggregated
                assert ra[k] == rb[k], k
            else:
                assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=max(1e-6, metric_tol), nan_ok=True), k
    ma, mb = load_tensors(flower / "model.safetensors"), load_tensors(local / "model.safetensors")
    assert sorted(ma) == sorted(mb)
    init = build_task(load_config(flower / "config.yaml"), data).initial_shared()
    for k in ma:
        if atol < 1e-3:
            np.testing.assert_allclose(ma[k], mb[k], atol=atol, rtol=0)
        else:  # CKKS: two independent Gaussian flooding draws, so a bound on their bulk, not on their tail
            diff = np.abs(ma[k].astype(np.float64) - mb[k])
            # rows few clients touched are divided by a small touch count, which scales their noise up
            # (measured: 99.9% quantile 0.055, most coordinates ~5e-5)
            assert float(np.quantile(diff, 0.999)) <= 2 * atol and float(diff.mean()) <= atol / 5, k
    # the model moved: equality is not the trivial one of two untrained models
    assert max(float(np.abs(ma[k] - init[k]).max()) for k in ma) > 10 * min(atol, 5e-3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The real ML-100K beside the checkout when present, else a generated one in the same format."""
    if SHARED_DATASETS.is_dir() and (SHARED_DATASETS / "ml-100k").is_dir():
        return SHARED_DATASETS
    root = tmp_path_factory.mktemp("ml")
    write_ml100k(root, n_users=12, n_items=40, per_user=20)
    return root


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, data_dir):
    shared_datasets = data_dir
    tmp = tmp_path_factory.mktemp("flower")
    cfg = load_config(_config(tmp, "secagg", 2))
    ids = list(build_task(cfg, shared_datasets).client_ids())
    dep = LocalDeployment(tmp / "deployment", partition(ids, 3), data_dir=shared_datasets)
    try:
        dep.start()
        yield dep, tmp
    finally:
        dep.close()
    for proc in dep.procs:
        assert proc.popen.poll() is not None, f"{proc.name} is still running"
        assert _live_members(proc.popen.pid) == [], f"{proc.name} left processes behind"
    assert _live_processes_mentioning(dep.workdir) == []


# ckks: each run floods its decryptions with noise keyed by its own key (docs/ckks.md), so two runs differ by
# two independent flooding draws per round (measured: largest model difference 0.0103 over 2 rounds, 6 clients)
@pytest.mark.parametrize("kind, atol", [("secagg", 5e-4), ("ckks", 5e-2)])
def test_flower_rounds_equal_the_in_process_run_with_the_same_seed(deployment, data_dir, kind, atol):
    shared_datasets = data_dir
    dep, tmp = deployment
    config = _config(tmp, kind, 2)
    flower = dep.run(config, tmp / f"runs-{kind}", stage_timeout=90.0, timeout=900)
    local = run_federation(load_config(config), RunOptions(out=tmp / f"local-{kind}", progress=False, data_dir=shared_datasets))
    _assert_same_run(flower, local, atol, shared_datasets)
    rows = _rows(flower)
    assert all(r["nodes_dropped"] == 0 for r in rows)
    # the server saw protocol frames only: fit + its stages, nothing else crossed the Grid
    assert all(r["transport_stages"] >= (2 if kind == "ckks" else 4) for r in rows)


def test_record_level_dp_over_flower_keeps_the_engines_ledger_on_the_nodes(deployment, data_dir):
    from fedrlhf_secure.privacy.ledger import read_ledger

    dep, tmp = deployment
    raw = yaml.safe_load(_config(tmp, "secagg", 1).read_text())
    raw["federation"]["weighting"] = "uniform"
    raw["privacy"] = {"mode": "record", "noise_multiplier": 1.0, "delta": 1e-6, "batch_size": 64, "max_grad_norm": 1.0}
    config = tmp / "record-dp.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    flower = dep.run(config, tmp / "runs-dp", stage_timeout=90.0, timeout=900)
    local = run_federation(load_config(config), RunOptions(out=tmp / "local-dp", progress=False, data_dir=data_dir))
    assert not (flower / "ledger").exists()
    nodes: dict = {}
    for ledger in sorted((dep.workdir / "sockets").glob("*.state/privacy/run-*/ledger")):
        nodes.update(read_ledger(ledger)[1])
    _, engine = read_ledger(local / "ledger")
    key = lambda es: [(e.round, e.noise_multiplier, e.sample_rate, e.steps) for e in es]  # noqa: E731
    assert sorted(nodes) == sorted(engine) and len(engine) == 6
    assert {c: key(es) for c, es in nodes.items()} == {c: key(es) for c, es in engine.items()}
    # ε after each release: the same accountant on the same mechanism, equal to float precision
    for c, es in engine.items():
        assert [e.epsilon_after for e in nodes[c]] == pytest.approx([e.epsilon_after for e in es], rel=1e-12)
    assert _rows(flower)[0]["privacy_epsilon_spent_max"] == pytest.approx(_rows(local)[0]["privacy_epsilon_spent_max"])


def _failed_run(dep, config: Path, out: Path, **kwargs) -> str:
    """Submit ``config``, wait for ``flwr run`` to end, and return its log (the ServerApp's stream)."""
    proc = dep.submit(config, out, stage_timeout=30.0, **kwargs)
    proc.wait(timeout=300)
    log = dep.procs[-1].log.read_text(errors="replace")
    assert not (out.exists() and any(p.is_dir() and (p / "summary.json").exists() for p in out.iterdir())), log[-3000:]
    return log


def test_supernodes_refuse_an_unsigned_app_bundle_before_running_any_of_it(deployment):
    """The app bundle goes to every SuperNode; without the operator's signature (here: the run
    config's app-signature emptied) each node's verifying flwr-clientapp refuses it before Flower
    installs or imports it, so no request ever reaches a client host and no round runs. The positive
    control is every other test of this module: the same bundle, signed, runs."""
    dep, tmp = deployment
    log = _failed_run(dep, _config(tmp, "secagg", 1), tmp / "runs-unsigned", extra={"app-signature": ""})
    refusals = [line for line in log.splitlines() if "ClientApp error" in line and "AppRefused" in line]
    assert refusals and "carries no signature" in refusals[0], log[-3000:]
    assert "did not answer the setup request" in log


def test_supernodes_refuse_a_server_that_dictates_plain_aggregation(deployment):
    """Config dictation against real SuperNodes: the ServerApp's config asks for `kind: plain`; each
    node's client host checks it against its own policy file and refuses, naming the field."""
    dep, tmp = deployment
    log = _failed_run(dep, _config(tmp, "plain", 1), tmp / "runs-plain")
    assert "node policy refuses aggregation.kind: the server asks for 'plain'" in log, log[-3000:]


def test_a_supernode_stopped_mid_round_drops_out_and_the_round_still_completes(deployment, data_dir):
    # Last in this module on purpose: the stopped SuperNode stays down, and the module-scoped
    # deployment is shared with the tests above (pytest runs a module's tests in file order).
    shared_datasets = data_dir
    dep, tmp = deployment
    config = _config(tmp, "secagg", 1)
    fault = tmp / "fault"
    fault.mkdir()
    out = tmp / "runs-dropout"
    # after SecAgg's key-sharing stage (stage 1) of round 0: the stopped node's clients have
    # handed out Shamir shares of their mask seeds but never send a masked input, so the
    # survivors must reveal those shares for the server to remove the dropped clients' masks.
    proc = dep.submit(config, out, stage_timeout=30.0, extra={"fault-dir": str(fault), "fault-stop": "0:1"})
    deadline = time.monotonic() + 600
    while not (fault / "stop-request").exists():
        assert proc.poll() is None, "flwr run ended before reaching the fault point"
        assert time.monotonic() < deadline, "the ServerApp never reached the fault point"
        time.sleep(0.2)
    victim = 2
    dep.stop_node(victim)
    assert all(p.popen.poll() is not None for p in dep.nodes[victim].procs)
    (fault / "stop-done").write_text("stopped")
    proc.wait(timeout=600)
    run = finished_run(out, set(), dep.workdir / "logs")
    (row,) = _rows(run)
    assert row["nodes_dropped"] == 1
    assert row["clients_dropped"] == len(dep.nodes[victim].client_ids) == 2
    assert row["clients_aggregated"] == 4
    assert np.isfinite(row["heldout_accuracy"])
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["clients_final"]) == {str(c) for n in dep.nodes[:victim] for c in n.client_ids}
    # the same drop at the same protocol point, with the nodes in process, gives the same model:
    # the survivors' aggregate was recovered exactly (up to SecAgg's stochastic rounding)
    # the in-process reference signs under the deployment's identity registry, as the nodes did
    hosts = {
        n.index: ParticipantHost(n.client_ids, shared_datasets, dep.node_keys_dir(n.index), policy=dep.policies[n.index]) for n in dep.nodes
    }
    link = InProcessLink(hosts)

    def drop(rnd: int, op: str, stage: int) -> None:
        if (rnd, stage) == (0, 1):
            link.down.add(victim)

    ref = run_remote_federation(
        load_config(config),
        link,
        {n.index: n.client_ids for n in dep.nodes},
        RunOptions(out=tmp / "local-dropout", progress=False, data_dir=shared_datasets),
        on_stage=drop,
        keys_dir=dep.workdir / "aggregation-keys" / "server",
    )
    (ref_row,) = _rows(ref)
    assert ref_row["clients_aggregated"] == 4
    assert row["heldout_accuracy"] == pytest.approx(ref_row["heldout_accuracy"], abs=1e-9)
    got, want = load_tensors(run / "model.safetensors"), load_tensors(ref / "model.safetensors")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-3, rtol=0)


def test_deploy_local_reports_progress_prints_the_result_table_and_points_runs_latest(tmp_path, data_dir):
    """`fedrlhf deploy local` piped to files, as a newcomer's log would be (issue 14): start-up steps
    and rounds are logged as plain lines (no carriage returns), stdout ends with the same table
    `fedrlhf run` prints for that run directory, and `runs/latest` names it."""
    import os
    import subprocess
    import sys

    from fedrlhf_secure.federation.results import render_result

    cfg = _config(tmp_path, "plain", 2)
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(
        [sys.executable, "-m", "fedrlhf_secure.cli", "deploy", "local", "--config", str(cfg), "--nodes", "2"]
        + ["--data-dir", str(data_dir), "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "\r" not in res.stdout and "\r" not in res.stderr
    steps = [line for line in res.stderr.splitlines() if "deploy local: start-up" in line]
    assert len(steps) == 3 + 2 * 2 and steps[-1].startswith("deploy local: start-up 7/7")
    assert any("deploy local · movielens · plain: 2/2 rounds" in line for line in res.stderr.splitlines()), res.stderr[-3000:]
    latest = out / "latest"
    assert latest.is_symlink()
    run = latest.resolve()
    assert run.parent == out.resolve() and (run / "summary.json").exists() and len(_rows(run)) == 2
    table = render_result(json.loads((run / "summary.json").read_text()), run)
    assert res.stdout.rstrip().endswith(table.rstrip())
