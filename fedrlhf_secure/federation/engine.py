"""The federation round loop (FedRLHF, arXiv 2412.15538, Algorithm 1, with secure aggregation and DP).

One round:

1. **select** clients (``fraction`` of them, at least ``min_clients``) with the server's seeded RNG;
   the privacy plan **admits** only those whose budget allows another release;
2. **broadcast** the global shared parameters (a ``fed/fit`` frame; personal parameters never
   leave a client, so they are in no message);
3. each client runs **local RLHF** on its own data and feedback (the task's ``fit``) and encodes
   its delta as a flat float32 vector (:mod:`.update`);
4. the privacy plan **privatizes** the vector (client-level clipping + the client's noise share)
   and **commits** the release to the ledger *before* the update leaves the client;
5. the **aggregator** (plain / secagg / ckks) computes the weighted sum through its sans-IO
   protocol; simulated dropouts may hit any stage;
6. the average delta (sparse rows normalised by their touch weight) is applied with ``server_lr``;
7. every client **evaluates** the new global parameters with its personal ones on its held-out
   data and reports numbers (``fed/report``); the engine pools them into ``metrics.jsonl``.

After each round the state needed to resume (global parameters, the clients' own personal
checkpoints, RNG state) is written atomically under ``checkpoint/``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from aggregation.base import AggregateResult, Aggregator, AggregationAborted, RoundContext, spec_for
from aggregation.driver import TranscriptHook, run_round

from ..config import RunConfig, build_config
from ..privacy.plan import NoPrivacy, PrivacyPlan
from ..rundir import RunDirectory, atomic_save_tensors, atomic_write_json, load_tensors
from ..tasks.base import Task, task_spec
from .clients import LocalClients, WorkerClients
from .messages import FitInstruction, Report
from .update import UpdateCodec


class InjectedCrash(RuntimeError):
    """Raised by the test-only crash switch (``crash_after_commits``)."""


@dataclass
class RunOptions:
    """How to run (not what to run: that is the config)."""

    data_dir: Path | None = None
    out: Path | None = None
    progress: bool = True
    hook: TranscriptHook | None = None
    """Sees every byte between clients and server (tests use it to inspect messages)."""
    crash_after_commits: int | None = None
    """Test-only: raise :class:`InjectedCrash` after this many ledger commits (crash/resume tests)."""
    keep_checkpoint: bool = False
    name: str | None = None
    task: Task | None = None
    """A prepared task to run instead of building one from the config (audits train shadow and
    canary runs on chosen subsets of the records with the config's federation code)."""


def resolve_data_dir(data_dir: Path | str | None) -> Path | None:
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("FEDRLHF_DATA_DIR")
    return Path(env) if env else None


def build_task(config: RunConfig, data_dir: Path | None) -> Task:
    spec = task_spec(config.task.kind)
    return spec.factory(config.task.params, data_dir, config.seed)


def build_aggregator(config: RunConfig, client_ids: list[int]) -> Aggregator:
    spec = spec_for(config.aggregation.kind)
    return spec.factory(config.aggregation.params, client_ids, config.seed)


def build_privacy(config: RunConfig, client_sizes: Mapping[int, int], run: RunDirectory, resume: bool) -> PrivacyPlan:
    if config.privacy.mode == "none":
        return NoPrivacy()
    from ..privacy.factory import build_plan

    return build_plan(config, dict(client_sizes), run.path / "ledger", resume)


class _TaskFactory:
    """Picklable task builder for worker processes (fork start method shares it anyway)."""

    def __init__(self, config: RunConfig, data_dir: Path | None) -> None:
        self.config, self.data_dir = config, data_dir

    def __call__(self) -> Task:
        return build_task(self.config, self.data_dir)


@dataclass
class RoundLog:
    row: dict[str, Any]
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)


