"""From a client's :class:`FitResult` to the flat float32 vector an aggregator sums, and back.

Layout of the vector (the aggregator sees only its length)::

    [ delta of every shared parameter, in ParamSpec order ]
    [ one touch indicator per row of every ``sparse_rows`` parameter ]   (sparse_rows: touched)

Why the indicators: in MovieLens each user rates ~100 of 1,682 items, so most clients leave most
item-embedding rows untouched (zero delta). Plain example-weighted FedAvg divides each row's
summed update by the weight of *all* clients and so shrinks a row's update by the share of
clients that never saw it. Sending ``w_k * touched_k[row]`` alongside ``w_k * delta_k`` lets the
engine divide each row by the weight of the clients that touched it, using only the two sums that
any secure aggregator already returns — so the same normalisation works under masking and CKKS.
The price is that the touch pattern's *sum* is revealed (how many clients rated each item), no
more than the weighted sum of the deltas already reveals; individual touch sets stay hidden.

Under client-level DP the indicators are inside the clipped vector and share its L2 norm with the
model delta. On MovieLens (one client per user, ~100 rated items each) they take a median 88% of
the squared norm, so at C = 1 the delta kept only 0.34 of its median 2.24. ``touch_scale`` s
(``federation.touch_scale``) sends ``s·touched`` instead: the indicators' share of the squared norm
drops by s², and the decoder divides the summed indicators by s to get the (noisy) count back. No
new release and no new accounting: the vector is still one client's whole contribution, clipped to
C and noised as before, so the ledger is unchanged; the count estimate's noise grows by 1/s, which
``touch_floor`` bounds (a row is divided by at least that many clients).

With adaptive clipping (``privacy.adaptive_clip``) the vector ends with one more coordinate, the
**count slot**: the codec leaves it 0 and the client's privacy layer writes its scaled clipped-count
bit there after clipping (:mod:`fedrlhf_secure.privacy.adaptive_clipping`), so the bit is noised with
the update and travels through the same secure aggregator; :meth:`UpdateCodec.count_total` reads
the slot of the (noised) aggregate and :meth:`UpdateCodec.decode` ignores it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from aggregation.base import AggregateResult

from ..config import FederationConfig
from ..tasks.base import FitResult, ParamSpec

MIN_ROW_WEIGHT = 0.5
"""A row counts as touched when its summed touch weight reaches this (weights are ≥ 1 per client;
under client-level DP the indicators are noisy and a near-zero denominator must not blow up)."""


class UpdateCodec:
    def __init__(
        self,
        spec: ParamSpec,
        sparse_rows: Literal["touched", "all"] = "touched",
        touch_scale: float = 1.0,
        touch_floor: float = MIN_ROW_WEIGHT,
        count_slot: bool = False,
    ) -> None:
        if not 0 < touch_scale <= 1:
            raise ValueError(f"touch_scale must be in (0, 1], got {touch_scale}")
        if not touch_floor > 0:
            raise ValueError(f"touch_floor must be > 0, got {touch_floor}")
        self.spec = spec
        self.touch_scale = float(touch_scale)
        self.touch_floor = float(touch_floor)
        self.sparse = [e for e in spec.entries if e.sparse_rows] if sparse_rows == "touched" else []
        self._rows = {e.name: e.shape[0] for e in self.sparse}
        self.count_slot = bool(count_slot)
        self.dim = spec.size + sum(self._rows.values()) + int(self.count_slot)

    @classmethod
    def for_federation(cls, spec: ParamSpec, fed: FederationConfig, count_slot: bool = False) -> UpdateCodec:
        """The codec a run's ``federation`` section asks for (server and clients build the same one);
        ``count_slot`` when ``privacy.adaptive_clip`` is set."""
        return cls(spec, fed.sparse_rows, fed.touch_scale, fed.touch_floor, count_slot)

    def count_total(self, result: AggregateResult) -> float:
        """The aggregate's count slot: the noised sum of the clients' scaled clipped-count bits."""
        if not self.count_slot:
            raise ValueError("this codec has no count slot (privacy.adaptive_clip is not set)")
        s = np.asarray(result.weighted_sum, dtype=np.float64)
        if s.shape != (self.dim,):
            raise ValueError(f"aggregate has shape {s.shape}, expected ({self.dim},)")
        return float(s[-1])

    def encode(self, fit: FitResult) -> np.ndarray:
        vec = np.empty(self.dim, dtype=np.float32)
        vec[: self.spec.size] = self.spec.flatten(fit.delta)
        pos = self.spec.size
        for e in self.sparse:
            touched = fit.touched_rows.get(e.name)
            if touched is None:
                raise ValueError(f"task declared {e.name} sparse_rows but reported no touched_rows for it")
            touched = np.asarray(touched, dtype=bool)
            if touched.shape != (e.shape[0],):
                raise ValueError(f"touched_rows[{e.name}] has shape {touched.shape}, expected ({e.shape[0]},)")
            vec[pos : pos + e.shape[0]] = touched * np.float32(self.touch_scale)
            pos += e.shape[0]
        if self.count_slot:
            vec[pos] = 0.0  # written by the client's privacy layer after clipping
        return vec

    def touch_estimates(self, result: AggregateResult) -> dict[str, np.ndarray]:
        """Each sparse parameter's estimated (weighted, under DP noisy) count of touching clients per
        row: the aggregate's indicator sums divided by ``touch_scale``."""
        s = np.asarray(result.weighted_sum, dtype=np.float64)
        if s.shape != (self.dim,):
            raise ValueError(f"aggregate has shape {s.shape}, expected ({self.dim},)")
        out, pos = {}, self.spec.size
        for e in self.sparse:
            out[e.name] = s[pos : pos + e.shape[0]] / self.touch_scale
            pos += e.shape[0]
        return out

    def decode(self, result: AggregateResult, touch: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Average delta per shared parameter: rows of sparse parameters by their touch weight
        (this aggregate's :meth:`touch_estimates`, or ``touch`` when the caller has a better estimate
        of the same counts, e.g. their mean over the rounds released so far)."""
        s = np.asarray(result.weighted_sum, dtype=np.float64)
        if s.shape != (self.dim,):
            raise ValueError(f"aggregate has shape {s.shape}, expected ({self.dim},)")
        if result.total_weight <= 0:
            raise ValueError("aggregate has no weight")
        avg = (s[: self.spec.size] / result.total_weight).astype(np.float32)
        params = self.spec.unflatten(avg)
        estimates = self.touch_estimates(result) if touch is None else touch
        sums = self.spec.unflatten(s[: self.spec.size].astype(np.float32)) if self.sparse else {}
        for e in self.sparse:
            rows = e.shape[0]
            count = np.asarray(estimates[e.name], dtype=np.float64)  # estimated (weighted) count of touching clients
            if count.shape != (rows,):
                raise ValueError(f"touch estimate of {e.name} has shape {count.shape}, expected ({rows},)")
            summed = sums[e.name].astype(np.float64)
            ok = count >= MIN_ROW_WEIGHT
            out = np.zeros_like(summed)
            denom = np.maximum(count[ok], self.touch_floor)
            out[ok] = summed[ok] / denom.reshape((-1,) + (1,) * (summed.ndim - 1))
            params[e.name] = out.astype(np.float32)
        return params
