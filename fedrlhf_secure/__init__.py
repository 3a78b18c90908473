"""fedrlhf_secure: privacy-hardened federated RLHF (FedRLHF, arXiv 2412.15538)."""

__version__ = "0.1.0"
