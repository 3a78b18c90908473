"""For audit regression tests only: break DP on purpose while the ledger still claims the budget.

An audit must be able to prove that it catches a run whose noise is missing. This switch makes
every plan hand out noise multiplier 0 (record level) or add no noise (client level) while the
ledger, the summary and ``fedrlhf ledger`` report the configured ε as usual.

It cannot be reached from a config file or the command line: only Python code that imports this
module and enters :func:`noise_disabled` turns it on, for the duration of the ``with`` block, in
this process (worker processes forked inside the block inherit it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_NOISE_DISABLED = False


@contextmanager
def noise_disabled() -> Iterator[None]:
    """Within the block, DP noise is zero but every ledger entry still claims the configured noise."""
    global _NOISE_DISABLED
    previous = _NOISE_DISABLED
    _NOISE_DISABLED = True
    try:
        yield
    finally:
        _NOISE_DISABLED = previous


def noise_is_disabled() -> bool:
    return _NOISE_DISABLED
