"""Measure one table per kernel class on this device: what `costmodel hardware calibrate` adds to
the peaks, so the roofline prices each op as its kind of kernel actually runs here.

Each probe runs one aten op on real tensors at a series of sizes and shapes and times it (blocks of
calls, the median block; CUDA events on a GPU). Its work (FLOPs or bytes), kernel class and shape
features come from the same rule that costs the op in a model (`rule_cost`), so the two can never
count differently, and a probe whose rule names another class than the probe's is an error.
From the times: the class's overhead (its tiniest instance), its rate at reference shapes by size,
and for products, convolutions and attention one efficiency curve per shape feature, measured
with the other features at the reference (see costmodel/hardware/kernels.py for how they combine).
On a CPU, the fresh-page price of large outputs is measured first and taken out of each time, as
the roofline adds it back per op.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import sympy
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from costmodel.hardware.eager_backend import NATIVE_BACKENDS, SLOW_CONV_ELEMENTS, conv_backend
from costmodel.hardware.kernels import (ALLOC_FEATURE, CHANNELS_LAST, INNER_STRIDE_FEATURE, POOL_STRIDE_FEATURE,
                                       POOL_WINDOW_FEATURE, PROBE_CLASSES, UPSAMPLE_WIDTH_FEATURE, AllocationTable,
                                       KernelTable, work_of)
from costmodel.validate.stats import cpu_clock, cuda_block_s, minor_faults

aten = torch.ops.aten


@dataclass(frozen=True)
class KernelPlan:
    """What to measure, by device: sizes grow with the device's speed."""
    block_s: float                   # each timed block of calls lasts at least this long
    blocks: int                      # blocks per measurement; the median block is kept
    elements: tuple[int, ...]        # byte-priced classes: float32 elements per tensor (first: tiny)
    pointwise_ops: tuple[str, ...]   # the elementwise ops measured one by one
    mm_ref: int                      # products: m = n = k = mm_ref is the reference shape
    mm_cubes: tuple[int, ...]        # n^3 products for the rate by size
    mm_curve: tuple[int, ...]        # values of m, of n, of k, the others at mm_ref
    stream_ref: int                  # streamed products: w[n, k] read from memory, n = k = stream_ref
    stream_m: tuple[int, ...]        # their rows m (few: a decode step's batch)
    stream_n: tuple[int, ...]        # their output widths, at m = STREAM_CURVE_M
    stream_k: tuple[int, ...]        # their inner sizes, at m = STREAM_CURVE_M
    bmm_batch: int
    bmm_ref: int
    bmm_cubes: tuple[int, ...]
    bmm_curve: tuple[int, ...]
    conv_batch: int
    conv_base: tuple[tuple[int, int], ...]   # (channels, image side) for the rate by size
    conv_ref: int                    # reference channels of the shape curves
    conv_side: int                   # reference image side of the shape curves
    conv_sides: tuple[int, ...]      # image sides of the m curve
    conv_channels: tuple[int, ...]   # c_in, c_out curves of dense convolutions
    conv_kernels: tuple[int, ...]    # kernel sides
    conv_groups: tuple[int, ...]     # channels of depthwise convolutions
    attn_heads: int                  # batch * heads
    attn_e: int                      # reference head dimension
    attn_lengths: tuple[int, ...]    # L = S for the rate by size
    attn_e_curve: tuple[int, ...]
    attn_heads_curve: tuple[int, ...]
    attn_kernels: tuple[str, ...]    # SDPA kernels this device runs
    optimizer_elements: tuple[int, ...]
    alloc_sizes: tuple[int, ...]     # bytes; empty where allocation is free (CUDA's caching allocator)
    dtypes: tuple[str, ...]          # dtypes of the FLOP-priced classes
    variants: bool = True            # causal/dropout attention, transposed and grouped convolutions
    max_copies: int = 64             # operand copies a probe rotates through (see Prober.instance)
    passes: int = 1                  # times every class is measured (least_disturbed)
    llc_samples: int = 0             # calls Timer.evicted_llc_samples times per instance, over all passes (0: not measured)
    # conv.dense.slow (a CPU's native convolution, see Prober.conv): channels of its 1x1 base calls
    # and image sides of its m curve, every call at batch 1 and at most SLOW_CONV_ELEMENTS inputs
    conv_slow_channels: tuple[int, ...] = ()
    conv_slow_sides: tuple[int, ...] = ()
    # matmul.lstm (a CPU's oneDNN LSTM layer, Prober.lstm): its steps, the batches of its rate (at the
    # middle hidden size), and the hidden sizes (the input as wide) of its curve, at lstm_batch
    lstm_batch: int = 0
    lstm_steps: int = 0
    lstm_hidden: tuple[int, ...] = ()
    lstm_batches: tuple[int, ...] = ()


_POINTWISE_ALL = ("add", "sub", "mul", "div", "neg", "abs", "relu", "threshold_backward", "gelu", "gelu_tanh",
                  "gelu_backward", "gelu_backward_tanh", "silu", "silu_backward", "sigmoid", "sigmoid_backward",
                  "tanh", "tanh_backward", "exp", "log", "pow", "rsqrt", "sqrt", "erf", "where", "masked_fill",
                  "clamp", "eq", "lt", "native_dropout_backward")


def kernel_plan(device: str, quick: bool) -> KernelPlan:
    """Sizes by device: quick (tests: seconds), a CPU (in three passes: 4-5 min on a 2-vCPU EPYC
    with a 32 MiB L3, 12 on a 2-vCPU Xeon whose L3 reads 260 MiB, the flushes of
    Timer.evicted_llc_samples writing twice it), a GPU."""
    kernels = _attention_kernels(device)
    if quick:
        return KernelPlan(
            block_s=0.001, blocks=5, elements=(16, 4096, 65536), pointwise_ops=("add", "mul", "tanh"),
            mm_ref=64, mm_cubes=(64, 128), mm_curve=(1, 16, 64), stream_ref=256, stream_m=(1, 2, 8),
            stream_n=(64, 256), stream_k=(64, 256), bmm_batch=4, bmm_ref=32, bmm_cubes=(32, 64),
            bmm_curve=(4, 32), conv_batch=1, conv_base=((8, 8), (16, 8)), conv_ref=8, conv_side=8,
            conv_sides=(4, 8), conv_channels=(4, 16), conv_kernels=(1, 3), conv_groups=(4, 16), attn_heads=2,
            attn_e=16, attn_lengths=(16, 64), attn_e_curve=(16,), attn_heads_curve=(1,), attn_kernels=kernels,
            optimizer_elements=(256, 4096), alloc_sizes=(1 << 20, 1 << 22) if device == "cpu" else (),
            dtypes=("float32",), variants=False, conv_slow_channels=(4, 16), conv_slow_sides=(2, 4),
            lstm_batch=2, lstm_steps=32, lstm_hidden=(32, 64, 128), lstm_batches=(1, 2))
    if device == "cpu":
        # Sizes: from one cache line to 16 MiB per tensor (past this machine's L2, into L3 and DRAM);
        # no output reaches glibc's mmap threshold (32 MiB) except in the allocation probe.
        return KernelPlan(
            block_s=0.004, blocks=5, elements=(16, 1024, 16384, 65536, 262144, 1048576, 4194304),
            pointwise_ops=_POINTWISE_ALL, mm_ref=256, mm_cubes=(256, 512, 1024),
            mm_curve=(1, 4, 16, 64, 256, 1024, 4096), stream_ref=4096, stream_m=(1, 2, 3, 4, 8, 16, 64, 256),
            stream_n=(512, 2048, 8192, 32768), stream_k=(512, 1024, 2048, 8192), bmm_batch=16, bmm_ref=128,
            bmm_cubes=(64, 128, 256),
            bmm_curve=(1, 8, 32, 128, 512, 2048), conv_batch=4, conv_base=((32, 8), (64, 16), (128, 16), (128, 32)),
            conv_ref=128, conv_side=16, conv_sides=(2, 4, 8, 16, 32, 64), conv_channels=(3, 16, 64, 128, 512),
            conv_kernels=(1, 3, 5, 7), conv_groups=(16, 64, 256, 1024), attn_heads=8, attn_e=64,
            attn_lengths=(32, 128, 256, 512, 1024), attn_e_curve=(16, 32, 64, 128),
            attn_heads_curve=(1, 2, 4, 16, 32), attn_kernels=kernels, optimizer_elements=(256, 16384, 262144, 1048576),
            alloc_sizes=tuple(1 << p for p in range(20, 29)), dtypes=("float32",), passes=3, llc_samples=9,
            conv_slow_channels=(16, 64, 128, 256), conv_slow_sides=(2, 3, 4, 6, 8, 16),
            lstm_batch=8, lstm_steps=32, lstm_hidden=(64, 128, 256, 512), lstm_batches=(1, 2, 4, 8, 32, 128))
    return KernelPlan(
        block_s=0.005, blocks=5, elements=(16, 65536, 1 << 20, 1 << 24, 1 << 26, 1 << 28),
        pointwise_ops=_POINTWISE_ALL, mm_ref=2048, mm_cubes=(1024, 2048, 4096, 8192),
        mm_curve=(1, 8, 64, 256, 1024, 4096, 16384), stream_ref=8192, stream_m=(1, 2, 4, 8, 16, 64, 256, 1024),
        stream_n=(1024, 4096, 32768, 131072), stream_k=(1024, 2048, 4096, 16384), bmm_batch=32, bmm_ref=512,
        bmm_cubes=(256, 512, 1024, 2048),
        bmm_curve=(1, 16, 64, 256, 1024, 4096), conv_batch=32, conv_base=((64, 28), (128, 56), (256, 56), (512, 28)),
        conv_ref=256, conv_side=28, conv_sides=(4, 7, 14, 28, 56, 112), conv_channels=(3, 32, 128, 512, 2048),
        conv_kernels=(1, 3, 5, 7), conv_groups=(32, 128, 512, 2048), attn_heads=64, attn_e=128,
        attn_lengths=(128, 512, 1024, 2048, 4096, 8192), attn_e_curve=(32, 64, 128, 256), attn_heads_curve=(4, 16, 256),
        attn_kernels=kernels, optimizer_elements=(4096, 1 << 20, 1 << 24), alloc_sizes=(),
        dtypes=("bfloat16", "float16", "float32"))


def last_level_cache_bytes(device: str) -> int:
    """The CPU's largest cache (sysfs), or the GPU's L2; 32 MiB where it cannot be read."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
                   or 32 << 20)
    return max(_cpu_caches().values(), default=32 << 20)


def core_cache_bytes(device: str) -> int | None:
    """A CPU core's largest own cache: the largest level below the last (sysfs; L2 on most CPUs).
    None on a GPU, or where sysfs does not tell."""
    if device != "cpu":
        return None
    caches = _cpu_caches()
    below = [size for level, size in caches.items() if level < max(caches, default=0)]
    return max(below, default=None)


def _cpu_caches() -> dict[int, int]:
    """{level: bytes} of cpu0's data and unified caches, from sysfs."""
    caches: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]] if text[-1] in "KMG" \
                else int(text)
        except (OSError, ValueError, KeyError):
            continue
        caches[level] = max(size, caches.get(level, 0))
    return caches


