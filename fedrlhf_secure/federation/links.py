"""Where the participant hosts of the embedded simulation live, and the wire to them.

The round core talks to participant hosts through a :class:`~.node_driver.NodeLink`: one request
frame to each of some hosts, the response frames that came back. In a deployment that link is
Flower's Grid (:mod:`fedrlhf_secure.transport.server_app`); here it is

* :class:`InProcessLink`: hosts in this process, called directly (the embedded default, tests);
* :class:`WorkerLink`: hosts in forked worker processes (``federation.workers > 1``), reached over
  pipes with the same frames; the workers answer in parallel;
* :class:`SimulatedDropouts`: wraps either and loses messages the way a client that goes offline
  would (``federation.dropout_rate``), so SecAgg's dropout recovery runs on every simulated round.

Only wire frames cross a link, never pickles, so the simulation exercises the bytes a deployment sends.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from aggregation import wire

from ..errors import InputError, PrivacyError, RunFailed, exit_status
from .node_protocol import REQUEST, NodeMessage


class Host(Protocol):
    def handle(self, data: bytes) -> bytes: ...

    def client_state(self) -> dict[str, np.ndarray]: ...

    def restore_client_state(self, tensors: Mapping[str, np.ndarray]) -> None: ...


class InProcessLink:
    """Calls participant hosts directly; ``down`` lists hosts that never answer (tests)."""

    def __init__(self, hosts: Mapping[int, Host], down: Sequence[int] = ()) -> None:
        self.hosts = dict(hosts)
        self.down = set(down)

    def exchange(self, requests: Mapping[int, bytes], timeout: float) -> dict[int, bytes]:
        return {n: self.hosts[n].handle(data) for n, data in requests.items() if n not in self.down}

    def client_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for host in self.hosts.values():
            out.update(host.client_state())
        return out

    def restore_client_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        for host in self.hosts.values():
            host.restore_client_state(tensors)

    def close(self) -> None:
        pass


class SimulatedDropouts:
    """Each round, each participant goes offline with probability ``rate`` after it has received a
    uniformly drawn number (0-3) of the aggregator's messages: from then on its messages are lost
    and it answers nothing more. Its fit still ran and its ledger commit still stands (the update
    did leave it for the aggregator's client half), exactly as a real dropout. The draws come from
    a generator seeded with (run seed, round): dropouts are part of the simulated scenario, not
    secrets, and a resumed run repeats them.
    """

    def __init__(self, inner, rate: float, seed: int) -> None:
        self.inner = inner
        self.rate = float(rate)
        self.seed = int(seed)
        self.drop_after: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.round: int | None = None

    def _limit(self, msg: NodeMessage) -> NodeMessage | None:
        """The request as the network delivers it, or None when it loses nothing (sent unchanged).

        A client past its limit gets none of its messages, so it sends nothing more either: a
        participant host only ever answers messages it was given."""
        if msg.op == "fit" and msg.header.get("round") != self.round:
            self.round = msg.header.get("round")
            self.drop_after, self.received = {}, {}
            # one generator per round, keyed by (run seed, round): a resumed run draws the same dropouts
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xD0D0, int(self.round)]))
            for c in msg.header.get("participants", []):
                if rng.random() < self.rate:
                    self.drop_after[int(c)] = int(rng.integers(0, 4))
        if msg.op not in ("fit", "agg", "finish"):
            return None
        kept: dict[int, list[bytes]] = {}
        lost = False
        for c, msgs in msg.messages.items():
            if c in self.drop_after:
                room = max(0, self.drop_after[c] - self.received.get(c, 0))
                lost |= room < len(msgs)
                msgs = msgs[:room]
            self.received[c] = self.received.get(c, 0) + len(msgs)
            kept[c] = msgs
        return NodeMessage(msg.op, msg.header, kept, msg.blobs, msg.arrays) if lost else None

    def exchange(self, requests: Mapping[int, bytes], timeout: float) -> dict[int, bytes]:
        delivered = {}
        for n, data in requests.items():
            limited = self._limit(NodeMessage.decode(data, REQUEST))
            delivered[n] = data if limited is None else limited.encode(REQUEST)
        return self.inner.exchange(delivered, timeout)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# Worker processes (``federation.workers > 1``)
# ---------------------------------------------------------------------------------------------

_REQ = "sim/request"
_RESP = "sim/response"


def _worker_main(conn, make_host: Callable[[], Host]) -> None:
    import torch

    torch.set_num_threads(1)
    host = make_host()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        frame = wire.decode(data, expect=_REQ)
        op = frame.field("op", str)
        try:
            if op == "stop":
                return
            if op == "node":
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {}, {"response": wire.as_blob(host.handle(frame.blob("request")))})))
            elif op == "state":
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {}, host.client_state())))
            elif op == "restore":
                host.restore_client_state(frame.tensors)
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {})))
        except Exception as exc:  # report to the parent instead of hanging it, keeping the error's family
            status = exit_status(exc) or 1
            family = "input" if status == 2 else "privacy" if isinstance(exc, PrivacyError) else "run"
            conn.send_bytes(wire.encode(wire.Frame(_RESP, {"error": f"{type(exc).__name__}: {exc}", "family": family})))


class WorkerLink:
    """Participant hosts in forked worker processes; host ``i`` runs ``make_host(i)`` in worker ``i``."""

    def __init__(self, make_host: Callable[[int], Host], n: int) -> None:
        ctx = mp.get_context("fork")
        self.n = n
        self.conns = []
        self.procs = []
        for w in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, lambda w=w: make_host(w)), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def _ask(self, per_worker: Mapping[int, wire.Frame]) -> dict[int, wire.Frame]:
        for w, frame in per_worker.items():
            self.conns[w].send_bytes(wire.encode(frame))
        out = {}
        for w in per_worker:
            try:
                resp = wire.decode(self.conns[w].recv_bytes(), expect=_RESP)
            except EOFError as exc:
                raise RunFailed(f"worker process {w} ended unexpectedly") from exc
            if "error" in resp.header:
                family = {"input": InputError, "privacy": PrivacyError}.get(resp.header.get("family"), RunFailed)
                raise family(f"worker {w}: {resp.header['error']}")
            out[w] = resp
        return out

    def exchange(self, requests: Mapping[int, bytes], timeout: float) -> dict[int, bytes]:
        reqs = {w: wire.Frame(_REQ, {"op": "node"}, {"request": wire.as_blob(data)}) for w, data in requests.items()}
        return {w: resp.blob("response") for w, resp in self._ask(reqs).items()}

    def client_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for resp in self._ask({w: wire.Frame(_REQ, {"op": "state"}) for w in range(self.n)}).values():
            out.update(resp.tensors)
        return out

    def restore_client_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._ask({w: wire.Frame(_REQ, {"op": "restore"}, dict(tensors)) for w in range(self.n)})

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(wire.encode(wire.Frame(_REQ, {"op": "stop"})))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
