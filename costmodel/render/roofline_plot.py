"""Roofline plot: the device's roofs per dtype and the model's ops as points, to a PNG/SVG/PDF file.

Log-log axes: arithmetic intensity (FLOP/byte) against attained FLOP/s (an op's FLOPs over its
roofline time). Each roof is min(peak, bandwidth * intensity); the dtype the model runs in is drawn
solid, the others dashed. Points are coloured by bound and sized by time. The ops with the most time
get a number beside their point and a line in the table to the right of the plot; ops that differ only
in a layer index and sit at the same point are one entry (`model.layers.*.mlp.up_proj`, 32 x 1.49 ms).
Ops with no FLOPs or no bytes (copies, views) have no place on log axes and are left out, and counted.
matplotlib is optional (`pip install 'costmodel[plot]'`) and used through its Agg backend only.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from costmodel.errors import UsageError
from costmodel.hardware.catalog import Hardware, canonical_dtype

_COLORS = {"compute": "tab:red", "memory": "tab:blue", None: "tab:gray"}
_BOUND_NAMES = {"compute": "compute-bound op", "memory": "memory-bound op", None: "op, bound not given"}
_OTHER_ROOFS = ["--", "-.", (0, (5, 2, 1, 2, 1, 2)), (0, (1, 1))]  # linestyles of the other dtypes' roofs
_LABEL_GID = "op-number"  # the numbers beside the points; tests find them by this id
_MAX_LABEL_CHARS = 44
_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # an integer path component: model.layers.3.mlp -> model.layers.*.mlp


def roofline_plot(hw: Hardware, points: Iterable[Mapping], out_path: str | os.PathLike,
                  dtype: str = "bfloat16", *, tf32: bool = False, top_n: int = 5,
                  title: str | None = None) -> Path:
    """Draw `points` (dicts with intensity, flops_per_s, time_s, label and optional bound) on the
    roofline of `hw` and save to `out_path`; the format follows its suffix (.png, .svg, .pdf). The
    `top_n` entries with the most time (copies of a layer counted together) are numbered and listed.

    >>> roofline_plot(load_hardware("a100-80gb"), [{"intensity": 2731, "flops_per_s": 2.5e14,
    ...     "time_s": 4.4e-3, "label": "mlp.up_proj"}], "roofline.png")
    PosixPath('roofline.png')
    """
    out = Path(out_path)
    fig = roofline_figure(hw, points, dtype, tf32=tf32, top_n=top_n, title=title)
    try:
        fig.savefig(out)
    except ValueError as e:  # unknown format from the suffix
        formats = ", ".join("." + f for f in sorted(fig.canvas.get_supported_filetypes()))
        raise UsageError(f"--plot '{out}': cannot write '{out.suffix}' files; accepted: {formats}") from e
    except OSError as e:
        raise UsageError(f"--plot '{out}': cannot write: {e.strerror}") from e
    return out


def roofline_figure(hw: Hardware, points: Iterable[Mapping], dtype: str = "bfloat16", *, tf32: bool = False,
                    top_n: int = 5, title: str | None = None):
    """The matplotlib Figure that roofline_plot saves, laid out and with its op numbers placed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import EngFormatter, FuncFormatter
    except ImportError as e:
        raise UsageError("matplotlib is needed for --plot; pip install 'costmodel[plot]'") from e
    from costmodel.render.units import duration as _time, num as _num

    dtype = canonical_dtype(dtype)
    model_peak = hw.peak_for(dtype, tf32)
    points = list(points)
    drawable = [p for p in points if _drawable(p)]
    fig = Figure(figsize=(11, 6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[2, 1])
    ax = fig.add_subplot(grid[0])
    side = fig.add_subplot(grid[1])
    side.axis("off")
    ax.set_xscale("log")
    ax.set_yscale("log")

    bandwidth = hw.bandwidth_bytes_per_s
    ridges = [p / bandwidth for p in hw.peak_flops_per_s.values()]
    intensities = [float(p["intensity"]) for p in drawable]
    rates = [float(p["flops_per_s"]) for p in drawable]
    x_lo = min([0.1, *intensities]) / 2
    x_hi = max([max(ridges) * 10, *intensities]) * 2
    xs = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    roofs: dict[float, list[str]] = {}  # dtypes sharing a peak share a roof
    for name, peak in hw.peak_flops_per_s.items():
        roofs.setdefault(peak, []).append(name)
    key = []  # the legend: what the colours, lines and sizes mean
    others = iter(_OTHER_ROOFS * len(roofs))
    for peak, names in sorted(roofs.items(), reverse=True):
        main = peak == model_peak
        style = {"color": "black", "linewidth": 2, "linestyle": "-"} if main else \
                {"color": "0.45", "linewidth": 1.2, "linestyle": next(others)}
        on = [x for x in xs if main or bandwidth * x >= min(peak, model_peak)]  # on the shared slope, drawn once
        line, = ax.plot(on, [min(peak, bandwidth * x) for x in on], zorder=2.5 if main else 2, **style)
        line.set_label(f"{'/'.join(names)} roof: {_num(peak, 'FLOP/s')}" + (" (this model)" if main else ""))
        key.append(line)
    key.append(Line2D([], [], color="none", label=f"slope: memory bandwidth {_num(bandwidth, 'B/s')}"))
    ridge = model_peak / bandwidth
    key.append(ax.axvline(ridge, color="black", linestyle=":", linewidth=1,
                          label=f"ridge point: {ridge:.3g} FLOP/byte"))

    entries = []
    if drawable:
        longest_s = max(float(p["time_s"]) for p in drawable) or 1.0
        area = [12 + 300 * float(p["time_s"]) / longest_s for p in drawable]
        ax.scatter(intensities, rates, s=area,
                   c=[_COLORS.get(p.get("bound"), "tab:gray") for p in drawable],
                   alpha=0.6, edgecolors="black", linewidths=0.5)
        for bound in _COLORS:
            if any(p.get("bound") == bound for p in drawable):
                key.append(Line2D([], [], color=_COLORS[bound], marker="o", markeredgecolor="black",
                                  markeredgewidth=0.5, alpha=0.6, linestyle="none", markersize=8,
                                  label=_BOUND_NAMES[bound]))
        key.append(Line2D([], [], color="none", marker="o", markeredgecolor="black", markeredgewidth=0.5,
                          markersize=math.sqrt(max(area)), linestyle="none",
                          label=f"marker area ~ op time (largest {_time(longest_s)})"))
        entries = _top_entries(drawable, top_n, sum(float(p.get("time_s") or 0) for p in points))
        y_lo = min(float(p["flops_per_s"]) for p in drawable) / 3
    else:
        y_lo = bandwidth * x_lo
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(min(y_lo, bandwidth * x_lo), max(hw.peak_flops_per_s.values()) * 10)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained performance (FLOP/s)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_formatter(EngFormatter(unit="FLOP/s"))
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.set_title(title or f"{hw.name} roofline, {dtype}{' (tf32)' if tf32 and dtype == 'float32' else ''}")

    footnote = f"{len(drawable)} of {len(points)} ops drawn; ops with no FLOPs or no bytes have no place on log axes."
    fig.canvas.draw()  # lays the figure out, then keeps it: the side panel and the numbers are placed in pixels
    fig.set_layout_engine("none")
    entries = _side_panel(side, key, entries, footnote)
    _place_numbers(ax, entries)
    return fig


def _side_panel(side, key: list, entries: list[dict], footnote: str) -> list[dict]:
    """The key on top, the table of numbered ops below it, the footnote last. The table takes two lines
    an entry, else one, else as many entries as the figure holds (those are returned); names are
    shortened from the left (the end of a module path says most) until the table fits the width."""
    from matplotlib.lines import Line2D
    fig = side.figure
    renderer = fig.canvas.get_renderer()
    to_side = side.transAxes.inverted()
    bold = {"weight": "bold", "size": 9}
    legend = side.legend(handles=key, loc="upper left", bbox_to_anchor=(0, 1), fontsize=8, title="key",
                         title_fontproperties=bold, alignment="left", frameon=False)
    side.add_artist(legend)  # the next side.legend() call, the table, would replace it otherwise
    below = to_side.transform(legend.get_window_extent(renderer).get_points())[0][1] - 0.03
    shown = 0
    for shown, one_line in [(len(entries), False)] + [(n, True) for n in range(len(entries), 0, -1)] if entries else []:
        for chars in (_MAX_LABEL_CHARS, 36, 28, 20, 12):
            rows = [Line2D([], [], color="none", label=f"{k}  {_row(e, one_line, chars)}")
                    for k, e in enumerate(entries[:shown], 1)]
            table = side.legend(handles=rows, loc="upper left", bbox_to_anchor=(0, below), fontsize=8,
                                handlelength=0, handletextpad=0, alignment="left", frameon=False,
                                title=f"top {shown} ops by total time", title_fontproperties=bold)
            extent = table.get_window_extent(renderer)
            if extent.x1 <= fig.bbox.x1 - 4:
                break
        bottom = to_side.transform(extent.get_points())[0][1]
        if bottom >= 0.12:  # room for the footnote
            break
    if entries:
        below = bottom - 0.03
    if shown < len(entries):
        footnote += f" {len(entries) - shown} more of the top {len(entries)} do not fit here."
    side.text(0, below, footnote, transform=side.transAxes, fontsize=8, color="0.3", va="top", wrap=True)
    return entries[:shown]


def _top_entries(drawable: list[Mapping], top_n: int, total_s: float) -> list[dict]:
    """Ops at one point whose labels differ only in integer path components (layer indices) are one
    entry; the top_n entries by total time, each with its point and its lines for the table (the share
    is of total_s, the time of every op given, drawn or not)."""
    groups: dict[tuple, dict] = {}
    for p in drawable:
        label = str(p.get("label", ""))
        pattern = _INDEX.sub("*", label)
        at = (f"{float(p['intensity']):.4g}", f"{float(p['flops_per_s']):.4g}", f"{float(p['time_s']):.4g}")
        g = groups.setdefault((pattern, *at, p.get("bound")), {"labels": [], "time_s": 0.0, "point": p})
        g["labels"].append(label)
        g["time_s"] += float(p["time_s"])
    top = sorted(groups.values(), key=lambda g: -g["time_s"])[:max(top_n, 0)]
    from costmodel.render.units import duration as _time
    for g in top:
        name = g["labels"][0] if len(g["labels"]) == 1 else _INDEX.sub("*", g["labels"][0])
        g["name"] = name or "(no label)"
        each = _time(float(g["point"]["time_s"]))
        if len(g["labels"]) > 1:  # 32 x 1.49 ms = 47.6 ms
            each = f"{len(g['labels'])} x {each}"
            g["time"] = f"{each} = {_time(g['time_s'])}"
        else:
            g["time"] = each
        g["short_time"] = each
        if total_s:
            share = g["time_s"] / total_s
            g["time"] += f" ({share:.0%} of all)"
            g["short_time"] += f" ({share:.0%})"
    return top


def _row(entry: dict, one_line: bool, chars: int) -> str:
    name = entry["name"] if len(entry["name"]) <= chars else "..." + entry["name"][-(chars - 3):]
    return f"{name}: {entry['short_time']}" if one_line else f"{name}\n      {entry['time']}"


def _place_numbers(ax, entries: list[dict]) -> None:
    """Each entry's number in a row along the top of the axes, above every roof (where no point can
    be), with a leader line down to its point. The boxes are sorted by their points' x, start above
    their points, and are pushed apart (right, then left from the axes' right edge), so they neither
    overlap nor leave the axes, and the lines from one row do not cross; when one row cannot hold them
    all, every other box goes to a second row below, and so on. Points that coincide share a box."""
    if not entries:
        return
    renderer = ax.figure.canvas.get_renderer()
    spots: dict[tuple, list] = {}
    for n, e in enumerate(entries, 1):
        xy = (float(e["point"]["intensity"]), float(e["point"]["flops_per_s"]))
        pixel = ax.transData.transform(xy)
        spots.setdefault(tuple(round(v) for v in pixel), [pixel[0], xy]).append(n)
    boxes = []  # (x of the point in pixels, annotation, width, height), left to right
    for px, xy, *numbers in sorted(spots.values(), key=lambda s: s[0]):
        ann = ax.annotate(",".join(map(str, numbers)), xy, xytext=(0.5, 0.5), textcoords="axes fraction",
                          fontsize=9, fontweight="bold", ha="center", va="center", gid=_LABEL_GID,
                          bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.3",
                                "linewidth": 0.6},
                          arrowprops={"arrowstyle": "-", "color": "0.25", "linewidth": 0.7, "shrinkA": 0,
                                      "shrinkB": 4})
        ann.update_positions(renderer)  # the box follows the text at draw time only
        ann.update_bbox_position_size(renderer)
        box = ann.get_bbox_patch().get_window_extent(renderer)
        boxes.append((px, ann, box.width, box.height))
    frame = ax.get_window_extent(renderer)
    margin, gap = 4, 5
    lo, hi = frame.x0 + margin, frame.x1 - margin
    rows = 1
    while max(sum(w + gap for _, _, w, _ in boxes[row::rows]) for row in range(rows)) > hi - lo:
        rows += 1
    to_axes = ax.transAxes.inverted()
    for row in range(rows):
        line = boxes[row::rows]
        centers = [min(max(px, lo + w / 2), hi - w / 2) for px, _, w, _ in line]
        for i in range(1, len(line)):  # push right of the left neighbour
            centers[i] = max(centers[i], centers[i - 1] + (line[i - 1][2] + line[i][2]) / 2 + gap)
        centers[-1] = min(centers[-1], hi - line[-1][2] / 2)
        for i in range(len(line) - 2, -1, -1):  # then left of the right neighbour
            centers[i] = min(centers[i], centers[i + 1] - (line[i][2] + line[i + 1][2]) / 2 - gap)
        for (_, ann, _, h), cx in zip(line, centers):
            ann.xyann = tuple(to_axes.transform((cx, frame.y1 - margin - h / 2 - row * (h + gap))))


