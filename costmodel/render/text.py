"""Data -> text: tables (tabulate), Markdown, CSV and the contract's JSON. Never prints.

Units are SI inside the package; scaling to GFLOP, GiB and ms happens here only.
"""

from __future__ import annotations

import csv
import io
import json

import sympy
from tabulate import tabulate

from costmodel.capture import trace as cap
from costmodel.api import Point, Report
from costmodel.capture.specs import dtype_name

GIB = 1024 ** 3


def _num(x, unit: str = "") -> str:
    if x is None:
        return "-"
    x = float(x)
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _bytes(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for scale, prefix in ((1024 ** 4, "TiB"), (GIB, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{int(x)} B"


def _time(t) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


# --- JSON -----------------------------------------------------------------------------------------

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
    """No dimension values given: the formulas, per module and per op type."""
    return _jsonable({
        "model": report.model, "mode": report.mode, "dtype": dtype_name(report.dtype), "dims": {},
        "inputs": [str(s) for s in report.inputs], "totals": None, "symbolic": symbolic_dict(report),
        "complexity": report.complexity,
        "modules": [{"module": r["module"], "flops": str(r["flops"]), "bytes": str(r["bytes"])}
                    for r in report.by_module(depth)],
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


# --- CSV ------------------------------------------------------------------------------------------

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


# --- tables ---------------------------------------------------------------------------------------

def _memory_lines(points: list[Point], h) -> list[str]:
    """Peak memory: the OOM verdict on the first device, the breakdown and what is live at the peak."""
    lines = []
    for p in points:
        v = p.extra.get("oom")
        mem = p.extra.get("memory")
        if not v or not mem:
            continue
        where = ", ".join(f"{d}={x}" for d, x in p.dims.items())
        verdict = (f"fits {v['device']} ({_bytes(v['capacity_bytes'])} usable), {_bytes(v['margin_bytes'])} to spare"
                   if v["fits"] else
                   f"does NOT fit {v['device']} ({_bytes(v['capacity_bytes'])} usable), "
                   f"{_bytes(-v['margin_bytes'])} over")
        parts = sorted(v["memory"].items(), key=lambda kv: -kv[1])
        at = mem.get("at") or {}
        lines.append(f"\nat {where}: peak {_bytes(v['peak_memory_bytes'])}: {verdict}")
        lines.append("  at the peak (" + f"{at.get('target', '?')} in {at.get('module', '?')}, {at.get('phase', '?')}): "
                     + ", ".join(f"{k.replace('_', ' ')} {_bytes(b)}" for k, b in parts if b))
        largest = mem.get("largest") or []
        if largest:
            lines.append("  largest live tensors: " + "; ".join(
                f"{t['node']} {t['shape']} {_bytes(t['bytes'])}" for t in largest[:3]))
        fits = v.get("largest_fitting") or {}
        others = lambda d: ", ".join(f"{k}={x}" for k, x in p.dims.items() if k != d)
        for d, n in fits.items():
            lines.append(f"  largest {d} that fits at {others(d) or 'these sizes'}: {n['description']}")
    if lines:
        lines.insert(0, h("Memory"))
    return lines


def _size_not_one(guard) -> bool:
    """PyTorch's contiguity checks assume derived sizes are not 1: true, and noise in a report."""
    e = guard.expr
    return isinstance(e, sympy.Ne) and e.rhs in (0, 1)


def to_table(report: Report, points: list[Point], depth: int | None = 2, top: int = 10, by: str = "module",
             fmt: str = "simple") -> str:
    """The human report: header, formulas, complexity, totals per point, roll-up, top ops, coverage."""
    md = fmt == "github"
    h = (lambda t: f"\n## {t}\n") if md else (lambda t: f"\n{t}\n{'-' * len(t)}")
    out = []
    title = f"{report.model}: {report.mode}, {dtype_name(report.dtype)}"
    out.append(f"# {title}" if md else title)
    out.append(f"inputs: {', '.join(str(s) for s in report.inputs)}; parameters: {report.params:,} "
               f"({_bytes(report.param_bytes)})" + (f"; optimizer: {report.optimizer}" if report.mode == "train" else ""))

    interp = report.interpolation
    at = {d: v for d, v in report.fixed.items() if d in report.dims and (interp is None or interp.dim != d)}
    out.append(h("Formulas" + (f" (at {', '.join(f'{d} = {v}' for d, v in at.items())}: pinned by the capture)"
                               if at else "")))
    sym = symbolic_dict(report)
    rows = [[k, v] for k, v in sym.items() if k not in ("params", "param_bytes")]
    out.append(tabulate(rows, headers=["total", "formula"], tablefmt=fmt))
    cx = report.complexity
    if cx:
        metrics = list(next(iter(cx.values())))
        out.append("")
        out.append(tabulate([[d] + [f"{d}^{cx[d][m]}" if m in cx[d] else "per point" for m in metrics] for d in cx],
                            headers=["complexity"] + metrics, tablefmt=fmt))
    pinned = cap.specialized(report.primary.captured)
    for d, (v, where) in pinned.items():
        out.append(f"\npinned by the capture: {d} = {v}" + (f" (from {where})" if where else ""))
        if interp is not None and interp.dim == d:
            peak = report.symbolic_method["peak_memory_bytes"]["method"]
            out.append(f"  formulas in {d} interpolated: degree {interp.degree} through {d} = "
                       f"{', '.join(map(str, interp.points))}, verified at {d} = {interp.verified_at}"
                       + ("" if peak == "interpolated" else f"; peak_memory_bytes is the capture's at {d} = {v}, "
                          f"other values of {d} are captured separately")
                       + (f"\n  fitted, not traced: {', '.join(interp.modules)}" if interp.modules else ""))
        else:
            out.append(f"  no formula in {d}: each value of {d} is captured separately")
    if report.guards:
        names = {sympy.Symbol(d, integer=True, positive=True) for d in pinned}
        shown = [g for g in report.guards if not _size_not_one(g) and not g.expr.free_symbols <= names]
        hidden = len(report.guards) - len(shown)
        out.append("\nvalid where: " + "; ".join(str(g) for g in shown)
                   + (f"{'; ' if shown else ''}{hidden} sizes != 1 (layout checks)" if hidden else ""))
    fixed = {d: v for d, v in report.primary.captured.fixed.items() if d not in pinned}
    if fixed:
        out.append("captured at: " + ", ".join(f"{d}={v}" for d, v in fixed.items()))

    if points:
        out.append(h("Totals"))
        dims = list(points[0].dims)
        headers = dims + ["FLOPs", "matmul FLOPs", "read", "written", "peak memory", "time"]
        rows = []
        for p in points:
            t = p.totals
            rows.append([p.dims[d] for d in dims] + [_num(t["flops"]), _num(t["matmul_flops"]), _bytes(t["bytes_read"]),
                                                      _bytes(t["bytes_written"]), _bytes(t.get("peak_memory_bytes")),
                                                      _time(t.get("time_s"))])
        out.append(tabulate(rows, headers=headers, tablefmt=fmt))
        last = points[-1]
        where = ", ".join(f"{d}={v}" for d, v in last.dims.items())
        if "time" in last.extra:
            tm = last.extra["time"]
            out.append(f"\non {tm['device']} at {where}: {_time(last.totals['time_s'])}, "
                       f"{(tm['memory_bound_share'] or 0) * 100:.0f}% of the time memory-bound, "
                       f"MFU {(tm['mfu'] or 0) * 100:.0f}%" + (" (TF32 assumed for float32 matmuls)" if tm["tf32"] else ""))
        out.extend(_memory_lines(points, h))
        out.append(h(f"By module (depth {depth}) at {where}" if by == "module" else f"By op at {where}"))
        if by == "module":
            mods = last.modules(depth)[:max(top, 20)]
            out.append(tabulate([[m["module"], _num(m["flops"]), _num(m["matmul_flops"]), _bytes(m["bytes"]),
                                  _time(m["time_s"])] for m in mods],
                                headers=["module", "FLOPs", "matmul FLOPs", "bytes", "time"], tablefmt=fmt))
        ops = last.by_op()[:top]
        out.append(h(f"Top {len(ops)} ops at {where}"))
        out.append(tabulate([[o["target"], o["category"], o["count"], _num(o["flops"]), _bytes(o["bytes"]),
                              _time(o["time_s"])] for o in ops],
                            headers=["op", "category", "count", "FLOPs", "bytes", "time"], tablefmt=fmt))
    else:
        out.append(h(f"By module (depth {depth}), symbolic"))
        mods = sorted(report.by_module(depth), key=lambda r: -len(str(r["flops"])))[:max(top, 20)]
        out.append(tabulate([[m["module"], str(m["flops"]), str(m["bytes"])] for m in mods],
                            headers=["module", "FLOPs", "bytes"], tablefmt=fmt))
        out.append("\n(give --dim NAME=V for concrete figures)")

    out.append(h("Coverage"))
    if report.unsupported:
        where = report.unsupported_where
        out.append(tabulate([[t, n, ", ".join(where[t][:3]) + (" ..." if len(where[t]) > 3 else "")]
                             for t, n in sorted(report.unsupported.items(), key=lambda kv: -kv[1])],
                            headers=["unsupported op (not counted)", "count", "where"], tablefmt=fmt))
    else:
        out.append(f"every op has a rule ({len(report.primary.ops)} ops costed)")
    return "\n".join(out) + "\n"
