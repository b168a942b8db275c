"""The doubling experiment: time a function at growing sizes and fit the exponent k of t ~ c * n^k.

`fit_exponent` is least squares on log size against log value (the slope of a log-log plot);
`complexity_class` names the nearest polynomial order; `measure_complexity` times any callable at
several sizes (warm-up, then the median of repeated blocks) and returns all three. The validator
(`costmodel.validate`) uses the same timer and fit on real models.

    >>> import random
    >>> r = measure_complexity(sorted, [2**k for k in range(12, 17)], lambda n: [random.random() for _ in range(n)])
    >>> r.exponent, r.complexity                         # doctest: +SKIP
    (1.09, 'O(n)')
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from costmodel.errors import UsageError

# Within this distance of an integer k the fitted exponent reads as O(n^k). Timing noise on a busy
# machine moves a fitted slope by a few hundredths over a decade of sizes; a log factor adds only
# 1/ln(n) (0.1 to 0.2 at the sizes anyone times), which is why O(n log n) is not offered as a class:
# over a finite range of sizes it is indistinguishable from O(n^1.1) by its slope.
CLASS_TOLERANCE = 0.2
MIN_BLOCK_S = 2e-3        # calls shorter than this are timed in blocks of several back to back
MAX_BLOCKS = 200          # however short the blocks, no more than this many for one median


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Slope of the least-squares line through (log size, log value): k in value ~ c * size^k.

    >>> fit_exponent([1, 2, 4, 8], [3, 12, 48, 192])     # 3 * n^2
    2.0
    """
    if len(sizes) != len(values):
        raise UsageError(f"fit_exponent needs as many values as sizes; got {len(sizes)} sizes and "
                         f"{len(values)} values")
    bad = [(s, v) for s, v in zip(sizes, values) if not (s > 0 and v > 0)]
    if bad:
        raise UsageError(f"fit_exponent needs positive sizes and values (log-log fit); got size {bad[0][0]} "
                         f"with value {bad[0][1]}")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    if len(set(xs)) < 2:
        raise UsageError(f"fit_exponent needs at least two distinct sizes; got {list(sizes)}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy / sxx


def complexity_class(exponent: float | None, var: str = "n", tolerance: float = CLASS_TOLERANCE) -> str | None:
    """The polynomial order a fitted exponent indicates: the nearest integer k when within
    `tolerance`, else the exponent itself to one decimal (a mix of orders, or a transition).

    >>> complexity_class(1.93), complexity_class(1.04, "seq"), complexity_class(0.07), complexity_class(1.5)
    ('O(n^2)', 'O(seq)', 'O(1)', 'O(n^1.5)')
    """
    if exponent is None or not math.isfinite(exponent):
        return None
    k = round(exponent)
    if abs(exponent - k) <= tolerance:
        return "O(1)" if k == 0 else f"O({var})" if k == 1 else f"O({var}^{k})"
    return f"O({var}^{exponent:.1f})"


def doubling_ratios(sizes: Sequence[float], values: Sequence[float]) -> list[float]:
    """value[i+1] / value[i] between consecutive sizes: about 2^k when the size doubles."""
    return [b / a if a else math.inf for a, b in itertools.pairwise(values)]


# --- timing ----------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Median time of one call, from `repeats` blocks of `number` calls each (after warm-up); the
    clock is `time_call`'s."""

    median_s: float
    times_s: list[float]          # per-call time of each block
    number: int                   # calls per block


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, device: str = "cpu",
              min_block_s: float = MIN_BLOCK_S, min_time_s: float = 0.0) -> Timing:
    """Time `fn()`: `warmup` calls, then at least `repeats` blocks (more until `min_time_s` of timing
    is spent, which steadies the median on a busy machine), each long enough to time well; the median.

    On CUDA each block is bracketed by CUDA events and synchronised, so the time is the GPU's, not
    the launch queue's. On the CPU at one thread (`torch.get_num_threads() == 1`: ops, backward and
    optimizer all run on the calling thread) it is that thread's own clock (`time.thread_time`),
    the clock calibration times kernels on: on an idle machine the same as the wall clock, on a
    busy one without the time spent waiting for a core. With more threads, `time.perf_counter`.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1; got {repeats}")
    cuda = _is_cuda(device)
    for _ in range(max(warmup, 0)):
        fn()
    _sync(cuda)
    number, once = 1, _block(fn, 1, cuda, thread_clock=True)
    if once < min_block_s:   # short calls: grow the block (timeit's autorange) so the timer's resolution does not matter
        number = max(1, min(1000, math.ceil(min_block_s / max(once, 1e-9))))
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or (spent < min_time_s and len(times) < MAX_BLOCKS):
        block = _block(fn, number, cuda, thread_clock=True)
        spent += block
        times.append(block / number)
    return Timing(statistics.median(times), times, number)


def cuda_block_s(fn, number: int) -> float:
    """Seconds of `number` calls of `fn` on the GPU, between two CUDA events."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _block(fn, number: int, cuda: bool, thread_clock: bool = False) -> float:
    if cuda:
        return cuda_block_s(fn, number)
    clock = cpu_clock() if thread_clock else time.perf_counter
    t0 = clock()
    for _ in range(number):
        fn()
    return clock() - t0