def _drawable(point: Mapping) -> bool:
    """On log axes: a finite positive intensity and a positive attained rate."""
    values = [point.get("intensity"), point.get("flops_per_s"), point.get("time_s")]
    if any(v is None for v in values):
        return False
    intensity, rate, time_s = (float(v) for v in values)
    return math.isfinite(intensity) and intensity > 0 and rate > 0 and time_s > 0


def point_roofline_plot(report, point, path, hw=None) -> Path:
    """The roofline of one evaluated point of a report on `hw` (default: its first device): every op
    with a time, labelled "module (op)"."""
    hw = hw if hw is not None else report.hardware[0]
    t = point.timing(hw, report.tf32)
    pts = [{"intensity": ot.intensity, "flops_per_s": ot.flops_per_s, "time_s": ot.time_s,
            "label": f"{op['module']} ({_op_name(op['target'])})", "bound": ot.bound}
           for op, ot in zip(point.ops, t["op_times"]) if ot.time_s > 0]
    dtype = next((op["dtype"] for op in point.ops if op["category"] in ("matmul", "conv", "attention")), "float32")
    at = ", ".join(f"{d}={v}" for d, v in point.dims.items())
    return roofline_plot(hw, pts, path, dtype, tf32=report.tf32,
                         title=f"{report.model} ({report.mode}, {dtype}{', ' + at if at else ''}) on {hw.name}")


def _op_name(target: str) -> str:
    """aten.mm.default -> mm, costmodel.sdpa.default -> sdpa: the name a reader knows the op by."""
    parts = str(target).split(".")
    return parts[1] if len(parts) >= 3 else str(target)
