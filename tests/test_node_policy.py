"""A participant's own policy: a server that asks for less protection is refused, by name.

Issue 12, measured on main: a node built its aggregator and privacy plan from the server's setup
frame, so a lying server asked for ``aggregation: {kind: plain}`` (and read every update), SecAgg
with ``threshold: 1, neighbours: 1``, a larger ε, or no DP at all. Each of those frames is sent
here to a host whose policy is the user's own config and must be refused with an error naming the
field and both values; the same frame is accepted by :class:`~weakened_host.ObedientHost` (the
host without its policy), so no refusal is vacuous.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from toy_task import toy_config  # registers the toy tasks
from weakened_host import ObedientHost

from aggregation import wire
from aggregation.plain import UPDATE
from aggregation.secagg import Identities
from aggregation.secagg.crypto import public_raw
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, run_federation, run_remote_federation
from fedrlhf_secure.federation.links import InProcessLink
from fedrlhf_secure.federation.node_protocol import REQUEST, RESPONSE, NodeMessage
from fedrlhf_secure.federation.participant import ParticipantHost
from fedrlhf_secure.federation.policy import CKKSPolicy, NodePolicy, PolicyRefused, SecAggPolicy, load_policy, write_policy
from fedrlhf_secure.federation.round_core import TransportError

CLIENTS = [0, 1, 2, 3]
NODES = {0: [0, 2], 1: [1, 3]}


def user_config() -> dict:
    """What the user runs: SecAgg (auto k, t) with client-level distributed DP at ε = 4, δ = 1e-3."""
    raw = toy_config(weighting="uniform", sparse_rows="all")
    raw["task"]["kind"] = "toy-dp"
    raw["aggregation"] = {"kind": "secagg", "clip_range": 8.0, "noise_bound": 1_000_000}
    raw["privacy"] = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed"}
    return raw


def weaker(change) -> dict:
    raw = copy.deepcopy(user_config())
    change(raw)
    return raw


def _set(path: str, value):
    def change(raw):
        section, key = path.split(".")
        raw[section][key] = value

    return change


# name -> (how the server weakens the user's config, the field the refusal names, the server's value, the policy's)
WEAKER = {
    "plain": (lambda r: r.update(aggregation={"kind": "plain"}), "aggregation.kind", "'plain'", "['secagg']"),
    "secagg-t1-k1": (
        lambda r: r["aggregation"].update(threshold=1, neighbours=1),
        "aggregation.neighbours",
        "1",
        "'auto'",
    ),
    "secagg-t1": (lambda r: r["aggregation"].update(threshold=1), "aggregation.threshold", "1", "'auto'"),
    "larger-epsilon": (_set("privacy.epsilon", 40.0), "privacy.epsilon", "40.0", "4.0"),
    "dp-off": (lambda r: r.update(privacy={"mode": "none"}), "privacy.mode", "'none'", "privacy.required = True"),
    "larger-delta": (_set("privacy.delta", 0.1), "privacy.delta", "0.1", "0.001"),
    "record-instead": (lambda r: r["privacy"].update(mode="record"), "privacy.mode", "'record'", "['client']"),
    "fewer-contributors": (_set("federation.min_clients", 1), "federation.min_clients", "1", "2"),
}


def setup_frame(raw: dict) -> bytes:
    return NodeMessage("setup", {"client_ids": CLIENTS}, blobs={"config": yaml.safe_dump(raw).encode()}).encode(REQUEST)


def answer(host, data: bytes) -> dict:
    return dict(NodeMessage.decode(host.handle(data), RESPONSE).header)


def own_policy() -> NodePolicy:
    return NodePolicy.from_config(config_from_dict(user_config()))


@pytest.mark.parametrize("name", sorted(WEAKER))
def test_a_setup_asking_for_less_than_the_nodes_policy_is_refused_naming_the_field(name, tmp_path):
    change, field, asked, required = WEAKER[name]
    frame = setup_frame(weaker(change))
    host = ParticipantHost([0, 2], None, state_dir=tmp_path / "node", policy=own_policy())
    err = answer(host, frame)["error"]
    assert err.startswith("PolicyRefused: node policy refuses " + field), err
    assert f"the server asks for {asked}" in err and required in err, err
    assert host.config is None and not (tmp_path / "node").exists()  # nothing was built, no ledger opened
    # the control: the same frame, to a host that ignores its policy, is accepted
    obedient = ObedientHost([0, 2], None, state_dir=tmp_path / "obedient", policy=own_policy())
    resp = answer(obedient, frame)
    assert "error" not in resp and resp["clients"] == [0, 2]
    assert obedient.config is not None


def test_the_users_own_config_is_accepted_by_the_policy_derived_from_it(tmp_path):
    host = ParticipantHost([0, 2], None, state_dir=tmp_path, policy=own_policy())
    resp = answer(host, setup_frame(user_config()))
    assert resp == {"clients": [0, 2], "dim": host.codec.dim}
    # and a config asking for more (a larger threshold, a smaller ε) is accepted too
    stronger = weaker(lambda r: (r["aggregation"].update(threshold=3), r["privacy"].update(epsilon=3.0)))
    host2 = ParticipantHost([0, 2], None, state_dir=tmp_path / "2", policy=own_policy())
    assert answer(host2, setup_frame(stronger))["clients"] == [0, 2]


def test_a_server_dictating_plain_aggregation_is_refused_over_the_node_protocol_and_reads_updates_from_obedient_nodes(tmp_path):
    """The attack end to end through the round core: refused by policy-bound nodes (the run does
    not start), while nodes without the policy hand the server every client's update in the clear."""
    server = config_from_dict(weaker(WEAKER["plain"][0]))
    hosts = {n: ParticipantHost(c, None, state_dir=tmp_path / f"n{n}", policy=own_policy()) for n, c in NODES.items()}
    with pytest.raises(TransportError, match=r"node 0 refused the run: PolicyRefused: .*aggregation\.kind.*'plain'"):
        run_remote_federation(server, InProcessLink(hosts), NODES, RunOptions(out=tmp_path / "refused", progress=False))
    assert not any((tmp_path / "refused").iterdir())
    seen: list[tuple[int, bytes]] = []
    obedient = {n: ObedientHost(c, None, state_dir=tmp_path / f"o{n}", policy=own_policy()) for n, c in NODES.items()}
    run_remote_federation(
        server,
        InProcessLink(obedient),
        NODES,
        RunOptions(out=tmp_path / "obeyed", progress=False, hook=lambda src, dst, b: seen.append((src, b))),
    )
    plain_updates = [(src, wire.decode(b)) for src, b in seen if src >= 0 and wire.decode(b).kind == UPDATE]
    assert sorted(src for src, _ in plain_updates) == sorted(CLIENTS * 2)  # every client, both rounds, in the clear
    # each one is a client's own (noised) update vector and its weight, readable by the server
    assert all(np.any(f.tensors["vector"] != 0) and "weight" in f.header for _, f in plain_updates)


