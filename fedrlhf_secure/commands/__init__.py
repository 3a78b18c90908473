"""Command modules of the ``fedrlhf`` console script (see :mod:`fedrlhf_secure.cli`)."""