class Federation:
    """Runs the rounds of one config into one run directory."""

    def __init__(self, config: RunConfig, run: RunDirectory, options: RunOptions, *, resume: bool = False) -> None:
        self.config = config
        self.run = run
        self.options = options
        self.fed = config.federation
        self.task = options.task if options.task is not None else build_task(config, options.data_dir)
        self.spec = self.task.shared_spec()
        self.codec = UpdateCodec(self.spec, self.fed.sparse_rows)
        self.client_ids = list(self.task.client_ids())
        if len(self.client_ids) < self.fed.min_clients:
            raise ValueError(
                f"federation.min_clients={self.fed.min_clients} but the task has only {len(self.client_ids)} clients"
            )
        if self.fed.workers > 1:
            factory = _TaskFactory(config, options.data_dir) if options.task is None else (lambda: self.task)
            self.clients = WorkerClients(factory, self.client_ids, self.fed.workers, self.fed.sparse_rows)
        else:
            self.clients = LocalClients(self.task, self.client_ids, self.codec)
        self.sizes = self.clients.num_examples()
        self.aggregator = build_aggregator(config, self.client_ids)
        self.privacy = build_privacy(config, self.sizes, run, resume)
        self._init_run_state()
        if resume:
            self._load_checkpoint()

    def _init_run_state(self) -> None:
        """Server-side state of a fresh run: selection RNG, session id, initial model, history."""
        self.rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0xFED]))
        self.session_id = os.urandom(16)
        self.global_params = {k: np.asarray(v, dtype=np.float32).copy() for k, v in self.task.initial_shared().items()}
        self.start_round = 0
        self.commits = 0
        self.history: list[dict[str, Any]] = []
        self.final_clients: dict[int, dict[str, float]] = {}
        self.stopped: str | None = None

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, completed_round: int) -> None:
        ck = self.run.path / "checkpoint"
        ck.mkdir(exist_ok=True)
        atomic_save_tensors(ck / "global.safetensors", self.global_params)
        personal = {f"{c}/{k}": v for c, st in self.clients.personal_states().items() for k, v in st.items()}
        atomic_save_tensors(ck / "personal.safetensors", personal or {"_empty": np.zeros(1, np.float32)})
        atomic_write_json(
            ck / "state.json",
            {"completed_round": completed_round, "rng": self.rng.bit_generator.state, "session_id": self.session_id.hex()},
        )

    def _load_checkpoint(self) -> None:
        ck = self.run.path / "checkpoint"
        state_path = ck / "state.json"
        if not state_path.exists():
            self.history = []
            return  # crashed during round 0: start over (the ledger keeps what was spent)
        import json

        state = json.loads(state_path.read_text())
        self.global_params = load_tensors(ck / "global.safetensors")
        personal: dict[int, dict[str, np.ndarray]] = {}
        for key, arr in load_tensors(ck / "personal.safetensors").items():
            if key == "_empty":
                continue
            cid, name = key.split("/", 1)
            personal.setdefault(int(cid), {})[name] = arr
        if personal:
            self.clients.load_personal_states(personal)
        self.rng.bit_generator.state = state["rng"]
        self.session_id = bytes.fromhex(state["session_id"])
        self.start_round = int(state["completed_round"]) + 1
        self.history = [r for r in self.run.read_jsonl("metrics.jsonl") if r["round"] < self.start_round]
        self.run.rewrite_jsonl("metrics.jsonl", self.history)

    # ------------------------------------------------------------------ one round
    def _select(self) -> list[int]:
        n = len(self.client_ids)
        k = min(n, max(self.fed.min_clients, math.ceil(self.fed.fraction * n)))
        if k == n:
            return list(self.client_ids)
        picked = self.rng.choice(n, size=k, replace=False)
        return sorted(self.client_ids[i] for i in picked)

    def _client_held(self) -> bool:
        """Under CKKS the server cannot read the aggregate, so it never broadcasts the global model:
        the clients hold it (the initial model is public; later ones each client decrypted). In this
        simulation the engine plays the clients' side when it hands them the decrypted model."""
        return not self.aggregator.server_can_read_result

    def _check_quorum(self, r: int, admitted: list[int]) -> None:
        if len(admitted) < self.fed.min_clients:
            raise _Stop(
                f"round {r}: only {len(admitted)} client(s) can take part (federation.min_clients={self.fed.min_clients}); stopping"
            )

    def _broadcast(self, r: int, admitted: list[int], client_held: bool) -> bytes:
        """The round's ``fed/fit`` frame, as every admitted client receives it (and the hook sees it)."""
        instruction = FitInstruction(r, self.fed.local_epochs, self.config.seed, self.global_params, client_held).encode()
        if self.options.hook:
            for c in admitted:
                self.options.hook(-1, c, instruction)
        return instruction

    def _weight(self, cid: int, num_examples: int) -> float:
        return float(num_examples) if self.fed.weighting == "examples" else 1.0

    def run_round(self, r: int, progress: Callable[[str], None]) -> RoundLog:
        t_round = time.perf_counter()
        selected = self._select()
        admitted = [c for c in selected if self.privacy.admit(c, r)]
        refused = sorted(set(selected) - set(admitted))
        if refused:
            print(f"round {r}: {len(refused)} client(s) refused: their next release would exceed the privacy budget", file=sys.stderr)
        self._check_quorum(r, admitted)
        client_held = self._client_held()
        if client_held:
            self.clients.hold_global(self.global_params)
        instruction = self._broadcast(r, admitted, client_held)
        hook = self.options.hook

        progress(f"round {r}: local RLHF on {len(admitted)} clients")
        t0 = time.perf_counter()
        dp = {c: self.privacy.fit_settings(c, r, self.sizes[c]) for c in admitted}
        updates = self.clients.fit(admitted, instruction, dp)
        t_fit = time.perf_counter() - t0

        inputs: dict[int, tuple[np.ndarray, float]] = {}
        extras: dict[int, dict[str, Any]] = {}
        for c in admitted:
            up = updates[c]
            priv = self.privacy.privatize(c, r, up.vector, self._weight(c, up.num_examples))
            self.privacy.commit(c, r, up.privacy)
            self.commits += 1
            if self.options.crash_after_commits is not None and self.commits >= self.options.crash_after_commits:
                raise InjectedCrash(f"injected crash after {self.commits} ledger commits (round {r})")
            inputs[c] = (priv.vector, priv.weight)
            extras[c] = priv.aggregator_kwargs

        drop_after = {}
        if self.fed.dropout_rate > 0:
            for c in admitted:
                if self.rng.random() < self.fed.dropout_rate:
                    drop_after[c] = int(self.rng.integers(0, 4))

        progress(f"round {r}: {self.config.aggregation.kind} aggregation")
        t0 = time.perf_counter()
        ctx = RoundContext(self.session_id, r, tuple(admitted), self.codec.dim)
        aggregator = _WithExtras(self.aggregator, extras) if any(extras.values()) else self.aggregator
        aborted: str | None = None
        contributors: tuple[int, ...] = ()
        stats = None
        try:
            outcome = run_round(aggregator, ctx, inputs, drop_after=drop_after, hook=hook)
            stats = outcome.stats
            result: AggregateResult = outcome.readable_result()
            result = self.privacy.finalize_aggregate(r, result)
        except AggregationAborted as exc:
            # Too few survivors (below the masking threshold, or below the noise the DP shares were
            # sized for): the round releases nothing and the model stays as it was. The ledger
            # keeps what the clients already spent: their updates did leave them.
            aborted = str(exc)
            print(f"round {r}: aggregation aborted, the global model is unchanged: {aborted}", file=sys.stderr)
        else:
            contributors = result.contributors
            avg = self.codec.decode(result)
            for k, d in avg.items():
                self.global_params[k] = (self.global_params[k] + self.fed.server_lr * d).astype(np.float32)
        t_agg = time.perf_counter() - t0

        progress(f"round {r}: evaluation")
        t0 = time.perf_counter()
        if client_held:
            self.clients.hold_global(self.global_params)
        shared_msg = FitInstruction(r, 0, self.config.seed, self.global_params, client_held).encode()
        per_client = self.clients.evaluate(shared_msg, self.client_ids)
        for c, extra in sorted(self.clients.local_artifacts.items()):
            # Client-side artefacts (e.g. sample generations) never travel in a frame; the
            # simulation plays the clients' side when it files them in the run directory.
            self.run.append_jsonl("samples.jsonl", {"round": r, "client": c, **extra})
        self.clients.local_artifacts.clear()
        report_bytes = {c: len(Report(c, r, m).encode()) for c, m in per_client.items()}
        if hook:
            for c, m in per_client.items():
                hook(c, -1, Report(c, r, m).encode())
        t_eval = time.perf_counter() - t0

        n_sel = len(admitted)
        bytes_down = [len(instruction) + (stats.bytes_down[c] if stats else 0) for c in admitted]
        bytes_up = [(stats.bytes_up[c] if stats else 0) + report_bytes.get(c, 0) for c in admitted]
        row: dict[str, Any] = {
            "round": r,
            **pool_metrics(per_client),
            "clients_selected": len(selected),
            "clients_refused": len(refused),
            "clients_aggregated": len(contributors),
            "clients_dropped": n_sel - len(contributors),
            "aggregation_aborted": aborted,
            "train_loss_mean": _nanmean([updates[c].metrics.get("loss", float("nan")) for c in admitted]),
            "bytes_up_per_client": float(np.mean(bytes_up)),
            "bytes_down_per_client": float(np.mean(bytes_down)),
            "seconds_fit": t_fit,
            "seconds_aggregation": t_agg,
            "seconds_aggregation_server": stats.server_seconds if stats else None,
            "seconds_eval": t_eval,
        }
        row.update(_privacy_row(self.privacy.summary()))
        row["seconds"] = time.perf_counter() - t_round
        return RoundLog(row, per_client)

    # ------------------------------------------------------------------ the run
    def run_all(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.fed.rounds,
            initial=self.start_round,
            desc=f"{self.config.task.kind} · {self.config.aggregation.kind}",
            unit="round",
            disable=not self.options.progress,
            file=sys.stderr,
        )
        t_start = time.perf_counter()
        try:
            for r in range(self.start_round, self.fed.rounds):
                try:
                    log = self.run_round(r, bar.set_postfix_str)
                except _Stop as stop:
                    self.stopped = str(stop)
                    print(self.stopped, file=sys.stderr)
                    break
                self.history.append(log.row)
                self.final_clients = log.per_client
                self.run.append_jsonl("metrics.jsonl", log.row)
                self._save_checkpoint(r)
                bar.update(1)
                acc = log.row.get("heldout_accuracy")
                bar.set_postfix_str(f"held-out acc {acc:.4f}" if isinstance(acc, float) else "")
        finally:
            bar.close()
            self.clients.close()
        return {"seconds_total": time.perf_counter() - t_start}


