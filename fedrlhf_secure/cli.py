"""The ``fedrlhf`` console script: one lazy command registry, one mapping of errors to exit codes.

:data:`COMMANDS` maps a command name to ``("module:attribute", help text)``. Every command module
lives in :mod:`fedrlhf_secure.commands` and exposes ``add_arguments(parser)`` and
``run(args) -> int``; the attribute named is its ``run``, or a registry of the same shape for a
command with sub-commands (``bench``: :data:`fedrlhf_secure.commands.bench.SUBCOMMANDS`).
``fedrlhf --help`` lists the registry without importing any command module (no torch); only the
chosen command's module is imported, and only its parser is built.

Failures are mapped once, by :func:`fedrlhf_secure.errors.exit_status`: a
:class:`~fedrlhf_secure.errors.FedRLHFError` (or a protocol's ``AggregationError``) prints
``fedrlhf COMMAND: error: MESSAGE`` and exits with its family's status (2 bad input, 1 refuted
claim / privacy refusal / failed run); SIGINT and SIGTERM both exit 130, and a run they stop keeps
its resumable ``.partial`` directory. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import progress
from .errors import Interrupted, RunFailed, exit_status

Registry = Mapping[str, tuple[str, str]]

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedrlhf_secure.commands.run:run", "run a federation from a YAML config"),
    "baseline": ("fedrlhf_secure.commands.baseline:run", "run the centralized / local-only baselines of a config"),
    "data": ("fedrlhf_secure.commands.data:run", "download and verify MovieLens (needs network)"),
    "ledger": ("fedrlhf_secure.commands.ledger:run", "print the privacy spend of a run, per client and in total"),
    "audit": ("fedrlhf_secure.commands.audit:run", "membership-inference audit of a run directory; exit 1 if ε̂ exceeds the claim"),
    "bench": ("fedrlhf_secure.commands.bench:SUBCOMMANDS", "benchmarks: write JSON and the tables in BENCHMARKS.md"),
    "keys": ("fedrlhf_secure.commands.keys:run", "key setup: CKKS keys, SecAgg identity registry"),
    "secagg-params": (
        "fedrlhf_secure.commands.secagg_params:run",
        "SecAgg k, t, quorum and failure probabilities for a config's colluder/dropout bounds",
    ),
    "deploy": ("fedrlhf_secure.commands.deploy:run", "Flower deployment helpers (certificates, node keys, launch)"),
    "redteam": ("fedrlhf_secure.commands.redteam:run", "attack your config as a lying server; exit 1 if anything is recovered"),
}

DISTRIBUTION = "fedrlhf-secure"
_OWN_PACKAGES = ("fedrlhf_secure", "aggregation", "attacks")


def load(target: str) -> tuple[Any, Any]:
    """``(module, attribute)`` for a registry target ``"module:attribute"``.

    A missing third-party dependency of the command (e.g. TenSEAL for ``keys``, Flower for
    ``deploy``) is a :class:`RunFailed` saying what to install; a missing module of this project
    is a bug and raises as is.
    """
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] not in _OWN_PACKAGES:
            raise RunFailed(f"this command needs the package {exc.name!r}, which is not installed") from exc
        raise
    return module, getattr(module, attr)


def _first_positional(argv: Sequence[str]) -> int | None:
    """Index of the first token that is not an option (the command's name), or None."""
    for i, token in enumerate(argv):
        if token == "--":
            return i + 1 if i + 1 < len(argv) else None
        if not token.startswith("-"):
            return i
    return None


def add_commands(parser: argparse.ArgumentParser, registry: Registry, argv: Sequence[str], *, dest: str, metavar: str) -> None:
    """One sub-parser per registry entry, filled in only for the entry ``argv`` chooses.

    The others get their name and help text only, which is all ``--help`` shows; the chosen one's
    module is imported and fills its parser (or, when its target is a registry, recurses).
    """
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    i = _first_positional(argv)
    chosen = argv[i] if i is not None else None
    for name, (target, help_text) in registry.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        module, attr = load(target)
        if isinstance(attr, Mapping):
            add_commands(
                p, attr, argv[i + 1 :], dest=getattr(module, "SUBCOMMAND_DEST", name), metavar=getattr(module, "SUBCOMMAND_METAVAR", "NAME")
            )
        else:
            module.add_arguments(p)
            p.set_defaults(_run=attr)


class _VersionAction(argparse.Action):
    """``--version``, read from the installed distribution only when asked (no import-time cost)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version(DISTRIBUTION)
        except PackageNotFoundError:
            v = "unknown (not installed)"
        print(f"fedrlhf {v}")
        parser.exit()


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command listed, only the one ``argv`` names built."""
    parser = argparse.ArgumentParser(prog="fedrlhf", description="Privacy-hardened federated RLHF.")
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages on stderr")
    add_commands(parser, COMMANDS, argv, dest="command", metavar="COMMAND")
    return parser


def iter_commands(registry: Registry = COMMANDS, prefix: tuple[str, ...] = ()):
    """``(command path, target, help)`` for every leaf of the registry (imports nested registries)."""
    for name, (target, help_text) in registry.items():
        if target.endswith(":SUBCOMMANDS"):
            _, nested = load(target)
            yield from iter_commands(nested, (*prefix, name))
        else:
            yield (*prefix, name), target, help_text


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (which tests and tools may swap), one plain line each."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


OWN_PACKAGES = ("fedrlhf_secure", "aggregation", "attacks")


class _OwnRecordsOnly(logging.Filter):
    """Third-party libraries (transformers, datasets, opacus, flwr) log configuration chatter at
    INFO/WARNING on every call; a user sees it with ``--verbose``, otherwise only their errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN_PACKAGES or record.levelno >= logging.ERROR


def configure_logging(level: int, *, third_party: bool = False) -> None:
    """INFO (or the given level) to stderr as ``%(message)s``; installed once per process."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    for f in [f for f in handler.filters if isinstance(f, _OwnRecordsOnly)]:
        handler.removeFilter(f)
    if not third_party:
        handler.addFilter(_OwnRecordsOnly())
    root.setLevel(level)


def quiet_third_party() -> None:
    """Silence other libraries' progress bars and warnings (``--verbose`` keeps them).

    Environment variables are read when those libraries are first imported, which the lazy command
    registry guarantees happens after this call."""
    for name, value in (
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=r"^(?!(" + "|".join(OWN_PACKAGES) + r")\b)")


class _SignalCatcher:
    """SIGTERM behaves like Ctrl-C: it raises KeyboardInterrupt where the program is, so the same
    cleanup runs (a run keeps its resumable ``.partial`` directory) and the exit status is 130."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: Callable | int | None = None

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt

    def __enter__(self) -> _SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = _first_positional(argv)
    name = argv[i] if i is not None else ""
    with _SignalCatcher() as signals:
        try:
            args = build_parser(argv).parse_args(argv)
            configure_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO, third_party=args.verbose)
            if not args.verbose:
                quiet_third_party()
            progress.configure(enabled=not (args.quiet or getattr(args, "no_progress", False)))
            name = " ".join(str(getattr(args, d)) for d in ("command", "bench") if getattr(args, d, None))
            return int(args._run(args) or 0)
        except (Exception, KeyboardInterrupt) as exc:
            status = exit_status(exc)
            if status is None:
                raise  # a bug: show the traceback
            if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                detail = f": {exc}" if str(exc) else ""
                print(f"fedrlhf {name}: interrupted by {signals.received or 'SIGINT'}{detail}", file=sys.stderr)
            else:
                print(f"fedrlhf {name}: error: {exc}", file=sys.stderr)
            return status


if __name__ == "__main__":
    sys.exit(main())