def cpu_clock() -> Callable[[], float]:
    """The calling thread's CPU clock where every op runs on it (one intra-op thread), else wall time."""
    import torch
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


HEAP_SETTLE_BYTES = (32 << 20) - (8 << 10)   # just under glibc's largest dynamic mmap threshold (32 MiB on 64-bit)


def settle_heap() -> None:
    """Put glibc's heap in the state of a process that has freed a block of 32 MiB, where the costs
    are modelled and the calibration measured. glibc maps each block at or above its mmap threshold
    anew and, on freeing one, raises the threshold to that block's size (32 MiB at most) and its trim
    threshold to twice that; a fresh process starts at 128 KiB. Until something that large is freed,
    the heap top a step frees is handed back to the kernel whenever it exceeds twice the largest
    tensor so far, and the next step faults it in again, page by page: a fresh process timing a
    ConvNeXt at batch 4 (largest tensor 3 MiB) paid 3,300 faults a step, 35% of its time; after this,
    none. A block of this size is mapped and freed untouched, so it costs two system calls; elsewhere
    than glibc it is only that."""
    import torch
    block = torch.empty(HEAP_SETTLE_BYTES, dtype=torch.uint8)
    del block


def minor_faults() -> int | None:
    """This process's minor page faults so far (all threads), or None where the OS does not say."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


# --- the doubling experiment on any callable -------------------------------------------------------

@dataclass
class ComplexityResult:
    sizes: list[int]
    times_s: list[float]          # median time per size
    exponent: float               # fitted k in t ~ c * n^k
    complexity: str               # complexity_class(exponent)
    doubling_ratios: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_complexity(fn: Callable[[Any], Any], sizes: Sequence[int], make_input: Callable[[int], Any],
                       repeats: int = 5, *, warmup: int = 1, device: str | None = None,
                       min_block_s: float = 10 * MIN_BLOCK_S) -> ComplexityResult:
    """Time `fn(make_input(n))` for every n in `sizes` (inputs are made before any timing) and fit
    the exponent of the median times. The repeats go round the sizes in turn, so a change in the
    machine's load while it runs hits every size alike instead of bending the slope. `device="cuda"`
    times with CUDA events; by default it is "cuda" when an input holds a CUDA tensor.

    >>> r = measure_complexity(lambda n: sum(range(n)), [10_000 * 2**k for k in range(5)], lambda n: n)
    >>> r.complexity, [round(x, 1) for x in r.doubling_ratios]          # doctest: +SKIP
    ('O(n)', [2.0, 2.0, 2.1, 2.0])
    """
    sizes = list(sizes)
    if len(set(sizes)) < 2:
        raise UsageError(f"measure_complexity needs at least two distinct sizes; got {sizes}")
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1; got {repeats}")
    inputs = [make_input(n) for n in sizes]
    cuda = _is_cuda(device) if device else any(_holds_cuda(x) for x in inputs)
    calls = [(lambda x=x: fn(x)) for x in inputs]
    numbers = []
    for call in calls:
        for _ in range(max(warmup, 0)):
            call()
        _sync(cuda)
        once = _block(call, 1, cuda)
        numbers.append(max(1, min(1000, math.ceil(min_block_s / max(once, 1e-9)))) if once < min_block_s else 1)
    samples: list[list[float]] = [[] for _ in sizes]
    for _ in range(repeats):
        for call, number, out in zip(calls, numbers, samples):
            out.append(_block(call, number, cuda) / number)
    times = [statistics.median(s) for s in samples]
    k = fit_exponent(sizes, times)
    return ComplexityResult(sizes, times, k, complexity_class(k), doubling_ratios(sizes, times))


def _holds_cuda(x) -> bool:
    try:
        import torch
        from costmodel._torch import tree_leaves
    except ImportError:   # pragma: no cover - torch is a dependency
        return False
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves(x))
