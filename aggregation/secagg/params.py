"""Choosing the SecAgg+ degree k, Shamir threshold t and signature quorum q from stated bounds.

The deployment states two fractions of a round's n participants:

* ``colluders`` γ: up to C = ceil(γ n) clients work with the server (which is itself malicious:
  it may lie about who survived, drop messages, and substitute anything it routes);
* ``dropouts`` δ: up to D = ceil(δ n) clients drop out during the round (chosen independently of
  the masking graph, as in Bell et al.'s model: crashes, not a server that hand-picks victims —
  a server that drops clients on purpose can always abort a round, but never learn more).

and a failure exponent σ (default 40). Following Bell et al. (CCS 2020, "Secure single-server
aggregation with (poly)logarithmic overhead", §3.2 / Definition 3.1 of a "good" graph and
Lemma 3.4 for the random Harary graph), the graph of degree k over a uniformly random relabelling
of the participants (:mod:`.graph`) must, except with probability 2^-σ each, satisfy:

1. **privacy** — every honest client has fewer than ``t`` colluding neighbours, so colluders alone
   never hold t shares of any honest client's secrets. With the consistency round (below) every
   honest neighbour of a client reveals the same kind of share for it (all "survived" or all
   "dropped"), so this is the whole condition: t > c_i for all honest i. Without the consistency
   round a lying server would also need ``2t > k + c_i`` (split view; Bonawitz et al. CCS 2017 §6).
2. **correctness** — every client keeps at least ``t`` surviving neighbours, so every needed secret
   can be rebuilt: ``k - (dropped neighbours) >= t``.
3. **no partial sums** (Bell et al., Def. 3.1 (1)) — the honest survivors stay connected once the
   colluders and dropouts are removed, so the server cannot learn the sum of a strict subset of
   them. H(k, n) with offsets ±1..±⌊k/2⌋ only falls apart if the removed clients cover ⌊k/2⌋
   consecutive ring positions (twice); we bound the probability of even one such run.

For a client, its k neighbours are a uniformly random k-subset of the other n - 1 (the relabelling
is uniform and independent of who colludes or drops), so the number of colluding or dropped
neighbours is exactly hypergeometric. Each probability below is that exact tail (integer
arithmetic, then one log2), times n for a union bound over clients.

The consistency round (Bonawitz et al. 2017, Fig. 4 "Round 4 ConsistencyCheck") needs a quorum
of signatures on the survivor set large enough that two different sets cannot both collect one:
q = floor((n + C) / 2) + 1 (two quorums share more than C signers, so an honest client would have
signed both, which it never does); the round needs q <= n - D signers to complete.

The smallest k (even below n - 1, so the graph is regular, else the complete graph k = n - 1 of
classic SecAgg) for which some t meets all three bounds is chosen; among the t that do, the one
with the largest margin on both sides (the middle of the best range).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import AggregationConfigError

DEFAULT_COLLUDERS = 0.1
DEFAULT_DROPOUTS = 0.1
DEFAULT_FAILURE_EXPONENT = 40


class ParameterError(AggregationConfigError):
    """No (k, t) meets the stated colluder/dropout bounds at this n (bad input: the message names the numbers)."""


@dataclass(frozen=True)
class SecAggParameters:
    """One round's masking parameters and the failure probabilities they carry (log2; -inf = exactly 0)."""

    n: int
    colluders: int
    """C = ceil(γ n): colluding clients the parameters are safe against."""
    dropouts: int
    """D = ceil(δ n): dropouts the round survives."""
    k: int
    t: int
    quorum: int
    """Signatures on the survivor set a client needs before it reveals any share."""
    log2_privacy_failure: float
    """log2 P[some honest client has >= t colluding neighbours] (union bound)."""
    log2_dropout_failure: float
    """log2 P[some client keeps fewer than t surviving neighbours] (union bound)."""
    log2_partition_failure: float
    """log2 P[the honest survivors' graph falls apart] (bound: a run of floor(k/2) removed ring positions)."""
    failure_exponent: int

    @property
    def log2_failure(self) -> float:
        return max(self.log2_privacy_failure, self.log2_dropout_failure, self.log2_partition_failure)

    def describe(self) -> str:
        def p(x: float) -> str:
            return "0" if x == -math.inf else f"2^{x:.1f}"

        return (
            f"n={self.n}: k={self.k}, t={self.t}, quorum={self.quorum} (colluders <= {self.colluders}, dropouts <= {self.dropouts}); "
            f"failure: privacy {p(self.log2_privacy_failure)}, dropout {p(self.log2_dropout_failure)}, "
            f"partition {p(self.log2_partition_failure)} (bound 2^-{self.failure_exponent})"
        )


