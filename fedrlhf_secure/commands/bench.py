"""``fedrlhf bench NAME``: benchmarks that write ``bench/NAME.json`` and their table in BENCHMARKS.md.

Each benchmark is a module of :mod:`fedrlhf_secure.bench` exposing ``add_arguments(parser)`` and
``run(args) -> int``; timing targets live there, never in unit tests. Quote medians and ratios
measured side by side in one run.

:data:`SUBCOMMANDS` is a registry of the same shape as :data:`fedrlhf_secure.cli.COMMANDS`, and the
CLI dispatches it the same way: only the chosen benchmark's module is imported.
"""

from __future__ import annotations

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "round": ("fedrlhf_secure.bench.round:run", "one MovieLens federation: seconds per round, bytes per client"),
    "aggregation": ("fedrlhf_secure.bench.aggregation:run", "plain vs masking (vs Flower SecAgg+) vs CKKS"),
    "dp": ("fedrlhf_secure.bench.dp:run", "DP-SGD overhead vs non-private local training; privacy-utility table"),
    "audit": ("fedrlhf_secure.bench.audit:run", "16-shadow LiRA audit of the default MovieLens run"),
    "flower": ("fedrlhf_secure.bench.flower:run", "per-round overhead of the Flower transport vs in-process"),
    "overhead": ("fedrlhf_secure.bench.overhead:run", "MovieLens round: secagg / plain and ckks / plain CPU, beside the crypto floor"),
    "scale": ("fedrlhf_secure.bench.scale:run", "CPU per MovieLens round for 100 / 1,000 / 10,000 resampled users, growth fit"),
}
SUBCOMMAND_DEST = "bench"
SUBCOMMAND_METAVAR = "NAME"
