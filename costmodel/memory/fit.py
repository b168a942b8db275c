"""Will it fit: the OOM verdict of one point, and the largest value of a dimension that fits a device.

The usable capacity is not the datasheet's memory. Unless told otherwise (`capacity_bytes`), it is

    capacity = (memory_bytes - CONTEXT_RESERVE_BYTES) * (1 - FRAGMENTATION_RESERVE)

CONTEXT_RESERVE_BYTES (1 GiB) is what the process never gets to allocate tensors in: the CUDA
context, cuBLAS/cuDNN handles and workspaces, loaded kernels (about 0.3 to 0.6 GiB with lazy
module loading), plus the part of the datasheet capacity the driver keeps (an A100 80GB reports
79.15 GiB of its 80). FRAGMENTATION_RESERVE (5%) is the caching allocator's reserved-but-unused
share: blocks rounded up to 512 B and 2 MiB segments, split blocks that later requests cannot use.
Both are typical, not measured on the user's machine; give `capacity_bytes` (CLI: --capacity) to
use another figure, e.g. torch.cuda.mem_get_info()[1] less what your process already holds.

`largest` searches (exponentially, then by bisection) for the largest integer value of one
dimension whose peak fits, the others fixed, starting from a value the model runs at and staying
inside what the model accepts: its limits bound the search, values it cannot be captured at are
reported as the reason the search stopped, never as an error of the whole analysis. Peak memory
grows with every dimension in practice; the search checks that it grows rather than assuming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from costmodel.errors import AnalysisError, CaptureFailed, CostModelError, OutsideLimits, UsageError
from costmodel.formulas import degree
from costmodel.hardware.catalog import Hardware, load_hardware
from costmodel.memory.timeline import device_kind
from costmodel.symbols import dim_symbol

CONTEXT_RESERVE_BYTES = 1 << 30
FRAGMENTATION_RESERVE = 0.05
_MAX_DOUBLINGS = 48          # 2**48: no tensor dimension is that large


def usable_bytes(hardware: Hardware, context_bytes: int = CONTEXT_RESERVE_BYTES,
                 fragmentation: float = FRAGMENTATION_RESERVE) -> int:
    """What tensors may occupy on `hardware`: (memory - context) * (1 - fragmentation).

    >>> usable_bytes(load_hardware("a100-80gb"))      # (80 - 1) GiB * 0.95
    80585246720
    """
    if not 0 <= fragmentation < 1:
        raise UsageError(f"fragmentation reserve must be in [0, 1); got {fragmentation}")
    return int((hardware.memory_bytes - context_bytes) * (1 - fragmentation))


def _hardware(hardware) -> Hardware:
    return load_hardware(hardware) if isinstance(hardware, str) else hardware


def _kind(report, hw: Hardware, device=None) -> str:
    """The device kind whose kernels the memory model assumes: `device`, else the report's (its
    --device, else that of its first --hw device, else cuda)."""
    return device_kind(device) if device is not None else report.device_kind


def verdict(report, hardware, dims: dict[str, int], capacity_bytes: int | None = None) -> dict:
    """Does the step at `dims` fit `hardware`? {"device", "capacity_bytes", "peak_memory_bytes",
    "fits", "margin_bytes" (capacity - peak: negative when it does not fit), "memory", "at"}."""
    hw = _hardware(hardware)
    capacity = int(capacity_bytes) if capacity_bytes is not None else usable_bytes(hw)
    m = report.memory_at(dims, device=_kind(report, hw))
    return {"device": hw.name, "capacity_bytes": capacity, "peak_memory_bytes": m.peak_bytes,
            "fits": m.peak_bytes <= capacity, "margin_bytes": capacity - m.peak_bytes,
            "memory": m.breakdown, "at": m.at}


@dataclass
class Stop:
    """Why a search for the largest value stopped where it did.

    kind: "capacity" (the next value does not fit), "model" (a limit of the model: a bound the
    capture found, a table the positions index, a config's declared context), "capture" (the next
    value could not be captured, with its reason), "none" (not even the smallest value fits),
    "error" (the search itself failed; `reason` says how)."""

    kind: str
    reason: str
    next_value: int | None = None      # the value just past the answer, when probed
    next_peak_bytes: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


@dataclass
class Largest:
    """The largest value of `dim` whose peak fits, the other dimensions fixed; `value` None when
    none fits or the search failed (`stop` says which)."""

    dim: str
    value: int | None
    stop: Stop
    peak_bytes: int | None = None
    memory_only_value: int | None = None      # past a soft limit (a config's context), memory's own answer

    def to_dict(self) -> dict:
        out = {"value": self.value, "limit": self.stop.to_dict()}
        if self.peak_bytes is not None:
            out["peak_memory_bytes"] = self.peak_bytes
        if self.memory_only_value is not None:
            out["memory_only_value"] = self.memory_only_value
        return out

    def describe(self) -> str:
        """'512 (the model's limit: seq <= 512, from modeling_bert.py:85 in forward)'."""
        s = self.stop
        if s.kind == "error":
            return f"not found ({s.reason})"
        if s.kind == "none":
            return f"none ({s.reason})"
        if s.kind == "capacity":
            return f"{self.value} (by memory{f': at {self.dim}={s.next_value} it does not fit' if s.next_value else ''})"
        if s.kind == "model":
            extra = (f"; memory alone allows {self.memory_only_value}" if self.memory_only_value else "")
            return f"{self.value} (the model's limit: {s.reason}{extra})"
        return f"{self.value} (above {self.value} the model could not be captured: {s.reason})"


