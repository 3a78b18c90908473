"""Print docs/dp.md's table: ε per client under replace-one, ours against Google's dp_accounting.

For a preset at a budget, every client's DP-SGD parameters are what a run would use (the record-level
plan's b = ceil(n / batch_size), q = 1/b, steps = rounds × local epochs × int(1/q), σ calibrated by
our accountant); the table gives, per distinct b, the clients, σ, our ε (prv and rdp, replace-one)
and dp_accounting's PLD ε under REPLACE_ONE, and what main's σ (calibrated under add/remove-one)
really cost under replace-one. Needs dp-accounting (the test extra) and the data directory.

    PYTHONPATH=$PWD python tools/dp_relation_table.py configs/movielens-silos.yaml --epsilon 8
    PYTHONPATH=$PWD python tools/dp_relation_table.py configs/movielens.yaml --epsilon 8 --set privacy.mode=record
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from fedrlhf_secure.config import load_config
from fedrlhf_secure.federation.engine import build_task, resolve_data_dir
from fedrlhf_secure.privacy.accountants import GaussianAccountant, GaussianRelease
from fedrlhf_secure.privacy.calibration import gaussian_noise_multiplier
from fedrlhf_secure.privacy.record_level import steps_per_epoch


def pld(sigma: float, q: float, steps: int, delta: float, relation) -> float:
    acc = pld_privacy_accountant.PLDAccountant(relation)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--epsilon", type=float, required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    config = load_config(args.config, [*args.set, f"privacy.epsilon={args.epsilon}"])
    p, fed = config.privacy, config.federation
    task = build_task(config, resolve_data_dir(None))
    sizes = {c: task.make_client(c).num_examples() for c in task.client_ids()}
    buckets: dict[int, list[int]] = defaultdict(list)
    for c, n in sizes.items():
        buckets[max(1, math.ceil(n / p.batch_size))].append(c)
    replace = GaussianAccountant(p.accountant)
    rdp = GaussianAccountant("rdp")
    add_remove = GaussianAccountant(p.accountant, relation="add-remove")
    print(f"{args.config} ε={args.epsilon} δ={p.delta} batch={p.batch_size} rounds={fed.rounds} epochs={fed.local_epochs}")
    head = ["b (batches/epoch)", "clients", "n", "steps", "σ (replace-one)", "ε ours prv", "ε ours rdp", "ε dp_accounting PLD"]
    head += ["main's σ (add/remove)", "its real ε"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    worst = 0.0
    for b in sorted(buckets):
        cids = buckets[b]
        q, steps = 1.0 / b, fed.rounds * fed.local_epochs * steps_per_epoch(b)
        sigma = gaussian_noise_multiplier(replace, args.epsilon, p.delta, q, steps)
        ours = replace.epsilon([GaussianRelease(sigma, q, steps)], p.delta)
        ours_rdp = rdp.epsilon([GaussianRelease(sigma, q, steps)], p.delta)
        ref = pld(sigma, q, steps, p.delta, dp_accounting.NeighboringRelation.REPLACE_ONE)
        old_sigma = gaussian_noise_multiplier(add_remove, args.epsilon, p.delta, q, fed.rounds * fed.local_epochs * b)
        old_real = pld(old_sigma, q, fed.rounds * fed.local_epochs * b, p.delta, dp_accounting.NeighboringRelation.REPLACE_ONE)
        worst = max(worst, abs(ours - ref))
        ns = sorted(sizes[c] for c in cids)
        label = ", ".join(map(str, cids)) if len(cids) <= 4 else f"{len(cids)} clients"
        cells = [b, label, f"{ns[0]}–{ns[-1]}", steps, f"{sigma:.4f}", f"{ours:.3f}", f"{ours_rdp:.3f}", f"{ref:.3f}"]
        cells += [f"{old_sigma:.4f}", f"{old_real:.3f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"max |ε ours prv - ε dp_accounting| = {worst:.4f} over {len(buckets)} sample rates, {len(sizes)} clients")


if __name__ == "__main__":
    main()
