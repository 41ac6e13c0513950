"""DITEN's closed forms: data utility, the energy of eqs. 13-15, Norm and the slot objective (eq. 22).

Everything is vectorised over twins (users) and servers; nothing here knows about Kafka or InfluxDB.
The constants the paper gives (Table II) are in :class:`DitenParams`; the ones it leaves open
(channel gain, per-sample bits, the energies ``E_s`` and ``E_{u,s}``, the barrier weight) are chosen
here and named, so a deployment can set its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# fitted accuracy curve rho(D, phi) of the paper (alpha_1..alpha_6)
ALPHAS = (0.8862, 6.8382, 0.0006, 0.9172, -0.0231, 0.8366)


@dataclass(frozen=True)
class DitenParams:
    """Table II of the paper, plus the constants it leaves open (marked 'ours')."""

    n_mig: float = 1e-4
    n_syn: float = 1e-1
    n_cmp: float = 1e-7
    power_w: float = 0.2  # P_u = 200 mW
    bandwidth_hz: float = 15e3  # W = 15 kHz
    noise_dbm_per_hz: float = -174.0  # N0
    beta1: float = 0.3
    beta2: float = 0.7
    f0: float = 200.0
    # ours: bits one training sample occupies on the uplink (D in eq. 14 is in samples)
    sample_bits: float = 2000.0
    # ours: 3GPP urban path loss 128.1 + 37.6 log10(d / km) dB for the channel gain xi
    pathloss_db_at_1km: float = 128.1
    pathloss_slope_db: float = 37.6
    # ours: E_{u,s} of eq. 15, per-sample energy of relaying a sample over one metre
    link_energy_per_m: float = 50.0
    # ours: weight of the C2/C3 log barriers in eq. 22, and where the barrier turns linear
    barrier_weight: float = 0.01
    barrier_knee: float = 0.01
    min_distance_m: float = 1.0

    @property
    def noise_w(self) -> float:
        """Noise power over the band: N0 [dBm/Hz] integrated over W, in watts."""
        return float(10 ** ((self.noise_dbm_per_hz - 30.0) / 10.0) * self.bandwidth_hz)


def v_phi(phi: float | Array) -> float | Array:
    """v(phi) = alpha_4 exp(-((alpha_5 + phi) / alpha_6)^2): the utility ceiling under label skew phi."""
    _, _, _, a4, a5, a6 = ALPHAS
    return a4 * np.exp(-(((a5 + np.asarray(phi, dtype=float)) / a6) ** 2))


def utility(dbar: Array | float, phi: float) -> Array:
    """rho = v(phi) - alpha_1 exp(-alpha_2 (alpha_3 Dbar)^v(phi)), per twin."""
    a1, a2, a3, _, _, _ = ALPHAS
    v = float(v_phi(phi))
    d = np.maximum(np.asarray(dbar, dtype=float), 0.0)
    return v - a1 * np.exp(-a2 * (a3 * d) ** v)


def norm(x: Array | float, f0: float) -> Array:
    """Norm(x, f0) = 2 / (1 + exp(-x / 2 f0)) - 1 (= tanh(x / 4 f0))."""
    return np.tanh(np.asarray(x, dtype=float) / (4.0 * f0))


def channel_gain(distance_m: Array, p: DitenParams) -> Array:
    d_km = np.maximum(distance_m, p.min_distance_m) / 1000.0
    loss_db = p.pathloss_db_at_1km + p.pathloss_slope_db * np.log10(d_km)
    return 10.0 ** (-loss_db / 10.0)


def uplink_rate(distance_m: Array, p: DitenParams) -> Array:
    """W log2(1 + P xi / N0), bits per second."""
    snr = p.power_w * channel_gain(distance_m, p) / p.noise_w
    return p.bandwidth_hz * np.log2(1.0 + snr)


def migration_cost(
    server_distance_m: Array, dbar: Array, twin_size: Array, moved: NDArray[np.bool_], p: DitenParams
) -> Array:
    """Eq. 13 per twin: n_mig l_{s,s'} (Dbar + D^twin) for a twin hosted elsewhere in the previous slot."""
    return np.where(moved, p.n_mig * server_distance_m * (dbar + twin_size), 0.0)


def sync_cost(new_samples: Array, distance_m: Array, p: DitenParams) -> Array:
    """Eq. 14 per twin: n_syn D / (W log2(1 + P xi / N0)) l, with D in bits (samples x sample_bits)."""
    d = np.maximum(distance_m, p.min_distance_m)
    return p.n_syn * new_samples * p.sample_bits / uplink_rate(d, p) * d


def compute_energy_per_sample(eps_s: Array, e_server: Array, distance_m: Array, p: DitenParams) -> Array:
    """n_cmp eps_s (E_s + E_{u,s}): the energy of training on one sample, with E_{u,s} = link energy x l."""
    return p.n_cmp * eps_s * (e_server + p.link_energy_per_m * distance_m)


def compute_cost(dbar: Array, per_sample: Array) -> Array:
    """Eq. 15 per twin: n_cmp eps_s Dbar (E_s + E_{u,s})."""
    return dbar * per_sample


def barrier(slack: Array, knee: float) -> Array:
    """log(slack) for slack >= knee, continued by its tangent below (finite when a constraint is broken)."""
    s = np.asarray(slack, dtype=float)
    safe = np.maximum(s, knee)
    return np.where(s >= knee, np.log(safe), np.log(knee) + (s - knee) / knee)


@dataclass(frozen=True)
class SlotTerms:
    """One slot's objective and its parts (per server sums and the per-twin utility)."""

    objective: float
    utility: float  # mean rho over twins
    cost: float  # sum of C_{s,t} over servers
    norm_cost: float  # mean Norm(C_{s,t}) over servers
    barrier: float
    per_server: Array  # C_{s,t}
    migration: Array  # per server
    sync: Array
    compute: Array


def slot_objective(
    rho: Array,
    migration: Array,
    sync: Array,
    compute: Array,
    compute_cap: Array,
    sync_cap: Array,
    p: DitenParams,
) -> SlotTerms:
    """Eq. 22 for one slot: (b1/U) sum rho - (b2/S) sum Norm(C_s, f0) + (mu/S) sum [ln slack_C2 + ln slack_C3].

    ``migration``, ``sync`` and ``compute`` are per server; the slacks are normalised by the caps so the
    barrier is 0 on an idle server.
    """
    n_servers = len(compute_cap)
    total = migration + sync + compute
    n = norm(total, p.f0)
    bar = barrier(1.0 - compute / compute_cap, p.barrier_knee) + barrier(
        1.0 - sync / sync_cap, p.barrier_knee
    )
    u = float(np.mean(rho))
    obj = p.beta1 * u - p.beta2 * float(np.mean(n)) + p.barrier_weight * float(np.sum(bar)) / n_servers
    return SlotTerms(
        objective=obj,
        utility=u,
        cost=float(np.sum(total)),
        norm_cost=float(np.mean(n)),
        barrier=float(np.sum(bar)) / n_servers,
        per_server=total,
        migration=migration,
        sync=sync,
        compute=compute,
    )
