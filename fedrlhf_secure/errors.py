"""One error family for the whole runtime, mapped once to the CLI's exit status.

Every failure a user can cause or must act on is a :class:`FedRLHFError`; its class says which
family it belongs to and so which exit status ``fedrlhf`` ends with (``cryptography`` style: one
exception per failure family, the message says the specifics):

============================  ======  ===================================================
family                         exit    meaning
============================  ======  ===================================================
:class:`InputError`            2       bad input: a config, a data or key file, a run
                                       directory, a command-line value. The message names
                                       the file, the field and what was expected.
:class:`ClaimRefuted`          1       an audit refuted the run's privacy claim, or a
                                       red-team attack recovered what it must not.
:class:`PrivacyError`          1       a release was refused to protect the budget, or a
                                       client did not do what its privacy plan required.
:class:`RunFailed`             1       the run could not go on (transport, protocol).
:class:`Interrupted`           130     SIGINT or SIGTERM; the run's state is kept.
============================  ======  ===================================================

The aggregation protocols (:mod:`aggregation`) know nothing of this package, so their failures
have their own root, :class:`aggregation.errors.AggregationError`; :func:`exit_status` maps it
too (a protocol failure that reaches the CLI is a failed run).
"""

from __future__ import annotations


class FedRLHFError(Exception):
    """Root of every error ``fedrlhf`` reports without a traceback."""

    exit_status = 1


class InputError(FedRLHFError, ValueError):
    """Bad user input (a config, a data file, a run directory): the message says which file, which
    field and what was expected. The CLI prints it and exits 2 instead of showing a traceback."""

    exit_status = 2


class ClaimRefuted(FedRLHFError):
    """A privacy or security claim was refuted (audit ε̂ above the claim, an attack succeeded)."""

    exit_status = 1


class PrivacyError(FedRLHFError):
    """A privacy rule stopped a release (budget, plan violation, ledger integrity)."""

    exit_status = 1


class RunFailed(FedRLHFError):
    """The run cannot continue (nodes unreachable, too few clients, a protocol that aborted)."""

    exit_status = 1


class Interrupted(FedRLHFError):
    """The user or a scheduler stopped the process (SIGINT, SIGTERM)."""

    exit_status = 130


def exit_status(exc: BaseException) -> int | None:
    """The exit status for ``exc``, or None when it is a bug (the CLI then shows the traceback).

    A bare :class:`FileNotFoundError` (a data or run file that is not there, raised by code that has
    no family class of its own yet) counts as bad input, as the CLI always treated it.
    """
    if isinstance(exc, FedRLHFError):
        return exc.exit_status
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted.exit_status
    if isinstance(exc, FileNotFoundError):
        return InputError.exit_status
    try:
        from aggregation.errors import AggregationError
    except ImportError:  # pragma: no cover - aggregation ships with the package
        return None
    if isinstance(exc, AggregationError):
        return getattr(exc, "exit_status", 1)
    return None
