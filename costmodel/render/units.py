"""Units for people: the only place SI figures become k/M/G, KiB/MiB/GiB and ms.

    >>> num(3.5e12, "FLOP/s"), size(3 * 2**30), duration(0.0042)
    ('3.5 TFLOP/s', '3 GiB', '4.2 ms')
"""

from __future__ import annotations

GIB = 1024 ** 3


def num(x, unit: str = "") -> str:
    """A count or rate with a decimal prefix: 1.23 G, 312 TFLOP/s; '-' for None."""
    if x is None:
        return "-"
    x = float(x)
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def size(x) -> str:
    """Bytes with a binary prefix, three significant digits and no exponent: 1000 MiB, 0.98 GiB."""
    if x is None:
        return "-"
    x = float(x)
    for scale, prefix in ((1024 ** 4, "TiB"), (GIB, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if abs(x) >= scale:
            return f"{_digits(x / scale)} {prefix}"
    return f"{int(x)} B"


def duration(t) -> str:
    """Seconds as ms below one second: 4.2 ms, 1.3 s; '-' for None."""
    if t is None:
        return "-"
    return f"{_digits(t * 1e3)} ms" if t < 1 else f"{_digits(t)} s"


def _digits(x: float) -> str:
    """Three significant digits, never in exponent form (1000, not 1e+03)."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def signed_pct(x) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def pct(x) -> str:
    return "-" if x is None else f"{x:.1f}%"


def fixed2(x) -> str:
    return "-" if x is None else f"{x:.2f}"
