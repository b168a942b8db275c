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

`fit` searches (exponentially, then by bisection) for the largest integer value of one dimension
whose peak fits, the others fixed: peak memory grows with every dimension in practice, and the
search checks that it grows rather than assuming it.
"""

from __future__ import annotations

from .errors import UsageError
from .formulas import degree
from .hardware import Hardware, load_hardware
from .memory import device_kind
from .symbols import dim_symbol

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


def verdict(report, hardware, dims: dict[str, int], capacity_bytes: int | None = None) -> dict:
    """Does the step at `dims` fit `hardware`? {"device", "capacity_bytes", "peak_memory_bytes",
    "fits", "margin_bytes" (capacity - peak: negative when it does not fit), "memory", "at"}."""
    hw = _hardware(hardware)
    capacity = int(capacity_bytes) if capacity_bytes is not None else usable_bytes(hw)
    m = report.memory_at(dims, device=device_kind(hw))
    return {"device": hw.name, "capacity_bytes": capacity, "peak_memory_bytes": m.peak_bytes,
            "fits": m.peak_bytes <= capacity, "margin_bytes": capacity - m.peak_bytes,
            "memory": m.breakdown, "at": m.at}


def fit(report, hardware, dim: str, dims: dict[str, int], capacity_bytes: int | None = None) -> dict:
    """The largest value of `dim` whose peak memory fits `hardware`, the other dimensions at `dims`.

    Returns {"max": {dim: N}, "capacity_bytes", "peak_memory_bytes" (at N), "next_peak_memory_bytes"
    (at N + 1, which does not fit), "device", "memory_bytes", "reserve": {...}, "dims" (all, at N),
    "memory" (the breakdown at N), "at" (where the peak happens)}.
    """
    hw = _hardware(hardware)
    kind = device_kind(hw)
    if dim not in report.dims:
        raise UsageError(f"--max {dim}: not a dimension of any input; the inputs "
                         f"({', '.join(str(s) for s in report.inputs)}) have: {', '.join(report.dims) or 'none'}")
    if dim in dims:
        raise UsageError(f"--max {dim} is solved for; do not also give --dim {dim}")
    missing = [d for d in report.dims if d != dim and d not in dims]
    if missing:
        raise UsageError(f"fit needs a value for every other dimension; give --dim {missing[0]}=N")
    capacity = int(capacity_bytes) if capacity_bytes is not None else usable_bytes(hw)
    if capacity <= 0:
        raise UsageError(f"capacity must be positive; got {capacity} bytes")
    cache: dict[int, object] = {}

    def at(v: int):
        if v not in cache:
            cache[v] = report.memory_at({**dims, dim: v}, device=kind)
        return cache[v]

    formula = report.memory_formula(device=kind)
    growing = [d for d in report.dims if degree(formula, dim_symbol(d)) > 0]
    if dim not in growing:
        pinned = report.fixed.get(dim)
        why = f"the model pins {dim} to {pinned}" if pinned is not None else f"{dim} is not in its formula"
        raise UsageError(f"--max {dim}: peak memory does not grow with {dim} ({why}); nothing to solve for. "
                         f"Dimensions that grow it: {', '.join(growing) or 'none'}")
    if at(1).peak_bytes > capacity:
        m = at(1)
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in m.breakdown.items() if v)
        raise UsageError(f"even {dim}=1 does not fit {hw.name}: peak {m.peak_bytes / 2**30:.2f} GiB > usable "
                         f"{capacity / 2**30:.2f} GiB ({parts}). Use a smaller --dtype, an optimizer with less "
                         "state, or a device with more memory")
    lo = 1
    for _ in range(_MAX_DOUBLINGS):
        if at(lo * 2).peak_bytes > capacity:
            break
        lo *= 2
    else:
        raise UsageError(f"--max {dim}: the peak still fits at {dim}={lo}; it grows too slowly to bound")
    hi = lo * 2                   # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).peak_bytes <= capacity:
            lo = mid
        else:
            hi = mid
    best = at(lo)
    return {"max": {dim: lo}, "capacity_bytes": capacity, "peak_memory_bytes": best.peak_bytes,
            "next_peak_memory_bytes": at(lo + 1).peak_bytes, "device": hw.name, "memory_bytes": hw.memory_bytes,
            "reserve": {"context_bytes": CONTEXT_RESERVE_BYTES if capacity_bytes is None else None,
                        "fragmentation": FRAGMENTATION_RESERVE if capacity_bytes is None else None,
                        "given_capacity_bytes": capacity_bytes},
            "dims": {**dims, dim: lo}, "memory": best.breakdown, "at": best.at}


def largest_fitting(report, hardware, dims: dict[str, int], capacity_bytes: int | None = None) -> dict[str, int | None]:
    """For each dimension that grows memory, the largest value that fits with the others at `dims`
    (None when even 1 does not fit)."""
    out: dict[str, int | None] = {}
    formula = report.memory_formula(device=device_kind(_hardware(hardware)))
    for d in report.dims:
        if degree(formula, dim_symbol(d)) == 0:
            continue
        others = {k: v for k, v in dims.items() if k != d}
        try:
            out[d] = fit(report, hardware, d, others, capacity_bytes)["max"][d]
        except UsageError:
            out[d] = None
    return out
