"""The node's ``flwr-clientapp``: Flower's own ClientApp runner, which first verifies the app bundle.

A SuperNode (through its SuperExec) starts ``flwr-clientapp`` by name for every message. A node
whose ``PATH`` finds this runner first (``fedrlhf deploy app-runner --out DIR`` writes
``DIR/flwr-clientapp``; ``fedrlhf deploy local`` does it for every node) runs Flower's
``run_clientapp`` unchanged, except that the FAB it pulls from the SuperNode is checked against
the node's trusted app signers (:mod:`.app_signing`) before Flower installs or imports anything
from it. A bundle without a valid signature is never executed: the runner raises
:class:`~.app_signing.AppRefused`, which Flower turns into an error reply to the server.

Fail closed: without the node config ``app-signers`` (the trusted-entities file), nothing runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
from pathlib import Path

from .app_signing import SIGNATURE_FIELD, SIGNERS_FIELD, AppRefused, load_trusted_entities, verify_fab

logger = logging.getLogger(__name__)


def check_app(fab_content: bytes, fab_hash: str, run_config, node_config) -> str:
    """Verify the pulled FAB for this node; return the signer's key id or raise :class:`AppRefused`."""
    if hashlib.sha256(fab_content).hexdigest() != fab_hash:
        raise AppRefused("the app bundle's content does not match its announced hash")
    signers = node_config.get(SIGNERS_FIELD) if hasattr(node_config, "get") else None
    if not isinstance(signers, str) or not signers:
        raise AppRefused(f"this SuperNode has no node config {SIGNERS_FIELD!r} (its trusted app signers); refusing every app")
    try:
        trusted = load_trusted_entities(Path(signers))
    except Exception as exc:  # a broken signer file refuses every app rather than running one unchecked
        raise AppRefused(f"this node's trusted app signers cannot be read: {exc}") from exc
    signature = run_config.get(SIGNATURE_FIELD) if hasattr(run_config, "get") else None
    return verify_fab(fab_content, signature, trusted)


def main() -> None:
    """``flwr-clientapp`` with the FAB check in front of installation.

    The check runs on what ``pull_task_input`` returns (the FAB, the run config, the node config),
    and a refusal is raised where Flower would install the bundle: by then Flower holds the message
    it answers, so the server gets an error reply at once instead of waiting out its deadline."""
    from flwr.supernode.runtime import run_clientapp as runtime

    pull, install = runtime.pull_task_input, runtime.install_from_fab
    verified: dict[str, str | AppRefused] = {}

    def pull_verified(client):
        message, context, run, fab = pull(client)
        try:
            verified[fab.hash_str] = check_app(fab.content, fab.hash_str, context.run_config, context.node_config)
        except AppRefused as exc:
            verified[fab.hash_str] = exc
        return message, context, run, fab

    def install_verified(content: bytes, *args, **kwargs):
        outcome = verified.get(hashlib.sha256(content).hexdigest(), AppRefused("the app bundle to install was never verified"))
        if isinstance(outcome, AppRefused):
            logger.error("refusing the app bundle: %s", outcome)
            raise outcome
        logger.info("app bundle verified: signed by %s", outcome)
        return install(content, *args, **kwargs)

    runtime.pull_task_input = pull_verified
    runtime.install_from_fab = install_verified
    flower_clientapp()


def flower_clientapp() -> None:
    """Flower 1.42's ``flwr-clientapp`` entry point (``flwr.supernode.cli.flwr_clientapp``), line for line.

    Why not import it: it lives in the package ``flwr.supernode.cli``, whose ``__init__`` also
    imports the whole SuperNode (``flower_supernode``: its object store, SQL state, HTTP fleet
    connection). A ClientApp process is started for every message and needs none of it; importing
    only ``flwr.supernode.runtime.run_clientapp`` and the argument helpers measured 0.9-1.0 CPU s
    instead of 1.5-1.6 per process here (``python -X importtime``, issue 16)."""
    import argparse

    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    parser = argparse.ArgumentParser(description="Run a Flower ClientApp (fedrlhf: app bundle signature verified first)")
    parser.add_argument("--runtime-api-address", dest="runtime_api_address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS, type=str)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    token = try_obtain_flwr_app_token(args)
    run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=args.runtime_dependency_install,
    )


def write_runner(bin_dir: Path, *, zygote: Path | None = None) -> Path:
    """``BIN_DIR/flwr-clientapp``: this runner under Flower's command name, for the SuperNode's ``PATH``.

    With ``zygote`` (a socket of :mod:`.clientapp_zygote`), the command is a small launcher that has
    the warm zygote fork the same runner, and runs it itself when no zygote answers."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    if zygote is not None:
        text = LAUNCHER.format(python=sys.executable, socket=str(Path(zygote).resolve()))
    else:
        text = (
            f"#!{sys.executable}\n"
            "# fedrlhf: Flower's ClientApp runner, verifying the app bundle's signature first\n"
            "from fedrlhf_secure.transport.verified_clientapp import main\n\n"
            "main()\n"
        )
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def runner_path_env(bin_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` with ``bin_dir`` first on ``PATH``, so Flower's SuperExec starts this runner."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(bin_dir).resolve()), env.get("PATH", "")])
    return env


LAUNCHER = """#!{python}
# fedrlhf: Flower's ClientApp runner (app bundle signature verified first), forked from this node's
# warm ClientApp zygote at {socket} when it runs, else started here
import json, os, signal, socket, struct, sys

def _direct():
    from fedrlhf_secure.transport.verified_clientapp import main
    main()
    sys.exit(0)

try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({socket!r})
except OSError:
    _direct()
body = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
socket.send_fds(s, [b"F"], [0, 1, 2])
s.sendall(struct.pack(">Q", len(body)) + body)

def _read4():
    buf = b""
    while len(buf) < 4:
        chunk = s.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    return struct.unpack(">i", buf)[0]

child = _read4()
if child is None:
    sys.exit(1)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda n, f: os.kill(child, n))
code = _read4()
sys.exit(1 if code is None else code)
"""
