"""The energy ledger of a running deployment: BS twins on declared edge sites, by policy, slot by slot.

Each slot (an hour of the stream by default) the BSs that trained get a site by the deployment's policy
(``nearest``, ``balanced`` or ``learned``); a BS whose site changed migrates (its twin and its training
window move). Every migration, sync and training step costs what eqs. 13-15 say:

- ``migration``: ``n_mig l_{s,s'} (Dbar + D^twin)`` on the destination site, ``l`` the Manhattan distance
  between the sites, ``D^twin`` the twin's size in samples (model bytes / sample bytes);
- ``sync``: ``n_syn D / (W log2(1 + P xi / N0)) l`` for the BS's new samples over its link to the site;
- ``compute``: ``n_cmp eps_s Dbar (E_s + E_{u,s})``.

In the running system ``Dbar`` is the sample count the local update trained on: its window already
reuses earlier hours (the role of gamma in the paper), so the ledger charges it as reported.
Positions are latitude/longitude, projected to metres around the sites' centroid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from twin_store.federation.edge.costs import (
    Array,
    DitenParams,
    compute_energy_per_sample,
    sync_cost,
)
from twin_store.federation.edge.policies import balanced
from twin_store.federation.edge.simulator import IntArray

EARTH_RADIUS_M = 6_371_008.8
KINDS = ("migration", "sync", "compute")
POLICIES = ("nearest", "balanced", "learned")


@dataclass(frozen=True)
class Site:
    """An edge site: where it is, and how many samples per slot it can train."""

    name: str
    lat: float
    lon: float
    capacity: float
    eps: float = 55.0  # Table II's mean eps_s
    energy: float = 7e3  # E_s, per-sample training energy (the simulator's mean)


def project(lat: Array, lon: Array, lat0: float, lon0: float) -> Array:
    """Equirectangular projection to metres around (lat0, lon0): (n, 2) east/north."""
    x = np.radians(np.asarray(lon) - lon0) * np.cos(np.radians(lat0)) * EARTH_RADIUS_M
    y = np.radians(np.asarray(lat) - lat0) * EARTH_RADIUS_M
    return np.stack([x, y], axis=-1)


@dataclass(frozen=True)
class Migration:
    bs: str
    source: str
    target: str
    bytes: int
    energy: float


@dataclass(frozen=True)
class SlotLedger:
    """One slot: every BS's site, the migrations, and energy/bytes per (site, kind)."""

    slot: int
    hosts: dict[str, str]
    migrations: list[Migration]
    energy: dict[tuple[str, str], float]
    bytes: dict[tuple[str, str], int]

    def rows(self) -> list[tuple[str, str, float, int]]:
        """(site, kind, energy, bytes) for every site and kind, zeros included (a complete table per slot)."""
        return [(s, k, self.energy[(s, k)], self.bytes[(s, k)]) for s, k in sorted(self.energy)]

    @property
    def total_energy(self) -> float:
        return float(sum(self.energy.values()))


# (distance BS x site in metres, samples per BS, previous site index or -1) -> site index per BS
Chooser = Callable[[Array, Array, IntArray], IntArray]


