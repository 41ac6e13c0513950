"""Live per-device multimodal windows from the ``replay ftm`` streams (FTM, IMU, SIMULATED vision), pure Python.

The three topics arrive interleaved in no particular event-time order (separate topics, separate fetches),
and a device may lack a modality altogether. Per key (``device/walk``) the windower keeps each modality's
recent readings sorted by event time, and a window ending at ``e`` is emitted once every *active* modality
has been seen past ``e + lateness_ms`` (its event-time watermark):

* a modality not seen yet for a key holds windows back for at most ``grace_s`` (wall clock) after the key's
  first record; after that it counts as missing (mask False) until it shows up;
* a modality whose newest reading has not advanced for ``idle_s`` (wall clock) stops holding windows back
  (an idle source); when every modality is idle, all data is taken to be in and windows are emitted up to
  the newest reading;
* a reading at or before the end of a window already emitted is *late*: it is counted and returned to the
  caller (the worker dead-letters it), never silently merged.

Least-squares FTM fix (the offline windows' last two FTM channels): when the key's scene has site
metadata (``sites``, from the ``sites.ftm`` topic), the rows of a key are run through a
:class:`~ingest.readers.ftm.FixTracker` in event-time order up to each emitted window's end (the readings up to there
are final: later ones are refused as late), and the fix is held at every FTM/IMU row time, as offline. Until
the scene's site is known the windows are held back like an unseen modality (``grace_s``); after that the
window's ``mask["fix"]`` is False. It is True from the first row ranged by >= 3 known APs on. A site that
arrives after a key's first window starts that key's fix from the APs' centroid at its next window.

Range Kalman filter and positioning twin: the same final rows go through a
:class:`~twin_store.models.ftm_filter.RangeFilter` with the stored twin's constants (defaults without one).
When a twin appears (or changes constants) after a key's filter started, the key's filter is restarted with
the twin's constants at its next window, over the key's final rows still held (the last window and
``max_age_ms``), so the key gets positions from the twin at once instead of only as a new key.

Grid: window ends start at the key's first event time + ``(window - 1)`` steps and advance by ``stride``
steps, as ``grid_ends`` does offline. Each window is computed by :func:`twin_store.models.multimodal.align`
on the buffered readings, so it equals the offline ``build_windows`` on the same rows (``Readings``).
State is explicit (one :class:`KeyState` per key); time (``now``) is passed in.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.readers.ftm import FixTracker, SiteGeometry
from twin_store.models.ftm_features import features_of
from twin_store.models.ftm_filter import FilterParams, RangeFilter
from twin_store.models.multimodal import MODALITIES, STEP_MS, Readings, align, hold, imu_channels

if TYPE_CHECKING:  # the locator brings torch: loaded by the caller, only when a positioning twin is stored
    from twin_store.federation.utt_locator import Locator


@dataclass(frozen=True)
class LiveWindowConfig:
    window: int = 20  # steps of 100 ms: 2 s
    stride: int = 5  # steps between window ends: 0.5 s
    max_age_ms: float = 1000.0
    min_present: float = 0.25
    lateness_ms: float = 1000.0  # event time a modality must be past a window's end before it is emitted
    grace_s: float = 2.0  # wall time an unseen modality may hold a new key's windows back
    idle_s: float = 2.0  # wall time after which a modality that stopped advancing no longer holds back


class Series:
    """Readings of one stream sorted by event time (out-of-order inserts allowed)."""

    def __init__(self, width: int) -> None:
        self.t: list[float] = []
        self.v: list[list[float]] = []
        self.width = width

    def insert(self, t: float, values: list[float]) -> None:
        i = bisect.bisect_right(self.t, t)
        self.t.insert(i, t)
        self.v.insert(i, values)

    def trim(self, before: float) -> None:
        """Drop readings older than ``before``: no window can hold them any more."""
        i = bisect.bisect_left(self.t, before)
        del self.t[:i], self.v[:i]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.t, dtype=np.float64), np.asarray(self.v, dtype=np.float64).reshape(
            -1, self.width
        )


@dataclass
class KeyState:
    first_wall: float
    first_t: float = math.inf
    ftm: dict[str, Series] = field(default_factory=dict)
    imu: Series = field(default_factory=lambda: Series(13))
    vision: Series = field(default_factory=lambda: Series(7))
    newest_t: dict[str, float] = field(default_factory=dict)  # modality -> newest event time seen
    advanced_wall: dict[str, float] = field(default_factory=dict)  # modality -> when that last grew
    next_end: float | None = None
    last_emitted: float = -math.inf
    emitted: int = 0
    late: int = 0
    scene: str | None = None
    # (t, seq, ranging {ap: [rtt, std, rss]} of an FTM record, |acc| of an IMU record)
    rows: list[tuple[float, int, dict[str, list[float]] | None, float | None]] = field(default_factory=list)
    seq: int = 0
    tracker: FixTracker | None = None
    fix: Series = field(default_factory=lambda: Series(2))
    first_fix_t: float = math.inf  # event time of the first real fix
    filter: RangeFilter | None = None  # the range Kalman filter, run causally over the rows made final
    feats: Series = field(default_factory=lambda: Series(12))  # row features (fix, filter, quality)
    first_kf_t: float = math.inf  # event time the filter started (its first fix)
    last_acc: float = 9.81  # |acc| of the newest IMU row (a row without one reuses it)
    # the final walk rows still held (t, {ap: [rtt, std, rss]}, |acc|, least-squares fix): what a restarted
    # filter runs over, so a stored twin positions a key whose filter started with other constants
    walked: list[tuple[float, dict[str, list[float]], float, list[float]]] = field(default_factory=list)
    filter_from: float = math.inf  # event time of the first row the current filter saw
    restarts: int = 0  # times the key's filter was restarted with a stored twin's constants


def parse(kind: str, rec: dict[str, Any]) -> tuple[float, Any]:
    """(event time, the modality's values) of a ``replay ftm`` record; KeyError/ValueError/TypeError if bad."""
    t = float(rec["t_ms"])
    if not math.isfinite(t):
        raise ValueError(f"t_ms {rec['t_ms']!r}")
    if kind == "ftm":
        aps = {str(a): [float(x) for x in v] for a, v in rec["aps"].items()}
        if any(len(v) != 3 for v in aps.values()):
            raise ValueError("an AP reading is not [rtt_m, std_m, rss_dbm]")
        return t, aps
    if kind == "imu":
        row = [*rec["acc"], *rec["gyro"], *rec["mag"], rec["azimuth"], rec["pitch"], rec["roll"]]
        if len(row) != 12:
            raise ValueError("IMU record needs 3 acc, 3 gyro, 3 mag, azimuth, pitch, roll")
        return t, imu_channels(np.asarray([row], dtype=np.float64))[0].tolist()
    if kind == "vision":
        det = 1.0 if rec["detected"] else 0.0
        vals = [
            rec["u"],
            rec["v"],
            rec["box_w"],
            rec["box_h"],
            det,
            rec.get("floor_x", 0.0),
            rec.get("floor_y", 0.0),
        ]
        return t, [float(x) for x in vals]
    raise ValueError(f"unknown modality {kind!r}")


class MultimodalWindower:
    """Per key state and the emission rule; ``on_record`` and ``flush`` return finished window dicts."""

    def __init__(
        self,
        cfg: LiveWindowConfig | None = None,
        sites: dict[str, SiteGeometry] | None = None,
        locator: Locator | None = None,
    ) -> None:
        """``sites``: scene -> AP positions, shared with (and filled by) the caller; None: no fix channel.
        ``locator``: the stored positioning twin (``nettwin twin position``), or None; the caller may set
        :attr:`locator` later: a key whose filter runs other constants than the twin's is restarted with the
        twin's at its next window (:meth:`_restart_filter`)."""
        self.cfg = cfg or LiveWindowConfig()
        self.keys: dict[str, KeyState] = {}
        self.sites = sites
        self.locator = locator

    def on_record(
        self, key: str, kind: str, rec: dict[str, Any], now: float
    ) -> tuple[list[dict[str, Any]], bool]:
        """Add one record; returns the windows it completed and whether the record was late (not added)."""
        t, values = parse(kind, rec)
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = KeyState(first_wall=now)
        if t <= st.last_emitted:
            st.late += 1
            return [], True
        if kind == "ftm":
            for ap, v in values.items():
                st.ftm.setdefault(ap, Series(3)).insert(t, v)
            if isinstance(rec.get("scene"), str):
                st.scene = rec["scene"]
        else:
            getattr(st, kind).insert(t, values)
        if self.sites is not None and kind in ("ftm", "imu"):  # a walk row: the fix is held at its time
            st.seq += 1
            ranging = values if kind == "ftm" else None
            acc = float(np.linalg.norm(values[:3])) if kind == "imu" else None
            bisect.insort(st.rows, (t, st.seq, ranging, acc), key=lambda r: (r[0], r[1]))
        st.first_t = min(st.first_t, t)
        if t > st.newest_t.get(kind, -math.inf):
            st.newest_t[kind] = t
            st.advanced_wall[kind] = now
        return self._ready(key, st, now), False

    def flush(self, now: float) -> list[dict[str, Any]]:
        """Windows that idle modalities or the grace period now let through (call it periodically)."""
        return [w for key, st in self.keys.items() for w in self._ready(key, st, now)]

    def _watermark(self, st: KeyState, now: float) -> float:
        cfg = self.cfg
        if now - st.first_wall < cfg.grace_s and (
            len(st.newest_t) < len(MODALITIES)
            or (self.sites is not None and (st.scene is None or st.scene not in self.sites))
        ):
            return -math.inf  # a modality, or the scene's site metadata, may still show up
        active = [st.newest_t[m] for m in st.newest_t if now - st.advanced_wall[m] < cfg.idle_s]
        if not active:
            return max(st.newest_t.values(), default=-math.inf)  # everything idle: all data is in
        return min(active) - cfg.lateness_ms

    def _ready(self, key: str, st: KeyState, now: float) -> list[dict[str, Any]]:
        cfg = self.cfg
        wm = self._watermark(st, now)
        # the grid is anchored when the first window is due, so an earlier reading arriving late still counts
        first = st.next_end if st.next_end is not None else st.first_t + (cfg.window - 1) * STEP_MS
        if not first <= wm:
            return []
        st.next_end = first
        n = math.floor((wm - st.next_end) / (cfg.stride * STEP_MS) + 1e-9) + 1
        ends = st.next_end + np.arange(n) * cfg.stride * STEP_MS
        self._advance_fix(st, float(ends[-1]))
        out = self._windows(key, st, ends)
        st.last_emitted = float(ends[-1])
        st.next_end = float(ends[-1] + cfg.stride * STEP_MS)
        st.emitted += n
        keep_from = st.next_end - (cfg.window - 1) * STEP_MS - cfg.max_age_ms
        for s in [*st.ftm.values(), st.imu, st.vision, st.fix, st.feats]:
            s.trim(keep_from)
        del st.walked[: bisect.bisect_left(st.walked, keep_from, key=lambda r: r[0])]
        return out

    def _advance_fix(self, st: KeyState, upto: float) -> None:
        """Run the key's rows up to ``upto`` (final: later ones are late) through its fix tracker and its range
        Kalman filter, in event-time order: the filter sees a row only once every row before it is in, so it
        is causal (no row after a window's end reaches that window)."""
        if st.tracker is None and self.sites is not None and st.scene in self.sites:
            st.tracker = FixTracker(self.sites[st.scene])
            params = self.locator.filter if self.locator is not None else FilterParams()
            st.filter = RangeFilter(self.sites[st.scene], None, params)
        elif (
            st.filter is not None
            and self.locator is not None
            and st.filter.p != self.locator.filter
            and self.sites is not None
            and st.scene in self.sites  # a withdrawn site keeps the running filter
        ):
            self._restart_filter(st, self.locator.filter)
        k = bisect.bisect_right(st.rows, (upto, math.inf), key=lambda r: (r[0], r[1]))
        done, st.rows = st.rows[:k], st.rows[k:]
        tracker = st.tracker
        if tracker is None or st.filter is None:
            return
        ranged: dict[str, list[float]] = {}
        acc: float | None = None
        for i, (t, _seq, ranging, mag) in enumerate(done):
            if ranging is not None:
                tracker.update({ap: v[0] for ap, v in ranging.items()})
                ranged.update(ranging)
                if tracker.fixed and st.first_fix_t == math.inf:
                    st.first_fix_t = t
            if mag is not None:
                acc = st.last_acc = mag
            if i + 1 == len(done) or done[i + 1][0] != t:  # after the last row at this time: one walk row
                fix = tracker.est.tolist()
                st.fix.insert(t, fix)
                row = (t, ranged, acc or st.last_acc, fix)
                st.walked.append(row)
                self._filter_row(st, *row)
                ranged, acc = {}, None

    def _filter_row(
        self, st: KeyState, t: float, ranged: dict[str, list[float]], acc: float, fix: list[float]
    ) -> None:
        """One walk row through the key's filter: its position and the row's features (held by windows)."""
        filt = st.filter
        assert filt is not None
        st.filter_from = min(st.filter_from, t)
        kf = filt.step_ranged(t, {a: (v[0], v[1]) for a, v in ranged.items()}, acc)
        if filt.started and st.first_kf_t == math.inf:
            st.first_kf_t = t
        st.feats.insert(t, self._row_features(filt, ranged, np.asarray(fix), kf).tolist())

    def _restart_filter(self, st: KeyState, params: FilterParams) -> None:
        """A new filter with ``params`` (a stored twin's constants), run over the key's held final rows.

        Those rows are all at or before the last emitted window's end, so the restarted filter is as causal as
        the first: a window's filter value comes from rows up to its end only, now from ``filter_from`` on
        (at most one window and ``max_age_ms`` back) instead of from the walk's first row."""
        assert self.sites is not None and st.scene is not None  # the caller checked the scene's site
        old, st.filter = st.filter, RangeFilter(self.sites[st.scene], None, params)
        st.feats = Series(12)
        st.first_kf_t = st.filter_from = math.inf
        st.restarts += 1
        for row in st.walked:
            self._filter_row(st, *row)
        if old is not None and old.started and not st.filter.started:
            # no held row was ranged by >= 3 APs (sparse ranging): go on from the old filter's state instead of
            # losing the filter until such a row comes
            st.filter.resume_from(old)
            st.first_kf_t = st.last_emitted

    @staticmethod
    def _row_features(
        filt: RangeFilter, ranged: dict[str, list[float]], fix: np.ndarray, kf: np.ndarray
    ) -> np.ndarray:
        """One row's :func:`~twin_store.models.ftm_features.features_of` over the site's APs."""
        row = np.zeros((3, len(filt.index)))
        for a, v in ranged.items():
            k = filt.index.get(a)
            if k is not None:
                row[:, k] = v
        return features_of(filt.aps, row[0:1], row[1:2], row[2:3], fix[None, :], kf[None, :])[0]

    def readings(self, st: KeyState) -> Readings:
        return Readings(
            {ap: s.arrays() for ap, s in st.ftm.items()},
            st.imu.arrays(),
            st.vision.arrays(),
            st.fix.arrays() if st.tracker is not None else None,
        )

    def _windows(self, key: str, st: KeyState, ends: np.ndarray) -> list[dict[str, Any]]:
        """Window dicts; a window lists the APs ranged in it (``ap_ids``), 4 channels each."""
        cfg = self.cfg
        known = sorted(st.ftm, key=lambda a: (len(a), a))
        ftm, imu, vis, mask = align(
            self.readings(st), known, ends, cfg.window, cfg.max_age_ms, cfg.min_present
        )
        tq = ends[:, None] + (np.arange(cfg.window) - (cfg.window - 1)) * STEP_MS
        feats, held = hold(*st.feats.arrays(), tq, cfg.max_age_ms)
        kf_on = np.array([st.filter is not None and st.first_kf_t <= e for e in ends], dtype=bool)
        position = self._locate(st, feats, held, imu, mask, kf_on)
        device, _, walk = key.partition("/")
        out = []
        for i, e in enumerate(ends):
            ranged = [k for k in range(len(known)) if ftm[i, :, 4 * k + 3].any()]
            cols = [4 * k + c for k in ranged for c in range(4)]
            out.append(
                {
                    "key": key,
                    "device": device,
                    "walk": walk,
                    "end_ms": float(e),
                    "step_ms": STEP_MS,
                    "window": cfg.window,
                    "mask": {
                        **dict(zip(MODALITIES, (bool(x) for x in mask[i]), strict=True)),
                        "fix": bool(st.tracker is not None and st.first_fix_t <= e),
                        "kf": bool(kf_on[i]),
                    },
                    "ap_ids": [known[k] for k in ranged],
                    "ftm": np.round(ftm[i][:, cols], 6).tolist(),  # per AP: rtt, std, rss, present
                    "imu": np.round(imu[i], 6).tolist(),
                    "vision": np.round(vis[i], 6).tolist(),  # SIMULATED camera
                    "fix": np.round(ftm[i][:, -2:], 6).tolist(),  # least-squares FTM fix x, y (mask "fix")
                    "kf": np.round(feats[i, :, 2:4], 6).tolist(),  # range Kalman filter x, y (mask "kf")
                    "quality": np.round(feats[i, :, 4:], 6).tolist(),  # ftm_features' quality channels
                    "held": held[i].tolist(),  # a row's features were held at that step (within max age)
                    "position": position[i],  # the positioning twin's, or None
                }
            )
        return out

    def _locate(
        self,
        st: KeyState,
        feats: np.ndarray,
        held: np.ndarray,
        imu: np.ndarray,
        mask: np.ndarray,
        kf_on: np.ndarray,
    ) -> list[dict[str, Any] | None]:
        """The stored positioning twin's position at each window's end: None without a twin or before the
        key's filter started (a filter with other constants is restarted before: :meth:`_restart_filter`)."""
        loc = self.locator
        out: list[dict[str, Any] | None] = [None] * len(kf_on)
        if loc is None or st.filter is None or st.filter.p != loc.filter or not kf_on.any():
            return out
        idx = np.flatnonzero(kf_on)
        pos, anchor = loc.locate(feats[idx], held[idx], imu[idx], mask[idx])
        for j, i in enumerate(idx):
            out[i] = {
                "x": round(float(pos[j, 0]), 4),
                "y": round(float(pos[j, 1]), 4),
                "kf_x": round(float(anchor[j, 0]), 4),
                "kf_y": round(float(anchor[j, 1]), 4),
                "twin": loc.twin_id,
                "version": loc.version,
                "alpha": loc.alpha,
            }
        return out


def encode_window(w: dict[str, Any]) -> bytes:
    return json.dumps(w, separators=(",", ":")).encode()
