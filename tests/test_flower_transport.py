"""The node transport without a network: client hosts, the staged driver, frames, credentials.

The server loop and the client hosts are driven through :class:`InProcessLink`, which is the
Flower deployment with the Grid replaced by direct calls, so these tests pin the protocol
behaviour (equality with the engine, dropouts, refusals) in a second or two; the loopback
deployment test (tests/test_flower_deployment.py, slow) runs the same code over Flower.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_task import toy_config

from aggregation import wire
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.federation.aggregators import KeyFileError, ServerFileKeys, deal_keys
from fedrlhf_secure.federation.engine import RunOptions, run_federation, run_remote_federation
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.federation.policy import NodePolicy
from fedrlhf_secure.federation.round_core import TransportError
from fedrlhf_secure.rundir import load_tensors
from fedrlhf_secure.transport.client_host import serve
from fedrlhf_secure.transport.credentials import create_certificates, create_node_keys
from fedrlhf_secure.transport.local_socket import relay

NODES = {0: [0, 2], 1: [1, 3]}


def _own(raw: dict) -> NodePolicy:
    """The nodes' policy when their operator runs ``raw`` themselves: no less than it asks."""
    return NodePolicy.from_config(config_from_dict(raw))


def _raw(kind: str = "plain", **fed) -> dict:
    raw = toy_config(**fed)
    raw["aggregation"] = {"kind": kind}
    return raw


def _secagg_keys(tmp: Path, nodes: dict[int, list[int]]) -> tuple[Path, dict[int, Path]]:
    """The SecAgg identity registry a deployment needs (server dir, node dirs), made as `deploy local` does."""
    from fedrlhf_secure.keys import deal_secagg_identities

    node_dirs = {n: tmp / f"secagg-keys-node-{n}" for n in nodes}
    deal_secagg_identities(list(nodes.values()), tmp / "secagg-keys-server", list(node_dirs.values()), tmp / "secagg-registry")
    return tmp / "secagg-keys-server", node_dirs