class _Probe:
    """Peak memory at values of one dimension, the others fixed; None where the model cannot run."""

    def __init__(self, report, dim: str, dims: dict[str, int], kind: str, capacity: int):
        self.report, self.dim, self.dims, self.kind, self.capacity = report, dim, dims, kind, capacity
        self.cache: dict[int, object] = {}
        self.failures: dict[int, AnalysisError] = {}

    def __call__(self, v: int):
        """The MemoryPoint at dim=v, or None (the reason in self.failures[v])."""
        if v in self.cache:
            return self.cache[v]
        try:
            result = self.report.memory_at({**self.dims, self.dim: v}, device=self.kind, quiet=True)
        except (CaptureFailed, OutsideLimits) as e:
            self.failures[v] = e
            result = None
        self.cache[v] = result
        return result

    def fits(self, v: int) -> bool | None:
        m = self(v)
        return None if m is None else m.peak_bytes <= self.capacity

    def stop_at(self, v: int) -> Stop:
        """Why v is past the answer."""
        m = self(v)
        if m is not None:
            return Stop("capacity", f"at {self.dim}={v} the peak is {m.peak_bytes} bytes, over {self.capacity} usable",
                        next_value=v, next_peak_bytes=m.peak_bytes)
        e = self.failures[v]
        if isinstance(e, OutsideLimits):
            return Stop("model", e.limit.describe(), next_value=v)
        guard = self._bounding_guard(v)
        if guard is not None:
            return Stop("model", str(guard.expr) + (f", from {guard.where}" if guard.where else ""), next_value=v)
        return Stop("capture", f"at {self.dim}={v}: {_first_line(e.reason)}", next_value=v)

    def _bounding_guard(self, v: int):
        """A guard of the symbolic capture on this dimension alone that v breaks: the model's own
        bound (e.g. seq <= 512 where a position buffer is sliced), when a capture past it fails."""
        sym = dim_symbol(self.dim)
        for g in self.report.guards:
            if g.expr.free_symbols == {sym} and not g.holds({sym: v}):
                return g
        return None


def largest(report, hardware, dim: str, dims: dict[str, int], capacity_bytes: int | None = None,
            start: int | None = None, device=None) -> Largest:
    """The largest value of `dim` whose peak memory fits `hardware` with the other dimensions at
    `dims`, searched from `start` (a value the model runs at: the user's, else the capture's own),
    exponentially then by bisection, inside the limits of the model (its bounds, tables indexed by
    positions, a config's context) and probing only values at which it can be captured: a value
    where it cannot bounds the search and is reported, never raised."""
    hw = _hardware(hardware)
    kind = _kind(report, hw, device)
    capacity = int(capacity_bytes) if capacity_bytes is not None else usable_bytes(hw)
    if capacity <= 0:
        raise UsageError(f"capacity must be positive; got {capacity} bytes")
    probe = _Probe(report, dim, dims, kind, capacity)
    sym = dim_symbol(dim)
    ceiling = None      # the tightest upper bound of the limits on this dimension alone
    for limit in report.limits:
        b = limit.bound(sym, {d: v for d, v in dims.items() if d != dim})
        if b is not None and (ceiling is None or b < ceiling[0]):
            ceiling = (b, limit)
    a = start if start is not None else report.primary.captured.hints.get(dim, 1)
    if ceiling is not None and a > ceiling[0]:
        a = ceiling[0]
    fits = probe.fits(a)
    if fits is None:
        raise probe.failures[a]
    if not fits:
        return _search_down(probe, dim, a)
    lo, hi = a, None
    for _ in range(_MAX_DOUBLINGS):
        nxt = lo * 2
        if ceiling is not None and nxt > ceiling[0]:
            if lo == ceiling[0]:
                return _at_limit(probe, dim, lo, ceiling[1])
            nxt = ceiling[0]
        f = probe.fits(nxt)
        if f:
            lo = nxt
            continue
        hi = nxt
        break
    else:
        return Largest(dim, None, Stop("error", f"the search failed: the peak still fits at {dim}={lo}; it grows "
                                                "too slowly to bound"))
    lo, hi = _bisect(probe, lo, hi)
    return Largest(dim, lo, probe.stop_at(hi), probe(lo).peak_bytes)


