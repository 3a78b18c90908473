"""Configs: unknown keys and wrong types fail naming the key and the file; presets validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import toy_task  # noqa: F401  (registers the toy task)

from fedrlhf_secure.config import load_config
from fedrlhf_secure.configtypes import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = _write(tmp_path, "task: {kind: toy}\nfederation: {rounds: 2, local_epoch: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "federation.local_epoch" in str(err.value)


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    p = _write(tmp_path, "task: {kind: toy}\nfederation: {rounds: three}\n")
    with pytest.raises(ConfigError, match=r"federation.rounds: expected an integer, got 'three'"):
        load_config(p)


def test_unknown_plugin_kind_lists_the_known_ones(tmp_path):
    p = _write(tmp_path, "task: {kind: toy}\naggregation: {kind: magic}\n")
    with pytest.raises(ConfigError, match=r"aggregation.kind: unknown aggregation kind 'magic'.*plain"):
        load_config(p)


def test_out_of_range_values_are_refused_with_the_key(tmp_path):
    p = _write(tmp_path, "task: {kind: toy}\nfederation: {fraction: 1.5}\n")
    with pytest.raises(ConfigError, match=r"federation.fraction must be in \(0, 1\], got 1.5"):
        load_config(p)


def test_overrides_apply_typed_values(tmp_path):
    p = _write(tmp_path, "task: {kind: toy}\n")
    cfg = load_config(p, ["federation.rounds=7", "task.lr=0.25", "privacy.delta=1e-6"])
    assert cfg.federation.rounds == 7 and cfg.task.params.lr == 0.25 and cfg.privacy.delta == 1e-6


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_validates(path):
    load_config(path)
