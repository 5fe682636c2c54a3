"""Moved to :mod:`odysseus.plan.forms` (the closed forms now take a :class:`odysseus.plan.Case`)."""

from .plan.forms import Collective, Record, bytes_per_rank, expected_collectives, expected_records

__all__ = ["Collective", "Record", "bytes_per_rank", "expected_collectives", "expected_records"]