def _at_limit(probe: _Probe, dim: str, value: int, limit) -> Largest:
    """The answer is a limit's bound; past a soft one, also how far memory alone would go."""
    result = Largest(dim, value, Stop("model", limit.describe()), probe(value).peak_bytes)
    if not limit.hard:
        # memory's own answer, without recapturing past the symbolic capture's guards
        guards = probe.report.primary.captured.guards
        sym = dim_symbol(dim)
        others = {dim_symbol(d): v for d, v in probe.dims.items()}

        def valid(v):
            return all(g.holds({**others, sym: v}) for g in guards) and not [
                l for l in probe.report.outside_limits({**probe.dims, dim: v}) if l.hard]
        lo = value
        for _ in range(_MAX_DOUBLINGS):
            if not valid(lo * 2):
                return result
            f = probe.fits(lo * 2)
            if not f:
                break
            lo *= 2
        else:
            return result
        hi = lo * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if valid(mid) and probe.fits(mid):
                lo = mid
            else:
                hi = mid
        result.memory_only_value = lo
    return result


def _bisect(probe: _Probe, lo: int, hi: int) -> tuple[int, int]:
    """lo fits, hi does not (or cannot run): narrow to adjacent values. A value that cannot run
    between them is replaced by the nearest one below it that can (sizes that must be multiples of a
    stride or a patch), and only bounds the search when there is none. Returns (answer, the value
    that stops it): the next value the model runs at, when hi itself cannot run."""
    lo, hi = _narrow(probe, lo, hi)
    while probe(hi) is None:
        above = _runnable_near(probe, hi, range(hi + 1, hi + _WINDOW))
        if above is None:
            break
        if not probe.fits(above):
            return lo, above if probe(above) is not None else hi
        lo, hi = _narrow(probe, above, _grow(probe, above))
    return lo, hi


def _grow(probe: _Probe, lo: int) -> int:
    """A value above lo that does not fit or cannot run (doubling)."""
    v = lo
    for _ in range(_MAX_DOUBLINGS):
        v *= 2
        if not probe.fits(v):
            return v
    raise AnalysisError(f"the peak still fits at {probe.dim}={v}; it grows too slowly to bound")


def _narrow(probe: _Probe, lo: int, hi: int) -> tuple[int, int]:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f = probe.fits(mid)
        if f is None:
            alt = _runnable_near(probe, mid, range(mid - 1, max(lo, mid - _WINDOW), -1))
            if alt is not None:
                if probe.fits(alt):
                    lo = alt
                    continue
                hi = alt
                continue
            hi = mid
        elif f:
            lo = mid
        else:
            hi = mid
    return lo, hi


_WINDOW = 64     # values tried around one that cannot run, for one that can (multiples of a stride)


def _runnable_near(probe: _Probe, v: int, values) -> int | None:
    """The first of `values` that the symbolic capture admits (checked on its guards alone, no
    capture) and that can run: a size between two that run when v itself cannot."""
    guards = probe.report.primary.captured.guards
    sym = dim_symbol(probe.dim)
    others = {dim_symbol(d): x for d, x in probe.dims.items()}
    for w in values:
        if w >= 1 and all(g.holds({**others, sym: w}) for g in guards) and probe(w) is not None:
            return w
    return None


