"""Where the clients live during a simulation: in this process, or spread over worker processes.

A client's task state (its private data, feedback and personal parameters) stays inside the
process that owns it for the whole run. Between the engine and a worker only wire frames travel
(the same ``fed/fit`` frame a real client would get), never pickles.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from aggregation import wire

from ..privacy.dpsgd import DPSGDSettings
from ..tasks.base import FitConfig, Task, TaskClient
from .messages import FitInstruction
from .update import UpdateCodec


@dataclass
class LocalUpdate:
    """What a client's local training produced, before privacy and aggregation."""

    client_id: int
    vector: np.ndarray
    num_examples: int
    metrics: dict[str, float]
    privacy: dict[str, Any]


def _split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Numbers go in the report to the server; anything else (e.g. sample generations) stays local."""
    numeric, other = {}, {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            numeric[k] = float(v)
        else:
            other[k] = v
    return numeric, other


class LocalClients:
    """All clients in this process (the embedded default)."""

    def __init__(self, task: Task, client_ids: Sequence[int], codec: UpdateCodec) -> None:
        self.codec = codec
        self.names = task.shared_spec().names()
        self.clients: dict[int, TaskClient] = {cid: task.make_client(cid) for cid in client_ids}
        self.local_artifacts: dict[int, dict[str, Any]] = {}
        self.held: dict[str, np.ndarray] | None = None

    def hold_global(self, shared: Mapping[str, np.ndarray]) -> None:
        """The global model as these clients decrypted it (CKKS): used when an instruction is client_held."""
        self.held = {k: np.asarray(v, dtype=np.float32) for k, v in shared.items()}

    def _shared(self, fit: FitInstruction) -> Mapping[str, np.ndarray]:
        if not fit.client_held:
            return fit.shared
        if self.held is None:
            raise RuntimeError("instruction is client_held but these clients hold no global model")
        return self.held

    def num_examples(self) -> dict[int, int]:
        return {cid: c.num_examples() for cid, c in self.clients.items()}

    def fit(
        self, cids: Sequence[int], instruction: bytes, dp: Mapping[int, DPSGDSettings | None]
    ) -> dict[int, LocalUpdate]:
        fit = FitInstruction.decode(instruction, self.names)
        out = {}
        for cid in cids:
            cfg = FitConfig(round=fit.round, local_epochs=fit.local_epochs, seed=client_seed(fit.seed, fit.round, cid), dp_sgd=dp.get(cid))
            res = self.clients[cid].fit(self._shared(fit), cfg)
            out[cid] = LocalUpdate(cid, self.codec.encode(res), int(res.num_examples), dict(res.metrics), dict(res.privacy))
        return out

    def evaluate(self, shared: bytes, cids: Iterable[int]) -> dict[int, dict[str, float]]:
        fit = FitInstruction.decode(shared, self.names)
        out = {}
        for cid in cids:
            numeric, other = _split_metrics(self.clients[cid].evaluate(self._shared(fit)))
            out[cid] = numeric
            if other:
                self.local_artifacts[cid] = other
        return out

    def personal_states(self) -> dict[int, dict[str, np.ndarray]]:
        return {cid: c.personal_state() for cid, c in self.clients.items()}

    def load_personal_states(self, states: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        for cid, state in states.items():
            self.clients[cid].load_personal_state(state)

    def close(self) -> None:
        pass


def client_seed(run_seed: int, round: int, cid: int) -> int:
    """Per-(run, round, client) seed: the same config and seed give the same training anywhere."""
    return int(np.random.SeedSequence([run_seed, round, cid]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------
# Worker processes (``--workers N``)
# ---------------------------------------------------------------------------------------------

_REQ = "sim/request"
_RESP = "sim/response"


def _encode_dp(dp: DPSGDSettings | None) -> dict[str, float] | None:
    return None if dp is None else {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "sample_rate": dp.sample_rate}


def _worker_main(conn, make_task: Callable[[], Task], cids: list[int], sparse_rows: str) -> None:
    import torch

    torch.set_num_threads(1)
    task = make_task()
    codec = UpdateCodec(task.shared_spec(), sparse_rows)  # type: ignore[arg-type]
    local = LocalClients(task, cids, codec)
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
            if op == "hold":
                local.hold_global({k[len("held/"):]: v for k, v in frame.tensors.items()})
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {})))
            elif op == "sizes":
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {"sizes": {str(c): v for c, v in local.num_examples().items()}})))
            elif op == "fit":
                dp = {int(k): (DPSGDSettings(**v) if v else None) for k, v in frame.field("dp", dict).items()}
                ups = local.fit(frame.field("cids", list), frame.blob("instruction"), dp)
                header = {
                    "updates": {
                        str(c): {"num_examples": u.num_examples, "metrics": _finite(u.metrics), "privacy": u.privacy} for c, u in ups.items()
                    }
                }
                tensors = {f"vec/{c}": u.vector for c, u in ups.items()}
                conn.send_bytes(wire.encode(wire.Frame(_RESP, header, tensors)))
            elif op == "evaluate":
                res = local.evaluate(frame.blob("instruction"), frame.field("cids", list))
                artifacts = {str(c): a for c, a in local.local_artifacts.items()}
                local.local_artifacts.clear()
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {"metrics": {str(c): _finite(m) for c, m in res.items()}, "artifacts": artifacts})))
            elif op == "personal":
                states = local.personal_states()
                tensors = {f"{c}/{k}": v for c, st in states.items() for k, v in st.items()}
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {}, tensors)))
            elif op == "load_personal":
                local.load_personal_states(_group_personal(frame.tensors))
                conn.send_bytes(wire.encode(wire.Frame(_RESP, {})))
        except Exception as exc:  # report to the parent instead of hanging it
            conn.send_bytes(wire.encode(wire.Frame(_RESP, {"error": f"{type(exc).__name__}: {exc}"})))


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: non-finite metrics (e.g. an undefined correlation) travel as null."""
    return {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}


