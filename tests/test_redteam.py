"""``fedrlhf redteam``: the suite's verdicts on the code as it stands, its report, and its exit codes.

The table :data:`EXPECTED` is the suite's verdict for each configuration on the current code. Rows
marked in :data:`FLIPS` are attacks that recover today and must be refused once the named defence
lands (issue 12: SecAgg consistency round + bounds + signatures by default, CKKS masks); whoever
merges a defence changes its rows to ``refused`` here, and the test then holds the defence to it.
The node branch (node-side policy, robust server loop) is merged: its rows (``dictate-*``,
``node-malformed-frames``) recovered on main before it (see the issue 12 report) and are refused now.
Every attack also has a test against a deliberately weakened component (tests/test_redteam_weakened.py),
so no attack is a check that cannot fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from attacks.redteam import SCHEMA_PATH
from fedrlhf_secure import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "movielens.yaml")
SMALL = ["--clients", "10", "--dim", "16"]

SECAGG_ONLY = ("secagg-overlapping-lists", "secagg-split-view", "secagg-key-substitution", "secagg-grinding")
CKKS_ONLY = ("ckks-single-ciphertext", "ckks-subset-aggregate")
NO_DP = ("dictate-dp-off", "dictate-epsilon")  # configs/movielens.yaml runs without DP: nothing weaker to dictate

EXPECTED: dict[str, dict[str, str]] = {
    "secagg": {
        "passive-server": "refused",
        "dictate-plain": "refused",
        "dictate-threshold-1": "refused",
        "dictate-colluder-bound": "refused",
        "dictate-signatures-off": "skipped",  # signatures are always on: no config turns them off
        "dictate-identity-dir": "skipped",  # identities come from the node's keys dir: no config key names them
        **dict.fromkeys(NO_DP, "skipped"),
        "secagg-overlapping-lists": "skipped",  # the unmask request carries one signed set, no per-client lists
        "secagg-split-view": "refused",
        "secagg-key-substitution": "refused",
        "secagg-grinding": "refused",
        **dict.fromkeys(CKKS_ONLY, "skipped"),
        "secagg-replay": "refused",
        "node-malformed-frames": "refused",
    },
    "ckks": {
        "passive-server": "refused",
        "dictate-plain": "refused",
        "dictate-threshold-1": "refused",
        "dictate-colluder-bound": "skipped",
        "dictate-signatures-off": "skipped",
        "dictate-identity-dir": "skipped",
        **dict.fromkeys(NO_DP, "skipped"),
        **dict.fromkeys(SECAGG_ONLY, "skipped"),
        "ckks-single-ciphertext": "refused",
        "ckks-subset-aggregate": "refused",
        "ckks-replay": "refused",
        "node-malformed-frames": "refused",
    },
}

FLIPS: dict[str, str] = {}
"""Rows that recover on the code this suite was written against, and the defence that must refuse them."""


def _run(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    code = cli.main(["redteam", CONFIG, "--out", str(tmp_path), *args])
    path = tmp_path / "redteam.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_suite_verdicts_on_the_current_code_match_the_table(kind, tmp_path, capsys, monkeypatch):
    from attacks.redteam import malformed

    monkeypatch.setattr(malformed, "MAX_CASES_PER_OP", 10)  # the first wrong types of each header; the CLI runs 48
    code, report = _run(tmp_path, "--set", f"aggregation.kind={kind}", *SMALL)
    jsonschema.validate(report, _schema())
    got = {a["name"]: a["verdict"] for a in report["attacks"]}
    assert got == EXPECTED[kind]
    recovered = [n for n, v in got.items() if v == "recovered"]
    assert set(recovered) <= set(FLIPS), "a row recovers that no defence is expected to flip"
    assert code == (1 if recovered else 0)
    assert report["verdict"] == ("fail" if recovered else "pass")
    assert report["counts"]["recovered"] == len(recovered)
    table = capsys.readouterr().out
    for name in got:
        assert name in table
    # every recovery carries its evidence: a reconstruction within the protocol's own precision, or what was accepted
    rows = {a["name"]: a for a in report["attacks"]}
    for name in recovered:
        ev = rows[name]["evidence"]
        if "max_abs_error" in ev:
            assert ev["max_abs_error"] <= ev["tolerance"]
        elif name.startswith("dictate-"):
            assert ev["node_runs"]["aggregation"]["kind"] == ev["asked"]["aggregation"]["kind"]
    if kind == "secagg":
        split = rows["secagg-split-view"]["evidence"]
        # n=10 under γ = δ = 0.1: k=6, t=4 (fedrlhf secagg-params); every colluder count up to c_max is refused
        assert (split["n"], split["k"], split["t"]) == (10, 6, 4)
        assert all(trial["recovered"] is False for trial in split["trials"].values())
    for name in ("dictate-plain", "dictate-threshold-1"):  # refused by the node's policy, naming the field
        assert "node policy refuses aggregation." in rows[name]["evidence"]["refusal"]


def test_the_json_is_strict_and_the_schema_rejects_a_refusal_that_recovered(tmp_path):
    code, report = _run(tmp_path, "--set", "aggregation.kind=secagg", "--only", "overlap,replay", *SMALL)
    assert code == 0 and report["verdict"] == "pass"
    text = (tmp_path / "redteam.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    jsonschema.validate(report, _schema())
    forged = json.loads(text)
    # a "refused" row whose evidence says recovered (overlap is 'skipped' on the merged protocol, without evidence)
    refused = next(i for i, a in enumerate(forged["attacks"]) if a["verdict"] == "refused")
    forged["attacks"][refused]["evidence"]["recovered"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(forged, _schema())
    forged = json.loads(text)
    forged["attacks"][0]["verdict"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(forged, _schema())


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-config.yaml"], "config file not found"),
        ([CONFIG, "--set", "aggregation.kind=rot13"], "unknown aggregation kind"),
        ([CONFIG, "--only", "dictation,telepathy"], "unknown suite entries ['telepathy']"),
        ([CONFIG, "--clients", "2"], "--clients must be >= 3"),
        ([CONFIG, "--dim", "0"], "--dim must be in"),
    ],
)
def test_bad_input_exits_2_naming_what_was_wrong(args, message, tmp_path, capsys):
    assert cli.main(["redteam", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "redteam.json").exists()


def test_round_size_comes_from_the_config_or_the_option():
    from attacks.redteam import round_size
    from fedrlhf_secure.config import load_config

    tiny = load_config(REPO / "configs" / "movielens-tiny.yaml")
    assert round_size(tiny, None, None) == (40, f"task.num_clients of {tiny.source}")
    assert round_size(tiny, 12, None) == (12, "--clients")
    half = load_config(REPO / "configs" / "movielens-tiny.yaml", ["federation.fraction=0.5"])
    assert round_size(half, None, None)[0] == 20


@pytest.mark.slow
def test_a_dp_config_adds_the_dp_dictation_rows_and_the_node_policy_refuses_them(tmp_path):
    dp = ["--set", "privacy.mode=record", "--set", "privacy.epsilon=8", "--set", "privacy.delta=1e-5"]
    code, report = _run(tmp_path, "--set", "aggregation.kind=secagg", *dp, "--only", "dictation", *SMALL)
    rows = {a["name"]: a for a in report["attacks"]}
    assert code == 0 and rows["dictate-epsilon"]["evidence"]["asked"]["epsilon"] == 8000.0
    for name in ("dictate-dp-off", "dictate-epsilon"):
        assert rows[name]["verdict"] == "refused" and "node policy refuses privacy." in rows[name]["evidence"]["refusal"]
