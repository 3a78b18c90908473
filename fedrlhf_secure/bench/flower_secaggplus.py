"""Flower 1.42's own SecAgg+ driven in one process, for side-by-side timing with ``aggregation.secagg``.

Runs the unmodified ``flwr.server.workflow.SecAggPlusWorkflow`` (server) against
``flwr.client.mod.secaggplus_mod`` (clients) through an in-process stand-in for Flower's ``Grid``
that hands each message straight to the addressed client's mod and times it. Nothing of Flower's
protocol code is replaced; only two things outside the protocol are kept out of the timing:

* the strategy's ``aggregate_fit`` (FedAvg would re-average n copies of the already-aggregated
  parameters, which is not SecAgg+ work), replaced by "take the aggregate";
* the message transport: each message goes through Flower's own protobuf serde (so every client
  gets its own copy, as over gRPC, and bytes up/down are the serialised sizes), but the
  serialisation time is subtracted.

A dropout is a client that stops replying from a given stage on (Flower's stage index: 0 setup,
1 share keys, 2 collect masked vectors, 3 unmask), matching ``drop_after`` of our driver.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FlowerRound:
    seconds_total: float
    seconds_server: float
    cpu_seconds_total: float
    """Process CPU time of the round (clients + server, serialisation excluded): robust to other load."""
    client_seconds: dict[int, float]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    aggregate: np.ndarray | None
    stage_client_seconds: dict[str, float] = field(default_factory=dict)


def available() -> str | None:
    """None when Flower can be driven, else why not (the bench skips it with that message)."""
    try:
        import flwr  # noqa: F401
        from flwr.client.mod import secaggplus_mod  # noqa: F401
        from flwr.server.workflow import SecAggPlusWorkflow  # noqa: F401
    except ImportError as exc:
        return f"Flower comparison skipped: flwr is not installed ({exc}); pip install 'flwr==1.42.*'"
    return None


def run_flower_secaggplus(
    inputs: Mapping[int, tuple[np.ndarray, float]],
    *,
    num_shares: int,
    threshold: int,
    drop_from_stage: Mapping[int, int] | None = None,
    clipping_range: float = 8.0,
    max_weight: float = 1000.0,
) -> FlowerRound:
    """One round of Flower SecAgg+ over ``inputs[node_id] = (vector, weight)``."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    drop_from_stage = dict(drop_from_stage or {})
    stages = ["setup", "share_keys", "collect_masked_vectors", "unmask"]

    class _Proxy(ClientProxy):
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *a, **k):  # pragma: no cover - never called by the workflow
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class _TakeAggregate(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            return (results[0][1].parameters if results else None), {}

    client_ctx = {nid: Context(run_id=0, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in inputs}
    client_seconds = {nid: 0.0 for nid in inputs}
    bytes_up = {nid: 0 for nid in inputs}
    bytes_down = {nid: 0 for nid in inputs}
    stage_seconds = {s: 0.0 for s in stages}
    transport_cpu = [0.0]
    transport = [0.0]  # protobuf (de)serialisation: transport, not protocol work; excluded

    def fit(msg: Message, ctxt: Context) -> Message:
        vec, weight = inputs[msg.metadata.dst_node_id]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), int(weight), {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    class _Grid:
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                nid = msg.metadata.dst_node_id
                stage = str(msg.content.config_records[RECORD_KEY_CONFIGS]["stage"])
                index = stages.index(stage)
                if nid in drop_from_stage and index >= drop_from_stage[nid]:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                wire_down = message_to_proto(msg)
                delivered = message_from_proto(wire_down)  # each client gets its own copy, as over gRPC
                t1, c1 = time.perf_counter(), time.process_time()
                reply = secaggplus_mod(delivered, client_ctx[nid], fit)
                t2, c2 = time.perf_counter(), time.process_time()
                wire_up = message_to_proto(reply)
                replies.append(message_from_proto(wire_up))
                transport[0] += (t1 - t0) + (time.perf_counter() - t2)
                transport_cpu[0] += (c1 - c0) + (time.process_time() - c2)
                client_seconds[nid] += t2 - t1
                stage_seconds[stage] += t2 - t1
                bytes_down[nid] += wire_down.ByteSize()
                bytes_up[nid] += wire_up.ByteSize()
            return replies

    manager = SimpleClientManager()
    for nid in inputs:
        manager.register(_Proxy(nid))
    dim = next(iter(inputs.values()))[0].size
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(dim, np.float32)]), keep_input=True
    )
    strategy = _TakeAggregate(fraction_fit=1.0, min_fit_clients=len(inputs), min_available_clients=len(inputs))
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy, client_manager=manager
    )
    workflow = SecAggPlusWorkflow(num_shares, threshold, max_weight=max_weight, clipping_range=clipping_range)
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what a ServerApp process would have set
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        workflow(_Grid(), context)
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0 - transport_cpu[0]
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
        flwr_logger.setLevel(level)
    aggregate = None
    params = context.state.array_records.get(MAIN_PARAMS_RECORD)
    if params is not None:
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(params, keep_input=True))
        aggregate = arrays[0]
    total -= transport[0]
    server = total - sum(client_seconds.values())
    return FlowerRound(total, server, cpu, client_seconds, bytes_up, bytes_down, aggregate, stage_seconds)
