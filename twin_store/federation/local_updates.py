"""The stream protocol of H-twinning, shared by the offline benchmark and the live BS agents.

Both drive the same rules, so a live run and the benchmark make the same forecasts for the same data and
seed:

- **Hours.** Hour ``h`` counts from the start of the series (``start_ms``). V-twinning used the hours
  before ``start_hour``. Forecasts and local updates begin at ``start_hour``.
- **What a twin sees.** At the close of hour ``h`` an agent acts on twins that reflect updates up to hour
  ``h - 1`` only. So the forecast of hour ``t`` (issued when ``t - 1`` closes) uses twins up to ``t - 2``, and
  a local update at ``h`` starts from its cluster twin as of ``h - 1``. The round trip through the twin
  store then has a whole hour of stream time; a live agent only waits (bounded) when its own updates of
  the previous hour have not come back yet.
- **Schedule.** BS ``s`` trains every ``update_every`` hours, at a fixed offset drawn from (seed, s). This
  staggers the BSs, and the schedule does not depend on which process serves the BS.
- **Local update.** A few Adam steps on the samples whose target lies in the last ``window`` hours. The
  minibatches come from a generator seeded by (seed, square, hour), so the result does not depend on which
  other BSs share the batched training pass.
- **Running traffic statistics.** Each BS reports its mean z-scored traffic per hour of day with every
  update. DCS re-clustering uses these profiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from twin_store.federation.models_topic import TwinMessage, is_int
from twin_store.federation.samples import DAY, LAGS
from twin_store.federation.series import HOUR_MS
from twin_store.federation.twinning import ClusterTwins
from twin_store.models.forecaster import FitConfig, TwinModel


@functools.lru_cache(maxsize=1 << 20)
def _offset(seed: int, update_every: int, square: int) -> int:
    """A BS's update phase: seeded per square, so the store, the agents and the bench agree. Cached: asked
    for every entity at every step (a fresh generator costs ~20 us: 0.2 s a step at 10,000 entities)."""
    return int(np.random.default_rng([seed, square]).integers(update_every))


@dataclass(frozen=True)
class StreamPlan:
    seed: int
    start_hour: int  # first hour with forecasts and local updates (V-twinning used the hours before)
    start_ms: int  # epoch ms of hour 0
    update_every: int = 24  # hours between a BS's local updates
    window: int = 336  # hours of recent samples a local update trains on
    # lr 3e-3: the lowest validation MSE of 1e-2 / 3e-3 / 1e-3 in `nettwin bench vhtwin` (50 squares, seed 1)
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=20, lr=3e-3, batch=64))
    recluster_every: int = 500  # accepted updates between DCS re-clusterings; 0: never
    column: str = "activity"  # which feature column is the traffic series
    # the step ("hour") of the series: Milan's hour, or the [twins] cadence
    step_ms: int = HOUR_MS
    # model inputs: how many steps before the target each input lies, oldest first (Milan: 5 days + 5 hours)
    lags: tuple[int, ...] = tuple(int(x) for x in LAGS)
    steps_per_day: int = DAY  # the profile a BS reports has one bin per hour of day, whatever the step
    horizon: int = 1  # forecasts are for the step this many steps after the one that closed
    fill_limit: int = 0  # model inputs carried forward over at most this many missing steps (0: none)

    def offset(self, square: int) -> int:
        return _offset(self.seed, self.update_every, square)

    def due(self, square: int, hour: int) -> bool:
        return (
            hour >= self.start_hour
            and (hour - self.start_hour + self.offset(square)) % self.update_every == 0
        )

    def first_target(self, hour: int) -> int:
        """The oldest target hour a local update at ``hour`` trains on."""
        return max(max(self.lags), hour + 1 - self.window)

    @property
    def lag_array(self) -> np.ndarray:
        return np.asarray(self.lags, np.int64)

    def hour_of(self, start_ms: int) -> int:
        return (start_ms - self.start_ms) // self.step_ms

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> StreamPlan:
        values = dict(meta)
        values["fit"] = FitConfig(**values["fit"])
        if "lags" in values:
            values["lags"] = tuple(values["lags"])
        return cls(**values)


def minibatch_generators(seed: int, squares: list[int], hour: int) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, s, hour]).generate_state(1)[0]))
        for s in squares
    ]


def window_samples(
    z: np.ndarray, first_target: int, hour: int, lags: np.ndarray = LAGS
) -> tuple[np.ndarray, np.ndarray]:
    """Samples of one series ``z [H]`` (hour-indexed) with targets in [first_target, hour]; NaN rows dropped."""
    targets = np.arange(first_target, hour + 1)
    x = z[targets[:, None] - lags[None, :]]
    y = z[targets]
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return x[ok], y[ok]


def local_updates(
    model: TwinModel,
    starts: torch.Tensor,
    series: list[np.ndarray],
    squares: list[int],
    hour: int,
    plan: StreamPlan,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Train the BSs due at ``hour`` in one batched pass.

    ``starts [B, P]`` are their cluster twins, ``series[b]`` square b's z-scored history (index = hour, at
    least ``hour + 1`` long). Returns (new params, training loss per BS, samples per BS); a BS without a
    sample keeps its start and reports 0 samples.
    """
    first = plan.first_target(hour)
    pairs = [window_samples(z, first, hour, plan.lag_array) for z in series]
    counts = [len(y) for _, y in pairs]
    n = max(max(counts), 1)
    x = torch.zeros(len(series), n, len(plan.lags))
    y = torch.zeros(len(series), n)
    for b, (xs, ys) in enumerate(pairs):
        x[b, : len(ys)] = torch.as_tensor(xs, dtype=torch.float32)
        y[b, : len(ys)] = torch.as_tensor(ys, dtype=torch.float32)
    gens = minibatch_generators(plan.seed, squares, hour)
    new, loss = model.fit(starts, x, y, plan.fit, gens, counts=torch.tensor([max(c, 1) for c in counts]))
    for b, c in enumerate(counts):
        if c == 0:
            new[b] = starts[b]
    return new, loss, counts


