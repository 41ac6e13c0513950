"""Screening and robust aggregation of local updates: one defense per module, one interface (``base.py``).

``make_defense(name)`` builds one by name; ``DEFENSES`` lists them. The store and ``nettwin bench
poisoning`` drive the same objects.
"""

from twin_store.federation.screening.base import (
    DEFENSES,
    Candidate,
    Defense,
    Verdict,
    cluster_aggregator,
    make_defense,
)

__all__ = ["DEFENSES", "Candidate", "Defense", "Verdict", "cluster_aggregator", "make_defense"]