def test_a_round_smaller_than_the_policys_minimum_is_refused_at_fit(tmp_path):
    host = ParticipantHost([0, 2], None, state_dir=tmp_path, policy=own_policy())
    assert "error" not in answer(host, setup_frame(user_config()))
    fit = NodeMessage(
        "fit",
        {"round": 0, "session": "00" * 16, "participants": [0], "dim": host.codec.dim, "clients": [0]},
        blobs={"instruction": b""},
    )
    err = answer(host, fit.encode(REQUEST))["error"]
    assert "node policy refuses round participants: the server asks for 1" in err and "min_contributors = 2" in err


def _secagg(n_threshold=None, neighbours=None, signatures=False, identity_dir=None):
    raw = toy_config()
    raw["aggregation"] = {"kind": "secagg", "signatures": signatures}
    if n_threshold is not None:
        raw["aggregation"]["threshold"] = n_threshold
    if neighbours is not None:
        raw["aggregation"]["neighbours"] = neighbours
    if identity_dir is not None:
        raw["aggregation"]["identity_dir"] = identity_dir
    return config_from_dict(raw)


@pytest.mark.parametrize(
    "n, colluders, threshold, refused",
    [
        # auto at n=10: k=9, t=5, 2t-k=1: one colluder suffices for a split view (issue 12, item 2)
        (10, 0, None, False),
        (10, 1, None, True),
        # auto at n=20: k=18, t=10, 2t-k=2
        (20, 1, None, False),
        (20, 2, None, True),
        # t=11 at k=18: 2t-k=4 > 2
        (20, 2, 11, False),
        # ten colluders: t=14 gives 2t-k=10, not enough; t=15 gives 12
        (20, 10, 14, True),
        (20, 10, 15, False),
    ],
)
def test_the_colluder_bound_needs_2t_minus_k_above_c(n, colluders, threshold, refused):
    policy = NodePolicy(aggregation=("secagg",), secagg=SecAggPolicy(max_colluders=colluders))
    config = _secagg(threshold)
    if refused:
        with pytest.raises(PolicyRefused, match=r"aggregation\.threshold.*secagg\.max_colluders"):
            policy.admit_setup(config, n, embedded=True)
    else:
        assert policy.admit_setup(config, n, embedded=True) is config


