"""Aggregation protocols: plain FedAvg, pairwise masking (SecAgg/SecAgg+) and CKKS.

This package knows vectors, weights, keys and bytes, and nothing about tasks or models.
"""

from .base import (
    AggregateResult,
    AggregationAborted,
    Aggregator,
    ClientHalf,
    ProtocolError,
    RoundContext,
    ServerHalf,
    register,
    registered,
    spec_for,
)

__all__ = [
    "AggregateResult",
    "AggregationAborted",
    "Aggregator",
    "ClientHalf",
    "ProtocolError",
    "RoundContext",
    "ServerHalf",
    "register",
    "registered",
    "spec_for",
]
