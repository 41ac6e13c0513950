"""Write Milan traffic as 3GPP PM files (TS 32.435 ``measCollecFile``), one file per 10-minute interval (or per
coarser granularity period, e.g. 30 minutes, with the counters summed).

So the whole chain can be shown on real traffic through the ``pm-files`` source: each square becomes a
measured object ``ManagedElement=milan,Square=<id>``, each activity column a counter under its Milan name
(``sms_in`` ... ``internet``, summed over country codes), one granularity period ``PT600S`` per file. Files
are written under a temporary name and renamed, so a watcher never sees one half written. The file name
follows the 32.432 convention ``A<date>.<start>-<end>_<sender>.xml``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from lxml import etree

from ingest.readers.milan import TrafficTable

NS = "http://www.3gpp.org/ftp/specs/archive/32_series/32.435#measCollec"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def interval_document(table: TrafficTable, rows: np.ndarray, start_ms: int) -> bytes:
    step_ms = table.step_s * 1000
    root = etree.Element(f"{{{NS}}}measCollecFile", nsmap={None: NS})
    header = etree.SubElement(
        root, f"{{{NS}}}fileHeader", fileFormatVersion="32.435 V10.0", vendorName="nettwin"
    )
    etree.SubElement(header, f"{{{NS}}}fileSender", localDn="ManagedElement=milan", elementType="grid")
    etree.SubElement(header, f"{{{NS}}}measCollec", beginTime=_iso(start_ms))
    data = etree.SubElement(root, f"{{{NS}}}measData")
    etree.SubElement(data, f"{{{NS}}}managedElement", localDn="ManagedElement=milan")
    info = etree.SubElement(data, f"{{{NS}}}measInfo", measInfoId="milan-activity")
    etree.SubElement(
        info, f"{{{NS}}}granPeriod", duration=f"PT{table.step_s}S", endTime=_iso(start_ms + step_ms)
    )
    for p, name in enumerate(table.columns, 1):
        etree.SubElement(info, f"{{{NS}}}measType", p=str(p)).text = name
    for i in rows.tolist():
        value = etree.SubElement(
            info, f"{{{NS}}}measValue", measObjLdn=f"ManagedElement=milan,Square={table.squares[i]}"
        )
        for p, x in enumerate(table.values[i].tolist(), 1):
            etree.SubElement(value, f"{{{NS}}}r", p=str(p)).text = repr(float(x))
    footer = etree.SubElement(root, f"{{{NS}}}fileFooter")
    etree.SubElement(footer, f"{{{NS}}}measCollec", endTime=_iso(start_ms + step_ms))
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


def file_name(start_ms: int, step_s: int) -> str:
    a = datetime.fromtimestamp(start_ms / 1000, UTC)
    b = a + timedelta(seconds=step_s)
    return f"A{a:%Y%m%d.%H%M}+0000-{b:%H%M}+0000_milan.xml"


def coarsen(table: TrafficTable, granularity_s: int) -> TrafficTable:
    """The table at a coarser granularity period: each square's counters summed over the table's intervals
    inside each epoch-aligned period (counts add up; a period holds what was reported in it)."""
    if granularity_s % table.step_s or granularity_s < table.step_s:
        raise ValueError(f"granularity {granularity_s} s must be a multiple of the table's {table.step_s} s")
    if granularity_s == table.step_s:
        return table
    period_ms = granularity_s * 1000
    starts = table.starts_ms - table.starts_ms % period_ms
    keys = np.stack([starts, table.squares.astype(np.int64)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    sums = np.zeros((len(uniq), table.values.shape[1]))
    np.add.at(sums, inverse.ravel(), table.values)
    return TrafficTable(
        table.source,
        table.columns,
        granularity_s,
        uniq[:, 1].astype(table.squares.dtype),
        uniq[:, 0],
        sums,
        table.lines,
        table.bad,
    )


def write_pm_files(table: TrafficTable, out: Path, granularity_s: int | None = None) -> list[Path]:
    """One PM file per interval of the table (or per ``granularity_s`` period, counters summed: see
    :func:`coarsen`); returns the files written, in time order."""
    if granularity_s is not None:
        table = coarsen(table, granularity_s)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for start in np.unique(table.starts_ms).tolist():
        rows = np.flatnonzero(table.starts_ms == start)
        path = out / file_name(int(start), table.step_s)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(interval_document(table, rows, int(start)))
        os.replace(tmp, path)
        written.append(path)
    return written
