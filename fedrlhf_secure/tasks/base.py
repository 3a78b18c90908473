"""What a task provides to the federation engine.

A task owns its data, its model and its local RLHF step; the engine never reaches into the model.
It sees only

* a :class:`ParamSpec` of the **shared** parameters (the ones that are federated), and
* per-client :class:`TaskClient` objects, which hold everything **personal** (e.g. a user's own
  embedding) in their own memory. Personal parameters never appear in anything a client returns,
  so they cannot reach a message.

Updates are deltas (``new - global``) on the shared parameters. A shared parameter may be
declared ``sparse_rows``: its rows (e.g. item embeddings) are touched only by the clients that
saw that row, and the engine normalises each row by the weight of the clients that touched it
instead of diluting it by all clients (see :mod:`fedrlhf_secure.federation.update`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    sparse_rows: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # 1 for a scalar; math.prod is ~10x cheaper than np.prod on a tuple


@dataclass(frozen=True)
class ParamSpec:
    """Ordered description of the shared parameters, and their flat float32 layout."""

    entries: tuple[ParamEntry, ...]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [e.name for e in self.entries if e.name not in params]
        if missing:
            raise KeyError(f"missing shared parameters: {missing}")
        out = np.empty(self.size, dtype=np.float32)
        pos = 0
        for e in self.entries:
            arr = np.asarray(params[e.name], dtype=np.float32)
            if arr.shape != e.shape:
                raise ValueError(f"parameter {e.name}: shape {arr.shape}, spec says {e.shape}")
            out[pos : pos + e.size] = arr.reshape(-1)
            pos += e.size
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, spec needs ({self.size},)")
        out, pos = {}, 0
        for e in self.entries:
            out[e.name] = np.asarray(flat[pos : pos + e.size], dtype=np.float32).reshape(e.shape).copy()
            pos += e.size
        return out


@dataclass
class FitConfig:
    """What the server asks of a client in one round."""

    round: int
    local_epochs: int
    seed: int
    dp_sgd: Any | None = None
    """A :class:`fedrlhf_secure.privacy.dpsgd.DPSGDSettings` when record-level DP is on."""


@dataclass
class FitResult:
    """A client's local training outcome: deltas on the shared parameters, never personal ones."""

    delta: dict[str, np.ndarray]
    num_examples: int
    touched_rows: dict[str, np.ndarray] = field(default_factory=dict)
    """For each ``sparse_rows`` parameter, a bool vector over its rows: which rows this client
    touched. Rows not touched must have a zero delta."""
    metrics: dict[str, float] = field(default_factory=dict)
    dp_sgd: Any | None = None
    """A :class:`fedrlhf_secure.privacy.dpsgd.DPSGDReport` when the fit ran DP-SGD (the config's
    ``dp_sgd`` settings were given), else None."""


class TaskClient(ABC):
    """One client's side of a task: its private data, feedback and personal parameters."""

    client_id: int

    @abstractmethod
    def num_examples(self) -> int: ...

    @abstractmethod
    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        """Local RLHF from the given global shared parameters."""

    @abstractmethod
    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Held-out metrics with the given shared parameters and this client's personal ones.

        Return counts (``correct``, ``n``) as well as rates so the engine can pool them."""

    def personal_state(self) -> dict[str, np.ndarray]:
        """This client's personal parameters, for the client's own checkpoint (``--resume``) and for
        audits that model a stronger attacker. Never sent anywhere by the engine."""
        return {}

    def load_personal_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`personal_state` returned (after a crash)."""
        if state:
            raise NotImplementedError(f"{type(self).__name__} cannot restore personal state")


@dataclass(frozen=True)
class Metric:
    """One headline number of a task: a key of ``metrics.jsonl`` rows and of baseline results.

    The final table has a column per metric; the run's plot draws metrics with the same ``unit`` in
    one panel (a rate and a KL in nats never share an axis), with the baselines as horizontal lines.
    """

    key: str
    label: str
    unit: str


ACCURACY_UNIT = "fraction of ratings predicted right"


class Task(ABC):
    """A federated RLHF task (MovieLens, IMDb...)."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("heldout_accuracy", "held-out accuracy", ACCURACY_UNIT),
        Metric("train_accuracy", "train accuracy", ACCURACY_UNIT),
    )
    """The task's headline numbers: the final table's columns and the run plot's lines."""

    @abstractmethod
    def client_ids(self) -> list[int]: ...

    @abstractmethod
    def shared_spec(self) -> ParamSpec: ...

    @abstractmethod
    def initial_shared(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def make_client(self, client_id: int) -> TaskClient: ...

    def fit_clients(
        self,
        fits: Sequence[tuple[TaskClient, FitConfig]],
        shared: Mapping[str, np.ndarray],
        on_fit: Callable[[int], None] | None = None,
    ) -> list[FitResult]:
        """Each ``client.fit(shared, config)``, in order: one participant host's clients of one round;
        ``on_fit(i)`` as soon as fit ``i`` is done (the run's in-round progress).

        A task may override this to train many clients as one batched computation (MovieLens:
        :mod:`fedrlhf_secure.tasks.movielens.batched`); the results must be each client's own fit."""
        out = []
        for i, (client, config) in enumerate(fits):
            out.append(client.fit(shared, config))
            if on_fit is not None:
                on_fit(i)
        return out

    def baselines(self) -> Mapping[str, Callable[[], dict[str, Any]]]:
        """Named baselines on the same split and model (e.g. centralized, local-only).

        Each is called as ``fn(rounds=..., local_epochs=...)`` with the federation's schedule and
        returns at least ``heldout_accuracy`` and ``train_accuracy``."""
        return {}


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    config_cls: type
    factory: Callable[..., Task]
    """``factory(config, data_dir: Path | None, seed: int) -> Task``."""


_TASKS: dict[str, TaskSpec] = {}


def register_task(kind: str, config_cls: type, factory: Callable[..., Task]) -> None:
    _TASKS[kind] = TaskSpec(kind, config_cls, factory)


def task_spec(kind: str) -> TaskSpec:
    import importlib

    for module in ("fedrlhf_secure.tasks.movielens", "fedrlhf_secure.tasks.imdb", "fedrlhf_secure.tasks.rlhf"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if kind not in _TASKS:
        raise KeyError(f"unknown task kind {kind!r}; expected one of {sorted(_TASKS)}")
    return _TASKS[kind]


def registered_tasks() -> list[str]:
    try:
        task_spec("")
    except KeyError:
        pass
    return sorted(_TASKS)
