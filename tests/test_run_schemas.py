"""summary.json and metrics.jsonl validate against the package's JSON Schemas, parsed strictly,
for a plain run and a record-level DP run on generated MovieLens data."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from movielens_fixtures import write_ml100k
from referencing import Registry, Resource

from fedrlhf_secure.cli import main
from fedrlhf_secure.schemas import METRICS_ROW, SUMMARY


def strict(text: str):
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def validators():
    schemas = {p.name: json.loads(p.read_text()) for p in (METRICS_ROW, SUMMARY)}
    registry = Registry().with_resources((name, Resource.from_contents(s)) for name, s in schemas.items())
    cls = jsonschema.validators.validator_for(schemas[SUMMARY.name])
    cls.check_schema(schemas[SUMMARY.name])
    cls.check_schema(schemas[METRICS_ROW.name])
    return cls(schemas[METRICS_ROW.name], registry=registry), cls(schemas[SUMMARY.name], registry=registry)


@pytest.mark.parametrize("privacy", [[], ["--set", "privacy.mode=record", "--set", "privacy.noise_multiplier=1.0"]], ids=["plain", "dp"])
def test_a_runs_files_validate_against_the_schemas(tmp_path: Path, privacy):
    data = tmp_path / "data"
    write_ml100k(data, n_users=12, n_items=40, per_user=20)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "seed: 0\ntask: {kind: movielens, split: u1, user_dim: 4, item_dim: 4, genre_dim: 2, hidden_dim: 8, personal_epochs: 1}\n"
        "federation: {rounds: 2, local_epochs: 1, min_clients: 2}\naggregation: {kind: plain}\nprivacy: {mode: none}\n"
        "baselines: [majority]\n"
    )
    assert main(["run", str(cfg), "--data-dir", str(data), "--out", str(tmp_path / "runs"), "--no-progress", *privacy]) == 0
    run = tmp_path / "runs" / "latest"
    row_v, summary_v = validators()
    rows = [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        row_v.validate(row)
    summary = strict((run / "summary.json").read_text())
    summary_v.validate(summary)
    # the schema is not vacuous: a NaN-free but mistyped file fails it
    with pytest.raises(jsonschema.ValidationError):
        summary_v.validate({**summary, "rounds_completed": "two"})
    with pytest.raises(jsonschema.ValidationError):
        row_v.validate({**rows[0], "round": -1})
