"""A twin's ``twin`` history row and its ``twin_current`` point, written together; the current state read back.

``twin`` keeps every state a twin had (one series per twin). Listing the latest row of each twin from it needs a
per-series ``LIMIT 1``, which costs InfluxDB one cursor per series: ~0.8 s at 10,000 BS twins. ``twin_current``
holds exactly one point per twin, overwritten in place, in one series per level:

- tag ``level``; time = the twin's key (``twin_key``): its integer id as seconds after the epoch (ids from
  2^31 on, and names, hashed into a 2^24 s range above that), so the points of a level sit in one or two
  shards of 1970 and each write replaces the twin's point (InfluxDB identifies a point by series and time);
- one string field ``state``: a JSON object with the history row's fields, ``level``, ``twin_id``, ``entity``
  (the BS's name, when the writer knows it) and ``time`` (the history row's time, the twin's last update,
  ISO to the second as listed). One field, because InfluxDB merges the fields of a rewritten point (a field the latest row left
  out would keep an older value), and because InfluxDB serialises one column of 10,000 rows several times
  faster than a dozen (measured: ``bench/twins_query.py``, docs/twins.md).

Reading every twin is then one scan of a few series. Last write wins: each twin's rows come from one writer
in update order (the store's first BS row comes before any update of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from twin_store.adapters.lineproto import point

if TYPE_CHECKING:
    from twin_store.adapters.influx import InfluxClient

TWIN = "twin"
TWIN_CURRENT = "twin_current"
# the keys of every listed twin (a twin without one has None), as the ``twin`` schema names them
KEYS = ("level", "twin_id", "entity", "version", "epsilon", "loss", "n_updates", "n_members", "n_offers")
_NULLS = "{" + ",".join(f'"{k}":null' for k in KEYS) + ","  # a state's keys override these (last wins)
UNITS = {"s": 1, "ms": 1_000, "u": 1_000_000, "ns": 1_000_000_000}  # per second, by write precision
INT_KEYS = 1 << 31  # integer ids below this are their own key, in seconds
HASHED_KEYS = 1 << 24  # the range the other ids are hashed into, above INT_KEYS


def twin_key(twin_id: str) -> int:
    """The twin's time in ``twin_current`` (seconds after the epoch), unique per id within a level for ids
    ``0 .. 2^31 - 1``; other ids (UTT twins are named) are hashed, so two of them could share a key
    (for 10 named twins of one level, odds ~3e-6)."""
    if twin_id.isdigit() and int(twin_id) < INT_KEYS:
        return int(twin_id)
    digest = hashlib.blake2b(twin_id.encode(), digest_size=8).digest()
    return INT_KEYS + int.from_bytes(digest, "big") % HASHED_KEYS


def twin_state_lines(
    level: str,
    twin_id: str,
    fields: Mapping[str, object],
    time: int,
    precision: str = "s",
    entity: str | None = None,
) -> list[str]:
    """The ``twin`` row at ``time`` and the twin's ``twin_current`` point, both in ``precision`` (the write's)."""
    unit = UNITS[precision]
    head = {"level": level, "twin_id": twin_id} | ({"entity": entity} if entity is not None else {})
    state = head | {k: v for k, v in fields.items() if v is not None} | {"time": _iso_s(time // unit)}
    return [
        point(TWIN, {"level": level, "twin_id": twin_id}, fields, time),
        point(
            TWIN_CURRENT, {"level": level}, {"state": orjson.dumps(state).decode()}, twin_key(twin_id) * unit
        ),
    ]


def _iso_s(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_ms(ms: Any) -> str:
    """Epoch milliseconds as the listings print times (UTC, to the second)."""
    return _iso_s(int(ms) // 1000)


def _sort_key(row: dict[str, Any]) -> tuple[str, int, str]:
    tid = str(row["twin_id"])
    return (str(row["level"]), int(tid) if tid.isdigit() else -1, tid)


def current_twins(influx: InfluxClient, level: str | None = None) -> list[dict[str, Any]]:
    """Every twin's latest state (of one level): level, twin_id, entity, its fields (None where its latest row
    has none, as the ``twin`` listing gives them), time = its last update (ISO), sorted by level and id. A
    database written before ``twin_current`` existed is read from ``twin``."""
    where = f" WHERE \"level\" = '{level}'" if level else ""
    # one series per level, in tag order, each in key order (integer ids: id order): sorted as listed
    series = influx.query(f'SELECT "state" FROM "{TWIN_CURRENT}"{where} GROUP BY "level"', packed=True)
    if not series and not influx.query(f'SELECT count("state") FROM "{TWIN_CURRENT}"'):
        return latest_history_rows(influx, level)
    out: list[dict[str, Any]] = []
    for s in series:
        # one parse for the level, every state behind the KEYS as nulls: a key the state has overrides its null
        texts = [_NULLS + v[1][1:] for v in s.values]
        rows: list[dict[str, Any]] = orjson.loads("[" + ",".join(texts) + "]")
        ids = [r["twin_id"] for r in rows]
        # integer ids below 10^9 (< INT_KEYS) are in id order already; named twins are in hashed-key order
        if ids and not ("".join(ids).isdigit() and max(map(len, ids)) <= 9):
            rows.sort(key=_sort_key)
        out += rows
    extra = set().union(*out).difference(KEYS, ("time",)) if out else set()
    if extra:  # fields some twins have (UTT twins' lineage): None on the others, as the ``twin`` listing
        for r in out:
            for k in extra:
                r.setdefault(k, None)
    return out


def latest_history_rows(influx: InfluxClient, level: str | None = None) -> list[dict[str, Any]]:
    """The same listing from ``twin`` alone: one series per twin, ``LIMIT 1`` each (slow at thousands of
    twins; kept for databases without ``twin_current`` and as the benchmark's baseline)."""
    where = f" WHERE \"level\" = '{level}'" if level else ""
    q = f'SELECT * FROM "{TWIN}"{where} GROUP BY "level", "twin_id" ORDER BY time DESC LIMIT 1'
    rows = [r for s in influx.query(q) for r in s.rows()]
    for r in rows:
        r["time"] = iso_ms(r["time"])
    rows.sort(key=_sort_key)
    return rows
