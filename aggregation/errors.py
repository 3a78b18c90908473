"""The aggregation protocols' own error family (this package imports nothing of the runtime).

:class:`AggregationError` is the root; :class:`~aggregation.wire.WireError` (a malformed frame),
:class:`~aggregation.base.ProtocolError` (a rejected message), :class:`~aggregation.base.AggregationAborted`
(a round that cannot complete) and configuration errors of an aggregator derive from it. The
runtime's CLI maps the family to an exit status (``fedrlhf_secure.errors.exit_status``).
"""

from __future__ import annotations


class AggregationError(Exception):
    """Root of every failure raised by :mod:`aggregation`."""

    exit_status = 1


class AggregationConfigError(AggregationError, ValueError):
    """An aggregator cannot be built with the parameters given (bad input: exit status 2)."""

    exit_status = 2