@dataclass(frozen=True)
class DueUpdate:
    row: int  # the square's row in the series matrix
    square: int
    start: torch.Tensor  # the cluster twin it trained from
    params: torch.Tensor
    n_samples: int  # 0: no sample in its window, nothing to send


def due_updates(
    model: TwinModel,
    plan: StreamPlan,
    clusters: ClusterTwins,
    squares: list[int],
    series: np.ndarray,
    hour: int,
) -> list[DueUpdate]:
    """The offline streams' BSs due at ``hour`` (``series [S, H]`` rows in ``squares`` order), each trained from
    its cluster twin as it stands now, in one batched pass."""
    rows = [i for i, s in enumerate(squares) if plan.due(s, hour)]
    if not rows:
        return []
    due = [squares[i] for i in rows]
    starts = torch.stack([clusters.twins[clusters.labels[s]] for s in due])
    new, _, counts = local_updates(model, starts, [series[i] for i in rows], due, hour, plan)
    return [
        DueUpdate(i, s, starts[k], new[k], counts[k]) for k, (i, s) in enumerate(zip(rows, due, strict=True))
    ]


def profile_upto(z: np.ndarray, hour: int, steps_per_day: int = DAY) -> list[float]:
    """Mean of ``z [H]`` per hour of day over steps 0..hour (missing steps skipped): the running traffic
    statistics a BS reports with its updates and DCS clusters on. Steps shorter or longer than an hour
    fall into the bin of the hour of day they start in (step 0 starts at midnight UTC: steps are aligned
    to the epoch and divide a day)."""
    values = z[: hour + 1]
    ok = np.isfinite(values)
    hod = (np.arange(values.size) % steps_per_day) * DAY // steps_per_day
    sums = np.bincount(hod[ok], weights=values[ok], minlength=DAY)
    counts = np.bincount(hod[ok], minlength=DAY)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).round(6).tolist()


# local-update meta the store relies on: name -> (lowest value, required)
UPDATE_INTS = {"seq": (0, True), "n_samples": (1, True), "hour": (0, False), "base_version": (0, False)}


