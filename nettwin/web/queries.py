"""The web view's InfluxQL reads. Every value put in a query is an int checked by the caller or a constant,
so no request can change a query's shape."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from ingest.errors import InputError
from twin_store.adapters.influx import InfluxClient, Series
from twin_store.adapters.twin_rows import TWIN_CURRENT, current_twins, twin_key

# map layers: name -> (label, unit)
LAYERS = {
    "traffic": ("current traffic (internet activity, last hour)", "activity"),
    "error": ("last forecast error |predicted - actual|", "activity"),
    "cluster": ("cluster (latest membership)", "cluster"),
    "flagged": ("flagged traffic / refused updates", "state"),
}
HISTORY_LIMIT = 2000  # points per chart line
# the traffic a map shows: internet activity of the official files, or the hourly files' single activity
TRAFFIC_FIELDS = 'last("internet"), last("activity")'


def _traffic_value(row: list[Any]) -> Any:
    return row[1] if row[1] is not None else row[2]


def _newest_per_square(influx: InfluxClient, measurement: str, fields: tuple[str, ...]) -> dict[str, Any]:
    """Each square's newest value of the first non-null field among ``fields``, over the two newest hours.

    One series of rows instead of ``last() GROUP BY entity`` (one series per square): at 10,000 squares
    this is 3-4x faster, which the map's first paint needs. A square silent for two hours is not current.
    """
    newest = None
    for f in fields:
        t = run(influx, f'SELECT last("{f}") FROM "{measurement}"')
        if t and t[0].values:
            newest = max(newest or 0, int(t[0].values[0][0]))
    if newest is None:
        return {}
    cols = ", ".join(f'"{f}"' for f in fields)
    q = f'SELECT {cols}, "entity" FROM "{measurement}" WHERE time > {newest - 2 * 3_600_000}ms'
    out: dict[str, Any] = {}
    for series in run(influx, q):
        for row in series.values:  # oldest first: newer rows overwrite
            value = next((v for v in row[1:-1] if v is not None), None)
            if value is not None and row[-1] is not None:
                out[str(row[-1])] = value
    return out


def current(influx: InfluxClient, level: str) -> list[dict[str, Any]]:
    """The twins of ``level`` as ``nettwin query twins`` lists them (``twin_current``); none before a database
    exists."""
    try:
        return current_twins(influx, level)
    except InputError as exc:
        if "database not found" in str(exc):
            return []
        raise


def run(influx: InfluxClient, q: str) -> list[Series]:
    """A query; a database that does not exist yet (a fresh demo) reads as empty."""
    try:
        return influx.query(q)
    except InputError as exc:
        if "database not found" in str(exc):
            return []
        raise


def _scalar(series: list[Series]) -> Any:
    return series[0].values[0][1] if series and series[0].values else None


def _by_tag(series: list[Series], tag: str) -> dict[str, Any]:
    return {s.tags.get(tag, ""): s.values[0][1] for s in series if s.values}


def layer(influx: InfluxClient, name: str) -> dict[str, Any]:
    """One value per square for a map layer: ``{"squares": [...], "values": [...]}``."""
    if name == "traffic":
        values = _newest_per_square(influx, "traffic_hourly", ("internet", "activity"))
    elif name == "error":
        values = _newest_per_square(influx, "forecast", ("abs_error",))
    elif name == "cluster":
        values = _by_tag(run(influx, 'SELECT last("cluster") FROM "membership" GROUP BY "entity"'), "entity")
    elif name == "flagged":
        # 0 fine, 1 its traffic was flagged by the screen, 2 an update was rejected, 3 quarantined
        flagged = _by_tag(run(influx, 'SELECT max("flagged") FROM "forecast" GROUP BY "entity"'), "entity")
        values = {sq: 1 if v else 0 for sq, v in flagged.items()}
        for decision, code in (("rejected", 2), ("quarantined", 3)):
            q = f'SELECT count("seq") FROM "update" WHERE "decision" = \'{decision}\' GROUP BY "entity"'
            for sq in _by_tag(run(influx, q), "entity"):
                values[sq] = max(values.get(sq, 0), code)
    else:
        raise ValueError(f"unknown layer {name!r}")
    squares = sorted(int(s) for s, v in values.items() if s.isdigit() and v is not None)
    return {
        "layer": name,
        "label": LAYERS[name][0],
        "squares": squares,
        "values": [values[str(s)] for s in squares],
    }


def twin_summary(influx: InfluxClient) -> dict[str, Any]:
    """Versions, H-twinning syncs against offers, re-clusterings and update decisions."""
    glob = next((t["version"] for t in current(influx, "global")), None)
    clusters = {t["twin_id"]: t["version"] for t in current(influx, "cluster")}
    syncs = _scalar(run(influx, 'SELECT count("version") FROM "twin" WHERE "level" = \'global\''))
    offers = _scalar(run(influx, 'SELECT max("n_offers") FROM "twin"'))
    epoch = _scalar(run(influx, 'SELECT max("epoch") FROM "membership"'))
    decisions = _by_tag(run(influx, 'SELECT count("seq") FROM "update" GROUP BY "decision"'), "decision")
    bs_moved = _scalar(
        run(influx, 'SELECT count("loss") FROM "twin" WHERE "level" = \'bs\' AND "version" > 0')
    )
    return {
        "global_version": int(glob or 0),
        "cluster_versions": {str(k): int(v) for k, v in sorted(clusters.items(), key=lambda kv: kv[0])},
        # V-twinning wrote the first global row; every later one is a live merge (a sync)
        "global_syncs": max(0, int(syncs or 0) - 1),
        "sync_offers": int(offers or 0),
        "membership_epochs": int(epoch) + 1 if epoch is not None else 0,
        "bs_updates": int(bs_moved or 0),
        "updates": {str(k): int(v) for k, v in decisions.items()},
    }


def forecast_counts(influx: InfluxClient) -> dict[str, Any]:
    issued = _scalar(run(influx, 'SELECT count("predicted") FROM "forecast"'))
    scored = _scalar(run(influx, 'SELECT count("abs_error") FROM "forecast"'))
    mae = _scalar(run(influx, 'SELECT mean("abs_error") FROM "forecast"'))
    return {"issued": int(issued or 0), "scored": int(scored or 0), "mae": mae}


def twin_history(influx: InfluxClient) -> dict[str, Any]:
    """Global and cluster versions over time, offers beside merges, membership epochs."""
    glob = run(
        influx,
        f'SELECT "version", "n_offers", "epsilon" FROM "twin" WHERE "level" = \'global\' '
        f"ORDER BY time DESC LIMIT {HISTORY_LIMIT}",
    )
    clusters = run(
        influx,
        f'SELECT "version", "n_offers", "epsilon" FROM "twin" WHERE "level" = \'cluster\' '
        f'GROUP BY "twin_id" ORDER BY time DESC LIMIT {HISTORY_LIMIT}',
    )
    members = run(influx, 'SELECT "cluster", "epoch" FROM "membership" ORDER BY time DESC LIMIT 100000')
    epochs: dict[int, dict[str, Any]] = {}
    for s in members:
        for r in s.rows():
            e = epochs.setdefault(int(r["epoch"]), {"epoch": int(r["epoch"]), "time": r["time"], "sizes": {}})
            e["time"] = min(e["time"], r["time"])
            cid = str(int(r["cluster"]))
            e["sizes"][cid] = e["sizes"].get(cid, 0) + 1
    offers = [[r["time"], r["n_offers"]] for s in clusters for r in s.rows() if r.get("n_offers") is not None]
    offers.sort()
    return {
        "global": [[r["time"], r["version"]] for s in glob for r in reversed(s.rows())],
        "clusters": {
            s.tags.get("twin_id", ""): [[r["time"], r["version"]] for r in reversed(s.rows())]
            for s in clusters
        },
        # psi trade-off: cumulative offers to the global twin (from cluster rows) against its merges
        "offers": offers,
        "epsilon": [
            [r["time"], r["epsilon"]] for s in clusters for r in s.rows() if r.get("epsilon") is not None
        ],
        "epochs": [epochs[k] for k in sorted(epochs)],
    }


def entity(influx: InfluxClient, square: int) -> dict[str, Any]:
    """One square: actual vs forecast (with persistence's error), cluster history, update decisions."""
    sq = int(square)
    rows = [
        r
        for s in run(
            influx,
            f'SELECT "predicted", "actual", "abs_error", "flagged", "cluster" FROM "forecast" '
            f"WHERE \"entity\" = '{sq}' ORDER BY time DESC LIMIT 500",
        )
        for r in s.rows()
    ]
    rows.reverse()
    by_time = {int(r["time"]): r for r in rows}
    model_err, persist_err = [], []
    series = []
    for r in rows:
        t = int(r["time"])
        prev = by_time.get(t - 3_600_000)
        persistence = prev.get("actual") if prev else None
        series.append([t, r.get("actual"), r.get("predicted"), persistence, r.get("flagged")])
        if r.get("actual") is not None and r.get("predicted") is not None and persistence is not None:
            model_err.append(abs(r["predicted"] - r["actual"]))
            persist_err.append(abs(persistence - r["actual"]))
    membership = [
        {"time": r["time"], "cluster": int(r["cluster"]), "epoch": int(r["epoch"])}
        for s in run(
            influx, f'SELECT "cluster", "epoch" FROM "membership" WHERE "entity" = \'{sq}\' ORDER BY time ASC'
        )
        for r in s.rows()
    ]
    decisions = [
        {
            "time": r["time"],
            "decision": s.tags.get("decision"),
            "cluster": s.tags.get("cluster"),
            "reason": r.get("reason") or "",
            "score": r.get("score"),
            "norm": r.get("norm"),
            "seq": r.get("seq"),
        }
        for s in run(
            influx,
            f'SELECT * FROM "update" WHERE "entity" = \'{sq}\' GROUP BY "decision", "cluster" '
            "ORDER BY time DESC LIMIT 100",
        )
        for r in s.rows()
    ]
    decisions.sort(key=lambda d: d["time"], reverse=True)
    twin = run(
        influx,
        f'SELECT "state" FROM "{TWIN_CURRENT}" WHERE "level" = \'bs\' AND time = {twin_key(str(sq))}s',
    )
    state = json.loads(twin[0].values[0][1]) if twin and twin[0].values else {}
    last = run(influx, f'SELECT {TRAFFIC_FIELDS} FROM "traffic_hourly" WHERE "entity" = \'{sq}\'')
    traffic = _traffic_value(last[0].values[0]) if last and last[0].values else None
    n = len(model_err)
    return {
        "square": sq,
        "bs_version": state.get("version"),
        "traffic": traffic,
        "series": series,  # [time, actual, predicted, persistence, flagged]
        "mae": sum(model_err) / n if n else None,
        "persistence_mae": sum(persist_err) / n if n else None,
        "scored": n,
        "membership": membership,
        "decisions": decisions[:100],
    }


def pipeline(influx: InfluxClient, attached: bool = True) -> dict[str, Any]:
    """Records/s, lag percentiles, and the sources: replay runs, sensor sources and (``attached``, one query per
    source: not in the live state polled every few seconds) the sources ``nettwin attach`` feeds."""
    recent = run(
        influx,
        'SELECT sum("records") FROM "pipeline" WHERE time > now() - 15m GROUP BY time(10s), "window" fill(0)',
    )
    rate: dict[str, list[list[Any]]] = {}
    for s in recent:
        rate[s.tags.get("window", "")] = [[t, (v or 0) / 10.0] for t, v in s.values]
    last_minute = run(
        influx, 'SELECT sum("records") FROM "pipeline" WHERE time > now() - 60s GROUP BY "window"'
    )
    lag = run(
        influx,
        'SELECT percentile("lag_ms", 50), percentile("lag_ms", 99), count("lag_ms") FROM "pipeline" '
        "WHERE time > now() - 15m",
    )
    lag_all = run(
        influx, 'SELECT percentile("lag_ms", 50), percentile("lag_ms", 99), count("lag_ms") FROM "pipeline"'
    )
    totals = run(influx, 'SELECT sum("records") FROM "pipeline" GROUP BY "window"')

    def lag_of(series: list[Series]) -> dict[str, Any]:
        if not series or not series[0].values:
            return {"p50": None, "p99": None, "count": 0}
        _, p50, p99, count = series[0].values[0]
        return {"p50": p50, "p99": p99, "count": int(count or 0)}

    runs: dict[str, dict[str, Any]] = defaultdict(lambda: {"sent": 0, "received": 0, "partitions": 0})
    for s in run(influx, 'SELECT last("sent"), last("received") FROM "replay" GROUP BY "run", "partition"'):
        _, sent, received = s.values[0]
        r = runs[s.tags.get("run", "")]
        r["sent"] += int(sent or 0)
        r["received"] += int(received or 0)
        r["partitions"] += 1
    sensors = [
        {"source": s.tags.get("source", ""), "points": s.values[0][1], "flagged": s.values[0][2]}
        for s in run(influx, 'SELECT last("points"), last("flagged") FROM "sensor_screen" GROUP BY "source"')
    ]
    return {
        "attached": attached_sources(influx) if attached else [],
        "records_per_s": {k: (v or 0) / 60.0 for k, v in _by_tag(last_minute, "window").items()},
        "rate": rate,
        "lag_15m": lag_of(lag),
        "lag_all": lag_of(lag_all),
        "records_total": {k: int(v or 0) for k, v in _by_tag(totals, "window").items()},
        "runs": [{"run": k, **v} for k, v in sorted(runs.items())],
        "sensors": sensors,
    }


MAX_SOURCES = 50


def attached_sources(influx: InfluxClient) -> list[dict[str, Any]]:
    """The attached sources (``nettwin attach``) that reached InfluxDB's ``telemetry``: their newest record.

    Their connection state (connected, reconnects, in flight) is on each attach process's ``/metrics``."""
    names = [
        str(row[1])
        for s in run(influx, 'SHOW TAG VALUES FROM "telemetry" WITH KEY = "source"')
        for row in s.values
    ][:MAX_SOURCES]
    out = []
    for name in names:
        quoted = name.replace("\\", "\\\\").replace("'", "\\'")
        newest = run(
            influx, f'SELECT * FROM "telemetry" WHERE "source" = \'{quoted}\' ORDER BY time DESC LIMIT 1'
        )
        row = newest[0].rows()[0] if newest and newest[0].values else {}
        out.append({"source": name, "newest_ms": row.get("time"), "entity": row.get("entity")})
    return out
