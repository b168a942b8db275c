"""Roofline plot: the device's roofs per dtype and the model's ops as points, to a PNG/SVG/PDF file.

Log-log axes: arithmetic intensity (FLOP/byte) against attained FLOP/s (an op's FLOPs over its
roofline time). Each roof is min(peak, bandwidth * intensity); the dtype the model runs in is drawn
solid, the others faint. Points are sized by time; the slowest few are labelled. Ops with no FLOPs
or no bytes (copies, views, pure math on registers) have no place on log axes and are left out.
matplotlib is optional (`pip install 'costmodel[plot]'`) and used through its Agg backend only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

from costmodel.errors import UsageError
from costmodel.hardware.catalog import Hardware, canonical_dtype

_COLORS = {"compute": "tab:red", "memory": "tab:blue", None: "tab:gray"}


def roofline_plot(hw: Hardware, points: Iterable[Mapping], out_path: str | os.PathLike,
                  dtype: str = "bfloat16", *, tf32: bool = False, top_n: int = 5,
                  title: str | None = None) -> Path:
    """Draw `points` (dicts with intensity, flops_per_s, time_s, label and optional bound) on the
    roofline of `hw` and save to `out_path`; the format follows its suffix (.png, .svg, .pdf).

    >>> roofline_plot(load_hardware("a100-80gb"), [{"intensity": 2731, "flops_per_s": 2.5e14,
    ...     "time_s": 4.4e-3, "label": "mlp.up_proj"}], "roofline.png")
    PosixPath('roofline.png')
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError("matplotlib is needed for --plot; pip install 'costmodel[plot]'") from e

    out = Path(out_path)
    dtype = canonical_dtype(dtype)
    model_peak = hw.peak_for(dtype, tf32)
    points = list(points)
    drawable = [p for p in points if _drawable(p)]
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")

    bandwidth = hw.bandwidth_bytes_per_s
    ridges = [p / bandwidth for p in hw.peak_flops_per_s.values()]
    intensities = [float(p["intensity"]) for p in drawable]
    x_lo = min([0.1, *intensities]) / 2
    x_hi = max([max(ridges) * 10, *intensities]) * 2
    xs = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    roofs: dict[float, list[str]] = {}  # dtypes sharing a peak share a roof
    for name, peak in hw.peak_flops_per_s.items():
        roofs.setdefault(peak, []).append(name)
    for peak, names in sorted(roofs.items()):
        main = peak == model_peak
        ax.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black" if main else "gray",
                linewidth=2 if main else 1, alpha=1 if main else 0.6, linestyle="-" if main else "--")
        ax.annotate(f"{'/'.join(names)} {peak:.3g} FLOP/s", (x_hi, peak), xytext=(-4, 3),
                    textcoords="offset points", ha="right", fontsize=8, color="black" if main else "gray")
    ridge = model_peak / bandwidth
    ax.axvline(ridge, color="black", linestyle=":", linewidth=1)
    ax.annotate(f"ridge {ridge:.3g} FLOP/byte", (ridge, model_peak), xytext=(4, -12),
                textcoords="offset points", fontsize=8)

    if drawable:
        longest_s = max(float(p["time_s"]) for p in drawable) or 1.0
        ax.scatter(intensities, [float(p["flops_per_s"]) for p in drawable],
                   s=[12 + 300 * float(p["time_s"]) / longest_s for p in drawable],
                   c=[_COLORS.get(p.get("bound"), "tab:gray") for p in drawable],
                   alpha=0.6, edgecolors="black", linewidths=0.5)
        for p in sorted(drawable, key=lambda p: -float(p["time_s"]))[:top_n]:
            ax.annotate(str(p.get("label", "")), (float(p["intensity"]), float(p["flops_per_s"])),
                        xytext=(5, 5), textcoords="offset points", fontsize=8)
        y_lo = min(float(p["flops_per_s"]) for p in drawable) / 3
    else:
        y_lo = bandwidth * x_lo
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(min(y_lo, bandwidth * x_lo), max(hw.peak_flops_per_s.values()) * 3)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s")
    ax.set_title(title or f"{hw.name} roofline, {dtype}{' (tf32)' if tf32 and dtype == 'float32' else ''}: "
                          f"{bandwidth:.3g} B/s, {len(drawable)} of {len(points)} ops drawn")
    ax.grid(True, which="both", alpha=0.2)

    try:
        fig.savefig(out)
    except ValueError as e:  # unknown format from the suffix
        formats = ", ".join(sorted(fig.canvas.get_supported_filetypes()))
        raise UsageError(f"--plot '{out}': cannot write '{out.suffix}' files; accepted: {formats}") from e
    except OSError as e:
        raise UsageError(f"--plot '{out}': cannot write: {e.strerror}") from e
    return out


def _drawable(point: Mapping) -> bool:
    """On log axes: a finite positive intensity and a positive attained rate."""
    values = [point.get("intensity"), point.get("flops_per_s"), point.get("time_s")]
    if any(v is None for v in values):
        return False
    intensity, rate, time_s = (float(v) for v in values)
    return math.isfinite(intensity) and intensity > 0 and rate > 0 and time_s > 0


def point_roofline_plot(report, point, path, hw=None) -> Path:
    """The roofline of one evaluated point of a report on `hw` (default: its first device): every op
    with a time, labelled by its module."""
    hw = hw if hw is not None else report.hardware[0]
    t = point.timing(hw, report.tf32)
    pts = [{"intensity": ot.intensity, "flops_per_s": ot.flops_per_s, "time_s": ot.time_s, "label": op["module"],
            "bound": ot.bound} for op, ot in zip(point.ops, t["op_times"]) if ot.time_s > 0]
    dtype = next((op["dtype"] for op in point.ops if op["category"] in ("matmul", "conv", "attention")), "float32")
    return roofline_plot(hw, pts, path, dtype, tf32=report.tf32, title=f"{report.model} ({report.mode}) on {hw.name}")
