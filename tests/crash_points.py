"""Crash points for crash/resume tests, injected through ``RunOptions(on_commit=...)``.

The package has no switch that crashes a run: a test hands in this callback, which the clients'
side calls right after each ledger commit, and which raises :class:`SimulatedCrash` (a
``BaseException``, like the ``KeyboardInterrupt`` of a killed process, so no ``except Exception``
on the way swallows it) after the given number of commits.
"""

from __future__ import annotations


class SimulatedCrash(BaseException):
    """The process died right after a ledger commit."""


def crash_after(commits: int):
    count = 0

    def on_commit(client: int, round: int) -> None:
        nonlocal count
        count += 1
        if count >= commits:
            raise SimulatedCrash(f"simulated crash after {count} ledger commits (client {client}, round {round})")

    return on_commit