def update_problem(update: TwinMessage) -> str | None:
    """Why a local update from ``updates.local`` is malformed (types and shapes), or None.

    Checked before anything uses it, so a bad field is a dead letter and never an exception deep in
    re-clustering or screening. Authenticity and staleness are the store's decisions, not checked here.
    """
    if not (update.twin_id.isascii() and update.twin_id.isdecimal()):
        return f"BS id {update.twin_id!r} is not a square number"
    meta = update.meta
    for key, (low, required) in UPDATE_INTS.items():
        if key not in meta and not required:
            continue
        if not is_int(meta.get(key), low):
            return f"BS {update.twin_id}: {key} must be an integer >= {low}, got {meta.get(key)!r}"
    if "cluster" in meta and not is_int(meta["cluster"], -1):
        return f"BS {update.twin_id}: cluster must be an integer >= -1, got {meta['cluster']!r}"
    loss = meta.get("loss", 0.0)
    if not _finite_number(loss):
        return f"BS {update.twin_id}: loss must be a finite number, got {loss!r}"
    if "joined" in meta and not isinstance(meta["joined"], bool):
        return f"BS {update.twin_id}: joined must be true or false, got {meta['joined']!r}"
    entity = meta.get("entity")
    if entity is not None and not (isinstance(entity, str) and 0 < len(entity) <= 512):
        return f"BS {update.twin_id}: entity must be a name of 1..512 characters, got {str(entity)[:60]!r}"
    problem = profile_problem(meta.get("profile"))
    if problem is not None:
        return f"BS {update.twin_id}: {problem}"
    if not _params_in_range(update.params):
        return f"BS {update.twin_id}: parameters must be finite and within +-{MAX_PARAM:g}"
    return None


# A twin's weights are O(1) to O(10); beyond this bound a parameter is a corrupted message, not a model, and
# its squares would overflow float32 in the divergence eps (then every row it touches is unwritable).
MAX_PARAM = 1e4


def _params_in_range(params: np.ndarray) -> bool:
    return bool(np.isfinite(params).all() and (params.size == 0 or np.abs(params).max() <= MAX_PARAM))


def profile_problem(profile: object) -> str | None:
    """A traffic profile is None (not reported) or DAY finite numbers, one per hour of day."""
    if profile is None:
        return None
    if not isinstance(profile, list) or len(profile) != DAY or not all(_finite_number(v) for v in profile):
        shown = repr(profile)[:80]
        return f"profile must be a list of {DAY} finite numbers, got {shown}"
    return None


def snapshot_problem(msg: TwinMessage) -> str | None:
    """Why a message of the ``twin.models`` snapshot cannot be rebuilt from, or None."""
    meta = msg.meta
    if msg.level != "global" and not (msg.twin_id.isascii() and msg.twin_id.isdecimal()):
        return f"{msg.level} twin id {msg.twin_id!r} is not a number"
    if not _params_in_range(msg.params):
        return f"{msg.level} twin {msg.twin_id}: parameters must be finite and within +-{MAX_PARAM:g}"
    if msg.level == "roster":
        return None  # decode_twin checked it (models_topic.roster_problem)
    if msg.level == "global":
        if "roster" in meta and not is_int(meta["roster"], 0):
            return f"global twin: roster must be a version (an integer >= 0), got {meta['roster']!r}"
        if meta.get("clusters") is not None and not is_int(meta["clusters"], 1):
            return f"global twin: clusters must be an integer >= 1, got {meta['clusters']!r}"
        if "milan_dir" in meta and not isinstance(meta["milan_dir"], str):
            return "global twin: milan_dir must be a string"
        if "plan" in meta:
            try:
                plan = StreamPlan.from_meta(meta["plan"])
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                return f"global twin: plan is not a stream plan ({exc})"
            ints = ("seed", "start_hour", "start_ms", "update_every", "window", "recluster_every")
            if not all(is_int(getattr(plan, k), 0) for k in ints) or plan.update_every < 1:
                return f"global twin: plan fields {', '.join(ints)} must be integers >= 0 (update_every >= 1)"
        return None
    if msg.level == "cluster":
        members = meta.get("members", [])
        if not isinstance(members, list) or not all(is_int(m, 0) for m in members):
            return f"cluster twin {msg.twin_id}: members must be a list of square numbers"
        for key in ("epoch", "accepted", "reclustered_at"):
            if key in meta and not is_int(meta[key], 0):
                return f"cluster twin {msg.twin_id}: {key} must be an integer >= 0, got {meta[key]!r}"
        return None
    for key, low in (("seq", -1), ("n_samples", 1), ("decided_seq", -1), ("hour", -1)):
        if (key in meta or key in ("seq", "n_samples")) and not is_int(meta.get(key), low):
            return f"bs twin {msg.twin_id}: {key} must be an integer >= {low}, got {meta.get(key)!r}"
    if "sig" in meta and not isinstance(meta["sig"], str):
        return f"bs twin {msg.twin_id}: sig must be a string"
    if "entity" in meta and not (isinstance(meta["entity"], str) and 0 < len(meta["entity"]) <= 512):
        return f"bs twin {msg.twin_id}: entity must be a name of 1..512 characters"
    problem = profile_problem(meta.get("profile"))
    return None if problem is None else f"bs twin {msg.twin_id}: {problem}"


def _finite_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)