def _remote(tmp: Path, raw: dict, *, keys: tuple[Path, dict[int, Path]] | None = None, on_stage=None, down_after=None, nodes=NODES):
    if keys is None and raw["aggregation"]["kind"] == "secagg":
        keys = _secagg_keys(tmp, nodes)
    hosts = {n: ParticipantHost(c, None, keys[1][n] if keys else None, policy=_own(raw)) for n, c in nodes.items()}
    link = InProcessLink(hosts)
    hook = on_stage
    if down_after is not None:
        node, at = down_after

        def hook(rnd, op, stage):
            if (rnd, stage) == at:
                link.down.add(node)

    return run_remote_federation(
        config_from_dict(raw), link, nodes, RunOptions(out=tmp, progress=False), keys_dir=keys[0] if keys else None, on_stage=hook
    )


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _engine_and_nodes(tmp: Path, raw: dict) -> tuple[Path, Path, dict, dict]:
    """``raw`` run by the in-process engine and over nodes: both run directories and final models
    (which must hold the same tensors, and every round of the config)."""
    local = run_federation(config_from_dict(raw), RunOptions(out=tmp / "a", progress=False))
    remote = _remote(tmp / "b", raw)
    a, b = load_tensors(local / "model.safetensors"), load_tensors(remote / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert len(_rows(local)) == len(_rows(remote)) == raw["federation"]["rounds"]
    return local, remote, a, b


def test_plain_rounds_over_nodes_equal_the_in_process_engine_exactly(tmp_path):
    local, remote, a, b = _engine_and_nodes(tmp_path, _raw("plain"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert float(np.abs(b["w"]).max()) > 0.5
    for ra, rb in zip(_rows(local), _rows(remote), strict=False):
        assert ra["heldout_accuracy"] == rb["heldout_accuracy"]
        assert ra["err_mean"] == rb["err_mean"]
        assert ra["bytes_up_per_client"] == rb["bytes_up_per_client"]
        assert ra["bytes_down_per_client"] == rb["bytes_down_per_client"]


def test_masking_over_nodes_equals_the_engine_up_to_stochastic_rounding(tmp_path):
    _, remote, a, b = _engine_and_nodes(tmp_path, _raw("secagg"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-3, rtol=0)
    assert [r["transport_stages"] for r in _rows(remote)] == [5, 5]  # fit+advertise, share, masked input, consistency, unmask


def test_ckks_over_nodes_reads_keys_from_the_dealer_files_and_the_server_has_no_secret(tmp_path, capsys):
    raw = _raw("ckks")
    cfg_path = tmp_path / "ckks.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    node_dirs = {n: tmp_path / f"keys-node-{n}" for n in NODES}
    deal_keys(cfg_path, list(NODES.values()), tmp_path / "keys-server", list(node_dirs.values()), tmp_path / "dealer")
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "keys-server").iterdir()) == ["dealer.pub", "public-context.frame", "secagg-registry.json"]
    server_keys = ServerFileKeys(tmp_path / "keys-server", load_config(cfg_path).aggregation.params)
    with pytest.raises(PermissionError):
        server_keys.client_key(0, 0)
    local = run_federation(load_config(cfg_path), RunOptions(out=tmp_path / "a", progress=False))
    seen: list[bytes] = []
    hosts = {n: ParticipantHost(c, None, node_dirs[n], policy=_own(raw)) for n, c in NODES.items()}
    remote = run_remote_federation(
        load_config(cfg_path),
        InProcessLink(hosts),
        NODES,
        RunOptions(out=tmp_path / "b", progress=False, hook=lambda s, d, b: seen.append(b)),
        keys_dir=tmp_path / "keys-server",
    )
    a, b = load_tensors(local / "model.safetensors"), load_tensors(remote / "model.safetensors")
    # the two runs hold different keys, so their CKKS flooding noise differs: 2 rounds x 2 runs x 6 sigma
    from aggregation.ckks import CKKSConfig, factory

    sigma = factory(CKKSConfig(), range(4), 0).plan.flood_sigma(4, 64)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=24 * sigma, rtol=0)
    # the server never sent a model: every fed/fit frame is client-held and empty; the final model
    # in the run directory is the one the nodes released, identical on both
    fits = [wire.decode(x) for x in seen if wire.decode(x).kind == "fed/fit"]
    assert len(fits) == 2 * 4 and all(f.header["client_held"] and not f.tensors for f in fits)
    released = [NodeMessage.decode(h.handle(NodeMessage("release").encode(REQUEST)), RESPONSE).arrays for h in hosts.values()]
    for k in b:
        np.testing.assert_array_equal(released[0][k], b[k])
        np.testing.assert_array_equal(released[1][k], b[k])


def test_ckks_without_the_server_key_directory_is_refused_with_the_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="public-context.frame"):
        _remote(tmp_path, _raw("ckks"), keys=(tmp_path / "empty", {0: tmp_path, 1: tmp_path}))


def test_a_node_that_goes_silent_after_key_sharing_is_recovered_by_secagg(tmp_path):
    # 6 clients on 3 nodes; node 1 (clients 1 and 4) stops answering after SecAgg's share-keys
    # stage of round 0, so the 4 survivors (>= t = 3) must reveal its mask-key shares
    nodes = {0: [0, 3], 1: [1, 4], 2: [2, 5]}

    def raw(kind):
        r = _raw(kind, rounds=1)
        r["task"]["clients"] = 6
        if kind == "secagg":
            r["aggregation"]["clip_range"] = 8.0  # the toy's table entries reach 6: no clipping
        return r

    masked = _remote(tmp_path / "s", raw("secagg"), down_after=(1, (0, 1)), nodes=nodes)
    (row,) = _rows(masked)
    assert (row["clients_aggregated"], row["clients_dropped"], row["nodes_dropped"]) == (4, 2, 1)
    got = load_tensors(masked / "model.safetensors")
    # exactly the survivors' FedAvg (up to stochastic rounding): survivors 0, 2, 3, 5 pull w towards
    # c with weight c+1, and table row r holds 1+c from the survivors c in {r-1, r} (weighted by c+1)
    survivors = [0, 2, 3, 5]
    w = 0.5 * sum(c * (c + 1) for c in survivors) / sum(c + 1 for c in survivors)
    np.testing.assert_allclose(got["w"], np.full(4, w), atol=5e-3)
    for r in range(6):
        touch = [c for c in survivors if r in (c % 6, (c + 1) % 6)]
        want = sum((c + 1) * (c + 1) for c in touch) / sum(c + 1 for c in touch)
        np.testing.assert_allclose(got["table"][r], [want, want], atol=5e-3)
    assert set(json.loads((masked / "summary.json").read_text())["clients_final"]) == {"0", "2", "3", "5"}


