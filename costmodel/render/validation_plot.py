"""The validation picture: measured against predicted on log-log axes, with the fitted slopes.

One row per swept dimension: time on the left (measured rings, predicted squares, FLOPs scaled to the
first measured time as a faint reference), peak memory on the right (measured against predicted).
Each series carries its fitted line, dashed, and its exponent k in the legend; a point that ran out
of memory is a red cross at the peak the memory model predicted for it. The y ticks carry units
(ms, MiB) and number at least 3 even where the values span less than a decade; the x ticks are the
sizes that ran. matplotlib is optional
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
    out = Path(out_path)
    fig = validation_figure(result, title)
    try:
        fig.savefig(out)
    except ValueError as e:
        raise UsageError(f"--plot '{out}': cannot write '{out.suffix}' files") from e
    except OSError as e:
        raise UsageError(f"--plot '{out}': cannot write: {e.strerror}") from e
    return out


def validation_figure(result, title: str | None = None):
    """The matplotlib Figure that validation_plot saves."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    data = result.to_dict() if hasattr(result, "to_dict") else result
    points, swept = data["points"], list(data["swept"])
    generate = data.get("mode") == "generate"
    if not swept and not generate:
        raise UsageError("the plot needs a swept dimension (a --dim with two or more values)")
    fig = Figure(figsize=(11, 4.2 * (len(swept) + generate)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(swept) + generate, 2, squeeze=False)
    if generate:
        _token_panels(axes[-1], points)
        axes = axes[:-1]
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
        for ax, ylabel, units in zip(row, ("time per generation" if generate else "time per step", "peak memory"),
                                     (_TIME_UNITS, _BYTE_UNITS)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ticks = _readable_ticks(lo, hi, units)
            ax.yaxis.set_major_locator(FixedLocator(list(ticks)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, ticks=ticks: ticks.get(v, "")))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_ylim(lo, hi)
            values = sorted({p["dims"][d] for p in points})
            if len(values) <= 8:  # a tick at each size that ran
                ax.xaxis.set_major_locator(FixedLocator(values))
                ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel(d)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.2)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title or f"{data['model']} ({data['mode']}, {data['dtype']}) on {data['device']}: "
                          f"measured vs predicted, fitted log-log slopes k")
    return fig


def _token_panels(row, points: list[dict]) -> None:
    """Generate mode: each decode step's time against its context, measured (dots) and predicted
    (line), one colour per point; and the time to first token against the prompt."""
    from matplotlib.ticker import FuncFormatter
    ax, ttft = row
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, p in enumerate(q for q in points if q["measured"].get("token_times_s")):
        color = colors[i % len(colors)]
        prompt = p["dims"]["prompt"]
        measured, predicted = p["measured"]["token_times_s"], p["predicted"].get("token_times_s") or []
        at = " ".join(f"{k}={v}" for k, v in p["dims"].items())
        ax.plot(range(prompt, prompt + len(measured)), [t * 1e3 for t in measured], color=color, marker="o",
                markersize=3, markerfacecolor="none", linestyle="none", label=f"measured, {at}")
        if predicted:
            ax.plot(range(prompt, prompt + len(predicted)), [t * 1e3 for t in predicted], color=color,
                    linestyle="-", linewidth=1.5, label=f"predicted, {at}")
    ax.set_xlabel("context (tokens in the cache before the step)")
    ax.set_ylabel("time per decode step (ms)")
    ax.set_title("time per token against context", fontsize=10)
    ax.grid(True, alpha=0.2)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    done = [p for p in points if p["measured"].get("time_to_first_token_s")]
    for key, color, marker, label in (("measured", "tab:blue", "o", "measured"),
                                      ("predicted", "tab:orange", "s", "predicted")):
        xy = sorted((p["dims"]["prompt"], p[key]["time_to_first_token_s"] * 1e3) for p in done
                    if p[key].get("time_to_first_token_s"))
        if xy:
            ttft.plot(*zip(*xy), color=color, marker=marker, linestyle="none", label=label,
                      **({"markerfacecolor": "none", "markersize": 10} if key == "measured" else {}))
    ttft.set_xlabel("prompt (tokens)")
    ttft.set_ylabel("time to first token (ms)")
    ttft.set_title("time to first token (the prefill)", fontsize=10)
    ttft.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ttft.grid(True, alpha=0.2)
    if ttft.get_legend_handles_labels()[0]:
        ttft.legend(fontsize=8)


_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"))
_BYTE_UNITS = ((1024.0 ** 3, "GiB"), (1024.0 ** 2, "MiB"), (1024.0, "KiB"), (1.0, "B"))


def _readable_ticks(lo: float, hi: float, units) -> dict[float, str]:
    """Labelled ticks for a log axis over [lo, hi], at least 3 of them: powers of two for bytes
    (`units` _BYTE_UNITS), 1-2-5 steps for seconds, each in its own unit (512 MiB, 1 GiB; 5 ms, 1 s),
    thinned to 8 at most. A range too short for 3 of those (a peak growing from 500 to 674 MiB) gets
    evenly spaced round numbers in one unit, the one hi reaches: the largest step of 1, 2, 2.5 or 5
    times a power of ten that puts 3 or more in the range.

    >>> list(_readable_ticks(480 * 2**20, 700 * 2**20, _BYTE_UNITS).values())
    ['500 MiB', '550 MiB', '600 MiB', '650 MiB', '700 MiB']
    >>> list(_readable_ticks(0.004, 3, _TIME_UNITS).values())
    ['5 ms', '20 ms', '100 ms', '500 ms', '2 s']
    """
    if units is _BYTE_UNITS:
        ticks = [2.0 ** e for e in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]
    else:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    if len(ticks) >= 3:
        ticks = ticks[::math.ceil(len(ticks) / 8)]
        return {t: _in_unit(t, next(((s, u) for s, u in units if t >= s * (1 - 1e-9)), units[-1])) for t in ticks}
    scale, unit = next(((s, u) for s, u in units if hi >= s), units[-1])
    a, b = lo / scale, hi / scale
    power = 10.0 ** math.floor(math.log10((b - a) / 3))
    step = max(m * power for m in (1, 2, 2.5, 5) if m * power <= (b - a) / 3)
    return {k * step * scale: _in_unit(k * step * scale, (scale, unit))
            for k in range(math.ceil(a / step), math.floor(b / step) + 1)}


def _in_unit(value: float, unit: tuple[float, str]) -> str:
    return f"{round(value / unit[0], 9):g} {unit[1]}"


def _value(p: dict, series: str):
    from costmodel.validate.engine import GENERATE_SERIES, SERIES
    section, key = {**SERIES, **GENERATE_SERIES}[series]
    v = p[section].get(key)
    return v if isinstance(v, (int, float)) and v > 0 else None
