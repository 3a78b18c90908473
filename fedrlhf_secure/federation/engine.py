"""A federation run: the round core, its participants, and the run directory around them.

:class:`Federation` puts the pieces of one run together and nothing more:

* the participants (:mod:`.participant`) in this process (the embedded default), in forked
  ``--workers`` processes, or — for :func:`run_remote_federation` — on deployment nodes behind any
  :class:`~.node_driver.NodeLink` (Flower's Grid: :mod:`fedrlhf_secure.transport`);
* the one round core (:mod:`.round_core`) that drives every round the same way over any of them;
* the run directory: ``metrics.jsonl`` per round, a checkpoint after each round for ``--resume``
  (embedded runs, whose participants' state is on this machine), ``model.safetensors`` and
  ``summary.json`` at the end.

In the embedded run the participants' ledgers live in the run directory (``ledger/``): the run
directory plays the clients' disk as well as the server's, but only the participant hosts write it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aggregation.base import Aggregator
from aggregation.driver import TranscriptHook

from ..config import RunConfig, build_config
from ..configtypes import ConfigError
from ..errors import InputError
from ..privacy.factory import ledger_header
from ..privacy.ledger import LedgerIncomplete, LedgerRefused, PrivacyLedger, check_extends, check_ledger, ledger_commitment
from ..privacy.noise import NoiseSource
from ..privacy.server import ServerPrivacy
from ..rundir import RunDirectory, atomic_save_tensors, atomic_write_json, load_tensors
from ..tasks.base import Task
from .aggregators import build_aggregator, server_aggregator
from .links import InProcessLink, SimulatedDropouts, WorkerLink
from .node_driver import NodeLink
from .participant import CommitHook, ParticipantHost, build_task
from .policy import NodePolicy
from .results import adopt_local_metrics
from .round_core import RoundCore, RoundStopped
from .update import UpdateCodec

__all__ = [
    "Federation",
    "RunOptions",
    "build_aggregator",
    "build_task",
    "check_resumable_ledger",
    "resolve_data_dir",
    "resume_federation",
    "run_federation",
    "run_remote_federation",
]

logger = logging.getLogger(__name__)


IN_PROCESS_HOST_CLIENTS = 256
"""Clients per in-process participant host (each host's replies travel as one node message)."""


@dataclass
class RunOptions:
    """How to run (not what to run: that is the config)."""

    data_dir: Path | None = None
    out: Path | None = None
    progress: bool = True
    hook: TranscriptHook | None = None
    """Sees every byte between clients and server (tests use it to inspect messages)."""
    keep_checkpoint: bool = False
    name: str | None = None
    task: Task | None = None
    """A prepared task to run instead of building one from the config (audits train shadow and
    canary runs on chosen subsets of the records with the config's federation code)."""
    noise: NoiseSource | None = None
    """Where every DP mechanism of the run draws its noise (default: the secret source). Tests inject
    a broken one to prove the audits catch it; nothing in a config or the CLI reaches this."""
    on_commit: CommitHook | None = None
    """Called after each ledger commit on the clients' side (tests inject crash points here)."""


def resolve_data_dir(data_dir: Path | str | None) -> Path | None:
    if data_dir:
        return Path(data_dir)
    env = os.environ.get("FEDRLHF_DATA_DIR")
    return Path(env) if env else None


class Federation:
    """Runs the rounds of one config into one run directory."""

    def __init__(
        self,
        config: RunConfig,
        run: RunDirectory,
        options: RunOptions,
        *,
        resume: bool = False,
        link: NodeLink | None = None,
        nodes: Mapping[int, Sequence[int] | None] | None = None,
        aggregator: Aggregator | None = None,
        fit_timeout: float = 600.0,
        stage_timeout: float = 60.0,
        on_stage: Callable[[int, str, int], None] | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.options = options
        self.fed = config.federation
        self.task = options.task if options.task is not None else build_task(config, options.data_dir)
        self.spec = self.task.shared_spec()
        self.codec = UpdateCodec.for_federation(self.spec, self.fed, count_slot=config.privacy.adaptive_clip is not None)
        self.client_ids = list(self.task.client_ids())
        if len(self.client_ids) < self.fed.min_clients:
            raise ConfigError(
                f"must be at most the task's {len(self.client_ids)} clients, got {self.fed.min_clients}",
                source=config.source,
                key="federation.min_clients",
            )
        self.embedded = link is None
        if self.embedded:
            aggregator = build_aggregator(config, self.client_ids)
        elif config.federation.dropout_rate > 0:
            raise InputError("federation.dropout_rate simulates dropouts in process; over a network dropouts are real: set it to 0")
        assert aggregator is not None
        self.privacy = ServerPrivacy(config, options.noise, aggregator)  # refuses a config the aggregator cannot serve first
        if self.embedded:
            link, nodes = self._embedded_participants(aggregator, resume)
        assert link is not None and nodes is not None
        self.link = link
        try:
            self.core = RoundCore(
                config,
                self.codec,
                self.client_ids,
                self.task.initial_shared(),
                link,
                nodes,
                aggregator,
                self.privacy,
                hook=options.hook,
                on_stage=on_stage,
                fit_timeout=fit_timeout,
                stage_timeout=stage_timeout,
            )
        except BaseException:
            self.close()  # worker processes the embedded run forked must not outlive a refused run
            raise
        self.start_round = 0
        self.start_step = 0
        """Steps of ``start_round`` already applied before a resume (several per round: ``privacy.steps_per_round``)."""
        self._resumed_aggregations = 0
        self.history: list[dict[str, Any]] = []
        self.final_clients: dict[int, dict[str, float]] = {}
        self.stopped: str | None = None
        self._clients_bar: Any = None
        if resume:
            self._load_checkpoint()

    def _client_done(self, client_id: int) -> None:
        if self._clients_bar is not None:
            self._clients_bar.update(1)

    def _embedded_participants(self, aggregator: Aggregator, resume: bool) -> tuple[NodeLink, dict[int, list[int]]]:
        """Participant hosts on this machine: one in this process, or one per worker process."""
        host_options = dict(
            # the user runs this config on their own machine: it is every participant's policy
            policy=NodePolicy.from_config(self.config),
            task=self.task,
            aggregator=aggregator,
            ledger_dir=self.run.path / "ledger",
            artifacts_dir=self.run.path,
            resume=resume,
            noise=self.options.noise,
            on_commit=self.options.on_commit,
            embedded=True,
        )
        workers = max(1, int(self.fed.workers))
        groups = [self.client_ids[w::workers] for w in range(workers)]
        groups = [g for g in groups if g]
        if len(groups) == 1 and len(self.client_ids) > IN_PROCESS_HOST_CLIENTS:
            # one host answers for all its clients in one node message, which the wire caps at 2 GiB:
            # 943 CKKS clients (2.8 MB each) would not fit, so large runs get several in-process hosts
            # of contiguous clients (the same order of replies, so the same sums)
            ids = self.client_ids
            groups = [ids[i : i + IN_PROCESS_HOST_CLIENTS] for i in range(0, len(ids), IN_PROCESS_HOST_CLIENTS)]
            if self.config.privacy.mode != "none" and not resume:
                PrivacyLedger(self.run.path / "ledger", ledger_header(self.config), resume=False)
                host_options["resume"] = True
            hosts = {
                n: ParticipantHost(g, self.options.data_dir, on_client_fit=self._client_done, **host_options) for n, g in enumerate(groups)
            }
            link: Any = InProcessLink(hosts)
        elif len(groups) > 1:
            # state every worker must share is made before they fork: the ledger's plan (each worker
            # then opens it, instead of racing to create it) and in-memory keys (CKKS's simulated dealer)
            if self.config.privacy.mode != "none" and not resume:
                PrivacyLedger(self.run.path / "ledger", ledger_header(self.config), resume=False)
                host_options["resume"] = True
            aggregator.prepare(self.fed.rounds)
            link = WorkerLink(lambda w: ParticipantHost(groups[w], self.options.data_dir, **host_options), len(groups))
        else:
            host = ParticipantHost(self.client_ids, self.options.data_dir, on_client_fit=self._client_done, **host_options)
            link = InProcessLink({0: host})
        if self.fed.dropout_rate > 0:
            link = SimulatedDropouts(link, self.fed.dropout_rate, self.config.seed)
        return link, dict(enumerate(groups))

    def close(self) -> None:
        close = getattr(getattr(self, "link", None), "close", None)
        if close is not None:
            close()

    @property
    def global_params(self) -> dict[str, np.ndarray]:
        return self.core.global_params

    # ------------------------------------------------------------------ checkpoints (embedded runs)
    def _save_checkpoint(self, completed_round: int, step: tuple[int, int] | None = None) -> None:
        """The state a resumed run needs: the server's (model, RNG, session) and the participants'
        own (personal parameters, a CKKS host's model), each written atomically.

        ``step = (steps done, aggregations applied)`` of round ``completed_round + 1`` when the
        round takes several aggregations (``privacy.steps_per_round``): the checkpoint after each
        step, so a resume continues at the next step from the model that step's release made."""
        if not self.embedded:
            return  # over nodes the participants' state is on the nodes: no resume from here
        ck = self.run.path / "checkpoint"
        ck.mkdir(exist_ok=True)
        atomic_save_tensors(ck / "global.safetensors", self.core.global_params)
        if self.core.server_opt.state():  # momentum / Adam state: a resume continues the same server step
            atomic_save_tensors(ck / "server_optimizer.safetensors", self.core.server_opt.state())
        clients = self.link.client_state()
        atomic_save_tensors(ck / "clients.safetensors", clients or {"_empty": np.zeros(1, np.float32)})
        state = {
            "completed_round": completed_round,
            "model_round": self.core.model_round,
            "rng": self.core.rng.bit_generator.state,
            "session_id": self.core.session_id.hex(),
        }
        if step is not None:
            state["round_steps_done"], state["round_aggregations"] = step
        if self.config.privacy.mode != "none":
            # the ledger as of this checkpoint (every commit of the round is done): a resume refuses a ledger holding less
            state["ledger"] = ledger_commitment(self.run.path / "ledger")
            state["clip_counts"] = self.core.privacy.count_history()  # adaptive clipping: C_t of the next rounds follows from these
        atomic_write_json(ck / "state.json", state)

    def _load_checkpoint(self) -> None:
        ck = self.run.path / "checkpoint"
        state_path = ck / "state.json"
        if not state_path.exists():
            self.history = []
            return  # crashed during round 0: start over (the ledger keeps what was spent)
        state = json.loads(state_path.read_text())
        self.core.global_params = load_tensors(ck / "global.safetensors")
        if (ck / "server_optimizer.safetensors").exists():
            self.core.server_opt.load_state(load_tensors(ck / "server_optimizer.safetensors"))
        self.link.restore_client_state(self._checkpointed_client_state(ck, int(state["completed_round"])))
        self.core.rng.bit_generator.state = state["rng"]
        self.core.session_id = bytes.fromhex(state["session_id"])
        self.core.model_round = int(state.get("model_round", state["completed_round"]))
        if self.core.privacy.schedule is not None:
            self.core.privacy.schedule.load(state.get("clip_counts", []))
        self.start_round = int(state["completed_round"]) + 1
        self.start_step = int(state.get("round_steps_done", 0))
        self._resumed_aggregations = int(state.get("round_aggregations", self.start_step))
        self.history = [r for r in self.run.read_jsonl("metrics.jsonl") if r["round"] < self.start_round]
        self.run.rewrite_jsonl("metrics.jsonl", self.history)

    def _checkpointed_client_state(self, ck: Path, completed_round: int) -> dict[str, np.ndarray]:
        """The participants' checkpoint; a run interrupted before the participant rewrite (bc717c7 and
        earlier) kept it as ``personal.safetensors`` (keys ``client/name``), and its engine held the
        CKKS model itself in ``global.safetensors``: read that layout too, so no interrupted run, and
        no privacy budget it spent, is stranded by an upgrade."""
        if (ck / "clients.safetensors").exists():
            return {k: v for k, v in load_tensors(ck / "clients.safetensors").items() if k != "_empty"}
        legacy = {f"personal/{k}": v for k, v in load_tensors(ck / "personal.safetensors").items() if k != "_empty"}
        if not self.core.aggregator.capabilities.server_reads_result:
            legacy.update({f"held/{k}": v for k, v in self.core.global_params.items()})
            legacy["held_round"] = np.asarray([completed_round], dtype=np.int64)
        return legacy

    def _step_checkpoint(self, r: int, step: int, applied: int) -> None:
        """After each step of a multi-step round (not its last: the round's own checkpoint follows)."""
        if step + 1 < self.core.steps_per_round:
            self._save_checkpoint(r - 1, (step + 1, applied))

    # ------------------------------------------------------------------ the run
    def run_all(self) -> dict[str, Any]:
        from .. import progress

        privacy = self.config.privacy.mode
        bar = progress.bar(
            self.fed.rounds,
            f"{self.config.task.kind} · {self.config.aggregation.kind}" + (f" · DP {privacy} level" if privacy != "none" else ""),
            "round",
            initial=self.start_round,
            show=self.options.progress,
        )
        t_start = time.perf_counter()
        try:
            for r in range(self.start_round, self.fed.rounds):
                # clients done / total within the round (in process; worker processes report per round)
                steps = self.core.steps_per_round
                # a round resumed mid-way continues at its next step (the steps before it were applied and checkpointed)
                start_step, applied = (self.start_step, self._resumed_aggregations) if r == self.start_round else (0, 0)
                self._clients_bar = progress.bar(
                    len(self.client_ids) * (steps - start_step),
                    f"round {r}: local RLHF" if steps == 1 else f"round {r}: {steps - start_step} DP-SGD steps",
                    "client",
                    show=self.options.progress,
                    leave=False,
                )
                try:
                    log = self.core.run_round(
                        r,
                        bar.set_postfix_str,
                        start_step=start_step,
                        applied=applied,
                        after_step=self._step_checkpoint if steps > 1 else None,
                    )
                except RoundStopped as stop:
                    self.stopped = str(stop)
                    logger.warning("%s", self.stopped)
                    break
                finally:
                    self._clients_bar.close()
                    self._clients_bar = None
                if self.embedded and self.config.privacy.mode != "none":
                    adopt_local_metrics(log, self.run.path)  # under DP the numbers stay client-side
                self.history.append(log.row)
                self.final_clients = log.per_client
                self.run.append_jsonl("metrics.jsonl", log.row)
                self._save_checkpoint(r)
                acc = log.row.get("heldout_accuracy")
                bar.set_postfix_str(f"round {r}: held-out acc {acc:.4f}" if isinstance(acc, float) else f"round {r} done")
                bar.update(1)
            if self.history and not self.core.aggregator.capabilities.server_reads_result:
                # CKKS: the server never held the model; the hosts release the one they decrypted
                self.core.global_params = self.core.release_model(self.core.model_round)
        finally:
            bar.close()
            self.close()
        return {"seconds_total": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_federation(config: RunConfig, options: RunOptions | None = None) -> Path:
    """Run ``config`` with every participant on this machine into a fresh run directory; return its path."""
    return _run_new(config, options, "", lambda run, opts: Federation(config, run, opts))


def resume_federation(run_dir: Path, options: RunOptions | None = None) -> Path:
    """Continue an interrupted run from its last completed round with the ε it already spent."""
    options = _resolved(options)
    run = RunDirectory.for_resume(run_dir)
    raw = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))
    config = build_config(raw, source=str(run.path / "config.yaml"))
    check_resumable_ledger(run, config)
    fed = Federation(config, run, options, resume=True)
    return _complete(fed, run, options)


def check_resumable_ledger(run: RunDirectory, config: RunConfig) -> None:
    """Refuse to resume a run whose privacy ledger is not whole, or older than its checkpoint, before
    anything is built or trained.

    A DP run creates its ledger (plan and manifest) before its first round, so an interrupted DP run
    always has one; a missing ``ledger/`` directory, plan or manifest, or a client file deleted,
    renamed, emptied or altered since (:func:`~fedrlhf_secure.privacy.ledger.check_ledger`), would
    otherwise resume as zero spend. The participant hosts check again when they reopen the ledger;
    this check names the problem before the task's data is even loaded. A ledger beside a config
    that now says ``privacy.mode: none`` is refused too: the resumed rounds would silently stop
    accounting a run that has spent ε. A ledger consistent with its own manifest but holding less than
    the checkpoint recorded (an older backup restored, a fresh ledger put in place) is refused too.
    """
    ledger = run.path / "ledger"
    if config.privacy.mode == "none":
        if ledger.exists():
            raise LedgerRefused(
                f"{ledger}: this run has a privacy ledger, but {run.path / 'config.yaml'} says privacy.mode: none; "
                "a resumed run must keep its privacy plan"
            )
        return
    check = check_ledger(ledger)
    check.raise_if_broken()
    state_path = run.path / "checkpoint" / "state.json"
    if state_path.exists():
        try:
            commitment = json.loads(state_path.read_text(encoding="utf-8")).get("ledger")
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{state_path}: unreadable checkpoint ({exc})") from exc
        if commitment is not None:  # checkpoints written before the manifest have none
            problems = check_extends(check, commitment, state_path)
            if problems:
                raise LedgerIncomplete(
                    f"{ledger}: the privacy ledger holds less than when the run's last checkpoint was taken, so the ε already "
                    "spent is unknown; refusing to continue (restore the ledger the run wrote):\n  " + "\n  ".join(problems)
                )


def run_remote_federation(
    config: RunConfig,
    link: NodeLink,
    nodes: Mapping[int, Sequence[int] | None],
    options: RunOptions | None = None,
    *,
    fit_timeout: float = 600.0,
    stage_timeout: float = 60.0,
    on_stage: Callable[[int, str, int], None] | None = None,
    keys_dir: Path | None = None,
) -> Path:
    """Run ``config`` with its participants on ``nodes`` (reached through ``link``) into a fresh run directory.

    The server builds the task only for the public facts it needs (the shared-parameter layout, the
    seeded initial model, the client ids); it never creates a client, so no client's private data,
    personal parameters or individual update is ever in this process.
    """

    def federation(run: RunDirectory, opts: RunOptions) -> Federation:
        task = opts.task if opts.task is not None else build_task(config, opts.data_dir)
        aggregator = server_aggregator(config, list(task.client_ids()), keys_dir)  # missing keys fail before any node is contacted
        return Federation(
            config,
            run,
            replace(opts, task=task),
            link=link,
            nodes=nodes,
            aggregator=aggregator,
            fit_timeout=fit_timeout,
            stage_timeout=stage_timeout,
            on_stage=on_stage,
        )

    return _run_new(config, options, "-flower", federation)


def _resolved(options: RunOptions | None) -> RunOptions:
    options = options or RunOptions()
    return replace(options, data_dir=resolve_data_dir(options.data_dir))


def _run_new(
    config: RunConfig, options: RunOptions | None, suffix: str, federation: Callable[[RunDirectory, RunOptions], Federation]
) -> Path:
    """A fresh run directory with its config.yaml, the federation built into it, then the run; a
    failure before the first round (bad input) leaves no directory behind."""
    options = _resolved(options)
    run = RunDirectory.create(options.out, options.name or f"{config.task.kind}-{config.aggregation.kind}{suffix}")
    try:
        (run.path / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        fed = federation(run, options)
    except BaseException:
        run.discard()
        raise
    return _complete(fed, run, options)


def _complete(fed: Federation, run: RunDirectory, options: RunOptions) -> Path:
    from .. import plots
    from .results import write_summary

    try:
        timing = fed.run_all()
        atomic_save_tensors(run.path / "model.safetensors", fed.global_params)
        summary = write_summary(fed, run, timing)
        plots.plot_run(
            run.path,
            fed.history,
            fed.final_clients,
            type(fed.task).metrics,
            baselines=summary["baselines"],
            epsilon_budget=fed.config.privacy.epsilon if fed.config.privacy.mode != "none" else None,
            num_clients=len(fed.client_ids),
        )
    except BaseException:
        if fed.config.privacy.mode == "none" and not (run.path / "checkpoint" / "state.json").exists():
            run.discard()
        else:
            logger.error(
                "run interrupted; its state and privacy ledger are kept in %s\ncontinue it with: fedrlhf run --resume %s",
                run.path,
                run.path,
            )
        raise
    return run.path if options.keep_checkpoint else run.finalize()