@pytest.mark.parametrize(
    "kind, nodes_go_down, aborted_rounds, reason",
    [
        # SecAgg's threshold for 4 participants is 2 (k=3, t=floor(3/2)+1): both nodes gone after
        # the advertise stage of round 0 leaves too few to unmask
        ("secagg", lambda rnd, stage: stage == 1, [0, 1, 2], "round 0"),
        # both nodes answer round 0, then go silent: round 1's plain aggregation receives nothing
        ("plain", lambda rnd, stage: rnd == 0, [1, 2], "round 1: no client's update arrived"),
    ],
    ids=["secagg-below-threshold", "plain-every-node-silent"],
)
def test_a_round_that_cannot_aggregate_releases_nothing_and_says_why(tmp_path, kind, nodes_go_down, aborted_rounds, reason):
    """The one round core treats an aborted aggregation alike in process and over nodes: the round
    releases nothing, the model stays as it was, the row says why, and the run goes on."""
    server_keys, node_keys = _secagg_keys(tmp_path, NODES) if kind == "secagg" else (None, {})
    hosts = {n: ParticipantHost(c, None, node_keys.get(n), policy=_own(_raw(kind))) for n, c in NODES.items()}
    link = InProcessLink(hosts)

    def hook(rnd, op, stage):
        if nodes_go_down(rnd, stage):
            link.down.update(NODES)

    run = run_remote_federation(
        config_from_dict(_raw(kind, rounds=3)), link, NODES, RunOptions(out=tmp_path, progress=False), on_stage=hook, keys_dir=server_keys
    )
    rows = _rows(run)
    assert [r["round"] for r in rows if r["aggregation_aborted"]] == aborted_rounds
    assert reason in rows[aborted_rounds[0]]["aggregation_aborted"]
    assert all(r["clients_aggregated"] == 0 for r in rows if r["aggregation_aborted"])


class _GarbledFitSummary:
    """A node whose fit answers carry a summary that is not a mapping (the aggregator messages are intact)."""

    def __init__(self, host: ParticipantHost) -> None:
        self.host = host

    def handle(self, data: bytes) -> bytes:
        resp = NodeMessage.decode(self.host.handle(data), RESPONSE)
        if resp.op == "fit":
            resp = NodeMessage("fit", {**resp.header, "fit": [1, 2]}, resp.messages)
        return resp.encode(RESPONSE)