def _search_down(probe: _Probe, dim: str, a: int) -> Largest:
    """`a` does not fit: halve until a value fits, or the model cannot run any smaller."""
    hi, v = a, a // 2
    while v >= 1:
        f = probe.fits(v)
        if f:
            lo, hi = _bisect(probe, v, hi)
            return Largest(dim, lo, probe.stop_at(hi), probe(lo).peak_bytes)
        if f is None:
            # the smallest value the model runs at, between v (cannot) and hi (can)
            bad, good = v, hi
            while good - bad > 1:
                mid = (bad + good) // 2
                if probe(mid) is None:
                    bad = mid
                else:
                    good = mid
            if probe.fits(good):
                lo, hi = _bisect(probe, good, hi)
                return Largest(dim, lo, probe.stop_at(hi), probe(lo).peak_bytes)
            m = probe(good)
            why = probe.stop_at(bad)
            return Largest(dim, None, Stop("none", f"even the smallest {dim} the model runs at, {good}, does not fit: "
                                                  f"peak {m.peak_bytes} bytes > {probe.capacity} usable; below it "
                                                  f"{why.reason}", good, m.peak_bytes))
        hi, v = v, v // 2
    m = probe(1)
    return Largest(dim, None, Stop("none", f"even {dim}=1 does not fit: peak {m.peak_bytes} bytes > "
                                           f"{probe.capacity} usable", next_value=1, next_peak_bytes=m.peak_bytes))


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def _growing(report, kind: str) -> list[str]:
    formula = report.memory_formula(device=kind)
    return [d for d in report.dims if degree(formula, dim_symbol(d)) > 0]


def fit(report, hardware, dim: str, dims: dict[str, int], capacity_bytes: int | None = None) -> dict:
    """The largest value of `dim` whose peak memory fits `hardware`, the other dimensions at `dims`.

    Returns {"max": {dim: N}, "limit": {...} (why the search stopped: "capacity", "model" with the
    bound and its source, "capture" with the reason), "capacity_bytes", "peak_memory_bytes" (at N),
    "next_peak_memory_bytes" (at N + 1 when that runs), "device", "memory_bytes", "reserve": {...},
    "dims" (all, at N), "memory" (the breakdown at N), "at" (where the peak happens)}. Raises
    UsageError when no value fits (saying what the smallest one needs) and AnalysisError when the
    model cannot be captured at the starting point.
    """
    hw = _hardware(hardware)
    kind = _kind(report, hw)
    if dim not in report.dims:
        raise UsageError(f"--max {dim}: not a dimension of any input; the inputs "
                         f"({', '.join(str(s) for s in report.inputs)}) have: {', '.join(report.dims) or 'none'}")
    if dim in dims:
        raise UsageError(f"--max {dim} is solved for; do not also give --dim {dim}")
    missing = [d for d in report.dims if d != dim and d not in dims]
    if missing:
        raise UsageError(f"fit needs a value for every other dimension; give --dim {missing[0]}=N")
    growing = _growing(report, kind)
    if dim not in growing:
        pinned = report.fixed.get(dim)
        why = f"the model pins {dim} to {pinned}" if pinned is not None else f"{dim} is not in its formula"
        raise UsageError(f"--max {dim}: peak memory does not grow with {dim} ({why}); nothing to solve for. "
                         f"Dimensions that grow it: {', '.join(growing) or 'none'}")
    capacity = int(capacity_bytes) if capacity_bytes is not None else usable_bytes(hw)
    result = largest(report, hw, dim, dims, capacity, device=kind)
    if result.stop.kind == "error":
        raise AnalysisError(f"--max {dim}: {result.stop.reason}")
    if result.value is None:
        raise UsageError(f"{result.stop.reason} on {hw.name}. Use a smaller --dtype, an optimizer with less "
                         "state, or a device with more memory")
    best = report.memory_at({**dims, dim: result.value}, device=kind, quiet=True)
    return {"max": {dim: result.value}, "limit": result.stop.to_dict(), "capacity_bytes": capacity,
            "peak_memory_bytes": best.peak_bytes, "next_peak_memory_bytes": result.stop.next_peak_bytes,
            "memory_only_value": result.memory_only_value, "device": hw.name, "memory_bytes": hw.memory_bytes,
            "reserve": {"context_bytes": CONTEXT_RESERVE_BYTES if capacity_bytes is None else None,
                        "fragmentation": FRAGMENTATION_RESERVE if capacity_bytes is None else None,
                        "given_capacity_bytes": capacity_bytes},
            "dims": {**dims, dim: result.value}, "memory": best.breakdown, "at": best.at,
            "description": result.describe()}


def largest_fitting(report, hardware, dims: dict[str, int], capacity_bytes: int | None = None) -> dict[str, Largest]:
    """For each dimension that grows memory, the largest value that fits with the others at `dims`,
    searched from the value in `dims`. Each search stands alone: one that fails is reported in its
    entry (stop kind "error"), never raised."""
    hw = _hardware(hardware)
    kind = _kind(report, hw)
    out: dict[str, Largest] = {}
    for d in _growing(report, kind):
        others = {k: v for k, v in dims.items() if k != d}
        try:
            out[d] = largest(report, hw, d, others, capacity_bytes, start=dims.get(d), device=kind)
        except CostModelError as e:
            out[d] = Largest(d, None, Stop("error", f"the search failed: {e}"))
    return out
