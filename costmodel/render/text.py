"""Data -> text: the tables (tabulate) and Markdown of every command. Never prints.

Units are SI inside the package; render/units.py scales them to GFLOP, GiB and ms.
"""

from __future__ import annotations

import sympy
from tabulate import tabulate

from costmodel.api import Point, Report
from costmodel.capture import trace as cap
from costmodel.capture.specs import dtype_name
from costmodel.render.formulas import readable
from costmodel.render.units import duration, fixed2, num, pct, signed_pct, size

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
        verdict = (f"fits {v['device']} ({size(v['capacity_bytes'])} usable), {size(v['margin_bytes'])} to spare"
                   if v["fits"] else
                   f"does NOT fit {v['device']} ({size(v['capacity_bytes'])} usable), "
                   f"{size(-v['margin_bytes'])} over")
        parts = sorted(v["memory"].items(), key=lambda kv: -kv[1])
        at = mem.get("at") or {}
        lines.append(f"\nat {where}: peak {size(v['peak_memory_bytes'])}: {verdict}")
        lines.append("  at the peak (" + f"{at.get('target', '?')} in {at.get('module', '?')}, {at.get('phase', '?')}): "
                     + ", ".join(f"{k.replace('_', ' ')} {size(b)}" for k, b in parts if b))
        largest = mem.get("largest") or []
        if largest:
            lines.append("  largest live tensors: " + "; ".join(
                f"{t['node']} {t['shape']} {size(t['bytes'])}" for t in largest[:3]))
        fits = v.get("largest_fitting") or {}
        others = lambda d: ", ".join(f"{k}={x}" for k, x in p.dims.items() if k != d)
        for d, n in fits.items():
            lines.append(f"  largest {d} that fits at {others(d) or 'these sizes'}: {n['description']}")
    if lines:
        lines.insert(0, h("Memory"))
    return lines


def _generation_lines(report: Report, points: list[Point], h, fmt: str) -> list[str]:
    """Generate mode: per point, the prefill and the decode steps, the KV cache, time to first token
    and tokens/s (times on the first --hw device)."""
    rows = []
    for p in points:
        g = p.extra.get("generate")
        if g is None:
            continue
        rows.append([p.dims[d] for d in p.dims] + [
            num(g["prefill"]["flops"]), num(g["decode"]["flops"]), size(g["kv_cache_bytes"]),
            size(p.kv_bytes_per_token()), duration(g["time_to_first_token_s"]),
            duration(g["decode"]["first_token_time_s"]), duration(g["decode"]["last_token_time_s"]),
            duration(g["decode"]["time_s"]), num(g["tokens_per_s"], "tok/s") if g["tokens_per_s"] else "-",
            pct(p.decode_memory_bound_share * 100) if p.decode_memory_bound_share is not None else "-"])
    if not rows:
        return []
    dims = list(points[0].dims)
    device = f" on {report.hardware[0].name}" if report.hardware else ""
    lines = [h(f"Generation{device}"), tabulate(rows, headers=dims + [
        "prefill FLOPs", "decode FLOPs", "KV cache", "KV per token", "time to 1st token", "1st decode step",
        "last decode step", "all decode steps", "tokens/s", "decode memory-bound"], tablefmt=fmt,
        disable_numparse=True)]
    lines.append("KV cache: keys and values after the last step (prompt + gen tokens); KV per token: what the next "
                 "token adds per sequence; tokens/s: batch x gen / the decode steps' time")
    pieces = getattr(report, "decode_pieces", [])
    if len(pieces) > 1:
        lines.append("decode step captured in pieces over its context ctx: " + ", ".join(
            f"[{lo}, {hi if hi is not None else 'inf'})" if hi is None else (f"{lo}" if lo == hi else f"[{lo}, {hi}]")
            for lo, hi in pieces))
    return lines


