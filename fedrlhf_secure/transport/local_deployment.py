"""A whole Flower deployment on one machine: SuperLink, SuperNodes, client hosts, ``flwr run``.

Used by ``fedrlhf deploy local``, the loopback test and the transport benchmark. It starts the
same processes, with the same flags, as a multi-machine deployment (docs/deployment.md):
TLS with a fresh deployment CA, SuperNode authentication with registered EC keys
(``--enable-supernode-auth`` + ``flwr supernode register``), runtime dependency installation off
(nothing is downloaded), each process on a free loopback port. Each node's client host is
started with its own policy file (``workdir/policies/node-<i>.yaml``,
:mod:`fedrlhf_secure.federation.policy`), written before any node starts: the server's setup frame
cannot change it. The app bundle ``flwr run`` submits is signed with a fresh Ed25519 app-signing
key (``workdir/app-signing``), and every SuperNode runs only bundles that key signed: its
``flwr-clientapp`` is the verifying runner (:mod:`.verified_clientapp`, first on the node's
``PATH``) and its node config names the trusted signers (``app-signers``).

Every process is started in its own session (process group), so stopping it also stops the
children Flower spawns (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``); :meth:`close` runs
from ``finally`` and from ``atexit``, so no process outlives a failed test or a Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, RunFailed
from ..federation.policy import NodePolicy, write_policy
from .app_signing import SIGNATURE_FIELD, SIGNERS_FIELD, build_fab, create_signing_key, sign_fab, write_trusted_entities
from .credentials import CertificatePaths, NodeKeyPaths, create_certificates, create_node_keys
from .supernode_runner import write_supernode_runner
from .verified_clientapp import runner_path_env, write_runner

APP_DIR = Path(__file__).resolve().parent / "flower-app"
LOOPBACK = "127.0.0.1"
APP_SIGNER = "fedrlhf-operator"


class DeploymentError(RunFailed):
    """A process of the deployment failed to start or exited; the message names its log file."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"process exited with code {proc.returncode} while starting; see {log}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {LOOPBACK}:{port} after {seconds:.0f} s; see {log}")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class NodeHandle:
    index: int
    client_ids: list[int]
    socket: Path
    keys: NodeKeyPaths
    procs: list[_Proc] = field(default_factory=list)