def _group_personal(tensors: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        cid, name = key.split("/", 1)
        out.setdefault(int(cid), {})[name] = arr
    return out


class WorkerClients:
    """Clients partitioned over ``n`` forked worker processes (client ``c`` lives in worker ``c % n``)."""

    def __init__(self, make_task: Callable[[], Task], client_ids: Sequence[int], n: int, sparse_rows: str) -> None:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.n = n
        self.owner = {cid: i % n for i, cid in enumerate(client_ids)}
        self.conns = []
        self.procs = []
        for w in range(n):
            parent, child = ctx.Pipe()
            mine = [c for c in client_ids if self.owner[c] == w]
            p = ctx.Process(target=_worker_main, args=(child, make_task, mine, sparse_rows), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.local_artifacts: dict[int, dict[str, Any]] = {}
        self._num_examples: dict[int, int] = {}
        for resp in self._ask({w: wire.Frame(_REQ, {"op": "sizes"}) for w in range(n)}).values():
            self._num_examples.update({int(c): int(v) for c, v in resp.header["sizes"].items()})

    def num_examples(self) -> dict[int, int]:
        return dict(self._num_examples)

    def hold_global(self, shared: Mapping[str, np.ndarray]) -> None:
        """Client-side delivery of the decrypted global model (the workers are the clients' devices)."""
        tensors = {f"held/{k}": np.asarray(v, dtype=np.float32) for k, v in shared.items()}
        self._ask({w: wire.Frame(_REQ, {"op": "hold"}, tensors) for w in range(self.n)})

    def _ask(self, per_worker: dict[int, wire.Frame]) -> dict[int, wire.Frame]:
        for w, frame in per_worker.items():
            self.conns[w].send_bytes(wire.encode(frame))
        out = {}
        for w in per_worker:
            resp = wire.decode(self.conns[w].recv_bytes(), expect=_RESP)
            if "error" in resp.header:
                raise RuntimeError(f"worker {w}: {resp.header['error']}")
            out[w] = resp
        return out

    def _by_worker(self, cids: Iterable[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for c in cids:
            groups.setdefault(self.owner[c], []).append(c)
        return groups

    def fit(self, cids, instruction: bytes, dp) -> dict[int, LocalUpdate]:
        reqs = {
            w: wire.Frame(_REQ, {"op": "fit", "cids": g, "dp": {str(c): _encode_dp(dp.get(c)) for c in g}}, {"instruction": wire.as_blob(instruction)})
            for w, g in self._by_worker(cids).items()
        }
        out = {}
        for resp in self._ask(reqs).values():
            for c, info in resp.header["updates"].items():
                metrics = {k: (float("nan") if v is None else v) for k, v in info["metrics"].items()}
                out[int(c)] = LocalUpdate(int(c), resp.tensor(f"vec/{c}", np.float32), info["num_examples"], metrics, info["privacy"])
        return {c: out[c] for c in cids}

    def evaluate(self, shared: bytes, cids) -> dict[int, dict[str, float]]:
        reqs = {w: wire.Frame(_REQ, {"op": "evaluate", "cids": g}, {"instruction": wire.as_blob(shared)}) for w, g in self._by_worker(cids).items()}
        out = {}
        for resp in self._ask(reqs).values():
            for c, m in resp.header["metrics"].items():
                out[int(c)] = {k: (float("nan") if v is None else v) for k, v in m.items()}
            for c, a in resp.header.get("artifacts", {}).items():
                self.local_artifacts[int(c)] = a
        return out

    def personal_states(self) -> dict[int, dict[str, np.ndarray]]:
        out: dict[int, dict[str, np.ndarray]] = {}
        for resp in self._ask({w: wire.Frame(_REQ, {"op": "personal"}) for w in range(self.n)}).values():
            out.update(_group_personal(resp.tensors))
        return out

    def load_personal_states(self, states) -> None:
        reqs = {}
        for w in range(self.n):
            tensors = {f"{c}/{k}": v for c, st in states.items() if self.owner[c] == w for k, v in st.items()}
            reqs[w] = wire.Frame(_REQ, {"op": "load_personal"}, tensors)
        self._ask(reqs)

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
