"""JSON Schemas of the run directory's files (``metrics.jsonl`` lines and ``summary.json``).

They document every key a run writes (units, which are pooled and which are means over clients,
what disappears under DP) and ``tests/test_run_schemas.py`` validates real run output against them
with a strict parser. Only the paths live here; validating needs ``jsonschema`` (a test dependency).
"""

from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
METRICS_ROW = SCHEMA_DIR / "metrics_row.schema.json"
SUMMARY = SCHEMA_DIR / "summary.schema.json"
