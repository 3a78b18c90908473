"""Bring your own data exactly as docs/rlhf.md shows it: the jsonl row format and the YAML config
printed there (secure aggregation included) run as a federated DPO across the file's annotators.
Only the model (tiny, no network) and the file's path are swapped in, and SecAgg's bounds are set as
the docs advise for three annotators."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedrlhf_secure.cli import main
from fedrlhf_secure.rundir import load_tensors

DOCS = Path(__file__).resolve().parents[1] / "docs" / "rlhf.md"
TINY = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "vocab_size": 400}


def documented_byod() -> tuple[dict, dict]:
    """(the documented example row, the documented config), read from docs/rlhf.md."""
    text = DOCS.read_text()
    section = text[text.index("**Bring your own data**") :]
    row = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)\n```", section, re.S).group(1))
    return row, config


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_documented_jsonl_and_config_run_as_secure_federated_dpo_across_the_annotators(tmp_path, cache_dir):
    row, config = documented_byod()
    assert set(row) == {"prompt", "chosen", "rejected", "annotator"}
    rng = np.random.default_rng(0)
    liked = {"ann": "sunny", "bob": "quiet", "cy": "bright"}
    rows = [
        {**row, "prompt": f"Describe {rng.choice(['the day', 'the room'])} {i}:", "chosen": f" It was {w} and calm.", "annotator": u}
        for u, w in liked.items()
        for i in range(12)
    ]
    data = tmp_path / "my_prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert config["task"]["data"] == "my_prefs.jsonl" and config["aggregation"]["kind"] == "secagg"
    config["task"].update(data=str(data), model="tiny", tiny=TINY, eval_prompts=3, max_new_tokens=4, torch_threads=1)
    config["task"]["trainer_args"].update(per_device_train_batch_size=4, max_length=32)
    config["federation"]["rounds"] = 2
    config["aggregation"].update(colluders=0.0, dropouts=0.0)  # the documented advice for 3 annotators
    cfg = tmp_path / "byod.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_clients"] == 3 and summary["aggregation"] == "secagg"  # one client per annotator, masked
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_aggregated"] for m in metrics] == [3, 3]
    assert metrics[-1]["pref_pairs_mean"] == 1  # documented eval_fraction default 0.1 of 12 rows per annotator
    assert 0.0 <= metrics[-1]["pref_accuracy_mean"] <= 1.0
    model = load_tensors(run / "model.safetensors")
    assert all(".lora_B." in k for k in model) and max(float(np.abs(v).max()) for v in model.values()) > 0
