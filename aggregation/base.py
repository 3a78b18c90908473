"""The aggregator plug-in interface: sans-IO client and server halves that exchange bytes.

An aggregator computes, over the clients that survive a round, the weighted sum
``S = sum_k w_k * x_k`` of their flat float32 vectors and the total weight ``W = sum_k w_k``;
the caller turns that into an average. Keeping the contract at "weighted sum" (not "average")
lets the runtime append extra coordinates to ``x_k`` (e.g. per-row touch indicators, so sparse
embedding rows can be normalised by the weight of the clients that touched them) and still get
exactly the sums it needs through any secure aggregator.

Both halves are pure state machines (no sockets, threads or clocks): they take message bytes and
return message bytes. The in-process driver (:mod:`aggregation.driver`), the Flower transport and
the tests drive the same objects, so tests can drop, reorder, replay or forge messages.

Addressing: the server half returns ``(client_id, bytes)`` pairs; a client half returns the bytes
it sends to the server. When a stage's deadline passes, the driver calls
:meth:`ServerHalf.close_stage`, and the server continues with the clients that answered (or aborts
with :class:`AggregationAborted` when too few did).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import AggregationError

Outgoing = tuple[int, bytes]


class ProtocolError(AggregationError, ValueError):
    """A message was rejected (malformed, replayed, wrong round/session/sender, bad signature...)."""


class AggregationAborted(AggregationError, RuntimeError):
    """The round cannot complete (e.g. fewer than ``threshold`` clients left); nothing was revealed."""


@dataclass(frozen=True)
class RoundContext:
    """What every party knows about a round before it starts.

    ``session_id`` is 16 random bytes fixed per run and ``round`` the round index: secure
    aggregators bind both into every message so nothing replays across rounds or runs.
    """

    session_id: bytes
    round: int
    participants: tuple[int, ...]
    dim: int

    def __post_init__(self) -> None:
        if len(self.session_id) != 16:
            raise ValueError("session_id must be 16 bytes")
        if len(set(self.participants)) != len(self.participants) or not self.participants:
            raise ValueError("participants must be a non-empty list of distinct client ids")
        if any(p < 0 for p in self.participants):
            raise ValueError("client ids must be non-negative")
        if self.dim <= 0:
            raise ValueError("dim must be positive")


@dataclass(frozen=True)
class AggregateResult:
    """``weighted_sum`` = sum_k w_k x_k and ``total_weight`` = sum_k w_k over ``contributors``."""

    weighted_sum: np.ndarray
    total_weight: float
    contributors: tuple[int, ...]

    @property
    def average(self) -> np.ndarray:
        if self.total_weight <= 0:
            raise AggregationAborted("total weight of the contributors is zero")
        return self.weighted_sum / self.total_weight


def check_single_upload(ctx: RoundContext, seen: Sequence[int], closed: bool, sender: int) -> None:
    """The checks every one-shot upload stage makes before parsing: open round, participant, no replay."""
    if closed:
        raise ProtocolError(f"round {ctx.round} is closed; update from {sender} rejected")
    if sender not in ctx.participants:
        raise ProtocolError(f"client {sender} is not a participant of round {ctx.round}")
    if sender in seen:
        raise ProtocolError(f"client {sender} already sent its update (replay?)")


class ServerHalf(ABC):
    """The aggregator's server side for one round."""

    @abstractmethod
    def start(self) -> list[Outgoing]:
        """Messages that open the round."""

    @abstractmethod
    def receive(self, sender: int, data: bytes) -> list[Outgoing]:
        """Handle one message; raise :class:`ProtocolError` to reject it (state is unchanged)."""

    @abstractmethod
    def close_stage(self) -> list[Outgoing]:
        """The current stage's deadline passed: continue with the clients that answered."""

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def result(self) -> AggregateResult | None:
        """The weighted sum, or ``None`` when the server by design cannot read it (CKKS)."""


class ClientHalf(ABC):
    """The aggregator's client side for one round, holding that client's vector and weight."""

    @abstractmethod
    def receive(self, data: bytes) -> list[bytes]:
        """Handle one message from the server; return the replies to the server."""

    @property
    @abstractmethod
    def done(self) -> bool: ...

    def result(self) -> AggregateResult | None:
        """The aggregate as this client learns it (CKKS clients decrypt it); default: none."""
        return None


@dataclass(frozen=True)
class Capabilities:
    """What an aggregator guarantees and accepts, so the runtime never has to know it by name.

    ``server_reads_result``: the server can read the aggregate (plain, masking); False when only the
    clients can (CKKS: the server never holds the global model in the clear).
    ``integer_scale``: the aggregator sums integers, a float x entering as round(scale · x), and
    takes an ``integer_noise`` share per client (distributed discrete DP); None for float sums.
    """

    server_reads_result: bool = True
    integer_scale: float | None = None


class Aggregator(ABC):
    """A plug-in: builds the two halves for each round and declares its :class:`Capabilities`."""

    kind: ClassVar[str]
    capabilities: Capabilities = Capabilities()
    """Each aggregator states its own (a class or instance attribute)."""

    def prepare(self, rounds: int) -> None:  # noqa: B027  (an optional hook: most aggregators have nothing to make)
        """Make now any key material the run will need, before the caller forks processes that must
        share it (the embedded simulation's worker processes). Default: nothing to make."""

    @property
    def server_can_read_result(self) -> bool:
        return self.capabilities.server_reads_result

    @abstractmethod
    def server(self, ctx: RoundContext) -> ServerHalf: ...

    @abstractmethod
    def client(
        self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float, *, integer_noise: np.ndarray | None = None
    ) -> ClientHalf:
        """The client half over ``vector``; ``integer_noise`` only where ``capabilities.integer_scale`` is set."""


def refuse_integer_noise(aggregator: Aggregator, integer_noise: np.ndarray | None) -> None:
    """Float aggregators take no integer noise: a share handed to one would silently be dropped."""
    if integer_noise is not None:
        raise ProtocolError(f"the {aggregator.kind} aggregator sums floats and takes no integer noise share")


# --------------------------------------------------------------------------------------------
# Registry: ``aggregation: {kind: ..., **params}`` in a config resolves through here.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregatorSpec:
    kind: str
    config_cls: type
    factory: Callable[[Any, Sequence[int], int], Aggregator]
    """``factory(config, client_ids, seed)`` -> Aggregator for one run."""


_REGISTRY: dict[str, AggregatorSpec] = {}


def register(kind: str, config_cls: type, factory: Callable[[Any, Sequence[int], int], Aggregator]) -> None:
    _REGISTRY[kind] = AggregatorSpec(kind, config_cls, factory)


def registered() -> Mapping[str, AggregatorSpec]:
    _load_builtin()
    return dict(_REGISTRY)


def spec_for(kind: str) -> AggregatorSpec:
    _load_builtin()
    if kind not in _REGISTRY:
        raise KeyError(f"unknown aggregation kind {kind!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind]


def _load_builtin() -> None:
    import importlib

    for module in ("aggregation.plain", "aggregation.secagg", "aggregation.ckks"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
