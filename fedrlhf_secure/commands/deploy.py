"""``fedrlhf deploy``: credentials, the node-side client host, and a one-machine deployment.

Subcommands::

    fedrlhf deploy certs --out certs --host superlink.example.org --host 10.0.0.5
    fedrlhf deploy node-keys --out keys --count 3            # node-0, node-0.pub, ...
    fedrlhf deploy client-host --client-ids 0,3,6 --socket /run/fedrlhf/node.sock --policy node-policy.yaml --data-dir DATA
    fedrlhf deploy policy --config configs/movielens.yaml --out node-policy.yaml   # a policy that accepts no less
    fedrlhf deploy app-key --out keys --name operator                 # operator: Ed25519 app-signing key
    fedrlhf deploy sign-app --key keys/operator --key-id operator      # -> app-signature for flwr run
    fedrlhf deploy app-runner --out /opt/fedrlhf/bin --signer operator=operator.pub   # each SuperNode
    fedrlhf deploy clientapp-zygote --socket /opt/fedrlhf/bin/clientapp-zygote.sock   # optional, each SuperNode
    fedrlhf deploy local --config configs/movielens-tiny.yaml --nodes 3 --data-dir DATA --out runs

``client-host`` checks every setup the server sends against the node's own policy file
(:mod:`fedrlhf_secure.federation.policy`) and refuses one that asks for less protection.
``local`` starts a TLS SuperLink with SuperNode authentication, registers the node keys, starts
one client host and one SuperNode per node on free loopback ports, runs the config with
``flwr run`` and stops every process afterwards, also when something fails; it logs each start-up
step and each round, prints the result table ``fedrlhf run`` prints and points ``runs/latest`` at
the run. ``clientapp-zygote`` is a process that imported Flower once and forks the node's verifying
ClientApp runner for each message (:mod:`fedrlhf_secure.transport.clientapp_zygote`).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from ..errors import InputError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("certs", help="create a deployment CA and the SuperLink's TLS certificate")
    p.add_argument("--out", type=Path, required=True, help="directory for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--host", action="append", required=True, help="a hostname or IP the SuperLink is reached at (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")

    p = sub.add_parser("node-keys", help="create SuperNode authentication key pairs (EC P-384, OpenSSH format)")
    p.add_argument("--out", type=Path, required=True, help="directory for NAME and NAME.pub")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--count", type=int, help="create node-0 .. node-(N-1)")
    g.add_argument("--names", nargs="+", help="explicit key names")

    p = sub.add_parser("client-host", help="serve this node's clients to its ClientApp over a Unix socket")
    p.add_argument("--client-ids", required=True, help="comma-separated client ids hosted by this node, e.g. 0,3,6")
    p.add_argument("--socket", type=Path, required=True, help="Unix socket path (the SuperNode's node config client-host)")
    p.add_argument(
        "--policy",
        type=Path,
        required=True,
        help="this node's policy (YAML): allowed aggregations and their minimum parameters, DP limits, "
        "the server cannot change it (fedrlhf deploy policy writes one)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="dataset directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument(
        "--keys-dir",
        type=Path,
        default=None,
        help="this node's key directory (CKKS: dealer.pub, client-<id>.key, package-client-<id>.frame)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="this node's DP ledgers, one folder per run (default: SOCKET.state beside the socket); ε is accounted here, not on the server",
    )
    p.add_argument("--task-module", action="append", default=[], help="import this module first (a task plug-in that registers its kind)")
    p.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser(
        "clientapp-zygote",
        help="a warm ClientApp process the node's flwr-clientapp launcher forks from (optional: saves Flower's imports per message)",
    )
    p.add_argument("--socket", type=Path, required=True, help="Unix socket path (the one deploy app-runner's launcher names)")
    p.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("policy", help="write a node policy that accepts no less protection than a config")
    p.add_argument("--config", type=Path, required=True, help="the fedrlhf YAML config the node's operator accepts")
    p.add_argument("--out", type=Path, required=True, help="the policy file to write (give it to client-host --policy)")

    p = sub.add_parser("app-key", help="create the operator's Ed25519 app-signing key (OpenSSH format)")
    p.add_argument("--out", type=Path, required=True, help="directory for NAME (private, stays with the operator) and NAME.pub")
    p.add_argument("--name", default="operator", help="key name, also its key id (default operator)")

    p = sub.add_parser("sign-app", help="sign the Flower app bundle: prints the run-config value app-signature")
    p.add_argument("--key", type=Path, required=True, help="the app-signing private key (fedrlhf deploy app-key)")
    p.add_argument("--key-id", required=True, help="the key id the nodes trust it under")
    p.add_argument("--app", type=Path, default=None, help="the Flower app directory (default: the one shipped with fedrlhf)")

    p = sub.add_parser(
        "app-runner", help="install a SuperNode's verifying flwr-clientapp, its trusted app signers and a faster-polling flower-supernode"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for flwr-clientapp, flower-supernode and app-signers.yaml (put it first on PATH)"
    )
    p.add_argument("--signer", action="append", required=True, metavar="ID=PUBKEY", help="a trusted app signer (repeatable)")

    p = sub.add_parser("local", help="run a config on a SuperLink + N SuperNodes on this machine (TLS, node auth)")
    p.add_argument("--config", type=Path, required=True, help="fedrlhf YAML config")
    p.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    p.add_argument("--data-dir", type=Path, default=None, help="dataset directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="where the run directory goes (default runs/)")
    p.add_argument("--workdir", type=Path, default=None, help="certificates, keys, sockets and logs (default: a temp dir)")
    p.add_argument("--stage-timeout", type=float, default=60.0, help="deadline of each aggregation stage in seconds")
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="every node's policy file (default: one written from --config: the nodes accept no less than it asks)",
    )


def _client_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"--client-ids must be comma-separated integers, got {text!r}") from exc
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise InputError(f"--client-ids must be distinct non-negative integers, got {text!r}")
    return ids


def run(args: argparse.Namespace) -> int:
    """Exit 0; a file that exists, a bad value or a failed process raises (the CLI maps it to 1 or 2)."""
    cmd = args.deploy_command
    if cmd == "certs":
        from ..transport.credentials import create_certificates

        paths = create_certificates(args.out, args.host, days=args.days)
        print(f"CA certificate (give to every SuperNode and flwr CLI user): {paths.ca_cert}")
        print(f"CA key (keep offline):                                       {paths.ca_key}")
        print(f"SuperLink certificate and key:                               {paths.server_cert}, {paths.server_key}")
        return 0
    if cmd == "node-keys":
        from ..transport.credentials import create_node_keys

        if args.count is not None and args.count < 1:
            raise InputError(f"--count must be at least 1, got {args.count}")
        names = args.names or [f"node-{i}" for i in range(args.count)]
        for p in create_node_keys(args.out, names):
            print(f"{p.private_key} (stays on the node)  {p.public_key} (register: flwr supernode register {p.public_key})")
        return 0
    if cmd == "client-host":
        import importlib

        from ..federation.policy import load_policy
        from ..transport.client_host import ParticipantHost, serve

        for module in args.task_module:
            importlib.import_module(module)
        policy = load_policy(args.policy)
        state_dir = args.state_dir or args.socket.with_name(args.socket.name + ".state")
        host = ParticipantHost(_client_ids(args.client_ids), args.data_dir, args.keys_dir, state_dir, policy=policy)
        try:
            serve(host, args.socket, ready_file=args.ready_file)
        except KeyboardInterrupt:
            pass
        return 0
    if cmd == "clientapp-zygote":
        from ..transport.clientapp_zygote import serve as serve_zygote

        try:
            serve_zygote(args.socket, ready_file=args.ready_file)
        except KeyboardInterrupt:
            pass
        return 0
    if cmd == "policy":
        from ..config import load_config
        from ..federation.policy import NodePolicy, write_policy

        policy = NodePolicy.from_config(load_config(args.config))
        print(f"node policy: {write_policy(policy, args.out)}")
        return 0
    if cmd in ("app-key", "sign-app", "app-runner"):
        return _app_signing(args)
    if cmd == "local":
        return _run_local(args)
    raise AssertionError(cmd)


def _app_signing(args: argparse.Namespace) -> int:
    from ..transport import app_signing
    from ..transport.supernode_runner import write_supernode_runner
    from ..transport.verified_clientapp import write_runner

    if args.deploy_command == "app-key":
        paths = app_signing.create_signing_key(args.out, args.name)
        print(f"{paths.private_key} (stays with the operator)  {paths.public_key} (to every SuperNode: deploy app-runner --signer)")
        return 0
    if args.deploy_command == "sign-app":
        from ..transport.local_deployment import APP_DIR

        print(app_signing.sign_fab(app_signing.build_fab(args.app or APP_DIR), args.key, args.key_id))
        return 0
    signers = {}
    for item in args.signer:
        key_id, sep, pub = item.partition("=")
        if not sep or not key_id or not pub:
            raise InputError(f"--signer expects ID=PUBKEY_FILE, got {item!r}")
        signers[key_id] = Path(pub)
    trusted = app_signing.write_trusted_entities(args.out / "app-signers.yaml", signers)
    runner = write_runner(args.out, zygote=args.out / "clientapp-zygote.sock")
    supernode = write_supernode_runner(args.out)
    print(f'{runner} (first on the SuperNode\'s PATH)  {trusted} (node config {app_signing.SIGNERS_FIELD}="{trusted.resolve()}")')
    print(f"{supernode} (optional: Flower's SuperNode polling every 0.3 s instead of 3 s; start it instead of flower-supernode)")
    print(f"optional, faster messages: fedrlhf deploy clientapp-zygote --socket {(args.out / 'clientapp-zygote.sock').resolve()}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    """Start the deployment, run the config, print the result table ``fedrlhf run`` prints.

    Start-up takes a minute or two (a SuperLink, the client hosts loading the task, the
    SuperNodes): each step is logged as it completes, then one progress display per run with a
    step per round (tqdm on a terminal, log lines elsewhere), so the command is never silent."""
    import json

    from .. import progress
    from ..config import load_config
    from ..federation.engine import build_task, resolve_data_dir
    from ..federation.policy import NodePolicy, load_policy
    from ..federation.results import render_result
    from ..rundir import point_latest
    from ..transport.local_deployment import LocalDeployment, partition

    config = load_config(args.config)
    # the operator runs their own nodes: unless told otherwise, they accept no less than this config asks
    policy = load_policy(args.policy) if args.policy else NodePolicy.from_config(config)
    data_dir = resolve_data_dir(args.data_dir)
    client_ids = list(build_task(config, data_dir).client_ids())
    groups = partition(client_ids, args.nodes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedrlhf-deploy-"))
    logger.info("deployment files and logs: %s", workdir)
    steps = [0]

    def started(text: str) -> None:
        steps[0] += 1
        logger.info("deploy local: start-up %d/%d: %s", steps[0], total_steps, text)

    dep = LocalDeployment(workdir, groups, data_dir=data_dir, policy=policy, on_step=started)
    total_steps = dep.start_steps
    with dep:
        logger.info(
            "SuperLink on 127.0.0.1:%d (TLS, SuperNode authentication); %d SuperNodes; running %d rounds of %s · %s",
            dep.port,
            len(groups),
            config.federation.rounds,
            config.task.kind,
            config.aggregation.kind,
        )
        bar = progress.bar(config.federation.rounds, f"deploy local · {config.task.kind} · {config.aggregation.kind}", "round")
        done = [0]

        def rounds(n: int) -> None:
            bar.set_postfix_str(f"round {n - 1} done")  # rounds are 0-based, as in metrics.jsonl
            bar.update(n - done[0])
            done[0] = n

        try:
            path = dep.run(args.config, args.out, stage_timeout=args.stage_timeout, on_round=rounds)
        finally:
            bar.close()
    print(render_result(json.loads((path / "summary.json").read_text()), path))
    point_latest(path)
    return 0
