"""The validation picture: measured against predicted on log-log axes, with the fitted slopes.

One row per swept dimension: time on the left (measured rings, predicted squares, FLOPs scaled to the
first measured time as a faint reference), peak memory on the right (measured against predicted).
Each series carries its fitted line, dashed, and its exponent k in the legend; a point that ran out
of memory is a red cross at the peak the memory model predicted for it. matplotlib is optional
(`pip install 'costmodel[plot]'`) and used through its Agg backend only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from costmodel.errors import UsageError

_STYLE = {  # series -> (axis, color, marker, label)
    "measured": (0, "tab:blue", "o", "measured time"),
    "predicted": (0, "tab:orange", "s", "predicted time"),
    "flops": (0, "tab:gray", "", "FLOPs (scaled)"),
    "memory": (1, "tab:blue", "o", "measured peak"),
    "predicted_memory": (1, "tab:orange", "s", "predicted peak"),
}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError("matplotlib is needed for --plot; pip install 'costmodel[plot]'") from e
    return Figure, FigureCanvasAgg


def check_plot_path(path: str | os.PathLike) -> None:
    """Fail before a long run, not after: matplotlib present, a known suffix, an existing folder."""
    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(path)
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--plot '{out}': cannot write '{out.suffix or 'no suffix'}' files; accepted: "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    if not out.parent.is_dir():
        raise UsageError(f"--plot '{out}': directory '{out.parent}' does not exist")


def validation_plot(result, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw a ValidationResult (or its to_dict()) to `out_path` (.png, .svg, .pdf ...).

    >>> validation_plot(validate(tiny_gpt2, dims={"batch": [1], "seq": [128, 256, 512]}), "v.png")
    PosixPath('v.png')
    """
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import FuncFormatter, LogLocator

    from costmodel.render.units import duration as _time, size as _bytes
    data = result.to_dict() if hasattr(result, "to_dict") else result
    points, swept = data["points"], list(data["swept"])
    out = Path(out_path)
    if not swept:
        raise UsageError("the plot needs a swept dimension (a --dim with two or more values)")
    fig = Figure(figsize=(11, 4.2 * len(swept)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(swept), 2, squeeze=False)
    names = list(points[0]["dims"]) if points else []
    first_time = next((p["measured"]["time_s"] for p in points if "time_s" in p["measured"]), None)
    first_flops = next((p["predicted"]["flops"] for p in points if "time_s" in p["measured"]), None)

    for row, d in zip(axes, swept):
        groups: dict[tuple, list[dict]] = {}
        for p in points:
            groups.setdefault(tuple((n, p["dims"][n]) for n in names if n != d), []).append(p)
        for series, (col, color, marker, label) in _STYLE.items():
            k = data["exponents"].get(d, {}).get(series)
            ax = row[col]
            for i, (at, group) in enumerate(groups.items()):
                group = sorted(group, key=lambda p: p["dims"][d])
                xy = [(p["dims"][d], _value(p, series)) for p in group]
                if series == "flops" and first_time and first_flops:
                    xy = [(x, y / first_flops * first_time if y else None) for x, y in xy]
                xy = [(x, y) for x, y in xy if y]
                if not xy:
                    continue
                text = f"{label}, k={k:.2f}" if k is not None else label
                if len(groups) > 1:
                    text += " at " + " ".join(f"{n}={v}" for n, v in at)
                xs, ys = zip(*xy)
                if series == "flops":
                    ax.plot(xs, ys, color=color, linestyle=":", linewidth=1, label=text if i == 0 or len(groups) > 1
                            else None)
                    continue
                hollow = {"markerfacecolor": "none", "markersize": 10} if series in ("measured", "memory") else {}
                ax.plot(xs, ys, color=color, marker=marker, linestyle="none", label=text, **hollow)
                if k is not None and len(xy) >= 2:
                    mx = sum(math.log(x) for x in xs) / len(xs)
                    my = sum(math.log(y) for y in ys) / len(ys)
                    lo, hi = min(xs), max(xs)
                    ax.plot([lo, hi], [math.exp(my + k * (math.log(v) - mx)) for v in (lo, hi)], color=color,
                            linestyle="--", linewidth=1)
            if series == "predicted_memory":
                ooms = [p for p in points if p["measured"].get("oom") and p["predicted"].get("peak_memory_bytes")]
                if ooms:
                    ax.plot([p["dims"][d] for p in ooms], [p["predicted"]["peak_memory_bytes"] for p in ooms],
                            color="tab:red", marker="x", markersize=10, linestyle="none",
                            label="measured OOM (at its predicted peak)")
        # 1-2-5 steps for seconds and powers of two for bytes: labelled ticks even on a short range
        locators = (LogLocator(base=10, subs=(1.0, 2.0, 5.0)), LogLocator(base=2))
        for ax, ylabel, fmt, locator in zip(row, ("time per step", "peak memory"), (_time, _bytes), locators):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(locator)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _, fmt=fmt: ""))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel(d)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.2)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title or f"{data['model']} ({data['mode']}, {data['dtype']}) on {data['device']}: "
                          f"measured vs predicted, fitted log-log slopes k")
    try:
        fig.savefig(out)
    except ValueError as e:
        raise UsageError(f"--plot '{out}': cannot write '{out.suffix}' files") from e
    except OSError as e:
        raise UsageError(f"--plot '{out}': cannot write: {e.strerror}") from e
    return out


def _value(p: dict, series: str):
    from costmodel.validate.engine import SERIES
    section, key = SERIES[series]
    v = p[section].get(key)
    return v if isinstance(v, (int, float)) and v > 0 else None
