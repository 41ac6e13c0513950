"""BS agents of a [twins] deployment, without services: 30-minute steps, the plan's own lags (six inputs, a
horizon of two), entity names on the forecast rows, short gaps bridged by past values only."""

from __future__ import annotations

import numpy as np
import torch

from ingest.schema import RecordBatch, decode
from stream_processors.bs_agents import BsAgents
from stream_processors.twin_windows import step_batch
from twin_store.adapters.traffic import forecast_lines
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.models.forecaster import FitConfig, TwinModel

STEP = 1_800_000
START = 1_077_926_400_000  # a UTC midnight
LAGS = (48, 6, 5, 4, 3, 2)  # horizon 2: the close inputs start two steps back
PLAN = StreamPlan(
    seed=1, start_hour=60, start_ms=START, update_every=4, window=24, fit=FitConfig(2, 1e-2, 8),
    recluster_every=0, column="temperature", step_ms=STEP, lags=LAGS, steps_per_day=48, horizon=2,
    fill_limit=3,
)  # fmt: skip
MODEL = TwinModel(8, len(LAGS))
NAMES = {11: "mote-1", 12: "mote-2"}
SCALER = {"11": [20.0, 2.0], "12": [22.0, 1.0]}


def snapshot() -> list[TwinMessage]:
    params = MODEL.init(1, 0)[0].numpy()
    meta = {"plan": PLAN.to_meta(), "scaler": SCALER, "as_of": -1, "metric": "temperature"}
    return [
        TwinMessage("global", "0", 1, 8, params, meta),
        TwinMessage("cluster", "0", 1, 8, params, {"members": [11, 12], "epoch": 0, "as_of": -1}),
    ]


def step(k: int, values: dict[int, float]) -> RecordBatch:
    keys = sorted(values)
    rows = [(values[s], 2.0) for s in keys]
    return step_batch("temperature", "mean", 1800, keys, [START + k * STEP] * len(keys), rows, NAMES)


def test_thirty_minute_steps_forecast_horizon_ahead_with_names_and_the_metric() -> None:
    agents = BsAgents()
    for t in snapshot():
        agents.on_twin(t)
    rng = np.random.default_rng(0)
    data = {s: SCALER[str(s)][0] + rng.standard_normal(70) for s in NAMES}
    data[12][55:57] = np.nan  # two steps missing: bridged from the step before (fill_limit 3)
    outs = {}
    for k in range(65):
        present = {s: float(data[s][k]) for s in NAMES if np.isfinite(data[s][k])}
        outs[k] = agents.on_hour(step(k, present))
    # the close of step 59 forecasts step 61 (horizon 2), at the start of step 61, for both motes
    [fc] = outs[59].forecasts
    assert (
        fc.step_s == 1800
        and int(fc.starts_ms[0]) == START + 61 * STEP
        and sorted(fc.squares.tolist()) == [11, 12]
    )
    # the forecast is the global twin on the plan's lags, de-scaled with the mote's statistics
    x = np.array([(data[11][61 - lag] - 20.0) / 2.0 for lag in LAGS])
    want = MODEL.predict(torch.as_tensor(snapshot()[0].params)[None], torch.tensor(x).float()[None, None])
    assert abs(fc.values[fc.squares.tolist().index(11), 0] - (float(want[0, 0]) * 2.0 + 20.0)) < 1e-4
    # step 58's forecast of mote 2 needed step 56 (missing): the value of step 54 was carried forward
    [fc58] = outs[58].forecasts
    assert 12 in fc58.squares.tolist()
    # rows: tag entity is the name, metric the target, time the forecast step's start
    [oc] = outs[61].outcomes
    lines = forecast_lines(decode(oc.encode()))
    assert any(
        line.startswith("forecast,cluster=0,entity=mote-1,metric=temperature predicted=") for line in lines
    )
    assert all(line.endswith(f" {(START + 61 * STEP) // 1000}") for line in lines)


def test_a_gap_longer_than_the_fill_limit_issues_no_forecast() -> None:
    agents = BsAgents()
    for t in snapshot():
        agents.on_twin(t)
    vals = 20.0 + np.sin(np.arange(70))
    issued = []
    for k in range(66):
        present = {11: float(vals[k])} if not 50 <= k < 58 else {}
        present[12] = 22.0 + float(np.cos(k))
        out = agents.on_hour(step(k, present))
        issued += [(int((f.starts_ms[0] - START) // STEP), f.squares.tolist()) for f in out.forecasts]
    # mote 1 is silent for 8 steps: its inputs at lags 2..6 are missing beyond fill_limit for targets 61..
    by_target = dict(issued)
    assert 11 not in by_target[61] and 12 in by_target[61]
    assert 11 in by_target[65]  # inputs 59..63 and 17 reported again: forecast again
