"""FTM features that do not depend on a walk's AP count or order, and the AP-dropout augmentation.

A window's per-AP channels (``Windows.ftm``) change meaning with the walk's AP list: another scene, more APs,
or an AP never ranged shifts every column. A twin that must work on walks and scenes it never saw instead reads,
per row, what any layout gives:

* ``fix``: the least-squares fix (x, y) of the row's ranges;
* ``kf``: the range Kalman filter's position (x, y) (:mod:`twin_store.models.ftm_filter`);
* ``quality``: the number of known APs ranged, the RMS, largest and mean range residual against the fix and
  against the filter, the mean RTT std and RSS of the ranged APs, and the horizontal dilution of precision of
  their geometry at the filter's position.

Positions are later made relative to an anchor (the filter's or the fix's last position in the window), so
the features do not carry a scene's coordinates either. Pure numpy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ingest.readers.ftm import FixTracker, SiteGeometry, Walk

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "fix": ("fix_x", "fix_y"),
    "kf": ("kf_x", "kf_y"),
    "quality": (
        "n_ranged",
        "res_rms_fix",
        "res_max_fix",
        "res_mean_kf",
        "res_rms_kf",
        "std_mean",
        "rss_mean",
        "hdop",
    ),
}
ALL_GROUPS = tuple(FEATURE_GROUPS)


def feature_names(groups: tuple[str, ...] = ALL_GROUPS) -> list[str]:
    return [n for g in ALL_GROUPS if g in groups for n in FEATURE_GROUPS[g]]


def row_features(walk: Walk, geo: SiteGeometry, fix: np.ndarray, kf: np.ndarray) -> np.ndarray:
    """``(n, 12)`` per row, every group of :data:`FEATURE_GROUPS` in order (absolute positions: the caller
    subtracts its anchor). A row with no known AP ranged has zero quality channels."""
    aps = FixTracker(geo, walk.ap_ids).aps
    return features_of(aps, walk.rtt, walk.std, walk.rss, fix, kf)


def features_of(
    aps: np.ndarray, rtt: np.ndarray, std: np.ndarray, rss: np.ndarray, fix: np.ndarray, kf: np.ndarray
) -> np.ndarray:
    """:func:`row_features` on arrays: AP positions ``(A, 2)`` (NaN: unknown), per row RTT ranges, their std
    and RSS ``(n, A)`` (0: not ranged), the fix and the filter's position ``(n, 2)``. The live windows call it
    one row at a time."""
    known = np.isfinite(aps[:, 0])
    ok = (rtt > 0) & known[None, :]  # (n, A)
    n_ok = ok.sum(axis=1)
    safe = np.where(known[:, None], aps, 0.0)  # (A, 2)

    def residuals(at: np.ndarray) -> np.ndarray:
        dist = np.linalg.norm(at[:, None, :] - safe[None, :, :], axis=2)  # (n, A)
        return np.where(ok, rtt - dist, 0.0)

    denom = np.maximum(n_ok, 1)
    r_fix, r_kf = residuals(fix), residuals(kf)
    diff = kf[:, None, :] - safe[None, :, :]
    unit = diff / np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), 1e-3)
    unit = unit * ok[:, :, None]
    hth = np.einsum("nai,naj->nij", unit, unit)  # (n, 2, 2)
    det = hth[:, 0, 0] * hth[:, 1, 1] - hth[:, 0, 1] ** 2
    hdop = np.where(
        det > 1e-6, np.sqrt(np.maximum(np.trace(hth, axis1=1, axis2=2), 0) / np.maximum(det, 1e-6)), 10.0
    )
    quality = np.column_stack(
        [
            n_ok,
            np.sqrt((r_fix**2).sum(axis=1) / denom),
            np.abs(r_fix).max(axis=1, initial=0.0),
            r_kf.sum(axis=1) / denom,
            np.sqrt((r_kf**2).sum(axis=1) / denom),
            np.where(ok, std, 0.0).sum(axis=1) / denom,
            np.where(ok, rss, 0.0).sum(axis=1) / denom,
            np.minimum(hdop, 10.0),
        ]
    )
    return np.column_stack([fix, kf, quality])


def drop_aps(walk: Walk, rng: np.random.Generator, p_ap: float = 0.25, p_reading: float = 0.3) -> Walk:
    """A copy of ``walk`` as a sparser, unseen walk looks: each AP silenced for the whole walk with probability
    ``p_ap`` (at least three ranged APs stay), then each remaining reading dropped with probability
    ``p_reading``. Ground truth, IMU and times are kept; the true distances of dropped readings are zeroed."""
    ranged = np.flatnonzero((walk.rtt > 0).any(axis=0))
    silenced = ranged[rng.random(len(ranged)) < p_ap]
    if len(ranged) - len(silenced) < 3:
        silenced = silenced[: max(len(ranged) - 3, 0)]
    keep = rng.random(walk.rtt.shape) >= p_reading
    keep[:, silenced] = False
    rtt = np.where(keep, walk.rtt, 0.0)
    return replace(
        walk,
        name=walk.name,
        rtt=rtt,
        std=np.where(keep, walk.std, 0.0),
        rss=np.where(keep, walk.rss, 0.0),
        true_dist=None if walk.true_dist is None else np.where(keep, walk.true_dist, 0.0),
    )