class LocalDeployment:
    """Start with :meth:`start` (or ``with``), run configs with :meth:`run`, stop with :meth:`close`."""

    def __init__(
        self,
        workdir: Path,
        node_clients: Sequence[Sequence[int]],
        *,
        data_dir: Path | None = None,
        start_timeout: float = 120.0,
        task_modules: Sequence[str] = (),
        policy: NodePolicy | Sequence[NodePolicy] | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        if len(node_clients) < 1 or any(len(c) == 0 for c in node_clients):
            raise InputError("every SuperNode needs at least one client id")
        self.workdir = Path(workdir).resolve()
        self.node_clients = [list(map(int, c)) for c in node_clients]
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.start_timeout = start_timeout
        self.task_modules = list(task_modules)
        if policy is None:
            policy = NodePolicy()  # the hardened default: masking or CKKS, never plain
        self.policies = list(policy) if not isinstance(policy, NodePolicy) else [policy] * len(self.node_clients)
        if len(self.policies) != len(self.node_clients):
            raise InputError(f"{len(self.policies)} node policies for {len(self.node_clients)} SuperNodes")
        self.procs: list[_Proc] = []
        self.nodes: list[NodeHandle] = []
        self.port = 0
        self.certs: CertificatePaths | None = None
        self.app_key: NodeKeyPaths | None = None
        self._closed = False
        self._previous_sigterm = None
        self._on_step = on_step
        """Told each start-up step as it completes (``deploy local`` prints them: start-up takes minutes under load)."""

    START_STEPS_FIXED = 3
    """Start-up steps besides the per-node ones: credentials, SuperLink listening, nodes registered."""

    @property
    def start_steps(self) -> int:
        """How many times :meth:`start` calls ``on_step``: the fixed steps, then a client host and a SuperNode per node."""
        return self.START_STEPS_FIXED + 2 * len(self.node_clients)

    def _step(self, text: str) -> None:
        if self._on_step is not None:
            self._on_step(text)

    # ------------------------------------------------------------------ processes
    def _env(self, home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            PYTHONUNBUFFERED="1",
            # SuperExec looks for new ClientApp/ServerApp tasks every second by default; on a
            # deployment this small that poll is a visible share of every exchange
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL=env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"),
        )
        if self.data_dir:
            env["FEDRLHF_DATA_DIR"] = str(self.data_dir)
        home.mkdir(parents=True, exist_ok=True)
        return env

    def _spawn(self, name: str, cmd: list[str], home: Path, base_env: dict[str, str] | None = None) -> _Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
        env = self._env(home, base_env)
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True)
        fh.close()
        proc = _Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _stop(proc: _Proc, grace: float = 5.0) -> None:
        """Stop ``proc``, its process group, and every descendant (SuperExec detaches into its own session)."""
        family = [proc.popen.pid, *descendants(proc.popen.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in family:
                try:
                    if pid == proc.popen.pid:
                        os.killpg(pid, sig)
                    else:
                        os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if sig == signal.SIGTERM:
                try:
                    proc.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        try:
            proc.popen.wait(timeout=10.0)  # SIGKILLed: only the kernel's teardown is left
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop every process; a further SIGTERM or Ctrl-C cannot cut this short (it is re-raised after)."""
        if self._closed:
            return
        self._closed = True
        main = threading.current_thread() is threading.main_thread()
        if main:
            previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                self._stop(proc)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous_int)
                signal.signal(signal.SIGTERM, self._previous_sigterm if self._previous_sigterm is not None else previous_term)
                self._previous_sigterm = None

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ start
    @property
    def cli_home(self) -> Path:
        return self.workdir / "flwr-cli"

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this deployment's SuperLink."""
        return subprocess.run(
            ["flwr", *args], env=self._env(self.cli_home), cwd=self.workdir, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            # a plain SIGTERM would end this process without running finally/atexit: turn it into
            # SystemExit so the deployment's processes are stopped too
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = create_certificates(self.workdir / "certs", ["localhost", LOOPBACK])
        keys = create_node_keys(self.workdir / "node-keys", [f"node-{i}" for i in range(len(self.node_clients))])
        # the operator's app-signing key; every node trusts it (and only it) to sign the app bundle
        self.app_key = create_signing_key(self.workdir / "app-signing", APP_SIGNER)
        write_trusted_entities(self.app_signers, {APP_SIGNER: self.app_key.public_key})
        write_runner(self.runner_dir, zygote=self.zygote_socket)
        write_supernode_runner(self.runner_dir)
        self._step("credentials written (deployment CA, node keys, app-signing key)")
        self.port = free_port()
        link = self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                LOOPBACK,
                "--port",
                str(self.port),
            ],
            self.workdir / "flwr-superlink",
        )
        _wait_port(self.port, link.popen, link.log, self.start_timeout)
        self._step(f"SuperLink listening on {LOOPBACK}:{self.port}")
        (self.cli_home).mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "{LOOPBACK}:{self.port}"\nroot-certificates = "{self.certs.ca_cert}"\n',
            encoding="utf-8",
        )
        for i, cids in enumerate(self.node_clients):
            self._register(keys[i])
            sock = self.workdir / "sockets" / f"node-{i}.sock"
            sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.nodes.append(NodeHandle(i, cids, sock, keys[i]))
        self._step(f"{len(self.nodes)} SuperNode keys registered")
        self._start_nodes()

    def _register(self, key: NodeKeyPaths) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            res = self.flwr("supernode", "register", str(key.public_key), "local", "--format", "json")
            if res.returncode == 0 and '"success": true' in res.stdout:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"flwr supernode register failed: {res.stdout[-2000:]} {res.stderr[-2000:]}")
            time.sleep(1.0)

    def _start_client_host(self, node: NodeHandle) -> tuple[_Proc, Path]:
        i = node.index
        ready = self.workdir / "sockets" / f"node-{i}.ready"
        if ready.exists():
            ready.unlink()
        cmd = [
            sys.executable,
            "-m",
            "fedrlhf_secure.cli",
            "deploy",
            "client-host",
            "--client-ids",
            ",".join(map(str, node.client_ids)),
            "--socket",
            str(node.socket),
            "--ready-file",
            str(ready),
            "--keys-dir",
            str(self.node_keys_dir(i)),
            "--policy",
            str(write_policy(self.policies[i], self.policy_path(i))),
        ]
        if self.data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        for module in self.task_modules:
            cmd += ["--task-module", module]
        return self._spawn(f"client-host-{i}", cmd, self.workdir / f"flwr-node-{i}"), ready

    @property
    def zygote_socket(self) -> Path:
        return self.workdir / "sockets" / "clientapp-zygote.sock"

    def _start_zygote(self) -> tuple[_Proc, Path]:
        """The warm ClientApp zygote every node's ``flwr-clientapp`` launcher forks from (:mod:`.clientapp_zygote`)."""
        ready = self.workdir / "sockets" / "clientapp-zygote.ready"
        if ready.exists():
            ready.unlink()
        cmd = [sys.executable, "-m", "fedrlhf_secure.cli", "deploy", "clientapp-zygote", "--socket", str(self.zygote_socket)]
        return self._spawn("clientapp-zygote", [*cmd, "--ready-file", str(ready)], self.workdir / "flwr-zygote"), ready

    def _start_nodes(self) -> None:
        """Client hosts first (all at once: each loads the task), then one SuperNode per host."""
        hosts = [self._start_client_host(node) for node in self.nodes]
        zygote, zygote_ready = self._start_zygote()
        deadline = time.monotonic() + self.start_timeout
        for (host, ready), node in zip(hosts, self.nodes, strict=True):
            while not ready.exists():
                if host.popen.poll() is not None:
                    raise DeploymentError(f"client host {node.index} exited with code {host.popen.returncode}; see {host.log}")
                if time.monotonic() > deadline:
                    raise DeploymentError(f"client host {node.index} not ready after {self.start_timeout:.0f} s; see {host.log}")
                time.sleep(0.1)
            self._step(f"client host {node.index} ready (clients {_ids_text(node.client_ids)})")
        while not zygote_ready.exists():
            if zygote.popen.poll() is not None:
                raise DeploymentError(f"the ClientApp zygote exited with code {zygote.popen.returncode}; see {zygote.log}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"the ClientApp zygote is not ready after {self.start_timeout:.0f} s; see {zygote.log}")
            time.sleep(0.1)
        assert self.certs is not None
        for (host, _), node in zip(hosts, self.nodes, strict=True):
            supernode = self._spawn(
                f"supernode-{node.index}",
                [
                    # Flower's SuperNode with its 3 s idle poll cut to 0.3 s (supernode_runner)
                    str(self.runner_dir / "flower-supernode"),
                    "--superlink",
                    f"{LOOPBACK}:{self.port}",
                    "--root-certificates",
                    str(self.certs.ca_cert),
                    "--auth-supernode-private-key",
                    str(node.keys.private_key),
                    "--node-config",
                    f'client-host="{node.socket}" {SIGNERS_FIELD}="{self.app_signers}"',
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(free_port()),
                ],
                self.workdir / f"flwr-node-{node.index}",
                # Flower's SuperExec starts `flwr-clientapp` by name: the verifying runner comes first
                runner_path_env(self.runner_dir),
            )
            node.procs = [host, supernode]
            self._step(f"SuperNode {node.index} started")

    @property
    def app_signers(self) -> Path:
        return self.workdir / "app-signers.yaml"

    @property
    def runner_dir(self) -> Path:
        return self.workdir / "bin"

    def app_signature(self) -> str:
        """The operator's signature over the bundle ``flwr run`` builds from the app directory."""
        assert self.app_key is not None, "start() first"
        return sign_fab(build_fab(APP_DIR), self.app_key.private_key, APP_SIGNER)

    def policy_path(self, index: int) -> Path:
        return self.workdir / "policies" / f"node-{index}.yaml"

    def node_keys_dir(self, index: int) -> Path:
        return self.workdir / "aggregation-keys" / f"node-{index}"

    def prepare_keys(self, config: Path) -> Path | None:
        """For a CKKS config run the dealer ceremony, for SecAgg the identity registry; return the server's key directory."""
        from ..config import load_config
        from ..federation.aggregators import deal_keys

        if load_config(config).aggregation.kind not in ("ckks", "secagg"):
            return None
        base = self.workdir / "aggregation-keys"
        if base.exists():
            shutil.rmtree(base)  # a fresh key per run, as the dealer makes one per run
        dealer = base / "dealer"
        deal_keys(Path(config), self.node_clients, base / "server", [self.node_keys_dir(i) for i in range(len(self.nodes))], dealer)
        return base / "server"

    def stop_node(self, index: int) -> None:
        """Stop SuperNode ``index`` and its client host (as a crash would: no goodbye message)."""
        for proc in self.nodes[index].procs:
            self._stop(proc, grace=0.1)

    # ------------------------------------------------------------------ run
    def submit(
        self, config: Path, out: Path, *, stage_timeout: float = 60.0, fit_timeout: float = 600.0, extra: dict | None = None
    ) -> subprocess.Popen:
        """``flwr run`` the app against this deployment (streams the ServerApp's log); returns the process."""
        keys_dir = self.prepare_keys(Path(config))
        settings = {
            "config": str(Path(config).resolve()),
            "keys-dir": str(keys_dir or ""),
            "task-modules": ",".join(self.task_modules),
            "data-dir": str(self.data_dir or ""),
            "out": str(Path(out).resolve()),
            "min-nodes": len(self.nodes),
            "node-wait": self.start_timeout,
            "stage-timeout": float(stage_timeout),
            "fit-timeout": float(fit_timeout),
            SIGNATURE_FIELD: self.app_signature(),
            **(extra or {}),
        }
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in settings.items())
        log = self.workdir / "logs" / f"flwr-run-{len(self.procs)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
        popen = subprocess.Popen(
            ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", overrides],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self._env(self.cli_home),
            cwd=self.workdir,
            start_new_session=True,
        )
        fh.close()
        self.procs.append(_Proc("flwr-run", popen, log))
        return popen

    def run(self, config: Path, out: Path, *, timeout: float = 1800.0, on_round: Callable[[int], None] | None = None, **kwargs) -> Path:
        """Run ``config`` to completion and return its run directory.

        ``on_round(n)`` is called whenever the run directory being written (``OUT/NAME.partial``,
        on this machine's disk) shows ``n`` completed rounds in its ``metrics.jsonl``."""
        out = Path(out)
        before = set(out.iterdir()) if out.exists() else set()
        proc = self.submit(config, out, **kwargs)
        deadline = time.monotonic() + timeout
        seen = 0
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise DeploymentError(f"flwr run did not finish in {timeout:.0f} s; see {self.workdir / 'logs'}")
            if on_round is not None:
                done = rounds_written(out, before)
                if done > seen:
                    seen = done
                    on_round(done)
            time.sleep(0.5)
        path = finished_run(out, before, self.workdir / "logs")
        if on_round is not None:
            done = _lines(path / "metrics.jsonl")
            if done > seen:
                on_round(done)
        return path


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where /proc is unavailable)."""
    parent: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parent[int(stat_file.parent.name)] = int(fields[1])
    found: list[int] = []
    frontier = {pid}
    while frontier:
        kids = {c for c, p in parent.items() if p in frontier and c not in found}
        found.extend(sorted(kids))
        frontier = kids
    return found


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def rounds_written(out: Path, before: set[Path]) -> int:
    """Completed rounds of the run being written into ``out`` (a directory that was not in ``before``)."""
    if not out.exists():
        return 0
    return max((_lines(p / "metrics.jsonl") for p in set(out.iterdir()) - before if p.is_dir()), default=0)


def _ids_text(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids)) if len(ids) <= 8 else f"{len(ids)} clients, {ids[0]}..{ids[-1]}"


def finished_run(out: Path, before: set[Path], logs: Path) -> Path:
    new = [p for p in (set(out.iterdir()) if out.exists() else set()) - before if p.is_dir() and (p / "summary.json").exists()]
    if len(new) != 1:
        raise DeploymentError(f"expected one completed run directory in {out}, found {sorted(map(str, new))}; see the logs in {logs}")
    return new[0]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def partition(client_ids: Sequence[int], nodes: int) -> list[list[int]]:
    """Round-robin ``client_ids`` over ``nodes`` SuperNodes (node ``i`` gets ids ``i, i+n, ...``)."""
    if nodes < 1:
        raise InputError(f"need at least one SuperNode, got {nodes}")
    if len(client_ids) < nodes:
        raise InputError(f"{len(client_ids)} clients cannot fill {nodes} SuperNodes")
    ids = sorted(client_ids)
    return [ids[i::nodes] for i in range(nodes)]