class _Stop(Exception):
    pass


class _WithExtras(Aggregator):
    """Passes per-client keyword arguments from the privacy plan (e.g. integer noise) to ``client``."""

    def __init__(self, inner: Aggregator, extras: Mapping[int, Mapping[str, Any]]) -> None:
        self.inner, self.extras = inner, extras
        self.kind = inner.kind  # type: ignore[misc]
        self.server_can_read_result = inner.server_can_read_result  # type: ignore[misc]

    def server(self, ctx: RoundContext):
        return self.inner.server(ctx)

    def client(self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float):
        return self.inner.client(ctx, client_id, vector, weight, **self.extras.get(client_id, {}))


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def pool_metrics(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Pool clients' reports: counts are summed into rates, other numbers are averaged.

    ``correct``/``n`` give the held-out accuracy (the primary metric), ``train_correct``/``train_n``
    the training accuracy (the FedRLHF paper's metric, kept for comparison), per-client
    ``accuracy`` gives the spread, and every other metric ``m`` becomes ``m_mean``.
    """
    out: dict[str, float] = {}
    rows = list(per_client.values())
    if not rows:
        return out

    def total(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in rows if np.isfinite(r.get(key, 0.0))))

    if any("n" in r for r in rows) and total("n") > 0:
        out["heldout_accuracy"] = total("correct") / total("n")
    if any("train_n" in r for r in rows) and total("train_n") > 0:
        out["train_accuracy"] = total("train_correct") / total("train_n")
    accs = np.asarray([r["accuracy"] for r in rows if "accuracy" in r and np.isfinite(r["accuracy"])])
    if accs.size:
        out["client_accuracy_std"] = float(accs.std())
        out["client_accuracy_p10"] = float(np.percentile(accs, 10))
        out["client_accuracy_p90"] = float(np.percentile(accs, 90))
    skip = {"n", "correct", "train_n", "train_correct", "accuracy"}
    keys = sorted({k for r in rows for k in r} - skip)
    for k in keys:
        out[f"{k}_mean"] = _nanmean([r.get(k) for r in rows])
    return out


def _privacy_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {f"privacy_{k}": v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_federation(config: RunConfig, options: RunOptions | None = None) -> Path:
    """Run ``config`` into a fresh run directory and return its final path."""
    options = options or RunOptions()
    options = replace(options, data_dir=resolve_data_dir(options.data_dir))
    run = RunDirectory.create(options.out, options.name or f"{config.task.kind}-{config.aggregation.kind}")
    try:
        (run.path / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        fed = Federation(config, run, options)
    except BaseException:
        run.discard()
        raise
    return _complete(fed, run, options)


def resume_federation(run_dir: Path, options: RunOptions | None = None) -> Path:
    """Continue an interrupted run from its last completed round with the ε it already spent."""
    options = options or RunOptions()
    options = replace(options, data_dir=resolve_data_dir(options.data_dir))
    run = RunDirectory.for_resume(run_dir)
    raw = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))
    config = build_config(raw, source=str(run.path / "config.yaml"))
    fed = Federation(config, run, options, resume=True)
    return _complete(fed, run, options)


def _complete(fed: Federation, run: RunDirectory, options: RunOptions) -> Path:
    from .. import plots
    from .results import write_summary

    try:
        timing = fed.run_all()
        atomic_save_tensors(run.path / "model.safetensors", fed.global_params)
        write_summary(fed, run, timing)
        plots.plot_run(run.path, fed.history, fed.final_clients, type(fed.task).plot_metrics)
    except BaseException:
        if fed.config.privacy.mode == "none" and not (run.path / "checkpoint" / "state.json").exists():
            run.discard()
        else:
            print(
                f"run interrupted; its state and privacy ledger are kept in {run.path}\n"
                f"continue it with: fedrlhf run --resume {run.path}",
                file=sys.stderr,
            )
        raise
    if options.keep_checkpoint:
        return run.path
    return run.finalize()
