"""kind: rlhf with tiny from-scratch models (no network, seconds): FFA-LoRA, on-policy DPO, data formats, BYOD."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from imdb_fixtures import write_imdb_parquet

from fedrlhf_secure.cli import main
from fedrlhf_secure.config import build_config
from fedrlhf_secure.errors import InputError
from fedrlhf_secure.federation.participant import build_task
from fedrlhf_secure.tasks.base import FitConfig
from fedrlhf_secure.tasks.rlhf.data import explicit_prompt, partition
from fedrlhf_secure.tasks.rlhf.lora import lora_factors, product_error

TINY = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "vocab_size": 400}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def imdb_task_mapping(**overrides) -> dict:
    task = {
        "kind": "rlhf",
        "data": "imdb",
        "clients": 2,
        "reviews_per_client": 60,
        "public_reviews": 100,
        "prompt_tokens": 4,
        "model": "tiny",
        "tiny": TINY,
        "lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        "trainer_args": {"per_device_train_batch_size": 2, "max_length": 32, "learning_rate": 0.05},
        "prompts_per_round": 4,
        "num_generations": 2,
        "max_new_tokens": 6,
        "lambdas": [0.8, 0.4],
        "preferences": ["length", "topic"],
        "eval_prompts": 4,
        "eval_classifier_reviews": 100,
        "samples_per_client": 2,
        "torch_threads": 1,
    }
    task.update(overrides)
    return task


def tiny_imdb(tmp_path, **overrides):
    data = write_imdb_parquet(tmp_path / "data", n_train=300, n_test=200)
    config = build_config({"seed": 3, "task": imdb_task_mapping(**overrides)})
    return build_task(config, data), data


def test_naive_lora_averaging_misses_the_mean_update_and_ffa_lora_hits_it_exactly():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(4, 32)) for _ in range(5)]
    b = [rng.normal(size=(32, 4)) for _ in range(5)]
    naive = product_error(a, b)["naive"]
    shared_a = [a[0]] * 5
    both = product_error(shared_a, b, weights=np.arange(1, 6))
    assert naive > 0.5  # mean(B)·mean(A) is far from mean(B·A) for independent factors
    assert both["ffa"] < 1e-12  # with A shared, mean(B)·A is mean(B·A) under any weights
    assert "ffa" not in product_error(a, b)  # undefined when clients' A differ


def test_ffa_lora_builds_the_same_frozen_a_everywhere_and_federates_only_b(tmp_path, cache_dir):
    task, _ = tiny_imdb(tmp_path)
    spec = task.shared_spec()
    assert spec.names() and all(".lora_B." in n for n in spec.names())
    assert all(np.all(v == 0) for v in task.initial_shared().values())  # B = 0: round 0 is the base model
    task2, _ = tiny_imdb(tmp_path)
    f1, f2 = lora_factors(task.policy()), lora_factors(task2.policy())
    assert f1.keys() == f2.keys()
    assert all(np.array_equal(f1[k][0], f2[k][0]) for k in f1)  # the same seeded A in two builds


def test_naive_scheme_federates_a_and_b(tmp_path, cache_dir):
    task, _ = tiny_imdb(tmp_path, lora={"rank": 2, "alpha": 4, "targets": ["q_proj"], "scheme": "naive"})
    names = task.shared_spec().names()
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)


def test_an_on_policy_dpo_round_trains_b_on_the_clients_own_picked_pairs_and_leaves_a_frozen(tmp_path, cache_dir):
    task, _ = tiny_imdb(tmp_path)
    client = task.make_client(0)
    a_before = {k: v[0].copy() for k, v in lora_factors(task.policy()).items()}
    result = client.fit(task.initial_shared(), FitConfig(round=1, local_epochs=1, seed=7))
    assert set(result.delta) == set(task.shared_spec().names())
    assert max(float(np.abs(v).max()) for v in result.delta.values()) > 0
    assert result.metrics["pairs"] >= 1 and result.metrics["dpo_steps"] >= 1
    assert result.num_examples == 60
    a_after = {k: v[0] for k, v in lora_factors(task.policy()).items()}
    assert all(np.array_equal(a_before[k], a_after[k]) for k in a_before)
    assert "ref" not in task.policy().model.peft_config  # TRL's per-round reference adapter is dropped after the round
    metrics = client.evaluate({k: task.initial_shared()[k] + result.delta[k] for k in result.delta})
    assert metrics["generations"] == 4 and 0 <= metrics["positive_rate"] <= 1
    assert metrics["kl_to_base"] != 0.0
    assert "shaped_reward_client0" in metrics and len(metrics["samples"]) == 2


def test_an_unknown_trl_field_in_trainer_args_is_refused_by_name(tmp_path, cache_dir):
    task, _ = tiny_imdb(tmp_path, trainer_args={"not_a_dpo_field": 1})
    with pytest.raises(InputError, match="not_a_dpo_field is not a field of TRL's DPOConfig"):
        task.make_client(0).fit(task.initial_shared(), FitConfig(round=1, local_epochs=1, seed=1))


def test_audit_records_are_the_clients_reviews_and_with_records_removes_them(tmp_path, cache_dir):
    task, _ = tiny_imdb(tmp_path)
    records = task.training_records()
    assert records.shape == (120, 3)
    assert set(records[:, 0].tolist()) == {0, 1}
    keep = np.ones(len(records), bool)
    keep[:10] = False
    sub = task.with_records(keep)
    assert sub.make_client(0).num_examples() == 50
    assert np.array_equal(sub.training_records(), records)
    scores = task.record_scores(task.initial_shared(), records[:3])
    assert scores.shape == (3,) and np.all(np.isfinite(scores))


def test_implicit_preference_rows_split_at_a_word_boundary():
    assert explicit_prompt("The film was great fun", "The film was dull") == ("The film was", " great fun", " dull")


def test_dirichlet_and_user_partitions_deal_every_row_once():
    cfg = build_config({"task": {"kind": "rlhf", "clients": 4, "partition": "dirichlet", "dirichlet_alpha": 0.3}}).task.params
    parts, names = partition(200, cfg, None, seed=1)
    assert len(parts) == 4 and sorted(np.concatenate(parts).tolist()) == list(range(200))
    assert max(len(p) for p in parts) > 2 * min(len(p) for p in parts)  # α = 0.3: uneven sizes
    cfg = build_config({"task": {"kind": "rlhf", "partition": "user", "user_column": "annotator"}}).task.params
    parts, names = partition(5, cfg, ["b", "a", "b", "c", "a"], seed=1)
    assert names == ["a", "b", "c"] and [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]


def write_preference_jsonl(path: Path, users=("ann", "bob", "cy"), per_user: int = 12, seed: int = 0) -> Path:
    """A TRL preference file with an annotator column: each user prefers a different word."""
    rng = np.random.default_rng(seed)
    liked = {"ann": "sunny", "bob": "quiet", "cy": "bright"}
    rows = []
    for u in users:
        for i in range(per_user):
            subject = str(rng.choice(["the room", "the day", "the street", "my garden"]))
            rows.append(
                {
                    "prompt": f"Describe {subject}:",
                    "chosen": f" It was {liked[u]} and calm, number {i}.",
                    "rejected": f" It was grey and loud, number {i}.",
                    "annotator": u,
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_jsonl_preference_file_with_an_annotator_column_runs_as_federated_dpo_across_the_annotators(tmp_path, cache_dir):
    data = write_preference_jsonl(tmp_path / "prefs.jsonl")
    task = {
        "kind": "rlhf",
        "data": str(data),
        "user_column": "annotator",
        "partition": "user",
        "model": "tiny",
        "tiny": TINY,
        "lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
        "trainer": "dpo",
        "on_policy": False,
        "trainer_args": {"per_device_train_batch_size": 4, "max_length": 32, "learning_rate": 0.05},
        "eval_fraction": 0.25,
        "eval_prompts": 3,
        "max_new_tokens": 4,
        "torch_threads": 1,
    }
    cfg = tmp_path / "byod.yaml"
    import yaml

    cfg.write_text(
        yaml.safe_dump(
            {"seed": 0, "task": task, "federation": {"rounds": 2, "local_epochs": 1, "min_clients": 3}, "aggregation": {"kind": "plain"}}
        )
    )
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_clients"] == 3  # one client per annotator
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients_aggregated"] == 3
    assert 0.0 <= rows[-1]["pref_accuracy_mean"] <= 1.0
    assert rows[-1]["pref_pairs_mean"] == 3  # 25% of 12 rows held out per annotator


def test_on_policy_dpo_on_your_own_data_is_refused_with_the_way_out(tmp_path, cache_dir):
    data = write_preference_jsonl(tmp_path / "prefs.jsonl")
    config = build_config({"task": {"kind": "rlhf", "data": str(data), "model": "tiny", "tiny": TINY}})
    with pytest.raises(InputError, match="on_policy: false"):
        build_task(config, None)


@pytest.mark.parametrize("reward", ["shaped", "model"])
def test_a_grpo_round_with_the_shaped_reward_or_the_clients_own_reward_model_trains_b(tmp_path, cache_dir, reward):
    task, _ = tiny_imdb(
        tmp_path,
        trainer="grpo",
        reward=reward,
        trainer_args={"learning_rate": 0.05, "per_device_train_batch_size": 4},
        reward_args={"per_device_train_batch_size": 8, "max_length": 32, "num_train_epochs": 1},
    )
    client = task.make_client(1)
    result = client.fit(task.initial_shared(), FitConfig(round=1, local_epochs=1, seed=5))
    assert result.metrics["grpo_steps"] == 2  # 4 prompts × 2 generations, 4 completions per step
    assert max(float(np.abs(v).max()) for v in result.delta.values()) > 0
    if reward == "model":
        assert result.metrics["rm_steps"] >= 1 and 0.0 <= result.metrics["rm_accuracy"] <= 1.0
        assert client.reward_model is not None  # kept on the client for the next rounds


@pytest.mark.parametrize("scheme", ["naive", "ffa"])
def test_two_clients_trained_lora_factors_average_exactly_only_under_ffa(tmp_path, cache_dir, scheme):
    """Trained adapters, not random ones: after one on-policy DPO round of two clients from the same
    global model, naive factor averaging misses the mean update B·A; FFA-LoRA's shared frozen A hits it."""
    task, _ = tiny_imdb(tmp_path, lora={"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "scheme": scheme})
    factors = []
    for cid in (0, 1):
        client = task.make_client(cid)
        result = client.fit(task.initial_shared(), FitConfig(round=1, local_epochs=1, seed=11 + cid))
        assert result.metrics["dpo_steps"] >= 1
        factors.append(lora_factors(task.policy()))
    errors = [product_error([f[m][0] for f in factors], [f[m][1] for f in factors]) for m in factors[0]]
    if scheme == "naive":
        assert max(e["naive"] for e in errors) > 1e-3
    else:
        assert max(e["ffa"] for e in errors) < 1e-12


class _BiasedJudge:
    """A judge whose P(positive) is 0.55 + 0.1·label: above 0.5 for every text, still ranking positives first."""

    def __init__(self, labels_by_text):
        self.labels = labels_by_text

    def prob_positive(self, texts):
        return np.asarray([0.55 + 0.1 * self.labels[t] for t in texts])


def test_the_length_calibrated_judge_threshold_undoes_a_positive_bias_that_0_5_keeps(tmp_path, cache_dir):
    from fedrlhf_secure.tasks.rlhf.data import token_prefix
    from fedrlhf_secure.tasks.rlhf.task import calibrate_judge

    task, _ = tiny_imdb(tmp_path)
    reviews = task.split.judge_check
    cfg = task.config
    tok = task.tokenizer
    labels = {}
    for (p, c), y in zip(token_prefix(list(reviews.text), tok, cfg.prompt_tokens), reviews.label, strict=True):
        if p and c.strip():
            labels[tok.decode(tok(c, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens])] = int(y)
    judge = _BiasedJudge(labels)
    threshold, info = calibrate_judge(judge, reviews, tok, cfg)
    assert info["rate_at_0.5"] == 1.0  # the biased judge at 0.5 calls everything positive
    assert 0.55 <= threshold < 0.65
    assert info["rate_at_threshold"] == pytest.approx(info["true_positive_rate"], abs=0.02)
    assert info["accuracy_at_threshold"] > 0.97
    fixed, fixed_info = calibrate_judge(judge, reviews, tok, replace(cfg, judge_calibration="fixed"))
    assert fixed == 0.5 and fixed_info["rate_at_threshold"] == 1.0
