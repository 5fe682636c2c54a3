"""The multi-rank test runner: ``run_ranks(world, fn, *args)`` (see :mod:`odysseus.launch`)."""

from odysseus.launch import RankError, run_ranks

__all__ = ["RankError", "run_ranks"]