def _parallel_lines(points: list[Point], h, fmt: str) -> list[str]:
    """Per GPU under parallel training: each pipeline stage's peak and its parts, its compute,
    exposed communication and bubble; the step time, tokens/s and MFU."""
    last = points[-1] if points else None
    if last is None or "ranks" not in last.extra:
        return []
    e = last.extra
    par = e["parallel"]
    where = ", ".join(f"{d}={x}" for d, x in last.dims.items())
    degrees = ", ".join(f"{g}={par[g]}" for g in ("dp", "fsdp", "tp", "pp"))
    extras = [f"zero {par['zero']}" if par["zero"] else "", f"{par['microbatches']} micro-batch{'es' if par['microbatches'] > 1 else ''}",
              "sequence parallel" if par["sequence_parallel"] else "",
              f"interleaved x{par['pp_interleave']}" if par["pp_interleave"] > 1 else "",
              f"checkpointing {par['checkpointing']}" if par["checkpointing"] != "none" else "",
              "master weights" if par["master_weights"] else ""]
    lines = [h(f"Per GPU ({par['world_size']} GPUs) at {where}"),
             f"{degrees}; " + ", ".join(x for x in extras if x) + f"; global batch {par['global_batch']}"]
    rows = []
    for r in e["ranks"]:
        m = r["memory"]
        rows.append([r["stage"], size(r["peak_memory_bytes"]), size(m.get("params")), size(m.get("grads")),
                     size(m.get("optimizer_state")), size(m.get("activations")), size(m.get("temporaries")),
                     duration(r.get("compute_time_s")), duration(r.get("exposed_communication_time_s")),
                     duration(r.get("bubble_time_s"))])
    lines.append(tabulate(rows, headers=["stage", "peak", "params", "grads", "optimizer", "activations",
                                         "temporaries", "compute", "exposed comm", "bubble"], tablefmt=fmt))
    if e.get("step_time_s") is not None:
        lines.append(f"step {duration(e['step_time_s'])}, {num(e['tokens_per_s'])} tokens/s, "
                     f"MFU {(e['mfu'] or 0) * 100:.1f}%")
    return lines


def plan_text(result: dict, top: int, fmt: str = "simple") -> str:
    """`costmodel plan`: the fitting plans fastest first, then the rejected ones with why."""
    out = [f"{result['model']} on {result['gpus']} x {result['hardware']} "
           f"({size(result['capacity_bytes'])} usable each), "
           + ", ".join(f"{d}={v}" for d, v in result["dims"].items())]
    rows = []
    for p in result["plans"][:top]:
        c = p["parallel"]
        b = p["breakdown"]
        rows.append([", ".join(f"{g}={c[g]}" for g in ("dp", "fsdp", "tp", "pp") if c[g] > 1) or "1 GPU",
                     c["zero"] or "", c["microbatches"], "yes" if c["sequence_parallel"] else "", p["checkpointing"],
                     size(p["peak_memory_bytes"]), duration(p["step_time_s"]), num(p["tokens_per_s"]),
                     f"{(p['mfu'] or 0) * 100:.1f}%", duration(b["exposed_communication_s"]),
                     duration(b["bubble_s"])])
    out.append(f"\n{len(result['plans'])} plans fit (the fastest {min(top, len(result['plans']))}, by tokens/s):")
    out.append(tabulate(rows, headers=["parallel", "zero", "micro-batches", "seq. par.", "checkpointing", "peak/GPU",
                                       "step", "tokens/s", "MFU", "exposed comm", "bubble"], tablefmt=fmt))
    rejected = result["rejected"]
    if rejected:
        out.append(f"\n{len(rejected)} rejected:")
        shown = rejected[:max(top, 10)]
        for r in shown:
            c = r.get("parallel")
            name = ", ".join(f"{g}={c[g]}" for g in ("dp", "fsdp", "tp", "pp") if c[g] > 1) if c else "any"
            extra = f", zero {c['zero']}" if c and c["zero"] else ""
            extra += f", {c['microbatches']} micro-batches" if c and c["microbatches"] > 1 else ""
            out.append(f"  {name or '1 GPU'}{extra}, checkpointing {r['checkpointing']}: {r['reason']}")
        if len(rejected) > len(shown):
            out.append(f"  ... and {len(rejected) - len(shown)} more (--format json lists all)")
    return "\n".join(out) + "\n"