def test_a_malformed_fit_summary_loses_that_nodes_metrics_but_not_its_updates(tmp_path, caplog):
    raw = _raw("plain")
    hosts = {n: ParticipantHost(c, None, policy=_own(raw)) for n, c in NODES.items()}
    link = InProcessLink({0: _GarbledFitSummary(hosts[0]), 1: hosts[1]})
    run = run_remote_federation(config_from_dict(raw), link, NODES, RunOptions(out=tmp_path / "b", progress=False))
    local = run_federation(config_from_dict(raw), RunOptions(out=tmp_path / "a", progress=False))
    a, b = load_tensors(local / "model.safetensors"), load_tensors(run / "model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [r["clients_aggregated"] for r in _rows(run)] == [4, 4]
    assert "node 0 sent a fit summary that is not a mapping" in caplog.text


def test_the_server_refuses_a_run_whose_nodes_do_not_host_every_client(tmp_path):
    with pytest.raises(TransportError, match=r"no node hosts clients \[3\]"):
        run_remote_federation(
            config_from_dict(_raw()),
            InProcessLink({0: ParticipantHost([0, 1, 2], None, policy=_own(_raw()))}),
            {0: None},
            RunOptions(out=tmp_path, progress=False),
        )
    assert not any(tmp_path.iterdir())  # the half-made run directory was discarded


def test_client_host_refuses_out_of_order_and_foreign_requests():
    host = ParticipantHost([0, 2], None, policy=_own(_raw()))
    fit = NodeMessage(
        "fit", {"round": 0, "session": "00" * 16, "participants": [0, 2], "dim": 16, "clients": [0]}, blobs={"instruction": b""}
    )
    resp = NodeMessage.decode(host.handle(fit.encode(REQUEST)), RESPONSE)
    assert "not been set up" in resp.header["error"]
    setup = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": yaml.safe_dump(_raw()).encode()})
    resp = NodeMessage.decode(host.handle(setup.encode(REQUEST)), RESPONSE)
    assert resp.header["clients"] == [0, 2] and "sizes" not in resp.header  # example counts are hidden weights
    foreign = NodeMessage("fit", {**fit.header, "clients": [1]}, blobs={"instruction": b""})
    resp = NodeMessage.decode(host.handle(foreign.encode(REQUEST)), RESPONSE)
    assert "does not host" in resp.header["error"]
    agg = NodeMessage("agg", {"round": 5}, {0: [b"x"]})
    assert "round is None" in NodeMessage.decode(host.handle(agg.encode(REQUEST)), RESPONSE).header["error"]
    assert "error" in NodeMessage.decode(host.handle(b"not a frame"), RESPONSE).header


def test_client_host_refuses_central_dp_noise_which_would_put_the_plan_on_the_server(tmp_path):
    raw = _raw(weighting="uniform")
    raw["privacy"] = {"mode": "client", "epsilon": 1.0, "delta": 1e-3, "noise": "central"}
    host = ParticipantHost([0], None, state_dir=tmp_path, policy=_own(raw))
    setup = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": yaml.safe_dump(raw).encode()})
    err = NodeMessage.decode(host.handle(setup.encode(REQUEST)), RESPONSE).header["error"]
    assert "privacy.noise 'central'" in err
    assert not list(tmp_path.iterdir())


@settings(max_examples=60, deadline=None)
@given(
    messages=st.dictionaries(st.integers(0, 10**6), st.lists(st.binary(max_size=40), max_size=4), max_size=4),
    header=st.dictionaries(st.sampled_from(["round", "clients", "x"]), st.integers(0, 99), max_size=3),
)
def test_node_message_round_trips(messages, header):
    msg = NodeMessage("agg", header, messages, {"b": b"\x00\x01"})
    back = NodeMessage.decode(msg.encode(REQUEST), REQUEST)
    assert back.op == "agg" and dict(back.header) == header
    assert {c: v for c, v in back.messages.items()} == {c: v for c, v in messages.items() if v}
    assert back.blobs == {"b": b"\x00\x01"}


@pytest.mark.parametrize(
    "tensors, problem",
    [
        ({"msg/1/1": wire.as_blob(b"a")}, "not numbered"),
        ({"msg/x/0": wire.as_blob(b"a")}, "malformed"),
        ({"weird": wire.as_blob(b"a")}, "unexpected tensor"),
    ],
)
def test_node_message_decoder_rejects_malformed_frames(tensors, problem):
    data = wire.encode(wire.Frame(REQUEST, {"op": "agg"}, tensors))
    with pytest.raises(wire.WireError, match=problem):
        NodeMessage.decode(data, REQUEST)
    with pytest.raises(wire.WireError, match="unknown op"):
        NodeMessage.decode(wire.encode(wire.Frame(REQUEST, {"op": "exec"})), REQUEST)


def test_client_host_answers_over_its_unix_socket_only_to_its_user(tmp_path):
    sock = tmp_path / "node.sock"
    host = ParticipantHost([0, 1], None, policy=_own(_raw()))
    t = threading.Thread(target=serve, args=(host, sock), kwargs={"ready_file": tmp_path / "ready", "max_requests": 1}, daemon=True)
    t.start()
    for _ in range(200):
        if (tmp_path / "ready").exists():
            break
        threading.Event().wait(0.01)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    setup = NodeMessage("setup", {"client_ids": [0, 1, 2, 3]}, blobs={"config": yaml.safe_dump(_raw()).encode()})
    resp = NodeMessage.decode(relay(sock, setup.encode(REQUEST), timeout=10), RESPONSE)
    assert resp.header["clients"] == [0, 1]
    t.join(timeout=10)
    assert not t.is_alive() and not sock.exists()


def test_certificates_chain_to_the_ca_and_name_every_host(tmp_path):
    paths = create_certificates(tmp_path, ["superlink.example.org", "10.1.2.3", "::1"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "::1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert load_pem_private_key(key.read_bytes(), None)
    with pytest.raises(FileExistsError):
        create_certificates(tmp_path, ["other"])


def test_node_keys_are_openssh_ec_keys_on_a_nist_curve_as_flower_expects(tmp_path):
    (a, b) = create_node_keys(tmp_path, ["node-a", "node-b"])
    priv = load_ssh_private_key(a.private_key.read_bytes(), None)
    pub = load_ssh_public_key(a.public_key.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert pub.public_numbers() == priv.public_key().public_numbers()
    assert load_ssh_public_key(b.public_key.read_bytes()).public_numbers() != pub.public_numbers()
    assert stat.S_IMODE(os.stat(a.private_key).st_mode) == 0o600
    with pytest.raises(ValueError, match="plain file name"):
        create_node_keys(tmp_path, ["../escape"])


def _live_members(pgid: int) -> list[int]:
    """Processes (not zombies) in process group ``pgid``, read from /proc."""
    live = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat_file.parent.name))
    return live


def _live_processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (every deployment process names its workdir)."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state != "Z" and str(path) in cmd and int(proc_dir.name) != os.getpid():
            found.append(cmd)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list process groups")
def test_a_deployment_that_fails_to_start_leaves_no_process_behind(tmp_path):
    pytest.importorskip("flwr")
    import shutil

    from fedrlhf_secure.transport.local_deployment import DeploymentError, LocalDeployment

    if shutil.which("flower-superlink") is None:
        pytest.skip("flower-superlink is not on PATH")
    # a Unix socket path longer than the kernel's 108 bytes: the client host cannot bind and exits,
    # after the SuperLink (and its SuperExec child) is already up
    deep = tmp_path / ("d" * 100)
    dep = LocalDeployment(deep, [[0, 1]], start_timeout=120)
    with pytest.raises(DeploymentError, match="client host 0 exited"):
        with dep:
            pass
    assert [p.name for p in dep.procs] == ["superlink", "client-host-0", "clientapp-zygote"]
    for proc in dep.procs:
        assert proc.popen.poll() is not None
        assert _live_members(proc.popen.pid) == []
    # including the SuperExec the SuperLink started in a session of its own
    assert _live_processes_mentioning(dep.workdir) == []


def test_deploy_command_writes_credentials_and_refuses_to_overwrite_them(tmp_path, capsys):
    from fedrlhf_secure.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    assert main(["deploy", "node-keys", "--out", str(tmp_path / "keys"), "--count", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["node-0", "node-0.pub", "node-1", "node-1.pub"]
    capsys.readouterr()
    assert main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--host", "localhost"]) == 1
    assert "ca.key already exists" in capsys.readouterr().err
    assert main(["deploy", "node-keys", "--out", str(tmp_path / "keys"), "--names", "node-1"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ signed app bundles


def _signing(tmp_path: Path):
    from fedrlhf_secure.transport.app_signing import build_fab, create_signing_key, write_trusted_entities
    from fedrlhf_secure.transport.local_deployment import APP_DIR

    key = create_signing_key(tmp_path / "op", "operator")
    signers = write_trusted_entities(tmp_path / "signers.yaml", {"operator": key.public_key})
    return build_fab(APP_DIR), key, signers


def test_an_app_bundle_runs_only_with_a_valid_signature_by_a_trusted_key(tmp_path):
    import hashlib

    from fedrlhf_secure.transport.app_signing import AppRefused, create_signing_key, sign_fab
    from fedrlhf_secure.transport.verified_clientapp import check_app

    fab, key, signers = _signing(tmp_path)
    h = hashlib.sha256(fab).hexdigest()
    node = {"app-signers": str(signers)}
    good = sign_fab(fab, key.private_key, "operator")
    assert check_app(fab, h, {"app-signature": good}, node) == "operator"
    other = create_signing_key(tmp_path / "attacker", "attacker")
    refusals = {
        "no signature": ({"app-signature": ""}, node, fab, h, "carries no signature"),
        "no run config key": ({}, node, fab, h, "carries no signature"),
        "signed by another key under the trusted id": (
            {"app-signature": sign_fab(fab, other.private_key, "operator")}, node, fab, h, "does not verify"),
        "an unknown signer": ({"app-signature": sign_fab(fab, other.private_key, "attacker")}, node, fab, h, "not one of this node"),
        "a different bundle": ({"app-signature": good}, node, fab + b" ", hashlib.sha256(fab + b" ").hexdigest(), "does not verify"),
        "content not matching its hash": ({"app-signature": good}, node, fab + b" ", h, "does not match its announced hash"),
        "malformed": ({"app-signature": "operator:x:y"}, node, fab, h, "malformed"),
        "a node without trusted signers": ({"app-signature": good}, {}, fab, h, "refusing every app"),
        "an unreadable signers file": ({"app-signature": good}, {"app-signers": str(tmp_path / "nope.yaml")}, fab, h, "cannot be read"),
    }  # fmt: skip
    for name, (run_cfg, node_cfg, content, digest, why) in refusals.items():
        with pytest.raises(AppRefused, match=why):
            check_app(content, digest, run_cfg, node_cfg)
        assert name


def test_app_signatures_are_in_flowers_own_format_and_verify_with_flowers_trusted_entities_check(tmp_path):
    """The same key file and signature serve ``flower-supernode --trusted-entities`` for Hub apps:
    flwr 1.42's own verifier accepts them (and refuses a tampered bundle)."""
    import hashlib

    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    from fedrlhf_secure.transport.app_signing import sign_fab

    fab, key, signers = _signing(tmp_path)
    key_id, at, sig = sign_fab(fab, key.private_key, "operator").split(":")
    trusted = yaml.safe_load(signers.read_text())
    verifications = {key_id: json.dumps({"signature": sig, "signed_at": int(at)}), "valid_license": "Valid"}
    assert _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, verifications), trusted)
    assert not _verify_fab(Fab("x", fab + b" ", verifications), trusted)


def test_the_verifying_runner_is_installed_under_flowers_command_name(tmp_path):
    import shutil

    from fedrlhf_secure.transport.verified_clientapp import runner_path_env, write_runner

    path = write_runner(tmp_path / "bin")
    assert path.name == "flwr-clientapp" and os.access(path, os.X_OK)
    assert "fedrlhf_secure.transport.verified_clientapp import main" in path.read_text()
    env = runner_path_env(tmp_path / "bin", {"PATH": "/usr/bin"})
    assert shutil.which("flwr-clientapp", path=env["PATH"]) == str(path.resolve())


@pytest.mark.parametrize("signed", [True, False])
def test_the_runner_refuses_at_installation_so_flower_still_answers_the_message(tmp_path, monkeypatch, signed):
    """The check is made on the pulled bundle and raised where Flower would install it: Flower then
    holds the message and replies with an error (raising inside the pull left it with nothing to
    answer, and the server waited out its deadline). A signed bundle is installed unchanged."""
    import hashlib
    import importlib
    from types import SimpleNamespace

    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    from fedrlhf_secure.transport import verified_clientapp
    from fedrlhf_secure.transport.app_signing import AppRefused, sign_fab

    fab, key, signers = _signing(tmp_path)
    signature = sign_fab(fab, key.private_key, "operator") if signed else ""
    pulled = SimpleNamespace(content=fab, hash_str=hashlib.sha256(fab).hexdigest())
    context = SimpleNamespace(run_config={"app-signature": signature}, node_config={"app-signers": str(signers)})
    installed: list[bytes] = []
    monkeypatch.setattr(runtime, "pull_task_input", lambda client: ("message", context, "run", pulled))
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, **kw: installed.append(content))

    def flower_runner():  # what run_clientapp does first: pull, then install
        message, _, _, got = runtime.pull_task_input(None)
        assert message == "message"
        runtime.install_from_fab(got.content, skip_prompt=True)

    monkeypatch.setattr(verified_clientapp, "flower_clientapp", flower_runner)
    if signed:
        verified_clientapp.main()
        assert installed == [fab]
    else:
        with pytest.raises(AppRefused, match="carries no signature"):
            verified_clientapp.main()
        assert installed == []


class _FakeGrid:
    """Flower's Grid API as the ServerApp uses it: replies appear after ``ready_after`` pulls; node 9 never answers."""

    def __init__(self, ready_after: int, nodes=(1, 2, 9)) -> None:
        self.ready_after, self.nodes, self.pulls, self.pushed = ready_after, nodes, 0, {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's grid does
            self.pushed[m.object_id] = m
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Message

        from fedrlhf_secure.transport.client_app import pack, unpack

        self.pulls += 1
        if self.pulls < self.ready_after:
            return []
        out = []
        for mid in message_ids:
            req = self.pushed[mid]
            if req.metadata.dst_node_id == 9:
                continue
            t = {"process_start": 100.0, "handler": 101.5, "relay_s": 0.25, "reply_at": 102.0}
            reply = Message(pack(unpack(req.content)[::-1], t), reply_to=req)
            reply.metadata.__dict__["_src_node_id"] = req.metadata.dst_node_id
            out.append(reply)
        return out


def test_the_server_link_pulls_with_a_short_back_off_and_stops_at_the_deadline(monkeypatch):
    """Replies after the 6th pull: the link's sleeps start at 50 ms and never exceed 250 ms (Flower's
    send_and_receive sleeps 3 s); a node that never answers is waited for until the deadline only."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrlhf_secure.transport import server_app

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a ServerApp process has
        monkeypatch.setattr(TaskIdentity, attr, value)
    slept: list[float] = []
    monkeypatch.setattr(server_app.time, "sleep", lambda s: slept.append(s))
    grid = _FakeGrid(ready_after=6, nodes=(1, 2))
    link = server_app.GridLink(grid)
    got = link.exchange({1: b"abc", 2: b"xyz"}, timeout=30.0)
    assert got == {1: b"cba", 2: b"zyx"}
    assert grid.pulls == 6 and len(slept) == 5
    assert slept[0] == pytest.approx(0.05) and max(slept) <= 0.25 and slept == sorted(slept)
    (t,) = link.timings
    assert (t["asked"], t["answered"], t["pulls"]) == (2, 2, 6)
    assert t["process_start"] == pytest.approx(1.5) and t["compute"] == pytest.approx(0.25)

    clock = iter(range(0, 10_000))
    monkeypatch.setattr(server_app.time, "monotonic", lambda: float(next(clock)))
    link = server_app.GridLink(_FakeGrid(ready_after=1))
    assert link.exchange({1: b"a", 9: b"b"}, timeout=5.0) == {1: b"a"}
    assert link.timings[0]["answered"] == 1 and link.timings[0]["pulls"] <= 6


def test_exchange_timing_splits_the_wall_time_at_the_slowest_nodes_stamps():
    from fedrlhf_secure.transport.server_app import exchange_timing

    nodes = {
        1: {"process_start": 12.0, "handler": 15.0, "relay_s": 0.5, "reply_at": 15.6, "pulled": 16.0},
        2: {"process_start": 11.0, "handler": 13.0, "relay_s": 0.9, "reply_at": 14.0, "pulled": 14.2},
    }
    t = exchange_timing(10.0, 10.5, 16.1, nodes, asked=2, pulls=9)
    assert t["wall"] == pytest.approx(6.1) and t["push"] == pytest.approx(0.5)
    assert (t["node_poll"], t["process_start"], t["compute"], t["return"]) == pytest.approx((1.5, 3.0, 0.5, 0.4))
    assert t["compute_max"] == pytest.approx(0.9)
    assert "node_poll" not in exchange_timing(10.0, 10.5, 16.1, {1: {"pulled": 16.0}}, asked=1, pulls=1)


def test_the_per_message_clientapp_process_imports_no_torch_no_task_and_not_the_whole_supernode(tmp_path):
    """Flower starts a fresh process per message: it must only relay (issue 16; numpy is Flower's own). The runner is
    started as SuperExec starts it, with Flower's run_clientapp replaced by a stub that loads our app."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import flwr.supernode.runtime.run_clientapp as rc\n"
        "def stub(**kw):\n"
        "    import fedrlhf_secure.transport.client_app  # what Flower's load_app imports\n"
        "    print('ARGS', kw['runtime_api_address'], kw['parent_pid'])\n"
        "rc.run_clientapp = stub\n"
        "sys.argv = ['flwr-clientapp', '--runtime-api-address', '127.0.0.1:9094', '--token', 't', '--insecure', '--parent-pid', '7']\n"
        "from fedrlhf_secure.transport.verified_clientapp import main\n"
        "main()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'aggregation', 'tenseal', 'opacus', 'transformers')"
        " or m.startswith(('fedrlhf_secure.federation', 'fedrlhf_secure.tasks', 'flwr.supernode.cli')))\n"
        "print('BAD', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ARGS 127.0.0.1:9094 7" in res.stdout
    assert "BAD []" in res.stdout, res.stdout


def test_the_supernode_runner_caps_flowers_idle_poll_and_nothing_else(tmp_path, monkeypatch):
    """flwr 1.42's SuperNode sleeps 3 s when idle (hard-coded); the runner caps that module's sleeps
    at 0.3 s, leaves every other use of ``time`` alone, and refuses a nonsensical interval."""
    import time as real_time

    from flwr.supernode import start_client_internal

    from fedrlhf_secure.transport import supernode_runner as sr

    slept: list[float] = []
    fake = type("T", (), {"sleep": staticmethod(slept.append), "time": staticmethod(lambda: 42.0)})
    capped = sr.CappedSleep(fake, 0.3)
    capped.sleep(3)
    capped.sleep(0.1)
    assert slept == [0.3, 0.1] and capped.time() == 42.0
    monkeypatch.setattr(start_client_internal, "time", real_time)
    sr.patch(sr.poll_interval({}))
    assert isinstance(start_client_internal.time, sr.CappedSleep) and start_client_internal.time.cap == sr.DEFAULT_POLL_S
    assert sr.poll_interval({sr.ENV: "3"}) == 3.0
    for bad in ("0", "inf", "x"):
        with pytest.raises(SystemExit, match=sr.ENV):
            sr.poll_interval({sr.ENV: bad})
    path = sr.write_supernode_runner(tmp_path / "bin")
    assert path.name == "flower-supernode" and os.access(path, os.X_OK) and "supernode_runner import main" in path.read_text()


def test_the_clientapp_launcher_runs_the_verifying_runner_forked_from_the_zygote_with_its_streams_and_exit_code(tmp_path):
    """The per-message `flwr-clientapp` hands its argv and standard streams to the warm zygote, whose
    child runs the same verifying runner (here: Flower's argument parser answering --help / refusing
    a bad flag) and reports its exit code; the launcher exits with it. Without a zygote the launcher
    runs the runner itself, with the same result."""
    import subprocess
    import sys
    import time

    from fedrlhf_secure.transport.verified_clientapp import write_runner

    sock = tmp_path / "z.sock"
    runner = write_runner(tmp_path / "bin", zygote=sock)

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=300)

    direct_help, direct_bad = launch("--help"), launch("--bogus")
    assert direct_help.returncode == 0 and "--runtime-api-address" in direct_help.stdout
    assert direct_bad.returncode == 2 and "--token" in direct_bad.stderr
    ready = tmp_path / "ready"
    zygote = subprocess.Popen(
        [sys.executable, "-m", "fedrlhf_secure.cli", "deploy", "clientapp-zygote", "--socket", str(sock), "--ready-file", str(ready)],
        cwd=Path(__file__).parents[1],
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert zygote.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        forked_help, forked_bad = launch("--help"), launch("--bogus")
        assert forked_help.returncode == 0 and "fedrlhf: app bundle signature verified first" in forked_help.stdout
        assert forked_help.stdout.split()[:4] == direct_help.stdout.split()[:4]  # (line wrapping follows the terminal)
        assert forked_bad.returncode == 2 and forked_bad.stderr.strip().endswith(direct_bad.stderr.strip().splitlines()[-1])
        assert zygote.poll() is None  # the zygote outlives its children
    finally:
        zygote.terminate()
        zygote.wait(timeout=30)
