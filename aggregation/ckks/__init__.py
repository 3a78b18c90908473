"""CKKS homomorphic-encryption aggregation (TenSEAL): the server adds updates it cannot decrypt.

``params`` (config, security bounds, contexts), ``codec`` (ciphertexts on the wire, validated),
``keys`` (dealer and key delivery), ``masking`` (masks, aggregate check, noise flooding),
``protocol`` (the round's two halves and the plug-in).
"""

from ..base import register
from .keys import ClientKeyPair, DealerKey, KeyPackageError, PublicContext, deal, open_package
from .masking import MaskPlan
from .params import MAX_LOG_Q_128, CKKSConfig, headroom
from .protocol import CKKSAggregator, CKKSClient, CKKSServer, SimulatedDealer, factory, masking_config

register("ckks", CKKSConfig, factory)

__all__ = [
    "MAX_LOG_Q_128",
    "CKKSAggregator",
    "CKKSClient",
    "CKKSConfig",
    "CKKSServer",
    "ClientKeyPair",
    "DealerKey",
    "KeyPackageError",
    "MaskPlan",
    "PublicContext",
    "SimulatedDealer",
    "deal",
    "factory",
    "headroom",
    "masking_config",
    "open_package",
]
