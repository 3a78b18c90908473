"""``fedrlhf`` maps every failure once to an exit status: 2 bad input, 1 refused/failed, 130 stopped.

Each case runs the CLI in process (``fedrlhf_secure.cli.main``) and as a real process
(``python -m fedrlhf_secure.cli``), where a traceback would show; known config errors must end in
one ``fedrlhf CMD: error: ...`` line, never in a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "movielens-tiny.yaml"


def cli_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrlhf_secure.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture()
def fixture_data(tmp_path: Path) -> Path:
    write_ml100k(tmp_path / "data", n_users=12, n_items=40, per_user=20)
    return tmp_path / "data"


def small_config(tmp_path: Path, rounds: int = 2) -> Path:
    """A MovieLens config over every user of the 12-user fixture."""
    path = tmp_path / "small.yaml"
    path.write_text(
        "seed: 0\n"
        "task: {kind: movielens, split: u1, user_dim: 4, item_dim: 4, genre_dim: 2, hidden_dim: 8, personal_epochs: 1}\n"
        f"federation: {{rounds: {rounds}, local_epochs: 1, min_clients: 2}}\n"
        "aggregation: {kind: plain}\n"
        "privacy: {mode: none}\n",
        encoding="utf-8",
    )
    return path


def test_a_missing_config_file_is_bad_input_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrlhf run: error: ") and str(missing) in err
    proc = cli_process("run", str(missing))
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_set_key_is_bad_input(capsys):
    assert main(["run", str(TINY), "--set", "federation.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    proc = cli_process("run", str(TINY), "--set", "federation.no_such_key=1")
    assert proc.returncode == 2 and "no_such_key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, key",
    [("task.num_clients=2000", "task.num_clients"), ("federation.min_clients=100", "federation.min_clients")],
    ids=["more-clients-than-users", "quorum-above-the-clients"],
)
def test_a_config_the_data_cannot_satisfy_is_bad_input_without_a_traceback(tmp_path, fixture_data, capsys, override, key):
    args = ["run", str(small_config(tmp_path)), "--data-dir", str(fixture_data), "--out", str(tmp_path / "runs"), "--no-progress"]
    args += ["--set", override]
    proc = cli_process(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and key in proc.stderr
    assert main(args) == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no half-written run directory


def test_sigterm_stops_a_run_like_ctrl_c_keeping_its_resumable_directory(tmp_path, fixture_data):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedrlhf_secure.cli",
            "run",
            str(small_config(tmp_path, rounds=500)),
            "--data-dir",
            str(fixture_data),
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        # wait for the first checkpoint: from then on the run is resumable
        while not list(out.glob("*.partial/checkpoint/state.json")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 15 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "fedrlhf run: interrupted by SIGTERM" in err and "Traceback" not in err
    assert "--resume" in err and list(out.glob("*.partial"))


OWN_PACKAGES = ("fedrlhf_secure", "aggregation", "attacks")


def _all_modules():
    for package_name in OWN_PACKAGES:
        package = importlib.import_module(package_name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            try:
                yield importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] in OWN_PACKAGES:
                    raise
                continue  # an optional third-party dependency is not installed


def test_every_exception_class_belongs_to_one_of_the_two_error_families():
    from aggregation.errors import AggregationError
    from fedrlhf_secure.errors import FedRLHFError

    outside: set[str] = set()
    for module in _all_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, BaseException):
                continue
            if cls.__name__.startswith("_"):
                continue  # private control flow that never leaves its module
            if not issubclass(cls, (FedRLHFError, AggregationError)):
                outside.add(f"{cls.__module__}.{cls.__qualname__}")
    assert outside == set(), "exception classes outside FedRLHFError / AggregationError"


def test_every_family_has_its_exit_status():
    from aggregation.errors import AggregationConfigError, AggregationError
    from fedrlhf_secure import errors

    assert errors.exit_status(errors.InputError("x")) == 2
    assert errors.exit_status(errors.ClaimRefuted("x")) == 1
    assert errors.exit_status(errors.PrivacyError("x")) == 1
    assert errors.exit_status(errors.RunFailed("x")) == 1
    assert errors.exit_status(errors.Interrupted("x")) == 130
    assert errors.exit_status(KeyboardInterrupt()) == 130
    assert errors.exit_status(AggregationError("x")) == 1
    assert errors.exit_status(AggregationConfigError("x")) == 2
    assert errors.exit_status(RuntimeError("a bug")) is None


def test_a_bug_still_shows_its_traceback(monkeypatch):
    from fedrlhf_secure.commands import ledger

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ledger, "run", broken)  # the registry resolves "module:run" when the command is chosen
    with pytest.raises(RuntimeError, match="a bug"):
        main(["ledger", os.devnull])