@dataclass
class EdgeLedger:
    """Associates BS twins with sites slot by slot and books the energy (pure; the service does the I/O)."""

    sites: Sequence[Site]
    policy: str = "nearest"
    params: DitenParams = field(default_factory=DitenParams)
    sample_bytes: int = 250
    twin_bytes: int = 18_000
    hosts: dict[str, int] = field(default_factory=dict)  # the current site of every BS seen so far
    positions: dict[str, Array] = field(default_factory=dict)
    learned: Chooser | None = None  # the trained association, for policy ``learned``

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("no edge sites declared (settings: [[edge.sites]] name, lat, lon, capacity)")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"edge site names must be unique: {names}")
        if self.policy not in POLICIES:
            raise ValueError(f"edge policy {self.policy!r}: choose {', '.join(POLICIES)}")
        if self.policy == "learned" and self.learned is None:
            raise ValueError("edge policy 'learned' needs a trained association model")
        self.lat0 = float(np.mean([s.lat for s in self.sites]))
        self.lon0 = float(np.mean([s.lon for s in self.sites]))
        self.site_xy = project(
            np.array([s.lat for s in self.sites]), np.array([s.lon for s in self.sites]), self.lat0, self.lon0
        )
        self.manhattan = np.abs(self.site_xy[:, None, :] - self.site_xy[None, :, :]).sum(axis=2)

    def place(self, bs: str, lat: float, lon: float) -> None:
        self.positions[bs] = project(np.array(lat), np.array(lon), self.lat0, self.lon0)

    def associate(self, bss: list[str], samples: Array) -> IntArray:
        xy = np.stack([self.positions[b] for b in bss])
        distance = np.sqrt(((xy[:, None, :] - self.site_xy[None, :, :]) ** 2).sum(axis=2))
        previous = np.array([self.hosts.get(b, -1) for b in bss], dtype=np.int64)
        if self.policy == "nearest":
            return np.argmin(distance, axis=1).astype(np.int64)
        if self.policy == "balanced":
            capacity = np.array([s.capacity for s in self.sites])
            return balanced(distance, samples, capacity, previous=previous)
        assert self.learned is not None  # checked in __post_init__
        return self.learned(distance, samples, previous)

    def slot(self, slot: int, samples: Mapping[str, int]) -> SlotLedger:
        """Book one slot: ``samples`` maps each BS that trained in it to its sample count (Dbar = D)."""
        unknown = [b for b in samples if b not in self.positions]
        if unknown:
            raise ValueError(f"BSs without a position: {unknown[:5]}")
        bss = sorted(samples)
        if not bss:
            return self.book(slot, [], np.zeros(0), np.zeros(0, np.int64))
        d = np.array([float(samples[b]) for b in bss])
        return self.book(slot, bss, d, self.associate(bss, d))

    def migration(self, bs: str, source: int, target: int, samples: float) -> Migration:
        """Eq. 13 for one twin moved between sites: its twin and its training data over their distance."""
        twin_samples = self.twin_bytes / self.sample_bytes
        energy = self.params.n_mig * float(self.manhattan[source, target]) * (samples + twin_samples)
        moved = self.twin_bytes + int(samples) * self.sample_bytes
        return Migration(bs, self.sites[source].name, self.sites[target].name, moved, energy)

    def book(self, slot: int, bss: list[str], d: Array, host: IntArray) -> SlotLedger:
        """Book one slot for a given placement: ``bss`` trained ``d`` samples each on site ``host``; a BS
        whose site changed since its last slot migrated there (eq. 13)."""
        p = self.params
        energy = {(s.name, k): 0.0 for s in self.sites for k in KINDS}
        volume = {(s.name, k): 0 for s in self.sites for k in KINDS}
        migrations: list[Migration] = []
        if not bss:
            return SlotLedger(slot, {}, [], energy, volume)
        xy = np.stack([self.positions[b] for b in bss])
        dist = np.sqrt(((xy - self.site_xy[host]) ** 2).sum(axis=1))
        eps = np.array([self.sites[h].eps for h in host])
        e_s = np.array([self.sites[h].energy for h in host])
        sync = sync_cost(d, dist, p)
        comp = d * compute_energy_per_sample(eps, e_s, dist, p)
        for i, b in enumerate(bss):
            site = self.sites[host[i]].name
            data_bytes = int(d[i]) * self.sample_bytes
            energy[(site, "sync")] += float(sync[i])
            volume[(site, "sync")] += data_bytes
            energy[(site, "compute")] += float(comp[i])
            volume[(site, "compute")] += data_bytes
            prev = self.hosts.get(b, -1)
            if prev >= 0 and prev != host[i]:
                move = self.migration(b, prev, int(host[i]), float(d[i]))
                migrations.append(move)
                energy[(site, "migration")] += move.energy
                volume[(site, "migration")] += move.bytes
            self.hosts[b] = int(host[i])
        hosts = {b: self.sites[h].name for b, h in zip(bss, host, strict=True)}
        return SlotLedger(slot, hosts, migrations, energy, volume)