def count(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float noise (0.1 * 1000 is 100, not 101)."""
    return math.ceil(round(fraction * n, 9))


def _log2(num: int, den: int) -> float:
    if num == 0:
        return -math.inf
    return math.log2(num) - math.log2(den)


@functools.lru_cache(maxsize=4096)
def _hyper_pmf(population: int, marked: int, draws: int) -> tuple[tuple[int, ...], int]:
    """Exact hypergeometric weights C(K, x) C(N-K, k-x) for x = 0..k, and their total C(N, k)."""
    return tuple(math.comb(marked, x) * math.comb(population - marked, draws - x) for x in range(draws + 1)), math.comb(population, draws)


def _tails(population: int, marked: int, draws: int) -> tuple[list[int], int]:
    """``tail[x]`` = weight of P[X >= x] (x = 0..draws+1) as an integer over the returned denominator."""
    pmf, total = _hyper_pmf(population, marked, draws)
    tail = [0] * (draws + 2)
    for x in range(draws, -1, -1):
        tail[x] = tail[x + 1] + pmf[x]
    return tail, total


def log2_privacy_failure(n: int, colluders: int, k: int, t: int) -> float:
    """log2 of n * P[Hyp(n-1, C, k) >= t]: some honest client has t colluding neighbours."""
    tail, total = _tails(n - 1, colluders, k)
    return min(0.0, math.log2(n) + _log2(tail[t] if t <= k else 0, total))


def log2_dropout_failure(n: int, dropouts: int, k: int, t: int) -> float:
    """log2 of n * P[Hyp(n-1, D, k) > k - t]: some client keeps fewer than t surviving neighbours."""
    tail, total = _tails(n - 1, dropouts, k)
    x = k - t + 1
    return min(0.0, math.log2(n) + _log2(tail[x] if x <= k else 0, total))


def log2_partition_failure(n: int, removed: int, k: int) -> float:
    """log2 of n * P[floor(k/2) given ring positions are all removed] (0 for the complete graph)."""
    if k >= n - 1:
        return -math.inf  # the complete graph stays connected whatever is removed
    h = k // 2
    if removed < h:
        return -math.inf
    return min(0.0, math.log2(n) + _log2(math.comb(n - h, removed - h), math.comb(n, removed)))


def quorum(n: int, colluders: int) -> int:
    """Signatures on one survivor set that two different sets cannot both collect: floor((n + C) / 2) + 1."""
    return (n + colluders) // 2 + 1


def evaluate(
    n: int,
    k: int,
    t: int,
    *,
    colluders: float = DEFAULT_COLLUDERS,
    dropouts: float = DEFAULT_DROPOUTS,
    failure_exponent: int = DEFAULT_FAILURE_EXPONENT,
) -> SecAggParameters:
    """The failure probabilities of a given (k, t) at n under the stated bounds (no check)."""
    c, d = count(colluders, n), count(dropouts, n)
    k = min(k, n - 1)
    return SecAggParameters(
        n=n,
        colluders=c,
        dropouts=d,
        k=k,
        t=t,
        quorum=quorum(n, c),
        log2_privacy_failure=log2_privacy_failure(n, c, k, t),
        log2_dropout_failure=log2_dropout_failure(n, d, k, t),
        log2_partition_failure=log2_partition_failure(n, c + d, k),
        failure_exponent=failure_exponent,
    )


def check(p: SecAggParameters) -> SecAggParameters:
    """``p`` if it meets its bounds, else :class:`ParameterError` naming every number that fails."""
    bound = -p.failure_exponent
    problems = []
    if p.n < 2:
        problems.append("secure aggregation needs at least 2 participants")
    if not 1 <= p.t <= p.k:
        problems.append(f"threshold t={p.t} must be in 1..k={p.k}")
    if p.log2_privacy_failure > bound:
        problems.append(f"P[a client has >= t={p.t} colluding neighbours among k={p.k}] = 2^{p.log2_privacy_failure:.1f}")
    if p.log2_dropout_failure > bound:
        problems.append(f"P[a client keeps < t={p.t} of k={p.k} neighbours after {p.dropouts} dropouts] = 2^{p.log2_dropout_failure:.1f}")
    if p.log2_partition_failure > bound:
        problems.append(f"P[removing {p.colluders + p.dropouts} clients splits the k={p.k} graph] <= 2^{p.log2_partition_failure:.1f}")
    if p.quorum > p.n - p.dropouts:
        problems.append(f"the consistency quorum {p.quorum} exceeds the {p.n - p.dropouts} clients left after {p.dropouts} dropouts")
    if problems:
        raise ParameterError(
            f"secagg at n={p.n} with colluders <= {p.colluders} and dropouts <= {p.dropouts} cannot hold at failure "
            f"probability 2^-{p.failure_exponent}: " + "; ".join(problems)
        )
    return p


def _best_threshold(n: int, c: int, d: int, k: int) -> tuple[int, float, float] | None:
    """The t in 1..k with the smallest max(privacy, dropout) failure; ties: the middle one."""
    scored = [(max(log2_privacy_failure(n, c, k, t), log2_dropout_failure(n, d, k, t)), t) for t in range(1, k + 1)]
    best = min(s for s, _ in scored)
    ts = [t for s, t in scored if s == best]
    t = ts[len(ts) // 2]
    return t, log2_privacy_failure(n, c, k, t), log2_dropout_failure(n, d, k, t)


@functools.lru_cache(maxsize=1024)
def secagg_parameters(
    n: int,
    colluders: float = DEFAULT_COLLUDERS,
    dropouts: float = DEFAULT_DROPOUTS,
    failure_exponent: int = DEFAULT_FAILURE_EXPONENT,
) -> SecAggParameters:
    """The smallest-degree (k, t, quorum) that holds against ``colluders`` and ``dropouts`` (fractions of n)
    with every failure probability <= 2^-failure_exponent; :class:`ParameterError` if none does.

    The function a node's own policy calls to know what it must insist on for a round of n.
    """
    if not (0 <= colluders < 1 and 0 <= dropouts < 1):
        raise ParameterError(f"colluders ({colluders}) and dropouts ({dropouts}) must be fractions in [0, 1)")
    if n < 2:
        raise ParameterError(f"secure aggregation needs at least 2 participants, got {n}")
    c, d = count(colluders, n), count(dropouts, n)
    bound = -failure_exponent
    candidates = list(range(2, n - 1, 2)) + [n - 1]
    for k in candidates:
        if log2_partition_failure(n, c + d, k) > bound:
            continue
        t, priv, drop = _best_threshold(n, c, d, k)
        if max(priv, drop) <= bound:
            return check(evaluate(n, k, t, colluders=colluders, dropouts=dropouts, failure_exponent=failure_exponent))
    # nothing fits: report the complete graph's best attempt, with every number that fails
    t, _, _ = _best_threshold(n, c, d, n - 1)
    return check(evaluate(n, n - 1, t, colluders=colluders, dropouts=dropouts, failure_exponent=failure_exponent))
