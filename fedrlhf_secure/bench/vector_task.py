"""A synthetic task for transport benchmarks: ``clients`` clients, one shared vector of ``dim`` floats.

Local "training" draws a small seeded delta (no model, no data), so a round's time is the
transport's and the aggregation's, not the task's. Registered as ``kind: vector`` when this module
is imported (``fedrlhf deploy client-host --task-module fedrlhf_secure.bench.vector_task``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tasks.base import FitConfig, FitResult, ParamEntry, ParamSpec, Task, TaskClient, register_task


@dataclass(frozen=True)
class VectorConfig:
    clients: int = 10
    dim: int = 100_000
    scale: float = 0.01

    def __post_init__(self) -> None:
        if self.clients < 1 or self.dim < 1:
            raise ValueError(f"task.clients and task.dim must be >= 1, got {self.clients}, {self.dim}")
        if not 0 < self.scale <= 0.1:
            raise ValueError(f"task.scale must be in (0, 0.1] (deltas stay inside SecAgg's clip range), got {self.scale}")


class VectorClient(TaskClient):
    def __init__(self, cid: int, cfg: VectorConfig) -> None:
        self.client_id = cid
        self.cfg = cfg

    def num_examples(self) -> int:
        return 10 + self.client_id

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        rng = np.random.default_rng(config.seed)
        delta = (rng.standard_normal(self.cfg.dim) * self.cfg.scale).astype(np.float32)
        return FitResult({"v": delta}, self.num_examples(), {}, {"loss": float(np.abs(delta).mean())})

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"norm": float(np.linalg.norm(shared["v"]))}


class VectorTask(Task):
    name = "vector"

    def __init__(self, cfg: VectorConfig) -> None:
        self.cfg = cfg

    def client_ids(self) -> list[int]:
        return list(range(self.cfg.clients))

    def shared_spec(self) -> ParamSpec:
        return ParamSpec((ParamEntry("v", (self.cfg.dim,)),))

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {"v": np.zeros(self.cfg.dim, np.float32)}

    def make_client(self, client_id: int) -> TaskClient:
        return VectorClient(client_id, self.cfg)


def _factory(cfg: VectorConfig, data_dir: Path | None, seed: int) -> VectorTask:
    return VectorTask(cfg)


register_task("vector", VectorConfig, _factory)
