"""FedAvg (sample-weighted mean), the undefended baseline."""

from twin_store.screening.base import Defense

DEFENSE = Defense