def test_auto_parameters_are_checked_again_for_each_rounds_size():
    """``neighbours: 6`` meets ``min_neighbours: auto`` at n=4 (complete graph, k=3) but not at n=100 (auto k=28)."""
    policy = NodePolicy(aggregation=("secagg",))
    config = _secagg(neighbours=6)
    policy.admit_round(config, 4)
    with pytest.raises(PolicyRefused, match=r"aggregation\.neighbours: the server asks for 6.*at n=100: at least 28"):
        policy.admit_round(config, 100)


def test_the_node_uses_its_own_identity_registry_not_the_path_the_server_names(tmp_path):
    ids = Identities.generate(CLIENTS)
    node_dir = tmp_path / "node-ids"
    Identities(public=dict(ids.public), private={c: ids.private[c] for c in (0, 2)}).write(node_dir)
    server_cfg = _secagg(signatures=True, identity_dir=str(tmp_path / "server-chosen"))
    raw = yaml.safe_load(server_cfg.to_yaml())
    policy = NodePolicy(aggregation=("secagg",), secagg=SecAggPolicy(require_signatures=True), identity_dir=str(node_dir))
    host = ParticipantHost([0, 2], None, policy=policy)
    assert answer(host, setup_frame(raw))["clients"] == [0, 2]
    assert host.config.aggregation.params.identity_dir == str(node_dir)
    loaded = host.aggregator.identities
    assert {c: public_raw(k) for c, k in loaded.public.items()} == {c: public_raw(k) for c, k in ids.public.items()}
    assert sorted(loaded.private) == [0, 2]
    # without a registry of its own, a node cannot check signatures across machines: refused
    bare = ParticipantHost([0, 2], None, policy=NodePolicy(aggregation=("secagg",)))
    assert "needs this node's identity registry" in answer(bare, setup_frame(raw))["error"]
    # and a policy that requires signatures refuses a server that turns them off
    unsigned = yaml.safe_load(_secagg().to_yaml())
    err = answer(ParticipantHost([0, 2], None, policy=policy), setup_frame(unsigned))["error"]
    assert "aggregation.signatures: the server asks for False" in err and "secagg.require_signatures = True" in err


def test_the_embedded_run_holds_its_participants_to_the_users_config(tmp_path):
    """In process the participants' policy is the config the user runs: a run of it completes."""
    run = run_federation(config_from_dict(user_config()), RunOptions(out=tmp_path, progress=False))
    assert (run / "summary.json").exists()


