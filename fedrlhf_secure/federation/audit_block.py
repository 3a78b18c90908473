"""The audit block: m released coordinates the model never reads, for ``privacy.audit_canaries``.

A Dirac canary on a coordinate that real gradients also move is confounded by them: with the noise
switched off, the data's own movement on that coordinate is as large as the canary's (docs/audits.md
has the measurements), so a broken run could not be told from an honest one. The audit block gives
every canary a coordinate of its own that no record's and no client's gradient reaches, while the
mechanism under test (clip → noise → secure aggregation → release) treats it like every other
coordinate: under record-level DP it is one more parameter of the DP-SGD optimizer
(:class:`~fedrlhf_secure.privacy.dpsgd.AuditBlock`), under client-level DP one more span of the
clipped update. It lives here, between the task and the privacy layer, because it wraps the task's
shared parameters (the task's own code never sees it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from ..privacy.canaries import AUDIT_BLOCK
from ..privacy.dpsgd import AuditBlock
from ..tasks.base import ParamEntry, ParamSpec

logger = logging.getLogger(__name__)


def with_audit_block(task, size: int):
    """``task`` with an audit block of ``size`` coordinates appended to its shared parameters (itself when 0).

    The returned object is the same task (same state, same class hierarchy, so ``isinstance`` checks
    such as :class:`~fedrlhf_secure.tasks.auditable.AuditableTask` still hold) with three methods
    extended: :meth:`shared_spec` gains the entry :data:`AUDIT_BLOCK`, :meth:`initial_shared` its
    zeros, :meth:`make_client` wraps each client (:func:`_block_client`). The task's own code never
    sees the block."""
    if size <= 0 or AUDIT_BLOCK in task.shared_spec().names():
        return task
    audited = _subclass(type(task), _AuditBlockTask)
    out = object.__new__(audited)
    out.__dict__.update(task.__dict__)
    out._audit_block_size = int(size)
    return out


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__.lstrip('_')}[{cls.__name__}]", (mixin, cls), {"__module__": cls.__module__})
    return _SUBCLASSES[key]


class _AuditBlockTask:
    _audit_block_size: int

    def shared_spec(self):
        inner = super().shared_spec()
        return ParamSpec((*inner.entries, ParamEntry(AUDIT_BLOCK, (self._audit_block_size,))))

    def initial_shared(self):
        return {**super().initial_shared(), AUDIT_BLOCK: np.zeros(self._audit_block_size, dtype=np.float32)}

    def fit_clients(self, fits, shared, on_fit=None):
        """The task's own (batched) fits on its own parameters, the block's change appended: zero
        without DP-SGD (the model never reads the block); record-level DP-SGD fits train the block
        inside their steps, one client at a time (:meth:`_AuditBlockClient.fit`)."""
        if any(cfg.dp_sgd is not None for _, cfg in fits):
            return super().fit_clients(fits, shared, on_fit)  # each _AuditBlockClient.fit trains its block
        rest, start = _without_block(shared)
        zero = np.zeros_like(start)
        return [
            r if AUDIT_BLOCK in r.delta else replace(r, delta={**r.delta, AUDIT_BLOCK: zero})
            for r in super().fit_clients(fits, rest, on_fit)
        ]

    def make_client(self, client_id: int):
        client = super().make_client(client_id)
        out = object.__new__(_subclass(type(client), _AuditBlockClient))
        out.__dict__.update(client.__dict__)
        return out


def _without_block(shared: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rest = {k: v for k, v in shared.items() if k != AUDIT_BLOCK}
    return rest, np.asarray(shared[AUDIT_BLOCK], dtype=np.float32)


class _AuditBlockClient:
    """A task client whose fit also trains the audit block (record level: inside its DP-SGD) and
    releases its change; the task's client only ever sees its own parameters."""

    def fit(self, shared, config):
        if AUDIT_BLOCK not in shared:  # called by the task's own fit_clients on its own parameters
            return super().fit(shared, config)
        rest, start = _without_block(shared)
        block = None
        if config.dp_sgd is not None:
            block = AuditBlock(start, config.dp_sgd.canaries)
            config = replace(config, dp_sgd=replace(config.dp_sgd, audit_block=block))
        result = super().fit(rest, config)
        change = np.zeros_like(start) if block is None else block.delta()
        if block is not None and block.canaries is not None:
            logger.debug("audit block: %d DP-SGD steps, %d canary samples", block.steps, block.sampled)
        return replace(result, delta={**result.delta, AUDIT_BLOCK: change})

    def evaluate(self, shared):
        return super().evaluate(_without_block(shared)[0])
