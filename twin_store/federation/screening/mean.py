"""FedAvg (sample-weighted mean), the undefended baseline."""

from twin_store.federation.screening.base import Defense

DEFENSE = Defense
