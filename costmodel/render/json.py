"""The contract's JSON (see ../shared/CONTRACT.md): one point, a sweep, formulas only, validation."""

from __future__ import annotations

import json

import sympy

from costmodel.analysis import METRICS
from costmodel.api import Point, Report
from costmodel.capture.specs import dtype_name

def point_dict(report: Report, point: Point, depth: int | None = None) -> dict:
    """One point as the contract's JSON object."""
    hw = report.hardware[0] if report.hardware else None
    totals = {k: point.totals.get(k) for k in ("flops", "matmul_flops", "bytes_read", "bytes_written", "bytes",
                                               "params", "param_bytes", "peak_memory_bytes", "memory", "time_s")}
    out = {
        "model": report.model, "mode": report.mode, "dtype": dtype_name(report.dtype), "dims": dict(point.dims),
        "hardware": hw.to_dict() if hw else None,
        "totals": totals,
        "symbolic": symbolic_dict(report),
        "complexity": report.complexity,
        "ops": [{k: op.get(k) for k in ("name", "target", "module", "phase", "category", "dtype", "flops",
                                        "matmul_flops", "bytes_read", "bytes_written", "intensity", "bound",
                                        "time_s")} for op in point.ops],
        "modules": point.modules(depth),
        "unsupported": report.unsupported,
        "guards": [str(g) for g in report.guards],
        "symbolic_method": report.symbolic_method,
        "limits": limits_list(report),
        "warnings": list(report.warnings),
    }
    if point.analysis is not report.primary:
        out["captured_separately"] = True
    for key, value in point.extra.items():
        out[key] = value
    return _jsonable(out)


def symbolic_dict(report: Report) -> dict:
    sym = report.symbolic
    return {k: str(getattr(sym, k)) for k in vars(sym)}


def symbolic_only_dict(report: Report, depth: int | None = None) -> dict:
    """No dimension values given: the formulas, per op (`ops`, the same keys as a point's, formulas for
    figures), per module and per op type."""
    return _jsonable({
        "model": report.model, "mode": report.mode, "dtype": dtype_name(report.dtype), "dims": {},
        "inputs": [str(s) for s in report.inputs], "totals": None, "symbolic": symbolic_dict(report),
        "complexity": report.complexity,
        "modules": [{"module": r["module"], "flops": str(r["flops"]), "bytes": str(r["bytes"])}
                    for r in report.by_module(depth)],
        "ops": [{"name": op.name, "target": op.target, "module": op.module, "phase": op.phase,
                 "category": op.category, "dtype": op.dtype, **{m: str(op.cost[m]) for m in METRICS if m != "bytes"}}
                for op in report.primary.ops],
        "ops_by_target": [{"target": r["target"], "category": r["category"], "count": r["count"],
                           "flops": str(r["flops"]), "bytes": str(r["bytes"])} for r in report.by_op()],
        "unsupported": report.unsupported, "guards": [str(g) for g in report.guards],
        "symbolic_method": report.symbolic_method,
        "limits": limits_list(report), "warnings": list(report.warnings),
    })


def limits_list(report: Report) -> list[dict]:
    """The model's limits as JSON: {"bound", "reason", "where", "hard"}."""
    return [{"bound": str(l.expr), "reason": l.reason, "where": l.where, "hard": l.hard} for l in report.limits]


def to_json(report: Report, points: list[Point], depth: int | None = None) -> str:
    if not points:
        return json.dumps(symbolic_only_dict(report, depth), indent=2)
    if len(points) == 1:
        return json.dumps(point_dict(report, points[0], depth), indent=2)
    return json.dumps({"points": [point_dict(report, p, depth) for p in points]}, indent=2)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, sympy.Basic):
        return int(x) if x.is_Integer else str(x)
    return x




def validation_json(result) -> str:
    """`costmodel validate --format json`: ValidationResult.to_dict()."""
    return json.dumps(_jsonable(result.to_dict()), indent=2, default=_default)


def _default(x):
    import numpy as np
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return str(x)
