"""CSV: one row per op per point of an analysis; one row per point of a validation."""

from __future__ import annotations

import csv
import io

from costmodel.api import Point, Report

def to_csv(report: Report, points: list[Point]) -> str:
    """One row per op per point (dims as leading columns); without points, one row per op type."""
    buf = io.StringIO()
    w = csv.writer(buf)
    if not points:
        w.writerow(["target", "category", "count", "flops", "matmul_flops", "bytes_read", "bytes_written"])
        for r in report.by_op():
            w.writerow([r["target"], r["category"], r["count"], r["flops"], r["matmul_flops"], r["bytes_read"],
                        r["bytes_written"]])
        return buf.getvalue()
    dims = list(points[0].dims)
    cols = ["name", "target", "module", "phase", "category", "dtype", "flops", "matmul_flops", "bytes_read",
            "bytes_written", "intensity", "bound", "time_s"]
    w.writerow(dims + cols)
    for p in points:
        for op in p.ops:
            w.writerow([p.dims[d] for d in dims] + [op.get(c) for c in cols])
    return buf.getvalue()




def validation_csv(r) -> str:
    """`costmodel validate --format csv`."""
    names = list(r.points[0].dims) if r.points else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names + ["measured_time_s", "measured_peak_memory_bytes", "oom", "predicted_time_s",
                        "predicted_peak_memory_bytes", "predicted_flops", "time_pct", "peak_memory_pct"])
    for p in r.points:
        m = p.measured
        w.writerow([p.dims[n] for n in names] + [m.get("time_s", ""), m.get("peak_memory_bytes", ""),
                                                  bool(m.get("oom")), _blank(p.predicted.get("time_s")),
                                                  _blank(p.predicted.get("peak_memory_bytes")),
                                                  p.predicted.get("flops"), _blank(p.errors.get("time_pct")),
                                                  _blank(p.errors.get("peak_memory_pct"))])
    return buf.getvalue()


def _blank(x):
    return "" if x is None else x