def _attention_kernels(device: str) -> tuple[str, ...]:
    return ("flash", "math") if device == "cpu" else ("flash", "efficient", "math")


# --- costs from the rules ---------------------------------------------------------------------------

@dataclass
class Cost:
    flops: float
    bytes: float
    kernel: str
    features: dict[str, float]
    alloc_bytes: float


def rule_cost(op, *args, counting: str = "math", **kwargs) -> Cost:
    """The cost the model's rule gives aten `op` called with these (real) tensors: its outputs
    come from the op on meta copies, so nothing runs for real here."""
    from costmodel.analysis import _fresh_output_bytes
    from costmodel.rules import TensorSpec, rule_for

    def meta(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") \
            if isinstance(x, torch.Tensor) else x

    def spec(x):
        return TensorSpec(tuple(sympy.Integer(d) for d in x.shape), x.dtype) if isinstance(x, torch.Tensor) else x

    margs, mkwargs = tree_map(meta, (list(args), dict(kwargs)))
    out = op(*margs, **mkwargs)
    sargs, skwargs, sout = tree_map(spec, (list(args), dict(kwargs), out))
    if isinstance(sout, list):
        sout = tuple(sout)
    extra = {"kernel": counting} if op.namespace == "costmodel" else {}
    cost = rule_for(op)(*sargs, **skwargs, out=sout, op=op, **extra)
    return Cost(float(cost.flops), float(cost.bytes), cost.kernel_class,
                {k: float(v) for k, v in cost.features.items()}, float(_fresh_output_bytes(op, sout)))


STREAM_CURVE_M = 1    # rows of the streamed products' n and k curves: a batch-1 decode step's


# --- timing -------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device: str, plan: KernelPlan):
        self.device, self.plan = device, plan
        self.calls = 0
        # Set once the allocation probe has priced a fresh page: each block's page faults are then
        # taken out of its time, so that a table holds the kernel, whatever glibc's heap did to
        # the probe (the roofline adds the faults a model's large outputs pay).
        self.fault_s_per_byte = 0.0
        self._others = None     # the work that runs between two calls of a kernel, see evicted()
        self.others_bytes = 0   # its footprint
        self._flush = None      # a buffer of twice the last-level cache, see evicted_llc_samples()
        self._interleaved = None    # see interleaved()

    def evicted(self, call, alone_s: float, core_bytes: int | None, inputs=()) -> tuple[float, float] | None:
        """Seconds a call costs more when other ops ran since its last call, as in a model: (other
        work, call) less the other work less `alone_s` (the call's own time). The other work
        (`_other_ops`) is a copy that overflows the core caches of the threads (4x each, read and
        written: the kernel's packed or reordered operands are gone) and ten different ops on
        tensors large enough to run on every thread (their code takes the instruction cache and
        branch predictors of each thread: an eager op's dispatch path, run once among others, costs
        several microseconds more than in a loop of itself). The two are timed in alternating
        blocks, `blocks` pairs, and the median of the pairs' differences taken: the machine's
        drift (its speed wanders by some percent over seconds) moves both blocks of a pair alike,
        and one disturbed block moves one difference, not the estimate; 0 at least. None on
        a GPU, where the core's cache is not known, and for calls over EVICTED_MAX_S (the
        difference is then within the noise of the call).
        Returns (evicted seconds, refill seconds): the second, the part that is the call's
        `inputs` coming back into the core caches, is the evicted seconds less those measured with
        the inputs read just before the call (a model's op whose input the op before it wrote)."""
        if self.device != "cpu" or not core_bytes or alone_s > EVICTED_MAX_S:
            return None
        if self._others is None:
            self._others, self.others_bytes = _other_ops(core_bytes)
        others = self._others

        def both():
            others()
            call()

        def touched():
            others()
            with torch.no_grad():
                for t in inputs:
                    t.sum()

        def touched_call():
            touched()
            call()
        number = self._calls_per_block(both)
        full, warm = [], []
        for _ in range(self.plan.blocks):
            full.append((self.block(both, number) - self.block(others, number)) / number)
            if inputs:
                warm.append((self.block(touched_call, number) - self.block(touched, number)) / number)
        evicted = max(0.0, statistics.median(full) - alone_s)
        state = max(0.0, statistics.median(warm) - alone_s) if inputs else evicted
        return evicted, max(0.0, evicted - state)

    def interleaved(self, call, alone_s: float, others=None) -> float | None:
        """Seconds a call costs more after ten other ops on tiny tensors (`_interleaved_ops`), as in
        a model, where other classes' ops run between two calls of one: they move next to no data,
        but their code takes the instruction cache and branch predictors (a oneDNN convolution or a
        BLAS product pays 10-15 us a call for it here, a batch norm 3, an add under 1). Timed in
        alternating blocks as `evicted` is; 0 at least; None on a GPU and for calls over
        INTERLEAVED_MAX_S. `others`: what runs in between instead (scripts/interleaved_share.py)."""
        if self.device != "cpu" or alone_s > INTERLEAVED_MAX_S:
            return None
        if others is None:
            if self._interleaved is None:
                self._interleaved = _interleaved_ops()
            others = self._interleaved

        def both():
            others()
            call()
        number = self._calls_per_block(both)
        pairs = [(self.block(both, number) - self.block(others, number)) / number for _ in range(self.plan.blocks)]
        return max(0.0, statistics.median(pairs) - alone_s)

    def evicted_llc_samples(self, call, alone_s: float, cache_bytes: int | None, inputs=()) -> list[float] | None:
        """Seconds a call costs more when the traffic since its last call overflowed the last-level
        cache as well, as a training step's does (activations, gradients and optimizer state well
        past it), one sample each (this pass's share, `llc_per_pass`; their median, 0 at least, is
        the instance's): the call timed alone right after writing a buffer of twice that cache and
        then reading the call's inputs back, less `alone_s`.
        Its operands are in cache (the roofline prices what a model's cache no longer holds of them);
        what comes from memory is the kernel's own state: oneDNN's reordered weights and scratch
        buffers, a BLAS's packing buffers, their pages' table entries (a 3x3 convolution on this
        kind of host: 60-170 us more at one thread, where a flush of the core caches alone costs it
        nearly nothing). Timed call by call: a flush costs milliseconds, whose jitter would drown
        the difference of two blocks. None on a GPU, for calls over EVICTED_MAX_S and where the plan
        takes no samples (the quick one)."""
        if self.device != "cpu" or not cache_bytes or alone_s > EVICTED_MAX_S or not self.plan.llc_samples:
            return None
        if self._flush is None or self._flush.numel() < 2 * cache_bytes:
            self._flush = torch.empty(2 * cache_bytes, dtype=torch.uint8)
        times = []
        with torch.no_grad():
            for _ in range(self.llc_per_pass):
                self._flush.fill_(1)
                for t in inputs:
                    t.sum()
                times.append(self.block(call, 1))
        return [t - alone_s for t in times]

    @property
    def llc_per_pass(self) -> int:
        """The plan's llc_samples are for all its passes together: a flush writes twice the
        last-level cache (520 MiB on a host that reports 260 MiB, ~0.1 s at one thread), which at
        nine samples an instance in each of three passes was two thirds of a 22-minute calibration;
        the passes' samples are pooled where they merge (`_mean`)."""
        return max(1, math.ceil(self.plan.llc_samples / max(1, self.plan.passes)))

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def block(self, call, number: int) -> float:
        if self.device == "cuda":
            return cuda_block_s(call, number)
        # One CPU thread: the thread's CPU time, which time slices lost to other processes do not
        # inflate; more threads: wall time (their work is spread over threads).
        clock = cpu_clock()
        faults = minor_faults() or 0
        t0 = clock()
        for _ in range(number):
            call()
        elapsed = clock() - t0
        self.calls += number
        return max(elapsed - ((minor_faults() or 0) - faults) * PAGE * self.fault_s_per_byte, 0.1 * elapsed)

    def __call__(self, call) -> float:
        """Seconds per call: the fastest of `blocks` blocks, each at least `block_s` long. Other
        work on the machine only ever adds time, so the fastest block is the one it disturbed least."""
        number = self._calls_per_block(call)
        return min(self.block(call, number) / number for _ in range(self.plan.blocks))

    def _calls_per_block(self, call) -> int:
        """Calls that fill a block of at least `block_s`, from one warm call's time."""
        call()
        self.sync()
        once = self.block(call, 1)
        return max(1, min(100_000, math.ceil(self.plan.block_s / max(once, 1e-7))))


PAGE = 4096
UPSAMPLE_SIDE = 16      # pool.upsample's base calls: input rows of 16 (a small image's decoder)
AUTOGRAD_CHAIN = 1000   # Prober.autograd_node_s: the adds (autograd nodes) of its chain
EVICTED_MAX_S = 2e-3    # Timer.evicted: the longest call it measures; the table's largest size holds past it
# Timer.interleaved: the longest call it measures. Past it what the code costs (~1-40 us) is within
# the noise of two blocks' difference (an add of 4M elements read 124 us), and held from below.
INTERLEAVED_MAX_S = 2e-4


def _other_ops(core_bytes: int):
    """What runs between two calls of a kernel in a model, for Timer.evicted: a copy of 4x the
    core caches of the threads, then ten different eager ops on 256x256 float32 tensors (each 64K
    elements, past the size at which an elementwise op goes to every thread). Returns the work and
    its footprint in bytes (its tensors and the ops' outputs: what it displaces of the last-level
    cache each time it runs)."""
    n = 4 * core_bytes * torch.get_num_threads() // 4
    src, dst = torch.randn(n), torch.empty(n)
    ops, tensors = _ten_ops(256)

    def run():
        dst.copy_(src)
        for op in ops:
            op()
    with torch.no_grad():
        footprint = sum(t.nbytes for t in (src, dst, *tensors)) + sum(op().nbytes for op in ops)
    return run, footprint


def _interleaved_ops():
    """What runs between two calls of a kernel in a model, less its data, for Timer.interleaved:
    the ten ops of `_other_ops` on 16x16 float32 tensors (1 KiB each)."""
    ops, _ = _ten_ops(16)

    def run():
        with torch.no_grad():
            for op in ops:
                op()
    return run


def _ten_ops(side: int):
    """Ten (PROBE_CLASSES: a model's call pays the share of their code it runs between two calls)
    different eager ops on side x side float32 tensors, and those tensors."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    rows = torch.randint(0, side, (side // 2,))
    q = side // 4
    ops = [lambda: torch.sin(a), lambda: a.sum(1), lambda: torch.softmax(b, -1), lambda: F.layer_norm(a, (side,)),
           lambda: torch.cat([a, b]), lambda: b.t().contiguous(), lambda: F.gelu(a),
           lambda: torch.where(a > 0, a, b), lambda: a.index_select(0, rows), lambda: torch.mm(a[:q], b[:, :q])]
    assert len(ops) == PROBE_CLASSES
    return ops, (a, b, rows)


# --- fitting ------------------------------------------------------------------------------------------

@dataclass
class Instance:
    """One measured call: its cost, and the seconds it took (and took more after other work
    evicted its state from the core's cache: Timer.evicted)."""
    cost: Cost
    time_s: float
    evicted_s: float | None = None
    refill_s: float | None = None       # of evicted_s, the call's inputs coming back (Timer.evicted)
    llc_s: float | None = None          # more with the last-level cache flushed too (Timer.evicted_llc_samples)
    interleaved_s: float | None = None  # more after other ops that move next to no data (Timer.interleaved)
    llc_samples: tuple[float, ...] = ()     # the samples llc_s is the median of (pooled over passes by _mean)
    # measures evicted_s, refill_s, llc_s and interleaved_s; Prober.finish runs it for the instances the table's
    # evicted seconds come from (the tiny and base ones), and drops it (and the call's tensors) from all
    measure_evicted: Callable[[], tuple[float, float, list[float] | None, float | None] | None] | None = field(
        default=None, repr=False, compare=False)
    # measures interleaved_s alone: Prober.finish runs it for the curves' instances (a product's few
    # rows or a convolution's small image: short calls where the base calls are all long ones)
    measure_interleaved: Callable[[], float | None] | None = field(default=None, repr=False, compare=False)


@dataclass
class Measured:
    kernel: str
    dtype: str | None
    tiny: Instance
    base: list[Instance]
    curves: dict[str, list[Instance]] = field(default_factory=dict)
    how: str = ""
    by: str = "work"            # what the base instances' sizes are: their work, or a feature


def fit(m: Measured, allocation: AllocationTable | None) -> KernelTable:
    """Overhead from the tiny instance; rates from the base instances (overhead and fresh-page time
    taken out); each curve's efficiency against the base rate at the same work."""
    def work(i: Instance) -> float:
        return i.cost.flops if work_of(m.kernel) == "flops" else i.cost.bytes

    def kernel_s(i: Instance) -> float | None:
        alloc_s = allocation.penalty_s(i.cost.alloc_bytes) if allocation else 0.0
        k = i.time_s - overhead - alloc_s
        return k if k > 0.2 * i.time_s and work(i) > 0 else None   # else the overhead is all there is

    def size(i: Instance) -> float:
        return work(i) if m.by == "work" else i.cost.features[m.by]

    overhead = max(0.0, m.tiny.time_s)
    rates: dict[float, float] = {}
    for i in sorted(m.base, key=size):
        k = kernel_s(i)
        if k is not None:
            rates[size(i)] = work(i) / k
    if not rates and m.base:
        big = max(m.base, key=size)
        rates[size(big)] = work(big) / max(big.time_s, 1e-12)
    evicted: dict[float, float] = {}
    refill: dict[float, float] = {}
    llc: dict[float, float] = {}
    for i in sorted([m.tiny] + list(m.base), key=size):
        if i.evicted_s is not None and size(i) > 0:
            evicted[size(i)] = i.evicted_s
            refill[size(i)] = i.refill_s or 0.0
        if i.llc_s is not None and size(i) > 0:
            llc[size(i)] = i.llc_s
    evicted = dict(zip(evicted, nondecreasing(list(evicted.values()))))
    llc = dict(zip(llc, nondecreasing(list(llc.values()))))
    # interleaved seconds of every instance that has them (curves' short calls too): the median of
    # those at one size
    by_size: dict[float, list[float]] = {}
    for i in [m.tiny, *m.base, *(i for c in m.curves.values() for i in c)]:
        at = work(i) if m.by == "work" else i.cost.features.get(m.by)
        if i.interleaved_s is not None and at and at > 0:
            by_size.setdefault(at, []).append(i.interleaved_s)
    sizes_ = sorted(by_size)
    interleaved = dict(zip(sizes_, nondecreasing([statistics.median(by_size[s_]) for s_ in sizes_])))
    refill = {s_: min(r, evicted[s_]) for s_, r in zip(refill, nondecreasing(list(refill.values())))}
    base = KernelTable(m.kernel, m.dtype, overhead, tuple(rates), tuple(rates.values()), how=m.how, by=m.by)
    sizes = sorted(size(i) for instances in m.curves.values() for i in instances)
    reference = sizes[len(sizes) // 2] if sizes else None

    def efficiency(i: Instance, k: float) -> float:
        """The call's rate over the base rate at its own size; for a slower call past the reference
        size, over the faster of that and the reference's rate: KernelTable.kernel_time_s prices a
        slow shape past the reference at rate(reference) * efficiency (two slowdowns, the size's
        and the shape's, are two limits), and the table prices its own call as measured (a 7x7
        depthwise backward, 5x the work of the 3x3 reference, ran at half the rate(reference) *
        efficiency it was otherwise given)."""
        rate = work(i) / k
        e = rate / base.rate(size(i))
        if e < 1 and reference is not None and size(i) > reference:
            e = rate / max(base.rate(size(i)), base.rate(reference))
        return e
    curves = {}
    for feature, instances in m.curves.items():
        points: dict[float, float] = {}
        at_base_call = None
        for i in sorted(instances, key=lambda i: i.cost.features[feature]):
            k = kernel_s(i)
            if k is not None:
                points[i.cost.features[feature]] = efficiency(i, k)
                if any(i.cost == b.cost for b in m.base):
                    at_base_call = points[i.cost.features[feature]]
        if at_base_call is not None:
            # The curve's call at the reference shape is a base call, measured again: by
            # definition at efficiency 1, so what it measures apart from 1 is the machine moving
            # between the two (a neighbour's load that began after the base was timed), and the
            # curve, timed together, moved with it.
            points = {v: e / at_base_call for v, e in points.items()}
        else:
            # A curve measured on another shape than the base calls (a dense convolution's
            # `skipped`, on 1x1 kernels) says how the feature moves that shape's rate, not what the
            # shape itself runs at: at the value every base call has, it is 1 by definition (the
            # 3x3 base calls skip nothing; a 1x1 kernel's own rate is the k curve's to say).
            shared = {b.cost.features.get(feature) for b in m.base}
            value = shared.pop() if len(shared) == 1 else None
            if value in points and points[value] > 0:
                points = {v: e / points[value] for v, e in points.items()}
        if points:
            curves[feature] = tuple(points.items())
    reference = reference if curves else None
    return KernelTable(m.kernel, m.dtype, overhead, base.sizes, base.rates, curves, m.how, m.by,
                       tuple(evicted.items()), reference,
                       tuple(refill.items()) if any(refill.values()) else (), tuple(llc.items()),
                       interleaved=tuple(interleaved.items()) if any(interleaved.values()) else ())


def with_evicted_share(tables: dict[str, KernelTable], others_bytes: int, cache_bytes: int | None) -> dict[str, KernelTable]:
    """`tables` with the share of the last-level cache that the work between the evicted probe's
    calls displaced (its footprint over the cache, at most 1) on each that measured both evicted
    seconds and those after a flush: KernelTable.evicted_s reads the two as points of a line in the
    share a model's traffic displaced (a probe at two threads copies 4x their core caches: 58% of
    a 32 MiB cache with its ops, more than a small net's inference step moves)."""
    if not others_bytes or not cache_bytes:
        return tables
    share = min(1.0, others_bytes / cache_bytes)
    return {key: replace(t, evicted_share=share) if t.evicted and t.evicted_llc else t for key, t in tables.items()}


def nondecreasing(values: list[float]) -> list[float]:
    """The least-squares nondecreasing fit of `values` (pool adjacent violators): a larger call
    never refills less of its state than a smaller one, and the measured differences are noisy
    by a few microseconds either way."""
    blocks: list[list[float]] = []      # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


# --- probes -------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _finished(probe):
    """A Prober method that returns a Measured, passed through Prober.finish."""
    @functools.wraps(probe)
    def run(self, *args, **kwargs):
        return self.finish(probe(self, *args, **kwargs))
    return run


class Prober:
    """Builds and times each class's instances on one device."""

    def __init__(self, device: str, plan: KernelPlan, stamp: str, progress: Callable[[str], None] | None = None):
        self.device, self.plan, self.stamp = device, plan, stamp
        self.time = Timer(device, plan)
        self.progress = progress or (lambda _: None)
        self.cache_bytes = last_level_cache_bytes(device)
        self.core_cache_bytes = core_cache_bytes(device)

    def t(self, *shape, dtype=torch.float32, grad=False):
        x = torch.randn(*shape, device=self.device, dtype=dtype)
        return x.requires_grad_(grad) if grad else x

    def instance(self, make, kernel: str, counting: str = "math", rotate: bool = False,
                 rule_class: str | None = None) -> Instance:
        """Time the call `make()` builds, `make()` -> (call, op, args, kwargs), its operands in cache
        as far as they fit (the roofline adds the reads of those a model's cache no longer holds).
        With `rotate`, over enough copies of its tensors (each call the next) to exceed twice the
        last-level cache instead. Its cost is the rule's for `op` on the first copy's arguments."""
        call, op, args, kwargs = make()
        cost = rule_cost(op, *args, counting=counting, **kwargs)
        expected = rule_class or kernel     # strided variants: the analysis, not the rule, names them
        if not (cost.kernel == expected or (kernel.startswith("attention") and cost.kernel.startswith("attention"))):
            raise AssertionError(f"the probe for {kernel} runs {op}, whose rule names class {cost.kernel}")
        cost.kernel = kernel
        if rotate:   # its operands come from memory: no state of its own to evict
            return Instance(cost, self.time(self.rotating(make, call, args, kwargs)))
        time_s = self.time(call)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return Instance(cost, time_s, measure_evicted=lambda: self.evicted(call, time_s, inputs),
                        measure_interleaved=lambda: self.time.interleaved(call, time_s))

    def evicted(self, call, time_s: float, inputs) -> tuple[float, float, list[float] | None, float | None] | None:
        """(evicted seconds, refill seconds, llc samples, interleaved seconds) of a call that took
        `time_s` in a loop (Timer.evicted, Timer.evicted_llc_samples, Timer.interleaved); None where
        the core's cache is not known."""
        core = self.time.evicted(call, time_s, self.core_cache_bytes, inputs)
        if core is None:
            return None
        return (*core, self.time.evicted_llc_samples(call, time_s, self.cache_bytes, inputs),
                self.time.interleaved(call, time_s))

    def finish(self, measured: Measured) -> Measured:
        """`measured` with the evicted seconds of its tiny and base instances, the ones the table's
        come from (Timer.evicted: the largest part of a class's time, not spent on its curves), and
        the interleaved seconds of its curves' too (Timer.interleaved, on short calls only)."""
        curves = [i for c in measured.curves.values() for i in c]
        for i in [measured.tiny, *measured.base]:
            if i.measure_evicted is not None:
                i.evicted_s, i.refill_s, llc, i.interleaved_s = i.measure_evicted() or (None,) * 4
                if llc:
                    i.llc_samples, i.llc_s = tuple(llc), max(0.0, statistics.median(llc))
        for i in curves:
            if i.measure_interleaved is not None and self.core_cache_bytes:   # where the tiny and base have them
                i.interleaved_s = i.measure_interleaved()
        for i in [measured.tiny, *measured.base, *curves]:
            i.measure_evicted = i.measure_interleaved = None
        return measured

    def rotating(self, make, call, args, kwargs):
        per_set = sum(t.untyped_storage().nbytes() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        copies = max(1, min(self.plan.max_copies, (2 * self.cache_bytes) // max(1, per_set)))
        if copies == 1:
            return call
        calls = [call] + [make()[0] for _ in range(copies - 1)]
        state = [0]

        def next_call():
            state[0] = (state[0] + 1) % copies
            return calls[state[0]]()
        return next_call

    def how(self, text: str) -> str:
        return f"{text}; fastest of {self.plan.blocks} blocks of >= {self.plan.block_s * 1e3:g} ms; {self.stamp}"

    # --- products -------------------------------------------------------------------------------------

    def addmm(self, dtype: str, m: int, n: int, k: int, rotate: bool = False) -> Instance:
        """One torch.addmm(bias, x[m, k], w[n, k].t()), as nn.Linear calls it, timed."""
        dt = _DTYPES[dtype]

        def make():
            x, w, bias = self.t(m, k, dtype=dt), self.t(n, k, dtype=dt), self.t(n, dtype=dt)
            return lambda: torch.addmm(bias, x, w.t()), aten.addmm.default, (bias, x, w.t()), {}
        return self.instance(make, "matmul", rotate=rotate)

    @_finished
    def matmul(self, dtype: str) -> Measured:
        """torch.addmm(bias, x, w.t()) as nn.Linear calls it, its operands in cache (the roofline
        adds the read of what a model's cache no longer holds; `matmul_streamed` measures products
        bound by that read)."""
        def run(m, n, k):
            return self.addmm(dtype, m, n, k)
        p = self.plan
        ref = p.mm_ref
        return Measured("matmul", dtype, run(4, 4, 4), [run(n, n, n) for n in p.mm_cubes],
                        {"m": [run(v, ref, ref) for v in p.mm_curve], "n": [run(ref, v, ref) for v in p.mm_curve],
                         "k": [run(ref, ref, v) for v in p.mm_curve]},
                        self.how(f"torch.addmm(bias, x[m, k], w[n, k].t()), {dtype}; rate by size on n^3 for "
                                 f"n in {list(p.mm_cubes)}; efficiency of m, n, k in {list(p.mm_curve)} with "
                                 f"the others {ref}"))

    @_finished
    def matmul_streamed(self, dtype: str) -> Measured:
        """Products of few rows whose weight comes from memory, as a decode step's are: the weight
        w[n, k] is past the cache (rotating through copies where one alone is not), so a call
        streams it. The in-cache table plus the weight's read at the copy bandwidth does not
        price these: a BLAS may run a product of m rows as m matrix-vector products (each reading
        the whole weight) up to some m, and short rows or wide outputs run at other rates. By m at
        n = k = stream_ref, with efficiency curves of n and of k at m = STREAM_CURVE_M."""
        p = self.plan
        ref = p.stream_ref

        def run(m, n, k):
            return self.addmm(dtype, m, n, k, rotate=True)
        tiny = run(1, 4, 4)
        base = [run(m, ref, ref) for m in p.stream_m]
        curves = {"n": [run(STREAM_CURVE_M, n, ref) for n in p.stream_n],
                  "k": [run(STREAM_CURVE_M, ref, k) for k in p.stream_k]}
        return Measured("matmul.streamed", dtype, tiny, base, curves,
                        self.how(f"torch.addmm(bias, x[m, k], w[n, k].t()), {dtype}, the weight rotating through "
                                 f"copies past twice the last-level cache; rate by m in {list(p.stream_m)} at n = k = "
                                 f"{ref}; efficiency of n in {list(p.stream_n)} and of k in {list(p.stream_k)} at "
                                 f"m = {STREAM_CURVE_M}, the other {ref}"),
                        by="m")

    @_finished
    def bmm(self, dtype: str) -> Measured:
        dt = _DTYPES[dtype]
        p = self.plan
        B, ref = p.bmm_batch, p.bmm_ref

        def run(m, n, k, batch=B):
            def make():
                a, b = self.t(batch, m, k, dtype=dt), self.t(batch, k, n, dtype=dt)
                return lambda: torch.bmm(a, b), aten.bmm.default, (a, b), {}
            return self.instance(make, "bmm", rotate=False)
        return Measured("bmm", dtype, run(4, 4, 4, 1), [run(n, n, n) for n in p.bmm_cubes],
                        {"m": [run(v, ref, ref) for v in p.bmm_curve], "n": [run(ref, v, ref) for v in p.bmm_curve],
                         "k": [run(ref, ref, v) for v in p.bmm_curve]},
                        self.how(f"torch.bmm(a[{B}, m, k], b[{B}, k, n]), {dtype}; rate by size on n^3 for n in "
                                 f"{list(p.bmm_cubes)}; efficiency of m, n, k in {list(p.bmm_curve)}, others {ref}"))

    @_finished
    def lstm(self, backward: bool) -> Measured:
        """A float32 LSTM layer as eager runs it on a CPU with oneDNN (capture/rnn.py): one
        aten.mkldnn_rnn_layer over the whole sequence, or its mkldnn_rnn_layer_backward (input,
        state and weight gradients), priced by the rule of the layer's op in the capture
        (costmodel::onednn_lstm_layer). Rates by the batch (the rows of each step's product: a third of
        the rate at batch 1 as at 8 here) at the middle hidden size; an efficiency curve of the
        hidden size at the plan's batch (a hidden size of 512 ran at 0.6 or at 0.95 of 256's,
        by allocation)."""
        from costmodel.capture.rnn import LSTM_KERNEL
        p = self.plan
        costmodel_ops = torch.ops.costmodel
        kernel = LSTM_KERNEL + (".backward" if backward else "")

        def run(batch, hidden, steps=p.lstm_steps):
            def make():
                x, hx, cx = self.t(steps, batch, hidden), self.t(1, batch, hidden), self.t(1, batch, hidden)
                w_ih, w_hh = self.t(4 * hidden, hidden), self.t(4 * hidden, hidden)
                b_ih, b_hh = self.t(4 * hidden), self.t(4 * hidden)
                operands = (x, w_ih, w_hh, b_ih, b_hh, hx, cx)
                if not backward:
                    return (lambda: aten.mkldnn_rnn_layer(*operands, False, [], 2, hidden, 1, True, False, False, False),
                            costmodel_ops.onednn_lstm_layer.default, (*operands, False, False), {})
                y, hy, cy, ws = aten.mkldnn_rnn_layer(*operands, False, [], 2, hidden, 1, True, False, False, True)
                grads = (torch.randn_like(y), torch.randn_like(hy), torch.randn_like(cy))
                return (lambda: aten.mkldnn_rnn_layer_backward(*operands, y, hy, cy, *grads, False, 2, hidden, 1, True,
                                                               True, False, [], False, ws),
                        costmodel_ops.onednn_lstm_layer_backward.default,
                        (*operands, y, hy, cy, *grads, ws, False, True, True), {})
            return self.instance(make, kernel)
        mid = p.lstm_hidden[len(p.lstm_hidden) // 2]
        what = "aten.mkldnn_rnn_layer_backward (input, state and weight gradients)" if backward \
            else "aten.mkldnn_rnn_layer (no workspace)"
        return Measured(kernel, "float32", run(1, 8, steps=2),
                        [run(b, mid) for b in p.lstm_batches],
                        {"hidden": [run(p.lstm_batch, h) for h in p.lstm_hidden]},
                        self.how(f"{what}, float32, {p.lstm_steps} steps; rate by the batch in {list(p.lstm_batches)} "
                                 f"at hidden = input {mid}; efficiency of the hidden size (= input) in "
                                 f"{list(p.lstm_hidden)} at batch {p.lstm_batch}"), by="batch")

    # --- convolutions ---------------------------------------------------------------------------------

    @_finished
    def conv(self, kind: str, backward: str | None, dtype: str, channels_last: bool = False) -> Measured:
        """F.conv2d (or conv_transpose2d) as the modules call it, padding 'same'; backward "input"
        is aten.convolution_backward for input, weight and bias gradients, "weight" without the
        input's (a first layer). Rates by work on growing shapes; efficiency curves of the GEMM
        the convolution lowers to: m (positions), n (output channels), k (input channels * kernel
        area), groups, each with the others at the reference shape."""
        dt = _DTYPES[dtype]
        p = self.plan
        B = p.conv_batch
        rule_kernel = f"conv.{kind}" + ({"input": ".backward", "weight": ".backward.weight"}[backward] if backward else "")
        # channels_last: the input laid out channels-last (the gradient follows the output, as in a
        # model), where eager runs the convolution channels-last; the rule names the class without it
        kernel = rule_kernel + (CHANNELS_LAST if channels_last else "")
        mask = [backward == "input", True, True]

        def geometry(cin, cout, k, groups, stride):
            """(transposed, weight shape, stride, padding) of a call: padding 'same', a transposed
            convolution's stride 2 and no padding."""
            transposed = kind == "transposed"
            w = (cin, cout // groups, k, k) if transposed else (cout, cin // groups, k, k)
            return transposed, w, 2 if transposed else stride, 0 if transposed else k // 2

        def backend(cin, cout, side, k, groups=1, batch=B, stride=1):
            """The kernel eager runs this call in (eager_backend; None where PyTorch cannot say)."""
            transposed, w, stride, pad = geometry(cin, cout, k, groups, stride)
            return conv_backend((batch, cin, side, side), w, (stride, stride), (pad, pad), (1, 1), transposed,
                                (0, 0), groups, dtype, torch.get_num_threads())

        def tiny(cin, cout, side, k, groups=1, like=()):
            """The class's tiny call (its overhead): the smallest batch at which eager runs it in the
            kernel it runs the base call `like` in. A small dense convolution at batch 1 runs in the
            native kernel (3 us a call here), oneDNN's base calls pay ~30 us a call more: measured
            on the native kernel, that cost went into the rates and was left out of every call
            smaller than the smallest base call."""
            want = backend(*like)
            for batch in (1, 2, 4, 8, 16):
                if want is None or backend(cin, cout, side, k, groups, batch) == want:
                    return run(cin, cout, side, k, groups, batch=batch)
            raise RuntimeError(f"calibration: {kernel}: no tiny call ({cin} -> {cout} channels, side {side}, "
                               f"{k}x{k}) runs in {want}, the kernel of its base calls")

        def run(cin, cout, side, k, groups=1, batch=B, stride=1):
            transposed, w_shape, stride, pad = geometry(cin, cout, k, groups, stride)
            if kind == "dense.slow" and backend(cin, cout, side, k, groups, batch, stride) not in NATIVE_BACKENDS:
                raise RuntimeError(f"calibration: {kernel} at batch {batch}, {cin} -> {cout} channels, side {side}, "
                                   f"{k}x{k}, stride {stride}: eager does not run its native kernel there")

            def make():
                x = self.t(batch, cin, side, side, dtype=dt)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                w = self.t(*w_shape, dtype=dt)
                bias = self.t(cout, dtype=dt)
                args = (x, w, bias, [stride, stride], [pad, pad], [1, 1], transposed, [0, 0], groups)
                if not backward:
                    if transposed:
                        return lambda: F.conv_transpose2d(x, w, bias, stride, pad, 0, groups), \
                            aten.convolution.default, args, {}
                    return lambda: F.conv2d(x, w, bias, stride, pad, 1, groups), aten.convolution.default, args, {}
                g = torch.randn_like(aten.convolution.default(*args))
                bargs = (g, x, w, [cout], [stride, stride], [pad, pad], [1, 1], transposed, [0, 0], groups, mask)
                return lambda: aten.convolution_backward.default(*bargs), aten.convolution_backward.default, bargs, {}
            # the native class: the rule names conv.dense, the point's backend (eager_backend) the rest
            return self.instance(make, kernel, rotate=False,
                                 rule_class=rule_kernel.replace(".slow", "") if kind == "dense.slow" else rule_kernel)

        sides, ref_side = p.conv_sides, p.conv_side
        ref = p.conv_ref
        if kind == "dense":
            base = [(c, s_) for c, s_ in p.conv_base]
            cins = p.conv_channels if backward != "weight" else tuple(c for c in p.conv_channels if c <= ref)
            measured = Measured(kernel, dtype, tiny(4, 4, 4, 3, like=(base[0][0], *base[0], 3)),
                                [run(c, c, s_, 3) for c, s_ in base],
                                {"m": [run(ref, ref, v, 3) for v in sides],
                                 "n": [run(ref, v, ref_side, 3) for v in p.conv_channels if v >= 8],
                                 "k": [run(v, ref, ref_side, 3) for v in cins]
                                 + [run(ref, ref, ref_side, k) for k in p.conv_kernels if k != 3],
                                 **({"skipped": [run(ref, ref, ref_side, 1, stride=s) for s in (1, 2)]}
                                    if backward != "weight" else {})})
            what = (f"3x3, (channels, side) in {base}; curves: sides {list(sides)}, c_out {list(p.conv_channels)}, "
                    f"c_in {list(cins)}, kernel sides {list(p.conv_kernels)}, 1x1 at strides 1 and 2 (skipped), "
                    f"the others {ref} channels, side {ref_side}")
        elif kind == "dense.slow":
            # eager's native convolution (eager_backend): every call at batch 1 with an input of at
            # most SLOW_CONV_ELEMENTS, where it runs whatever the threads. Rates by work on 1x1
            # convolutions (a GEMM per sample, as most of a model's native calls are); curves of
            # m (the image side), n, k (1x1 inputs, then 3x3: their im2col), and a stride-2 1x1
            cs = p.conv_slow_channels
            c, side = cs[1], max(v for v in p.conv_slow_sides if cs[-1] * v * v <= SLOW_CONV_ELEMENTS)
            measured = Measured(kernel, dtype, run(4, 4, 4, 1, batch=1),
                                [run(v, v, side, 1, batch=1) for v in cs if v * side * side <= SLOW_CONV_ELEMENTS],
                                {"m": [run(c, c, v, 1, batch=1) for v in p.conv_slow_sides
                                       if c * v * v <= SLOW_CONV_ELEMENTS],
                                 "n": [run(c, v, side, 1, batch=1) for v in sorted(set(cs) | {cs[-1] * 4})],
                                 "k": [run(v, c, side, 1, batch=1) for v in cs if v * side * side <= SLOW_CONV_ELEMENTS]
                                 + [run(v, c, side, 3, batch=1) for v in (c, cs[-1]) if v * side * side <= SLOW_CONV_ELEMENTS],
                                 "skipped": [run(c, c, side, 1, batch=1, stride=s_) for s_ in (1, 2)]})
            what = (f"batch 1, 1x1, channels {list(cs)} at side {side}; curves: sides {list(p.conv_slow_sides)}, "
                    f"c_out and c_in 1x1, c_in 3x3, 1x1 at strides 1 and 2 (skipped), the others {c} channels, "
                    f"side {side}; every call the native kernel (torch._C._select_conv_backend: Slow2d)")
        elif kind == "depthwise":
            # The channels curve runs at the work of a base call (the side shrinking as the
            # channels grow) and includes that call: each point is read against a measured base
            # rate, not one interpolated between small calls that are mostly setup (a depthwise
            # backward's is 0.1 ms), and the curve against its own call of the base shape
            c, side = ref, ref_side
            channels = sorted(set(p.conv_groups) | {c})
            at_work = {v: max(1, round(side * math.sqrt(c / v))) for v in channels}
            measured = Measured(kernel, dtype, tiny(4, 4, 4, 3, groups=4, like=(c, c, sides[0], 3, c)),
                                [run(c, c, v, 3, groups=c) for v in sides],
                                {"k": [run(c, c, side, k, groups=c) for k in p.conv_kernels if k > 1],
                                 "groups": [run(v, v, at_work[v], 3, groups=v) for v in channels]})
            what = (f"{c} channels, 3x3, sides {list(sides)}; curves: kernel sides {list(p.conv_kernels)} at side "
                    f"{side}, channels (side) {', '.join(f'{v} ({s_})' for v, s_ in at_work.items())}: the same work")
        elif kind == "grouped":
            g, per = 8, 16
            measured = Measured(kernel, dtype, tiny(8, 8, 4, 3, groups=2, like=(g * per, g * per, sides[0], 3, g)),
                                [run(g * per, g * per, v, 3, groups=g) for v in sides],
                                {"k": [run(g * v, g * v, ref_side, 3, groups=g) for v in (2, 4, 16, 64)],
                                 "groups": [run(v * per, v * per, ref_side, 3, groups=v) for v in (2, 8, 32)]})
            what = f"{g} groups of {per} channels, 3x3, sides {list(sides)}; curves: channels per group 2..64, groups 2..32"
        else:
            c = ref
            measured = Measured(kernel, dtype, tiny(4, 4, 4, 2, like=(c, c, max(2, sides[0] // 2), 2)),
                                [run(c, c, max(2, v // 2), 2) for v in sides],
                                {"k": [run(c, c, max(2, ref_side // 2), k) for k in (2, 3, 4)]})
            what = f"{c} channels, 2x2 stride 2 (upsampling), input sides {[max(2, v // 2) for v in sides]}; kernel 2..4"
        measured.how = self.how({None: "F.conv_transpose2d " if kind == "transposed" else "F.conv2d ",
                                 "input": "aten.convolution_backward (input, weight and bias gradients) of ",
                                 "weight": "aten.convolution_backward (weight and bias gradients) of "}[backward]
                                + (f"{dtype}; {what}" if kind == "dense.slow" else f"{dtype}, batch {B}; {what}")
                                + ("; every input channels-last (x.contiguous(memory_format=torch.channels_last)), "
                                   "the gradient as the output" if channels_last else ""))
        return measured

    # --- attention ------------------------------------------------------------------------------------

    @_finished
    def attention(self, kernel: str, causal: bool, backward: bool, dropout: bool, dtype: str) -> Measured:
        """F.scaled_dot_product_attention under sdpa_kernel(<kernel>); the backward is timed as
        forward + backward less the forward."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "math": SDPBackend.MATH}[kernel]
        dt = _DTYPES[dtype]
        counting = kernel       # a model's attention node is counted as the kernel the device runs
        name = f"attention.{kernel}" + (".backward" if backward else "") + (".causal" if causal else "") + \
            (".dropout" if dropout else "")
        p = self.plan
        p_drop = 0.1 if dropout else 0.0

        def run(L, E, heads=p.attn_heads):
            def make(part="forward"):
                q, k, v = (self.t(1, heads, L, E, dtype=dt, grad=backward) for _ in range(3))

                def forward():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=causal)
                if not backward:
                    return forward, torch.ops.costmodel.sdpa.default, (q, k, v, None, p_drop, causal, None, False), {}
                g = torch.randn(1, heads, L, E, device=self.device, dtype=dt)

                def both():
                    torch.autograd.backward(forward(), g)
                    q.grad = k.grad = v.grad = None
                args = (g, q.detach(), k.detach(), v.detach(), None, p_drop, causal, None, False)
                return both if part == "both" else forward, torch.ops.costmodel.sdpa_backward.default, args, {}
            if not backward:
                return self.instance(make, name, counting)
            both = self.instance(lambda: make("both"), name, counting)
            forward = self.instance(make, name, counting)
            def evicted():
                b, f = both.measure_evicted(), forward.measure_evicted()
                if b is None or f is None:
                    return None
                llc, interleaved = (max(x - y, 0.0) if x is not None and y is not None else None
                                    for x, y in ((b[2], f[2]), (b[3], f[3])))
                return max(b[0] - f[0], 0.0), max(b[1] - f[1], 0.0), llc, interleaved
            return Instance(both.cost, max(both.time_s - forward.time_s, 0.0), measure_evicted=evicted)
        # the math kernel holds [batch * heads, L, S] scores: at most 1 GiB of them
        lengths = [L for L in p.attn_lengths if kernel != "math" or p.attn_heads * L * L * 4 <= 1 << 30]
        mid = lengths[len(lengths) // 2]
        return Measured(name, dtype, run(8, 8, heads=1), [run(L, p.attn_e) for L in lengths],
                        {"E": [run(mid, e) for e in p.attn_e_curve],
                         "batch_heads": [run(mid, p.attn_e, heads=h) for h in p.attn_heads_curve]},
                        self.how(f"F.scaled_dot_product_attention under sdpa_kernel({backend.name}), {dtype}, "
                                 f"[1, {p.attn_heads}, L, {p.attn_e}], L = S in {list(lengths)}"
                                 + (", is_causal" if causal else "") + (f", dropout {p_drop}" if dropout else "")
                                 + ("; backward = forward and backward less forward" if backward else "")
                                 + f"; curves of E in {list(p.attn_e_curve)}, batch * heads in "
                                 f"{list(p.attn_heads_curve)}; FLOPs as the {counting} kernel counts"), by="L")

    # --- byte-priced classes ------------------------------------------------------------------------

    @_finished
    def bytes_class(self, kernel: str, make, what: str, rule_class: str | None = None,
                    curves: dict[str, list[Instance]] | None = None, curves_how: str = "") -> Measured:
        """`make(n)` -> (call, op, args, kwargs) with tensors of about n float32 elements; `curves`,
        instances measured already, with `curves_how` saying how."""
        sizes = self.plan.elements
        instances = [self.instance(lambda: make(n), kernel, rule_class=rule_class) for n in sizes]
        return Measured(kernel, None, instances[0], instances[1:], curves or {},
                        how=self.how(f"{what}, float32, {list(sizes[1:])} elements (tiny: {sizes[0]})"
                                     + (f"; {curves_how}" if curves_how else "")))

    def pointwise(self, name: str) -> Measured:
        return self.bytes_class(f"pointwise.{name}", lambda n: _pointwise_call(name, self.t(n), self.t(n)),
                                _POINTWISE_HOW.get(name, f"torch.{name}"))

    @_finished
    def optimizer(self, name: str) -> Measured:
        """One step of torch.optim over 8 parameters of n elements (their gradients set), per parameter."""
        from costmodel.rules.optimizer import UPDATES, update_bytes
        from costmodel.validate.runner import make_optimizer
        count = 8
        kernel = f"optimizer.{name.replace('-', '_')}"

        def run(n):
            params = [torch.nn.Parameter(self.t(n)) for _ in range(count)]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = make_optimizer(name, params)
            opt.step()
            read, written = update_bytes(name, (n,), 4)
            cost = Cost(float(UPDATES[name].flops_per_elem * n), float(read + written), kernel, {}, 0.0)
            return Instance(cost, self.time(opt.step) / count)
        sizes = (16,) + tuple(self.plan.optimizer_elements)
        return Measured(kernel, None, run(sizes[0]), [run(n) for n in sizes[1:]],
                        how=self.how(f"torch.optim ({name}, torch's default implementation) step over {count} "
                                     f"float32 parameters of {list(sizes[1:])} elements, per parameter"))

    def module(self) -> KernelTable:
        x = self.t(4)
        m = torch.nn.Identity()
        return KernelTable("module", None, self.time(lambda: m(x)),
                           how=self.how("torch.nn.Identity()(x): an nn.Module call's hooks and dispatch (the Python "
                                        "inside a model's forward beyond its torch calls is not measured)"))

    def python_call_s(self) -> float | None:
        """What the Python binding adds to an eager op: a Python loop of tiny in-place adds against
        the same adds made by C++ (torch._foreach_add_'s per-tensor loop on the CPU). None on a GPU,
        whose foreach is one fused kernel."""
        if self.device != "cpu":
            return None
        ts = [self.t(4) for _ in range(64)]

        def python():
            for t in ts:
                t.add_(1.0)
        per_python = self.time(python) / len(ts)
        per_cpp = self.time(lambda: torch._foreach_add_(ts, 1.0)) / len(ts)
        return max(0.0, per_python - per_cpp)

    def autograd_node_s(self) -> float | None:
        """What a training step pays per autograd node beyond the ops it runs: a chain of
        AUTOGRAD_CHAIN adds of tiny tensors (each add one node, whose backward passes its gradient on
        and runs no op), forward and backward less the same forward without grad, per add: the node
        made and its tensors saved in the forward, and the engine's scheduling of it in the backward
        (1.5 us here, where a Python call of an op adds 0.5). None on a GPU, where the engine's CPU
        time overlaps the kernels it queues."""
        if self.device != "cpu":
            return None
        x, w = self.t(16, grad=True), self.t(16)

        def chain():
            y = x
            for _ in range(AUTOGRAD_CHAIN):
                y = y + w
            return y.sum()

        def train():
            chain().backward()
            x.grad = None

        def forward():
            with torch.no_grad():
                chain()
        with torch.enable_grad():
            both = self.time(train)
        return max(0.0, both - self.time(forward)) / AUTOGRAD_CHAIN

    def view(self) -> KernelTable:
        x = self.t(64, 64)
        t = statistics.median([self.time(lambda: x.view(4096)), self.time(lambda: x.t()),
                               self.time(lambda: x.transpose(0, 1)), self.time(lambda: x[1:])])
        return KernelTable("view", None, t, how=self.how("x.view(n), x.t(), x.transpose(0, 1), x[1:]: the median "
                                                        "of their eager call times"))

    def allocation(self) -> AllocationTable | None:
        """Per size, what a fresh output costs over writing into an existing one: clone() less
        copy_() into a preallocated tensor, per byte; where the difference is within noise, 0."""
        sizes = self.plan.alloc_sizes
        if not sizes:
            return None
        per_byte = []
        for size in sizes:
            src = torch.ones(size // 4, device=self.device)
            dst = torch.empty_like(src)
            copy_s = self.time(lambda: dst.copy_(src))
            clone_s = self.time(lambda: src.clone())
            extra = clone_s - copy_s
            per_byte.append(extra / size if extra > 0.25 * copy_s else 0.0)
            del src, dst
        return AllocationTable(tuple(float(s) for s in sizes), tuple(per_byte),
                               self.how(f"clone() less copy_() into a preallocated tensor, per byte, for "
                                        f"{sizes[0] >> 20}..{sizes[-1] >> 20} MiB (0 where within 25% of the copy)"))


_POINTWISE_HOW = {"gelu_tanh": "F.gelu(x, approximate='tanh')", "gelu_backward_tanh":
                  "aten.gelu_backward(g, x, approximate='tanh')", "where": "torch.where(mask, x, y)",
                  "masked_fill": "x.masked_fill(mask, 0)", "pow": "x.pow(2)", "clamp": "x.clamp(min=0)"}


def _pointwise_call(name: str, x: torch.Tensor, y: torch.Tensor):
    """(call, op, args, kwargs) of one elementwise op on x (and y), as model code calls it."""
    mask = x > 0
    pos = x.abs() + 1
    table = {
        "add": (lambda: x + y, aten.add.Tensor, (x, y)),
        "sub": (lambda: x - y, aten.sub.Tensor, (x, y)),
        "mul": (lambda: x * y, aten.mul.Tensor, (x, y)),
        "div": (lambda: x / y, aten.div.Tensor, (x, y)),
        "neg": (lambda: -x, aten.neg.default, (x,)),
        "abs": (lambda: x.abs(), aten.abs.default, (x,)),
        "relu": (lambda: torch.relu(x), aten.relu.default, (x,)),
        "threshold_backward": (lambda: aten.threshold_backward.default(y, x, 0.0), aten.threshold_backward.default,
                               (y, x, 0.0)),
        "gelu": (lambda: F.gelu(x), aten.gelu.default, (x,)),
        "gelu_tanh": (lambda: F.gelu(x, approximate="tanh"), aten.gelu.default, (x,), {"approximate": "tanh"}),
        "gelu_backward": (lambda: aten.gelu_backward.default(y, x), aten.gelu_backward.default, (y, x)),
        "gelu_backward_tanh": (lambda: aten.gelu_backward.default(y, x, approximate="tanh"),
                               aten.gelu_backward.default, (y, x), {"approximate": "tanh"}),
        "silu": (lambda: F.silu(x), aten.silu.default, (x,)),
        "silu_backward": (lambda: aten.silu_backward.default(y, x), aten.silu_backward.default, (y, x)),
        "sigmoid": (lambda: torch.sigmoid(x), aten.sigmoid.default, (x,)),
        "sigmoid_backward": (lambda: aten.sigmoid_backward.default(y, x), aten.sigmoid_backward.default, (y, x)),
        "tanh": (lambda: torch.tanh(x), aten.tanh.default, (x,)),
        "tanh_backward": (lambda: aten.tanh_backward.default(y, x), aten.tanh_backward.default, (y, x)),
        "exp": (lambda: torch.exp(x), aten.exp.default, (x,)),
        "log": (lambda: torch.log(pos), aten.log.default, (pos,)),
        "pow": (lambda: x.pow(2), aten.pow.Tensor_Scalar, (x, 2)),
        "rsqrt": (lambda: torch.rsqrt(pos), aten.rsqrt.default, (pos,)),
        "sqrt": (lambda: torch.sqrt(pos), aten.sqrt.default, (pos,)),
        "erf": (lambda: torch.erf(x), aten.erf.default, (x,)),
        "where": (lambda: torch.where(mask, x, y), aten.where.self, (mask, x, y)),
        "masked_fill": (lambda: x.masked_fill(mask, 0.0), aten.masked_fill.Scalar, (x, mask, 0.0)),
        "clamp": (lambda: x.clamp(min=0.0), aten.clamp.default, (x, 0.0)),
        "eq": (lambda: x == y, aten.eq.Tensor, (x, y)),
        "lt": (lambda: x < y, aten.lt.Tensor, (x, y)),
        "native_dropout_backward": (lambda: aten.native_dropout_backward.default(y, mask, 1.25),
                                    aten.native_dropout_backward.default, (y, mask, 1.25)),
    }
    call, op, args, *kwargs = table[name]
    return call, op, args, (kwargs[0] if kwargs else {})


def byte_classes(prober: Prober) -> list[Measured]:
    """Every byte-priced class but the pointwise ops, optimizers and views."""
    t, p = prober.t, prober
    d = 256  # row length of norms and softmax: a model's hidden size

    def rows(n):
        return max(1, n // d)

    def layer_norm(n):
        x, w, b = t(rows(n), d), t(d), t(d)
        return lambda: F.layer_norm(x, (d,), w, b), aten.native_layer_norm.default, (x, [d], w, b, 1e-5), {}

    def layer_norm_backward(n):
        x, w, b = t(rows(n), d), t(d), t(d)
        y, mean, rstd = aten.native_layer_norm.default(x, [d], w, b, 1e-5)
        g = torch.randn_like(y)
        args = (g, x, [d], mean, rstd, w, b, [True, True, True])
        return lambda: aten.native_layer_norm_backward.default(*args), aten.native_layer_norm_backward.default, args, {}

    def image(n):
        c = 64 if n >= 64 * 16 else 4   # 64 channels, but at least 2x2 positions (batch statistics need 2)
        side = max(2, int(math.sqrt(n // c)))
        return t(1, c, side, side)

    def batch_norm(training):
        def make(n):
            x = image(n)
            c = x.shape[1]
            w, b, rm, rv = t(c), t(c), torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
            if training:
                args = (x, w, b, rm, rv, True, 0.1, 1e-5)
                return lambda: aten._native_batch_norm_legit.default(*args), aten._native_batch_norm_legit.default, args, {}
            args = (x, w, b, rm, rv, 0.1, 1e-5)
            return (lambda: F.batch_norm(x, rm, rv, w, b, False), aten._native_batch_norm_legit_no_training.default,
                    args, {})
        return make

    def batch_norm_backward(n):
        x = image(n)
        c = x.shape[1]
        w, rm, rv = t(c), torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
        _, mean, invstd = aten._native_batch_norm_legit.default(x, w, t(c), rm, rv, True, 0.1, 1e-5)
        g = torch.randn_like(x)
        args = (g, x, w, rm, rv, mean, invstd, True, 1e-5, [True, True, True])
        return lambda: aten.native_batch_norm_backward.default(*args), aten.native_batch_norm_backward.default, args, {}

    def group_norm(n):
        x = image(n)
        c = x.shape[1]
        w, b = t(c), t(c)
        hw = x.shape[2] * x.shape[3]
        args = (x, w, b, x.shape[0], c, hw, 8 if c % 8 == 0 else 2, 1e-5)
        return (lambda: F.group_norm(x, args[6], w, b), aten.native_group_norm.default, args, {})

    def softmax(n):
        x = t(rows(n), d)
        return lambda: x.softmax(-1), aten._softmax.default, (x, -1, False), {}

    def softmax_backward(n):
        x = t(rows(n), d)
        y = x.softmax(-1)
        g = torch.randn_like(y)
        args = (g, y, -1, torch.float32)
        return lambda: aten._softmax_backward_data.default(*args), aten._softmax_backward_data.default, args, {}

    def reduction(n):
        x = t(rows(n), d)
        return lambda: x.sum(-1), aten.sum.dim_IntList, (x, [-1]), {}

    def copy(n):
        x = t(n)
        return lambda: x.clone(), aten.clone.default, (x,), {}

    def pad(n):
        x = image(n)
        return lambda: F.pad(x, (1, 1, 1, 1)), aten.constant_pad_nd.default, (x, [1, 1, 1, 1]), {}

    def fill(n):
        dev = p.device
        return lambda: torch.zeros(n, device=dev), aten.zeros.default, ([n],), {"device": torch.device("meta")}

    def random(n):
        x = t(n)
        return lambda: x.bernoulli_(0.5), aten.bernoulli_.float, (x, 0.5), {}

    def dropout(n):
        x = t(n)
        return lambda: aten.native_dropout.default(x, 0.1, True), aten.native_dropout.default, (x, 0.1, True), {}

    vocab = 32000

    def embedding(n):
        table = t(vocab, d)
        idx = torch.randint(0, vocab, (rows(n),), device=p.device)
        return lambda: F.embedding(idx, table), aten.embedding.default, (table, idx), {}

    def embedding_backward(n):
        # the gradient of a table of 4x the rows gathered: the table's zeros are most of the bytes
        idx = torch.randint(0, 4 * rows(n), (rows(n),), device=p.device)
        g = t(rows(n), d)
        args = (g, idx, 4 * rows(n), -1, False)
        return (lambda: aten.embedding_dense_backward.default(*args), aten.embedding_dense_backward.default, args, {})

    def index(n):
        x = t(rows(n) * 2, d)
        idx = torch.randint(0, x.shape[0], (rows(n),), device=p.device)
        return lambda: x.index_select(0, idx), aten.index_select.default, (x, 0, idx), {}

    def scatter(n):
        g = t(rows(n), d)
        sizes = [rows(n) * 2, d]
        args = (g, sizes, 0, 0, rows(n), 1)
        return lambda: aten.slice_backward.default(*args), aten.slice_backward.default, args, {}

    def pooling(kind: str, backward: bool, k: int, stride: int):
        """make(n): F.max_pool2d / F.avg_pool2d of a k x k window at `stride` (padding k // 2 for
        odd windows) of an image of about n elements, or its backward"""
        pad = k // 2 if k % 2 else 0
        forward = aten.max_pool2d_with_indices.default if kind == "max" else aten.avg_pool2d.default
        pool = F.max_pool2d if kind == "max" else F.avg_pool2d

        def make(n):
            x = image(n)
            fwd = (x, [k, k], [stride, stride], [pad, pad])
            if not backward:
                return lambda: pool(x, k, stride, pad), forward, fwd, {}
            y = forward(*fwd)
            if kind == "max":
                y, indices = y
                args = (torch.randn_like(y), x, [k, k], [stride, stride], [pad, pad], [1, 1], False, indices)
                op = aten.max_pool2d_with_indices_backward.default
            else:
                args = (torch.randn_like(y), x, [k, k], [stride, stride], [pad, pad], False, True, None)
                op = aten.avg_pool2d_backward.default
            return lambda: op(*args), op, args, {}
        return make

    def upsampled(n, side):
        """(channels, side) of a 2x nearest upsampling of about n elements in all (n/5 read, 4n/5
        written) in rows of `side`, the channels growing with n; tiny: fewer than a row's"""
        side = side if n >= 5 * side * side else max(1, int(math.sqrt(n / 5)))
        return max(1, n // (5 * side * side)), side

    def upsample(n, side=UPSAMPLE_SIDE):
        c, side = upsampled(n, side)
        x = t(1, c, side, side)
        args = (x, [2 * side, 2 * side], 2.0, 2.0)
        return (lambda: F.interpolate(x, scale_factor=2, mode="nearest"), aten.upsample_nearest2d.default, args, {})

    def upsample_backward(n):
        c, side = upsampled(n, UPSAMPLE_SIDE)
        args = (t(1, c, 2 * side, 2 * side), [2 * side, 2 * side], [1, c, side, side], 2.0, 2.0)
        return (lambda: aten.upsample_nearest2d_backward.default(*args), aten.upsample_nearest2d_backward.default,
                args, {})

    def adaptive_pool(n):
        x = image(n)
        return lambda: F.adaptive_avg_pool2d(x, 1), aten._adaptive_avg_pool2d.default, (x, [1, 1]), {}

    specs = [
        ("norm.layer", layer_norm, f"F.layer_norm over rows of {d}"),
        ("norm.layer.backward", layer_norm_backward, f"aten.native_layer_norm_backward, rows of {d}"),
        ("norm.batch", batch_norm(True), "aten._native_batch_norm_legit (batch statistics), 64 channels"),
        ("norm.batch.eval", batch_norm(False), "F.batch_norm with running statistics, 64 channels"),
        ("norm.batch.backward", batch_norm_backward, "aten.native_batch_norm_backward, 64 channels"),
        ("norm.group", group_norm, "F.group_norm, 8 groups of 8 channels"),
        ("softmax", softmax, f"x.softmax(-1) over rows of {d}"),
        ("softmax.backward", softmax_backward, f"aten._softmax_backward_data over rows of {d}"),
        ("reduction", reduction, f"x.sum(-1) over rows of {d}"),
        ("copy", copy, "x.clone()"),
        ("copy.pad", pad, "F.pad(x, (1, 1, 1, 1)) of an image, 64 channels (eager's constant_pad_nd)"),
        ("fill", fill, "torch.zeros(n)"),
        ("random", random, "x.bernoulli_(0.5)"),
        ("random.dropout", dropout, "aten.native_dropout(x, 0.1, train=True)"),
        ("embedding", embedding, f"F.embedding of rows of {d} from a {vocab}-row table"),
        ("embedding.backward", embedding_backward, "aten.embedding_dense_backward into a table of 4x the rows"),
        ("index", index, f"x.index_select(0, idx), rows of {d}"),
        ("index.scatter", scatter, "aten.slice_backward (zeros, then the slice written)"),
        ("pool.adaptive", adaptive_pool, "F.adaptive_avg_pool2d(x, 1), 64 channels"),
        ("pool.upsample.backward", upsample_backward,
         f"aten.upsample_nearest2d_backward of a 2x nearest upsampling, input rows of {UPSAMPLE_SIDE}"),
    ]
    def nhwc(n):
        """a channels-first tensor's channels-last view (as x.permute(0, 2, 3, 1) makes it)"""
        return image(n).permute(0, 2, 3, 1)

    def copy_strided(n):
        x = nhwc(n)
        return lambda: x.contiguous(), aten.clone.default, (x,), {}

    def plus_channels_last(x):
        """x (channels-first) plus a channels-last view of x's shape: the view steps the channels"""
        y = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return lambda: x + y, aten.add.Tensor, (x, y), {}

    def add_strided(n):
        """a channels-first tensor plus a channels-last view of one (64 channels: 256 B apart)"""
        return plus_channels_last(image(n))

    def add_across(n, channels=None, side=None):
        """the inner_stride_bytes curve at n elements: channels-first plus a channels-last view of
        `channels` channels (the view steps the channels, 16x16 planes), or a channels-last tensor
        plus a channels-first view of 64 channels (the view steps a side x side plane)"""
        c, s = (channels, 16) if channels else (64, side)
        x = t(max(1, n // (c * s * s)), c, s, s)
        if channels:
            return plus_channels_last(x)
        x = x.permute(0, 2, 3, 1)
        y = x.contiguous()
        return lambda: y + x, aten.add.Tensor, (y, x), {}

    out = []
    for kernel, make, what in specs:
        prober.progress(kernel)
        out.append(prober.bytes_class(kernel, make, what))
    out.append(prober.bytes_class("copy.strided", copy_strided, "x.permute(0, 2, 3, 1).contiguous(), 64 channels",
                                  rule_class="copy"))
    prober.progress("pointwise.strided")
    n = min(prober.plan.elements[1:], key=lambda e: abs(math.log(e / (1 << 18))))
    curve = []
    for channels, side in [(16, None), (64, None), (256, None), (None, 16), (None, 32), (None, 64)]:
        if (channels or 64) * (side or 16) ** 2 > n:
            continue
        i = prober.instance(lambda: add_across(n, channels, side), "pointwise.strided", rule_class="pointwise.add")
        i.cost.features[INNER_STRIDE_FEATURE] = 4.0 * (channels or side * side)
        curve.append(i)
    out.append(prober.bytes_class(
        "pointwise.strided", add_strided, "x + a channels-last view of x's shape, 64 channels",
        rule_class="pointwise.add", curves={INNER_STRIDE_FEATURE: curve},
        curves_how=f"curve of inner_stride_bytes at {n} elements: the view steps 16, 64 or 256 channels (16x16 "
                   f"planes), or 16x16, 32x32 or 64x64 planes (a channels-last tensor plus a channels-first view, "
                   f"64 channels)"))
    # Poolings: rates on one window and stride (max: a ResNet stem's 3x3 stride 2; average 2x2),
    # curves of the window area at stride 2 and of the stride area at that window. A window's
    # time per output grows with its area, and the bytes per output (each input read once) with
    # the stride's: 3x3 at stride 1 moves 16 bytes an output where stride 2 moves 28, in about the
    # same time.
    for kind, k0 in (("max", 3), ("avg", 2)):
        for backward in (False, True):
            kernel = f"pool.{kind}" + (".backward" if backward else "")
            prober.progress(kernel)
            curves = {POOL_WINDOW_FEATURE: [prober.instance(lambda: pooling(kind, backward, k, 2)(n), kernel)
                                            for k in sorted({2, 3, 5} | {k0})],
                      POOL_STRIDE_FEATURE: [prober.instance(lambda: pooling(kind, backward, k0, s_)(n), kernel)
                                            for s_ in (1, 2, 3)]}
            call = ("aten.max_pool2d_with_indices_backward" if kind == "max" else "aten.avg_pool2d_backward") \
                if backward else f"F.{kind}_pool2d(x, k, stride, k // 2 for odd k)"
            out.append(prober.bytes_class(
                kernel, pooling(kind, backward, k0, 2), f"{call}, {k0}x{k0} stride 2, 64 channels",
                curves=curves, curves_how=f"curves at {n} elements: windows 2x2, 3x3, 5x5 at stride 2 (window), "
                                          f"strides 1, 2, 3 at {k0}x{k0} (stride)"))
    # A channels-first CPU kernel (TensorIterator over the output, an index per position) runs
    # short rows several times slower than long ones, and slower still as the tensor grows
    # (this host, one thread: rows of 16 at 0.75 down to 0.09 Gelem/s, rows of 64 at 1.6-3.0):
    # rates by size on rows of UPSAMPLE_SIDE, a curve of the row length at one size.
    prober.progress("pool.upsample")
    curve = [prober.instance(lambda: upsample(n, side), "pool.upsample")
             for side in (8, 16, 24, 32, 48, 64, 128) if 5 * side * side <= n]
    out.append(prober.bytes_class(
        "pool.upsample", upsample, f"F.interpolate(x, scale_factor=2, mode='nearest'), input rows of {UPSAMPLE_SIDE}",
        curves={UPSAMPLE_WIDTH_FEATURE: curve},
        curves_how=f"curve of the input's row length (in_width) at {n} elements: rows of "
                   f"{[int(i.cost.features[UPSAMPLE_WIDTH_FEATURE]) for i in curve]}"))
    return out


@dataclass
class KernelMeasurements:
    tables: dict[str, KernelTable]         # keyed as the device file names them ("matmul:float32")
    allocation: AllocationTable | None
    python_call_s: float | None
    cache_bytes: int
    core_cache_bytes: int | None = None
    autograd_node_s: float | None = None


def _classes(prober: Prober, plan: KernelPlan, device: str) -> list[Measured]:
    """One measurement of every class but the view and module tables, in a fixed order."""
    measured: list[Measured] = []
    for dtype in plan.dtypes:
        prober.progress(f"matmul {dtype}")
        measured += [prober.matmul(dtype), prober.matmul_streamed(dtype), prober.bmm(dtype)]
    conv_dtypes = plan.dtypes if device == "cpu" else tuple(d for d in plan.dtypes if d != "float16")
    kinds = ("dense", "depthwise", "grouped", "transposed") if plan.variants else ("dense", "depthwise")
    for dtype in conv_dtypes:
        for kind in kinds:
            for backward in (None, "input", "weight") if kind == "dense" else (None, "input"):
                prober.progress(f"conv.{kind} {backward or 'forward'} {dtype}")
                measured.append(prober.conv(kind, backward, dtype))
        if device == "cpu":
            # a channels-last input (a net that permutes around its norms, as ConvNeXt does): oneDNN
            # runs it channels-last, at other rates (a 7x7 depthwise backward 3x faster)
            for kind in ("dense", "depthwise"):
                for backward in (None, "input"):
                    prober.progress(f"conv.{kind} channels-last {backward or 'forward'} {dtype}")
                    measured.append(prober.conv(kind, backward, dtype, channels_last=True))
        if device == "cpu" and plan.conv_slow_channels:
            # and its gradients, which eager computes natively too (slow_conv2d_backward): oneDNN's
            # backward tables price a call 80 us of setup and ~90 us of evicted state it never pays
            for backward in (None, "input", "weight"):
                prober.progress(f"conv.dense.slow {backward or 'forward'} {dtype}")
                measured.append(prober.conv("dense.slow", backward, dtype))
    if device == "cpu" and plan.lstm_hidden and "float32" in plan.dtypes and torch.backends.mkldnn.is_available():
        for backward in (False, True):
            prober.progress(f"matmul.lstm {'backward' if backward else 'forward'} float32")
            measured.append(prober.lstm(backward))
    for dtype in conv_dtypes:
        for kernel in plan.attn_kernels:
            if kernel == "flash" and device == "cuda" and dtype == "float32":
                continue   # CUDA's flash kernel takes half precision only
            variants = [(c, b, False) for c in ((False, True) if plan.variants else (False,)) for b in (False, True)]
            if kernel == "math" and plan.variants:
                variants += [(False, False, True), (True, False, True)]
            for causal, backward, dropout in variants:
                prober.progress(f"attention.{kernel} {dtype}")
                try:
                    measured.append(prober.attention(kernel, causal, backward, dropout, dtype))
                except RuntimeError:   # this kernel does not take these inputs on this device
                    continue
    for name in plan.pointwise_ops:
        prober.progress(f"pointwise.{name}")
        measured.append(prober.pointwise(name))
    measured += byte_classes(prober)
    for name in ("adamw", "adam", "sgd", "sgd-momentum"):
        prober.progress(f"optimizer.{name}")
        measured.append(prober.optimizer(name))
    return measured


DISTURBED = 1.1     # least_disturbed: a pass this much slower on average than another was disturbed
CALL_DISTURBED = 1.25   # _mean: a call this much slower than in another calm pass was disturbed there


def least_disturbed(passes: list[list[Measured]]) -> list[Measured]:
    """Of several passes over the classes, each class's measurement: the passes whose calls ran
    within DISTURBED of the least disturbed one on average (the mean log of each call's time over
    its fastest in any pass), merged call by call (`_mean`). Other work on the machine only ever
    slows a probe, and a neighbour's load that lasts through one class's probe (seconds) is gone
    a pass later (a minute), where the fastest of a probe's blocks cannot reject it; a pass it
    slowed as a whole is left out. Within the calm ones, the passes are averaged (no pass is
    chosen for its luck, which would bias the tables low), but a call's time in a pass over
    CALL_DISTURBED of its fastest is left out: at two threads this machine's host slows small
    calls (a k = 4 product 2.7x, an add of 64K elements 1.5x) for 5-30 s at a time, a quarter of
    the time, and barely moves the large calls that weigh most in the class's average."""
    if len(passes) == 1:
        return passes[0]

    def calls(m: Measured) -> list[float]:
        return [i.time_s for i in [m.tiny, *m.base, *(i for c in m.curves.values() for i in c)]]

    def keyed(ms: list[Measured]) -> dict[tuple, Measured]:   # (kernel, dtype, how many came before)
        seen: dict[tuple, int] = {}
        out = {}
        for m in ms:
            n = seen[m.kernel, m.dtype] = seen.get((m.kernel, m.dtype), -1) + 1
            out[m.kernel, m.dtype, n] = m
        return out
    others = [keyed(ms) for ms in passes[1:]]
    out = []
    for key, m in keyed(passes[0]).items():
        same = [m] + [o[key] for o in others if key in o and len(calls(o[key])) == len(calls(m))]
        fastest = [min(ts) for ts in zip(*map(calls, same))]

        def slowness(p: Measured) -> float:    # the mean of log(time / fastest) over its calls
            return sum(math.log(max(t, 1e-12) / max(f, 1e-12)) for t, f in zip(calls(p), fastest)) / len(fastest)
        scores = [slowness(p) for p in same]
        low = min(scores)
        calm = [p for p, score in zip(same, scores) if math.exp(score - low) < DISTURBED]
        merged, dropped = _mean(calm)
        if len(calm) == len(same):
            how = f"the mean of {len(same)} passes"
        elif len(calm) == 1:
            best = scores.index(low)
            ratio = math.exp(sorted(scores)[1] - low)
            how = (f"pass {best + 1} of {len(same)} kept (the other {ratio:.2f}x slower on average)" if len(same) == 2
                   else f"pass {best + 1} of {len(same)} kept (the others {ratio:.2f}x or more slower on average)")
        else:
            how = f"the mean of {len(calm)} of {len(same)} passes (the others over {DISTURBED}x slower on average)"
        if dropped:
            how += f", {dropped} call{'s' if dropped > 1 else ''} without {'their' if dropped > 1 else 'its'} " \
                   f"times over {CALL_DISTURBED}x {'their' if dropped > 1 else 'its'} fastest"
        out.append(replace(merged, how=f"{m.how}; {how}"))
    return out


def _mean(passes: list[Measured]) -> tuple[Measured, int]:
    """One class's measurements of several passes (the same calls, in the same order) as one, and
    how many of its calls left out a pass: each call's time the geometric mean of its times within
    CALL_DISTURBED of its fastest, its evicted seconds the median of those passes' (None where none
    measured): the median of three is not moved by one pass's (a 3x3 convolution's backward read
    47-130 us in calibrations an hour apart, the mean of three passes); its seconds after a flush of
    the last-level cache, the median of those passes' samples together."""
    dropped = 0

    def merged(instances: list[Instance]) -> Instance:
        nonlocal dropped
        fastest = min(i.time_s for i in instances)
        kept = [i for i in instances if i.time_s <= CALL_DISTURBED * fastest]
        dropped += len(kept) < len(instances)
        evicted = [i.evicted_s for i in kept if i.evicted_s is not None]
        refill = [i.refill_s or 0.0 for i in kept if i.evicted_s is not None]
        samples = [t for i in kept for t in i.llc_samples]
        llc = [max(0.0, statistics.median(samples))] if samples else [i.llc_s for i in kept if i.llc_s is not None]
        interleaved = [i.interleaved_s for i in kept if i.interleaved_s is not None]
        time_s = math.exp(sum(math.log(max(i.time_s, 1e-12)) for i in kept) / len(kept))
        median = statistics.median
        return Instance(kept[0].cost, time_s, median(evicted) if evicted else None,
                        median(refill) if evicted else None, median(llc) if llc else None,
                        median(interleaved) if interleaved else None, tuple(samples))
    first = passes[0]
    if len(passes) == 1:
        return first, 0
    out = replace(first, tiny=merged([p.tiny for p in passes]),
                  base=[merged(list(i)) for i in zip(*(p.base for p in passes))],
                  curves={f: [merged(list(i)) for i in zip(*(p.curves[f] for p in passes))] for f in first.curves})
    return out, dropped


def measure_kernels(device: str, plan: KernelPlan, stamp: str, progress=None) -> KernelMeasurements:
    """Every class's table on `device`, the allocation table, the Python binding's share of an op's
    overhead and the cache size."""
    from costmodel.hardware.kernels import table_key
    prober = Prober(device, plan, stamp, progress)
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    try:
        prober.progress("allocation")
        allocation = prober.allocation()
        if allocation is not None:
            prober.time.fault_s_per_byte = max(allocation.seconds_per_byte)
        passes = []
        for i in range(plan.passes):
            if i:
                prober.progress(f"pass {i + 1} of {plan.passes}")
            passes.append(_classes(prober, plan, device))
        measured = least_disturbed(passes)
        tables = {table_key(m.kernel, m.dtype): fit(m, allocation) for m in measured}
        tables = with_evicted_share(tables, prober.time.others_bytes, prober.cache_bytes)
        add = tables.get("pointwise.add")
        if add is not None:   # elementwise ops no probe ran are priced as an add
            tables["pointwise"] = KernelTable("pointwise", None, add.overhead_s, add.sizes, add.rates,
                                              how="pointwise.add's table, for elementwise ops without their own: "
                                                  + add.how)
        tables["view"] = prober.view()
        tables["module"] = prober.module()
        python_call_s = prober.python_call_s()
        autograd_node_s = prober.autograd_node_s()
    finally:
        torch.set_grad_enabled(grad_mode)
    return KernelMeasurements(tables, allocation, python_call_s, prober.cache_bytes, prober.core_cache_bytes,
                              autograd_node_s)