def test_a_policy_file_round_trips_and_a_typo_is_refused_naming_the_key(tmp_path):
    policy = NodePolicy(
        aggregation=("secagg", "ckks"),
        secagg=SecAggPolicy(min_threshold=5, max_colluders=1, require_signatures=True),
        identity_dir="/var/lib/fedrlhf/ids",
    )
    path = write_policy(policy, tmp_path / "node.yaml")
    assert load_policy(path) == policy and load_policy(path).source == str(path)
    path.write_text(path.read_text().replace("min_threshold", "min_treshold"))
    with pytest.raises(ConfigError, match=r"node\.yaml.*unknown key secagg\.min_treshold"):
        load_policy(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("aggregation: [plain, rot13]\n")
    with pytest.raises(ConfigError, match=r"aggregation\[1\].*'rot13'"):
        load_policy(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "missing.yaml")


def test_deploy_policy_writes_the_policy_of_a_config_and_client_host_requires_one(tmp_path, capsys):
    cfg = tmp_path / "user.yaml"
    cfg.write_text(yaml.safe_dump(user_config()))
    out = tmp_path / "policy.yaml"
    assert main(["deploy", "policy", "--config", str(cfg), "--out", str(out)]) == 0
    policy = load_policy(out)
    assert policy.aggregation == ("secagg",) and policy.privacy.max_epsilon == 4.0 and policy.privacy.required
    with pytest.raises(SystemExit) as exc:
        main(["deploy", "client-host", "--client-ids", "0", "--socket", str(tmp_path / "s.sock")])
    assert exc.value.code == 2 and "--policy" in capsys.readouterr().err


def test_a_participant_host_cannot_be_built_without_a_policy():
    with pytest.raises(TypeError, match="policy"):
        ParticipantHost([0], None)  # type: ignore[call-arg]
    with pytest.raises(Exception, match="NodePolicy"):
        ParticipantHost([0], None, policy=None)  # type: ignore[arg-type]


def test_the_policy_example_in_the_deployment_docs_is_a_valid_policy(tmp_path):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text(encoding="utf-8")
    block = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "p.yaml").write_text(block)
    policy = load_policy(tmp_path / "p.yaml")
    assert policy.aggregation == ("secagg", "ckks") and policy.secagg.max_colluders == 1 and policy.privacy.max_epsilon == 8.0


class _EchoHalf:
    """A client half whose 'aggregate' is its own update alone: what a lying CKKS server achieves by
    returning one client's ciphertext as the round's aggregate (issue 12, item 4)."""

    def __init__(self, cid, vector, weight):
        from aggregation.base import AggregateResult

        self._result = AggregateResult(np.asarray(vector, np.float64) * weight, float(weight), (cid,))

    def receive(self, data):
        return []

    done = True

    def result(self):
        return self._result


class _EchoAggregator:
    kind = "ckks"

    def __init__(self):
        from aggregation.base import Capabilities

        self.capabilities = Capabilities(server_reads_result=False)

    @property
    def server_can_read_result(self):
        return False

    def client(self, ctx, cid, vector, weight, *, integer_noise=None):
        return _EchoHalf(cid, vector, weight)


def _held_after_single_client_aggregate(policy: NodePolicy) -> tuple[dict, np.ndarray, np.ndarray]:
    from fedrlhf_secure.federation.messages import FitInstruction
    from fedrlhf_secure.federation.participant import build_task

    raw = toy_config(sparse_rows="all", min_clients=1)
    raw["aggregation"] = {"kind": "ckks"}
    cfg = config_from_dict(raw)
    host = ParticipantHost([0], None, policy=policy, task=build_task(cfg, None), aggregator=_EchoAggregator())
    assert "error" not in answer(host, setup_frame(raw))
    before = host.held["w"].copy()
    fit = NodeMessage(
        "fit",
        {"round": 0, "session": "00" * 16, "participants": [0, 1], "dim": host.codec.dim, "clients": [0], "model_round": -1},
        blobs={"instruction": FitInstruction(0, 1, 3, {}, client_held=True).encode()},
    )
    assert "error" not in answer(host, fit.encode(REQUEST))
    finish = answer(host, NodeMessage("finish", {"round": 0}).encode(REQUEST))
    return finish, before, host.held["w"]


def test_a_node_never_applies_a_decrypted_aggregate_of_fewer_clients_than_its_policy_allows():
    """The check this node can make today on the contributors an aggregate states (making that list
    provable is the CKKS side's job): an 'aggregate' of one client is discarded and the held model
    stays; a node whose policy allows one contributor folds that client's own update into its model."""
    strict = NodePolicy(aggregation=("ckks",), min_contributors=1)  # ckks.min_contributors defaults to 2
    finish, before, after = _held_after_single_client_aggregate(strict)
    assert finish["contributors"] == [0]
    assert "below this node's policy ckks.min_contributors = 2" in finish["discarded"]
    np.testing.assert_array_equal(after, before)
    lax = NodePolicy(aggregation=("ckks",), min_contributors=1, ckks=CKKSPolicy(min_contributors=1))
    finish, before, after = _held_after_single_client_aggregate(lax)
    assert "discarded" not in finish and np.any(after != before)