def parallel_validation_text(report: Report, points: list[dict], fmt: str = "simple") -> str:
    """`validate --parallel`: each rank's measured peak beside its stage's predicted one."""
    out = [f"{report.model}: {report.options.parallel}, measured on gloo ranks (CPU) against the prediction"]
    rows = []
    for p in points:
        where = ", ".join(f"{d}={v}" for d, v in p["dims"].items())
        for r in p["ranks"]:
            rows.append([where, r["rank"], r["stage"], size(r["measured"]["peak_memory_bytes"]),
                         size(r["predicted"]["peak_memory_bytes"]), signed_pct(r["error_pct"])])
    out.append(tabulate(rows, headers=["at", "rank", "stage", "measured peak", "predicted peak", "error"],
                        tablefmt=fmt))
    return "\n".join(out) + "\n"


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
    title = f"{report.model}: {_mode_label(report)}"
    out.append(f"# {title}" if md else title)
    out.append(f"inputs: {', '.join(str(s) for s in report.inputs)}; parameters: {report.params:,} "
               f"({size(report.param_bytes)})" + (f"; optimizer: {report.optimizer}" if report.mode == "train" else ""))

    interp = report.interpolation
    at = {d: v for d, v in report.fixed.items() if d in report.dims and (interp is None or interp.dim != d)}
    out.append(h("Formulas" + (f" (at {', '.join(f'{d} = {v}' for d, v in at.items())}: pinned by the capture)"
                               if at else "")))
    shown, where = readable({k: v for k, v in vars(report.symbolic).items() if k not in ("params", "param_bytes")})
    out.append(tabulate([[k, v] for k, v in shown.items()], headers=["total", "formula"], tablefmt=fmt))
    if where:
        out.append("where " + ", ".join(f"{name} = {definition}" for name, definition in where)
                   + " (JSON gives the exact formulas)")
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
            rows.append([p.dims[d] for d in dims] + [num(t["flops"]), num(t["matmul_flops"]), size(t["bytes_read"]),
                                                      size(t["bytes_written"]), size(t.get("peak_memory_bytes")),
                                                      duration(t.get("time_s"))])
        out.append(tabulate(rows, headers=headers, tablefmt=fmt))
        last = points[-1]
        where = ", ".join(f"{d}={v}" for d, v in last.dims.items())
        if "time" in last.extra:
            tm = last.extra["time"]
            out.append(f"\non {tm['device']} at {where}: {duration(last.totals['time_s'])}, "
                       f"{(tm['memory_bound_share'] or 0) * 100:.0f}% of the time memory-bound, "
                       f"MFU {(tm['mfu'] or 0) * 100:.0f}%" + (" (TF32 assumed for float32 matmuls)" if tm["tf32"] else ""))
        out.extend(_generation_lines(report, points, h, fmt))
        out.extend(_parallel_lines(points, h, fmt))
        out.extend(_memory_lines(points, h))
        out.append(h(f"By module (depth {depth}) at {where}" if by == "module" else f"By op at {where}"))
        if by == "module":
            mods = last.modules(depth)[:max(top, 20)]
            out.append(tabulate([[m["module"], num(m["flops"]), num(m["matmul_flops"]), size(m["bytes"]),
                                  duration(m["time_s"])] for m in mods],
                                headers=["module", "FLOPs", "matmul FLOPs", "bytes", "time"], tablefmt=fmt))
        ops = last.by_op()[:top]
        out.append(h(f"Top {len(ops)} ops at {where}"))
        out.append(tabulate([[o["target"], o["category"], o["count"], num(o["flops"]), size(o["bytes"]),
                              duration(o["time_s"])] for o in ops],
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


# --- validation ---------------------------------------------------------------------------------

def _measured_cells(m: dict) -> tuple[str, str]:
    if m.get("oom"):
        return "OOM", "OOM"
    if "skipped" in m:
        return "skipped", "skipped"
    return duration(m["time_s"]), size(m["peak_memory_bytes"])


def validation_table(r, style: str = "simple") -> str:
    """`costmodel validate`'s table: per point, the fitted exponents, the doubling ratios, the summary
    (generate mode: also the time to first token and per token, and per-token time against context)."""
    from costmodel.validate.engine import labels_of, series_of
    series, labels = series_of(r.mode), labels_of(r.mode)
    generate = r.mode == "generate"
    names = list(r.points[0].dims) if r.points else []
    cross = any("independent_peak_memory_bytes" in p.measured for p in r.points)
    threads = r.environment.get("threads")
    head = (f"{r.model} ({r.mode}, {r.dtype}) on {r.device} ({r.device_name}"
            f"{f', {threads} threads' if threads and r.device == 'cpu' else ''}): median of at least {r.repeats} "
            f"{'generations' if generate else 'steps'}; predicted time on {r.hardware or '-'}")
    speed = r.environment.get("calibration", {}).get("machine_vs_calibration")
    if speed:
        head += f" (this CPU against it: {', '.join(f'{k} {v:.2f}x' for k, v in speed.items())})"
    rows = []
    for p in r.points:
        t, peak = _measured_cells(p.measured)
        row = [p.dims[n] for n in names] + [t, duration(p.predicted.get("time_s")), signed_pct(p.errors.get("time_pct")),
                                            peak, size(p.predicted.get("peak_memory_bytes")),
                                            signed_pct(p.errors.get("peak_memory_pct"))]
        if cross:
            row += [size(p.measured.get("independent_peak_memory_bytes")),
                    signed_pct(p.errors.get("measured_vs_independent_pct"))]
        if generate:
            row += [duration(p.measured.get("time_to_first_token_s")), duration(p.predicted.get("time_to_first_token_s")),
                    signed_pct(p.errors.get("time_to_first_token_pct")), duration(p.measured.get("token_time_s")),
                    duration(p.predicted.get("token_time_s")), signed_pct(p.errors.get("token_time_pct"))]
        row.append(num(p.predicted.get("flops")))
        if p.measured.get("oom") or "skipped" in p.measured:
            fits = p.errors.get("predicted_oom")
            row.append("predicted OOM" if fits else "predicted to fit" if fits is False else "")
        rows.append(row)
    headers = names + ["time", "predicted", "error", "peak", "predicted", "error"]
    if cross:
        headers += ["allocator peak", "peak vs allocator"]
    if generate:
        headers += ["1st token", "predicted", "error", "per token", "predicted", "error"]
    headers += ["FLOPs"]
    if any(len(row) > len(headers) for row in rows):
        headers.append("note")
        rows = [row + [""] * (len(headers) - len(row)) for row in rows]
    parts = [head, "", tabulate(rows, headers=headers, tablefmt=style, disable_numparse=True)]
    if generate:
        parts += ["", "Time per token against context: least squares a + b * ctx over the decode steps "
                      "(each step reads the whole cache)",
                  tabulate([[p.dims[n] for n in names] + _line_cells(p) for p in r.points if p.ok],
                           headers=names + ["measured a", "b (per 1k tokens)", "R^2", "predicted a",
                                            "b (per 1k tokens)", "R^2"], tablefmt=style, disable_numparse=True)]

    if r.swept:
        exp_rows = []
        for d in r.swept:
            for key, label in labels.items():
                exp_rows.append([d, label, fixed2(r.exponents[d].get(key)), r.classes[d].get(key) or "-"])
        parts += ["", "Fitted exponents (least squares on log size vs log value)",
                  tabulate(exp_rows, headers=["dim", "series", "exponent", "class"], tablefmt=style,
                           disable_numparse=True)]
        ratio_rows = []
        for d in r.swept:
            for row in r.doubling_ratios[d]:
                at = " ".join(f"{k}={v}" for k, v in row.get("at", {}).items())
                ratio_rows.append([d, f"{row['from']} -> {row['to']}", at] +
                                  [fixed2(row.get(key)) for key in series])
        parts += ["", "Ratios between consecutive sizes (the doubling experiment)",
                  tabulate(ratio_rows, headers=["dim", "sizes", "at"] + [labels[key] for key in series],
                           tablefmt=style, disable_numparse=True)]
    e = r.errors
    summary = [f"time MAPE {pct(e['time_mape'])}", f"peak memory MAPE {pct(e['peak_memory_mape'])}"]
    if generate:
        summary += [f"time to first token MAPE {pct(e.get('time_to_first_token_mape'))}",
                    f"time per token MAPE {pct(e.get('token_time_mape'))}"]
    if e.get("measured_vs_independent_max_pct") is not None:
        summary.append(f"measured peak vs allocator: max {e['measured_vs_independent_max_pct']:.1f}% apart")
    if e.get("oom_points"):
        summary.append(f"{e['oom_points']} point(s) out of memory")
    if e.get("skipped_points"):
        summary.append(f"{e['skipped_points']} point(s) skipped")
    parts += ["", "Summary: " + "; ".join(summary)]
    return "\n".join(parts) + "\n"


def _line_cells(p) -> list[str]:
    cells = []
    for side in (p.measured, p.predicted):
        b = side.get("token_time_slope_s")
        r2 = side.get("token_time_r2")
        cells += [duration(side.get("token_time_intercept_s")), duration(b * 1000) if b is not None else "-",
                  f"{r2:.2f}" if r2 is not None else "-"]
    return cells


# --- fit, hardware, zoo, device comparison -------------------------------------------------------

def fit_text(report: Report, hw, result: dict) -> str:
    """`costmodel fit`: the usable capacity, the largest value with why the search stopped, the
    breakdown at the peak."""
    reserve = result.get("reserve") or {}
    reserved = (f" (reserved: {size(reserve['context_bytes'])} CUDA context, "
                f"{reserve['fragmentation'] * 100:.0f}% fragmentation)"
                if reserve.get("context_bytes") is not None and reserve.get("fragmentation") is not None
                else " (--capacity)")
    lines = [f"{report.model} ({_mode_label(report)}) on {hw.name}: {size(result['capacity_bytes'])} usable"
             + (f" of {size(result['memory_bytes'])}" if result.get("memory_bytes") else "") + reserved]
    for d, v in result["max"].items():
        others = ", ".join(f"{k}={x}" for k, x in result.get("dims", {}).items() if k != d)
        limit = result["limit"]
        if limit["kind"] == "capacity":
            why = (f"at {d}={limit['next_value']}: {size(limit['next_peak_bytes'])}, does not fit"
                   if limit.get("next_value") else "the next value does not fit")
        elif limit["kind"] == "model":
            why = f"the model's limit: {limit['reason']}" + (
                f"; memory alone allows {result['memory_only_value']}" if result.get("memory_only_value") else "")
        else:
            why = f"above {v} the model could not be captured: {limit['reason']}"
        lines.append(f"largest {d} that fits: {v}" + (f" at {others}" if others else "")
                     + f" (peak {size(result['peak_memory_bytes'])}; {why})")
    if result.get("memory"):
        lines.append("at the peak: " + ", ".join(f"{k.replace('_', ' ')} {size(b)}"
                                                 for k, b in sorted(result["memory"].items(), key=lambda kv: -kv[1])
                                                 if b))
    return "\n".join(lines)


def hardware_list_text(devices: list) -> str:
    from costmodel.hardware.catalog import DTYPES
    rows = [[d.name, size(d.memory_bytes), num(d.bandwidth_bytes_per_s, "B/s")]
            + [num(d.peak_flops_per_s.get(t), "FLOP/s") for t in DTYPES]
            + [d.gpus_per_node, num(d.intra_node_bandwidth_bytes_per_s, "B/s"),
               num(d.inter_node_bandwidth_bytes_per_s, "B/s")] for d in devices]
    return tabulate(rows, headers=["device", "memory", "bandwidth"] + list(DTYPES)
                    + ["GPUs/node", "intra-node", "inter-node/GPU"])


def hardware_show_text(hw) -> str:
    from costmodel.hardware.catalog import DTYPES
    d = hw.to_dict()
    rows = [[t, num(d["peak_flops_per_s"].get(t), "FLOP/s"), f"{d['ridge_point'][t]:.1f}" if t in d["ridge_point"]
             else "-"] for t in DTYPES]
    head = (f"{hw.name}: {size(hw.memory_bytes)}, {num(hw.bandwidth_bytes_per_s, 'B/s')}, "
            f"kernel overhead {hw.kernel_overhead_s * 1e6:.1f} us\n"
            f"interconnect: {hw.gpus_per_node} GPUs per node; bus bandwidth "
            f"{num(hw.intra_node_bandwidth_bytes_per_s, 'B/s')} inside a node, "
            f"{num(hw.inter_node_bandwidth_bytes_per_s, 'B/s')} per GPU across nodes; latency "
            f"{hw.intra_node_latency_s * 1e6:.1f} us / {hw.inter_node_latency_s * 1e6:.1f} us per step\n")
    src = "\n".join(f"  {k}: {v}" for k, v in hw.sources.items())
    return head + tabulate(rows, headers=["dtype", "dense peak", "ridge (FLOP/byte)"]) + "\nsources:\n" + src


def zoo_text(models) -> str:
    return tabulate([[m.name, f"{m.params:,}", " ".join(m.inputs),
                      ", ".join(f"{d}={v}" for d, v in m.default_dims.items()), m.description] for m in models],
                    headers=["model", "parameters", "default inputs", "default sizes", "description"])


def comparison_text(rows: list[dict]) -> str:
    """Devices side by side at one point: time, memory-bound share, MFU (generate mode: and the time to
    first token, the decode steps, tokens/s)."""
    if rows and "tokens_per_s" in rows[0]:
        return "\nDevices compared at the last point\n" + tabulate(
            [[c["device"], duration(c["time_s"]), duration(c["time_to_first_token_s"]),
              duration(c["first_token_time_s"]), duration(c["last_token_time_s"]),
              num(c["tokens_per_s"], "tok/s") if c["tokens_per_s"] else "-",
              f"{(c['decode_memory_bound_share'] or 0) * 100:.0f}%", f"{(c['mfu'] or 0) * 100:.0f}%"] for c in rows],
            headers=["device", "generation", "time to 1st token", "1st decode step", "last decode step", "tokens/s",
                     "decode memory-bound", "MFU"], disable_numparse=True) + "\n"
    return "\nDevices compared at the last point\n" + tabulate(
        [[c["device"], duration(c["time_s"]), f"{(c['memory_bound_share'] or 0) * 100:.0f}%",
          f"{(c['mfu'] or 0) * 100:.0f}%"] for c in rows], headers=["device", "time", "memory-bound", "MFU"]) + "\n"


def _mode_label(report: Report) -> str:
    """'train, float32' or 'train, float32 weights with bfloat16 autocast' (--amp)."""
    label = f"{report.mode}, {dtype_name(report.dtype)}"
    return label + (" weights with bfloat16 autocast" if report.amp else "")
