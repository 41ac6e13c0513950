"""3GPP performance-measurement XML files -> canonical records. Pure (lxml, no Kafka).

Two layouts, read by element local names so either namespace (or none) works:

- TS 32.435 ``measCollecFile``: ``fileHeader/measCollec@beginTime``, then ``measData`` blocks, each with
  ``managedElement@localDn`` and ``measInfo`` blocks;
- TS 28.550 / 28.532 ``measDataFile`` style files, whose ``measData`` blocks have the same
  ``measInfo`` content.

Inside a ``measInfo``: ``granPeriod@duration`` (ISO 8601, e.g. ``PT900S``) and ``@endTime``; the counter
names either as ``measType p="1"`` elements (values in ``measValue/r p="1"``) or as one space-separated
``measTypes`` (values in ``measValue/measResults``). One record per ``measValue``: entity = ``measObjLdn``,
time = start of the granularity period (endTime - duration), metrics = the counters under their file names
(``DRB.UEThpDl``). Empty and ``NIL`` values mean "not available" and are left out.

Refused (a ``Refusal`` each, the rest of the file still counts): a ``measValue`` with ``suspect`` true (the
network element says its values are unreliable), a counter named twice in one ``measInfo`` or given twice in
one ``measValue``, a non-numeric value, a ``measInfo`` without a usable ``granPeriod``. A file that is not
well-formed XML (for example truncated) or has no ``measData`` is refused whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from lxml import etree

from ingest.sources.record import (
    Limits,
    Parsed,
    Record,
    RecordError,
    Refusal,
    check_record,
    metric_value,
    parse_time,
)

_DURATION = re.compile(r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")
_MISSING = {"", "NIL", "nil", "null"}


def duration_s(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m or not any(m.groupdict().values()):
        raise RecordError(f"granPeriod duration {text!r} is not an ISO 8601 duration like PT900S")
    g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return g["d"] * 86400 + g["h"] * 3600 + g["m"] * 60 + g["s"]


def _local(el: Any) -> str:
    tag = el.tag
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _children(el: Any, name: str) -> Iterator[Any]:
    for child in el:
        if _local(child) == name:
            yield child


def _child(el: Any, name: str) -> Any | None:
    return next(_children(el, name), None)


def _snippet(el: Any) -> bytes:
    return bytes(etree.tostring(el))


def parse_pm_file(data: bytes, where: str, now_ms: int, limits: Limits = Limits()) -> Parsed:
    """Records of one PM file; ``where`` (the file name) locates refusals (``file measInfo 2 measValue 3``)."""
    out = Parsed()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        out.refusals.append(Refusal(f"not well-formed XML (truncated?): {exc}", where, data))
        return out
    blocks = [el for el in root.iter() if _local(el) == "measData"]
    if not blocks:
        out.refusals.append(
            Refusal(f"no measData in a <{_local(root)}> document; not a 3GPP PM file", where, data)
        )
        return out
    k = 0
    for block in blocks:
        for info in _children(block, "measInfo"):
            k += 1
            out.extend(_meas_info(info, f"{where} measInfo {k}", now_ms, limits))
    return out


def _meas_info(info: Any, where: str, now_ms: int, limits: Limits) -> Parsed:
    out = Parsed()
    try:
        start_ms = _period_start_ms(info)
        names_by_p, names_list = _counter_names(info)
    except RecordError as exc:
        out.refusals.append(Refusal(str(exc), where, _snippet(info)))
        return out
    for j, value in enumerate(_children(info, "measValue"), 1):
        pos = f"{where} measValue {j}"
        try:
            rec = _meas_value(value, start_ms, names_by_p, names_list)
            out.records.append(check_record(rec, now_ms, limits))
        except RecordError as exc:
            out.refusals.append(Refusal(str(exc), pos, _snippet(value)))
    return out


def _period_start_ms(info: Any) -> int:
    gran = _child(info, "granPeriod")
    if gran is None or not gran.get("endTime") or not gran.get("duration"):
        raise RecordError("measInfo without granPeriod endTime and duration")
    end_ms = parse_time(gran.get("endTime"))
    return end_ms - round(duration_s(gran.get("duration")) * 1000)


def _counter_names(info: Any) -> tuple[dict[str, str], list[str]]:
    """Counter names by position attribute ``p`` (measType layout) and in order (measTypes layout)."""
    by_p: dict[str, str] = {}
    for t in _children(info, "measType"):
        name = (t.text or "").strip()
        p = t.get("p") or str(len(by_p) + 1)
        if not name:
            raise RecordError(f"measType p={p} has no name")
        if p in by_p:
            raise RecordError(f"measType p={p} given twice")
        by_p[p] = name
    types_el = _child(info, "measTypes")
    listed = (types_el.text or "").split() if types_el is not None else []
    names = list(by_p.values()) + listed
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecordError(f"counter(s) {dupes} named twice in one measInfo")
    if not names:
        raise RecordError("measInfo names no counters (no measType/measTypes)")
    return by_p, listed


def _meas_value(value: Any, start_ms: int, by_p: dict[str, str], listed: list[str]) -> Record:
    entity = (value.get("measObjLdn") or "").strip()
    if not entity:
        raise RecordError("measValue without measObjLdn")
    suspect = _child(value, "suspect")
    if suspect is not None and (suspect.text or "").strip().lower() == "true":
        raise RecordError("suspect flag set: the network element marked these values unreliable")
    metrics: dict[str, float] = {}
    for r in _children(value, "r"):
        p = r.get("p")
        if p not in by_p:
            raise RecordError(f"r p={p} names no measType")
        name = by_p[p]
        if name in metrics:
            raise RecordError(f"counter {name!r} given twice")
        _put(metrics, name, r.text)
    results = _child(value, "measResults")
    if results is not None:
        cells = (results.text or "").split()
        if len(cells) != len(listed):
            raise RecordError(f"measResults has {len(cells)} values for {len(listed)} measTypes")
        for name, cell in zip(listed, cells, strict=True):
            _put(metrics, name, cell)
    if not metrics:
        raise RecordError("no counter values")
    return Record(entity, start_ms, metrics)


def _put(metrics: dict[str, float], name: str, text: str | None) -> None:
    raw = (text or "").strip()
    if raw in _MISSING:
        return
    try:
        x = float(raw)
    except ValueError as exc:
        raise RecordError(f"counter {name!r} value {raw!r} is not a number") from exc
    metrics[name] = metric_value(name, x)
