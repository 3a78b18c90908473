"""One lazy command registry: ``fedrlhf --help`` imports no command module (no torch), every entry
imports and builds its parser, and every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fedrlhf_secure import cli

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command_without_importing_any():
    code = (
        "import sys\n"
        "from fedrlhf_secure.cli import main, COMMANDS\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('fedrlhf_secure.commands', 'attacks', 'torch', 'flwr', 'tenseal')))\n"
        "assert loaded == [], loaded\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name in proc.stdout
    assert proc.stdout.rstrip().endswith("OK")


def test_version_comes_from_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and version(cli.DISTRIBUTION) in capsys.readouterr().out


def test_every_command_module_lives_in_commands():
    for path, target, _ in cli.iter_commands():
        assert target.startswith("fedrlhf_secure.commands.") or path[0] == "bench", (path, target)
    assert cli.COMMANDS["bench"][0].startswith("fedrlhf_secure.commands.bench:")


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


@pytest.mark.parametrize("path", [p for p, _, _ in cli.iter_commands()], ids=" ".join)
def test_every_registry_entry_imports_builds_its_parser_and_documents_every_option(path):
    parser = cli.build_parser(list(path))
    chosen = parser
    for name in path:
        sub = next(a for a in chosen._actions if isinstance(a, argparse._SubParsersAction))
        chosen = sub.choices[name]
    assert chosen.get_default("_run") is not None, path
    undocumented = [
        (" ".join(p), a.option_strings or a.dest)
        for p, parser_ in _parsers(chosen, path)
        for a in parser_._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        and a.help != argparse.SUPPRESS
        and not (a.help or "").strip()
    ]
    assert undocumented == []


def test_only_the_chosen_command_is_built():
    parser = cli.build_parser(["ledger", "x"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["ledger"].get_default("_run") is not None
    assert sub.choices["run"].get_default("_run") is None  # listed for --help, never imported


def test_bench_help_lists_its_benchmarks_without_importing_them():
    code = (
        "import sys\n"
        "from fedrlhf_secure.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fedrlhf_secure.bench.') or m == 'torch')\n"
        "assert loaded == [], loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "round" in proc.stdout and "aggregation" in proc.stdout
