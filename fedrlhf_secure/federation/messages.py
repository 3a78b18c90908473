"""The federation's own messages (the aggregators' messages are theirs, in :mod:`aggregation`).

Both are :class:`aggregation.wire.Frame` s, so every byte between a client and the server — in
process or over Flower — goes through the one versioned wire format:

* ``fed/fit`` (server -> client): the round, the fit instructions, and the global **shared**
  parameters as tensors. Personal parameters have no place in it. When the aggregate is readable
  by the clients only (CKKS), the server never holds the global model in the clear, so the frame
  carries no parameters (``client_held: true``): each client uses the global model it decrypted
  itself.
* ``fed/report`` (client -> server): the client's evaluation metrics (numbers only). Without DP
  this is plaintext metadata the server learns in every aggregation mode; under any DP mode the
  participant's :class:`~.participant.PlaintextPolicy` sends it with **no** metrics (the numbers
  stay in the client's own file). SECURITY.md §3 lists what travels, per mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregation import wire

FIT = "fed/fit"
REPORT = "fed/report"


@dataclass(frozen=True)
class FitInstruction:
    round: int
    local_epochs: int
    seed: int
    shared: Mapping[str, np.ndarray]
    client_held: bool = False
    """True: the parameters are not in the message; the client uses its own decrypted copy."""

    def encode(self) -> bytes:
        header = {"round": self.round, "local_epochs": self.local_epochs, "seed": self.seed, "client_held": self.client_held}
        tensors = {} if self.client_held else {f"shared/{k}": v for k, v in self.shared.items()}
        return wire.encode(wire.Frame(FIT, header, tensors))

    @classmethod
    def decode(cls, data: bytes, expected_names: list[str]) -> FitInstruction:
        frame = wire.decode(data, expect=FIT)
        client_held = bool(frame.header.get("client_held", False))
        if client_held:
            if frame.tensors:
                raise wire.WireError(f"{FIT}: a client_held instruction must carry no tensors")
            expected_names = []
        shared = {}
        for name in expected_names:
            arr = frame.tensors.get(f"shared/{name}")
            if arr is None:
                raise wire.WireError(f"{FIT}: shared parameter {name!r} is missing")
            if arr.dtype != np.float32:
                raise wire.WireError(f"{FIT}: shared parameter {name!r} must be float32, got {arr.dtype}")
            shared[name] = arr
        extra = set(frame.tensors) - {f"shared/{n}" for n in expected_names}
        if extra:
            raise wire.WireError(f"{FIT}: unexpected tensors {sorted(extra)}")
        return cls(
            round=frame.field("round", int),
            local_epochs=frame.field("local_epochs", int),
            seed=frame.field("seed", int),
            shared=shared,
            client_held=client_held,
        )


@dataclass(frozen=True)
class Report:
    client_id: int
    round: int
    metrics: Mapping[str, float]

    def encode(self) -> bytes:
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in self.metrics.items()}
        return wire.encode(wire.Frame(REPORT, {"client": self.client_id, "round": self.round, "metrics": clean}))

    @classmethod
    def decode(cls, data: bytes) -> Report:
        frame = wire.decode(data, expect=REPORT, max_bytes=1 << 20)
        metrics = frame.field("metrics", dict)
        for k, v in metrics.items():
            if not isinstance(k, str) or (v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))):
                raise wire.WireError(f"{REPORT}: metric {k!r} must be a number or null")
        return cls(
            frame.field("client", int),
            frame.field("round", int),
            {k: (float("nan") if v is None else float(v)) for k, v in metrics.items()},
        )
