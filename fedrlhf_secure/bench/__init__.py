"""The benchmarks of ``fedrlhf bench NAME``: each module exposes ``add_arguments(parser)`` and
``run(args) -> int`` and is listed in :data:`fedrlhf_secure.commands.bench.SUBCOMMANDS`."""
