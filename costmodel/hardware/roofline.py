"""Roofline time of an op on a device: pure arithmetic on FLOPs, bytes and the device's figures.

Generic: an op takes max(flops / achievable FLOP/s, bytes / achievable bandwidth) plus one kernel
overhead. Achievable = datasheet peak * efficiency, where the efficiency has a ceiling per kind of
op (data in DEFAULT_EFFICIENCY, overridable) and ramps up with the op's size. Matmul, conv and
attention run on the tensor-core peak of their dtype; every other op runs on the float32 vector peak.
Calibrated: where the device file has a measured table for the op's kernel class (costmodel/hardware/kernels.py,
written by `costmodel hardware calibrate`), the op takes that table's overhead plus its work at the
measured rate for its size and shape, plus, on a CPU, the first touch of a large new output; a
product bound by reading its weight from memory (few rows) takes the "matmul.streamed" table's.
`bound` compares the op's intensity with the ridge point (datasheet peak / datasheet bandwidth) of
the peak it runs on, so it agrees with `costmodel hardware show` and the roofline plot.
No torch here: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from costmodel.rules.cost import ATTENTION, CONV, INDEX, KERNEL_OF_CATEGORY, MATMUL, VIEW
from costmodel.errors import UsageError
from costmodel.hardware.kernels import (ALLOC_FEATURE, AUTOGRAD_NODE_FEATURE, CHANNELS_LAST, COLD_FEATURE,
                                        ENGINE_CALL_FEATURE, EVICTED_FEATURE, FLOPS, INTERLEAVED_FEATURE,
                                        INTERNAL_FEATURE, SHAPE_ONLY_FEATURE, STRIDED_FEATURE)

if TYPE_CHECKING:
    from costmodel.hardware.catalog import Hardware

# Efficiency: achievable / datasheet peak. Ceilings are what a large, well-shaped op reaches; an op
# of ideal time t (at peak) gets ceiling * t / (t + ramp_s): half the ceiling when t == ramp_s.
DEFAULT_EFFICIENCY: dict[str, float] = {
    # cuBLAS bf16 GEMMs reach 80-86% of dense peak at their best shapes (S. Bekman, ml-engineering,
    # "Maximum Achievable Matmul FLOPS": A100 SXM 85.9%, H100 SXM 80.1%, A100 PCIe 82.2%).
    "matmul": 0.80,
    # cuDNN implicit-GEMM convolutions lose more to im2col tiling and small channel counts.
    "conv": 0.70,
    # FlashAttention-2 reaches 50-73% of A100 peak (Dao 2023, arXiv:2307.08691, abstract).
    "attention": 0.65,
    # Elementwise/norm/reduction math on CUDA cores; such ops are memory-bound far below the
    # vector ridge point, so this ceiling rarely decides a time.
    "vector": 0.70,
    # Streaming kernels (copy, STREAM triad) sustain ~85-90% of HBM bandwidth on A100/H100.
    "memory": 0.85,
    # index/gather/scatter: scattered rows waste part of each DRAM burst.
    "memory_gather": 0.60,
    # Size ramps, in seconds of ideal time: wave quantization and pipeline fill on small GEMMs,
    # DRAM latency on small transfers. These two are costmodel estimates, not a published
    # measurement: 2 us puts a 1024^3 bf16 GEMM on A100 (6.9 us at peak) at 0.8 * 6.9 / 8.9 = 62%
    # of peak before launch overhead, a 64^3 one at 0.07%, an 8192^3 one at 79.95%.
    "compute_ramp_s": 2e-6,
    "memory_ramp_s": 1e-6,
}
_COMPUTE_KEYS = ("matmul", "conv", "attention", "vector")
_MEMORY_KEYS = ("memory", "memory_gather")
_TENSOR_CATEGORIES = {MATMUL: "matmul", CONV: "conv", ATTENTION: "attention"}


@dataclass(frozen=True)
class OpTime:
    flops: float
    bytes: float
    time_s: float               # max(compute_time_s, memory_time_s) + overhead_s
    compute_time_s: float       # flops / (peak_flops_per_s * compute_efficiency)
    memory_time_s: float        # bytes / (bandwidth * memory_efficiency)
    overhead_s: float           # the device's kernel_overhead_s; 0 for an op that does nothing
    intensity: float | None     # flops / bytes; inf with no bytes, None with neither
    bound: str | None           # "compute" | "memory"; None for zero-cost (view) ops
    peak_flops_per_s: float     # the datasheet peak this op's FLOPs run on
    ridge_point: float          # peak_flops_per_s / bandwidth: the intensity where bound flips
    compute_efficiency: float
    memory_efficiency: float
    kernel: str | None = None   # the measured table that priced it ("conv.depthwise"), None: the ramps
    allocation_s: float = 0.0   # first touch of a large new output (calibrated CPUs), inside time_s
    cold_s: float = 0.0         # reading what the cache no longer holds (calibrated devices), inside time_s
    evicted_s: float = 0.0      # the kernel's state coming back after other ops evicted it, inside time_s

    @property
    def flops_per_s(self) -> float:
        """Attained rate: the op's FLOPs over its whole time."""
        return self.flops / self.time_s if self.time_s > 0 else 0.0


@dataclass(frozen=True)
class Summary:
    time_s: float                  # sum of per-op times: ops run one after another
    compute_bound_time_s: float
    memory_bound_time_s: float
    overhead_time_s: float
    memory_bound_share: float | None   # memory_bound_time_s / time_s
    flops: float
    peak_flops_per_s: float        # dense peak of the model's dtype, the MFU denominator
    mfu: float | None              # flops / (time_s * peak_flops_per_s)
    framework_time_s: float = 0.0  # eager's module calls (framework_time_s()), inside time_s and overhead


def efficiencies(hw: "Hardware", overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """DEFAULT_EFFICIENCY, adjusted for `hw`, then the device file's and the caller's overrides.

    A calibrated device's peaks are already measured achievable matmul and copy rates, so its
    ceilings become relative to those (matmul and memory 1.0, conv 0.70 / 0.80 = 0.875, ...).
    """
    eff = dict(DEFAULT_EFFICIENCY)
    if hw.calibrated:
        for key in _COMPUTE_KEYS:
            eff[key] = min(1.0, eff[key] / DEFAULT_EFFICIENCY["matmul"])
        for key in _MEMORY_KEYS:
            eff[key] = min(1.0, eff[key] / DEFAULT_EFFICIENCY["memory"])
    eff.update(hw.efficiency)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_EFFICIENCY:
            raise UsageError(f"unknown efficiency '{key}'; accepted: {', '.join(DEFAULT_EFFICIENCY)}")
        ramp = key.endswith("_s")
        if not (value >= 0 if ramp else 0 < value <= 1):
            raise UsageError(f"efficiency '{key}' = {value!r}; expected "
                             + ("seconds >= 0" if ramp else "0 < value <= 1 (a fraction of the peak)"))
        eff[key] = float(value)
    return eff



def _roofs(hw, eff: dict, category: str, dtype, tf32: bool) -> tuple:
    """(peak FLOP/s, compute ceiling, bandwidth, memory ceiling, ridge point) of an op category."""
    tensor_key = _TENSOR_CATEGORIES.get(category)
    if tensor_key is not None:
        peak, compute_ceiling = hw.peak_for(dtype, tf32), eff[tensor_key]
    else:
        peak, compute_ceiling = hw.vector_flops_per_s, eff["vector"]
    bandwidth = hw.bandwidth_bytes_per_s
    memory_ceiling = eff["memory_gather" if category == INDEX else "memory"]
    return peak, compute_ceiling, bandwidth, memory_ceiling, peak / bandwidth

def op_time(flops, bytes, category: str, dtype: str, hw: "Hardware", tf32: bool = False,
            efficiency: Mapping[str, float] | None = None, kernel: str | None = None,
            features: Mapping[str, float] | None = None) -> OpTime:
    """Time of one op: from the device's measured table for `kernel` (default: the category's
    class) where it has one, else the roofline with generic efficiencies. `features` are the op's
    shape features (m, n, k, ...) and alloc_bytes, as the rules name them.

    >>> t = op_time(2 * 8192**3, 3 * 8192**2 * 2, "matmul", "bfloat16", load_hardware("a100-80gb"))
    >>> t.bound, round(t.intensity), round(t.compute_efficiency, 3), round(t.time_s * 1e3, 2)
    ('compute', 2731, 0.799, 4.41)
    """
    flops, bytes = float(flops), float(bytes)
    if not (flops >= 0 and bytes >= 0):
        raise UsageError(f"op_time needs flops >= 0 and bytes >= 0; got flops={flops}, bytes={bytes}")
    if hw.kernels or hw.allocation:
        measured = _measured_time(flops, bytes, category, dtype, hw, tf32, kernel, features or {})
        if measured is not None:
            return measured
    eff = efficiencies(hw, efficiency)
    peak, compute_ceiling, bandwidth, memory_ceiling, ridge = _roofs(hw, eff, category, dtype, tf32)
    if flops == 0 and bytes == 0:
        # Views, reshapes, empty tensors: no kernel runs, so no launch either.
        return OpTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, None, peak, ridge, 0.0, 0.0)
    compute_efficiency = _ramp(flops / peak, compute_ceiling, eff["compute_ramp_s"])
    memory_efficiency = _ramp(bytes / bandwidth, memory_ceiling, eff["memory_ramp_s"])
    compute_time_s = flops / (peak * compute_efficiency) if flops else 0.0
    memory_time_s = bytes / (bandwidth * memory_efficiency) if bytes else 0.0
    intensity = flops / bytes if bytes else math.inf
    allocation_s = hw.allocation.penalty_s(float((features or {}).get(ALLOC_FEATURE, 0))) if hw.allocation else 0.0
    return OpTime(
        flops=flops, bytes=bytes,
        time_s=max(compute_time_s, memory_time_s) + hw.kernel_overhead_s + allocation_s,
        compute_time_s=compute_time_s, memory_time_s=memory_time_s, overhead_s=hw.kernel_overhead_s,
        intensity=intensity, bound="compute" if intensity >= ridge else "memory",
        peak_flops_per_s=peak, ridge_point=ridge,
        compute_efficiency=compute_efficiency, memory_efficiency=memory_efficiency, allocation_s=allocation_s,
    )


def _peak(category: str, dtype: str, hw: "Hardware", tf32: bool) -> float:
    return hw.peak_for(dtype, tf32) if category in _TENSOR_CATEGORIES else hw.vector_flops_per_s


def _measured_time(flops: float, bytes: float, category: str, dtype: str, hw: "Hardware", tf32: bool,
                   kernel: str | None, features: Mapping[str, float]) -> OpTime | None:
    """The op priced from the device's measured table of its kernel class; None if it has none."""
    from costmodel.hardware.catalog import canonical_dtype
    kernel = kernel or KERNEL_OF_CATEGORY.get(category)
    key = canonical_dtype(dtype)
    if tf32 and key == "float32" and hw.kernel_table(kernel, "tf32") is not None:
        key = "tf32"
    table = hw.kernel_table(kernel, key)
    if table is None:
        return None
    peak = _peak(category, dtype, hw, tf32)
    bandwidth = hw.bandwidth_bytes_per_s
    ridge = peak / bandwidth
    if flops == 0 and bytes == 0:
        if category != VIEW or features.get(SHAPE_ONLY_FEATURE):
            return OpTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, None, peak, ridge, 0.0, 0.0, table.kernel)
        # A view does no work, but an eager call of it still goes through the dispatcher.
        overhead_s = _overhead_s(table.overhead_s, hw, features)
        return OpTime(0.0, 0.0, overhead_s, 0.0, 0.0, overhead_s, None, None, peak, ridge, 0.0, 0.0, table.kernel)
    # The measured side is the table's time (it already holds whatever bound the kernel); the
    # other side is the ideal time at the datasheet figure, for the record.
    # Tables were measured with the operands in cache (as far as they fit); what the cache no
    # longer holds is read from memory first.
    work = flops if table.work == FLOPS else bytes
    kernel_s = table.kernel_time_s(work, features)
    cold = float(features.get(COLD_FEATURE, 0))
    cold_s = cold / bandwidth
    streams = cold_s >= kernel_s or (hw.cache_bytes is not None and cold > hw.cache_bytes) or cold >= 0.5 * bytes
    streamed = _streamed_table(hw, kernel, key, features) if streams else None
    if streamed is not None:    # measured with its weight coming from memory: nothing to add
        table = streamed
        kernel_s = flops / (table.rate(features["m"]) * _streamed_shape_efficiency(table, features))
    else:
        kernel_s += cold_s
    evicted_s = 0.0
    if features.get(EVICTED_FEATURE):   # other ops since its last call took its state out of the core's cache
        evicted_s = table.evicted_s(work, features)
    elif features.get(INTERLEAVED_FEATURE):     # other classes ran since its last call: their code took its own's place
        evicted_s = table.interleaved_s(work, features)
    kernel_s += evicted_s
    if table.work == FLOPS:
        compute_time_s, memory_time_s = kernel_s, bytes / bandwidth
    else:
        compute_time_s, memory_time_s = flops / peak, kernel_s
    # a class measured channels-last (conv.depthwise.channels_last) ran on such operands: no copy
    strided = 0.0 if table.kernel.endswith(CHANNELS_LAST) else float(features.get(STRIDED_FEATURE, 0))
    copy = hw.kernel_table("copy.strided", None) if strided else None
    if copy is not None and copy.kernel == "copy.strided":    # the contiguous copy the kernel makes first
        kernel_s += copy.kernel_time_s(2 * strided)
    allocation_s = hw.allocation.penalty_s(float(features.get(ALLOC_FEATURE, 0))) if hw.allocation else 0.0
    overhead_s = _overhead_s(table.overhead_s, hw, features)
    intensity = flops / bytes if bytes else math.inf
    return OpTime(
        flops=flops, bytes=bytes, time_s=overhead_s + kernel_s + allocation_s,
        compute_time_s=compute_time_s, memory_time_s=memory_time_s, overhead_s=overhead_s,
        intensity=intensity, bound="compute" if intensity >= ridge else "memory",
        peak_flops_per_s=peak, ridge_point=ridge,
        compute_efficiency=flops / (peak * compute_time_s) if compute_time_s else 1.0,
        memory_efficiency=bytes / (bandwidth * memory_time_s) if memory_time_s else 1.0,
        kernel=table.kernel, allocation_s=allocation_s, cold_s=0.0 if streamed is not None else cold_s,
        evicted_s=evicted_s,
    )


def op_times(flops, bytes, category: str, dtype: str, hw: "Hardware", tf32: bool = False,
             efficiency: Mapping[str, float] | None = None):
    """`op_time` of one op at many sizes at once: arrays of FLOPs and bytes -> {"time_s",
    "compute_time_s", "memory_time_s", "memory_bound"}, numpy arrays whose element i is that field of
    op_time(flops[i], bytes[i], ...) (memory_bound: its bound == "memory"). The same arithmetic,
    vectorized, for the decode step timed at every context length."""
    import numpy as np
    flops, bytes = np.asarray(flops, dtype=float), np.asarray(bytes, dtype=float)
    if np.any(flops < 0) or np.any(bytes < 0):
        raise UsageError("op_times needs flops >= 0 and bytes >= 0")
    eff = efficiencies(hw, efficiency)
    peak, compute_ceiling, bandwidth, memory_ceiling, ridge = _roofs(hw, eff, category, dtype, tf32)

    def ramp(ideal, ceiling, ramp_s):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ideal > 0, ceiling * ideal / (ideal + ramp_s), ceiling)

    compute_efficiency = ramp(flops / peak, compute_ceiling, eff["compute_ramp_s"])
    memory_efficiency = ramp(bytes / bandwidth, memory_ceiling, eff["memory_ramp_s"])
    with np.errstate(divide="ignore", invalid="ignore"):
        compute_time = np.where(flops > 0, flops / (peak * compute_efficiency), 0.0)
        memory_time = np.where(bytes > 0, bytes / (bandwidth * memory_efficiency), 0.0)
        intensity = np.where(bytes > 0, flops / np.where(bytes > 0, bytes, 1.0), np.inf)
    nothing = (flops == 0) & (bytes == 0)
    time_s = np.where(nothing, 0.0, np.maximum(compute_time, memory_time) + hw.kernel_overhead_s)
    return {"time_s": time_s, "compute_time_s": compute_time, "memory_time_s": memory_time,
            "memory_bound": (intensity < ridge) & ~nothing}


def summarize(op_times: Iterable[OpTime], total_flops, hw: "Hardware", dtype: str,
              tf32: bool = False, framework_s: float = 0.0) -> Summary:
    """Totals over ops run one after another, plus `framework_s` of eager framework work outside
    the ops; MFU against the dense peak of `dtype`.

    `total_flops` is the numerator of MFU (the model's FLOPs, usually matmul FLOPs); per-op FLOPs
    only decide each op's time.
    """
    op_times = list(op_times)
    time_s = math.fsum(t.time_s for t in op_times) + framework_s
    compute_s = math.fsum(t.time_s for t in op_times if t.bound == "compute")
    memory_s = math.fsum(t.time_s for t in op_times if t.bound == "memory")
    overhead_s = math.fsum(t.overhead_s for t in op_times) + framework_s
    peak = hw.peak_for(dtype, tf32)
    total_flops = float(total_flops)
    return Summary(
        time_s=time_s, compute_bound_time_s=compute_s, memory_bound_time_s=memory_s,
        overhead_time_s=overhead_s, memory_bound_share=memory_s / time_s if time_s else None,
        flops=total_flops, peak_flops_per_s=peak,
        mfu=total_flops / (time_s * peak) if time_s else None, framework_time_s=framework_s,
    )


def _streamed_table(hw: "Hardware", kernel: str | None, dtype: str, features: Mapping[str, float]):
    """The device's "matmul.streamed" table for a product, or None. The caller asks only for a
    product bound by its cold read (reading what the cache no longer holds takes longer than the
    in-cache kernel: its weight, first read in the step, at few rows, as a decode step's products
    are), whose cold read is larger than the cache (as the table's weights were), or that reads at
    least half its bytes from memory (so that the price does not jump where the read and the
    in-cache kernel trade places, with a calibration's bandwidth): a BLAS runs
    those at rates the in-cache table plus the read does not give. Past the table's largest m
    there is no measurement and the in-cache table holds."""
    if kernel is None or kernel.split(".", 1)[0] != "matmul" or features.get("m") is None:
        return None
    table = hw.kernel_table("matmul.streamed", dtype)
    if table is None or table.kernel != "matmul.streamed" or not table.sizes or features["m"] > table.sizes[-1]:
        return None
    return table


def _streamed_shape_efficiency(table, features: Mapping[str, float]) -> float:
    """The streamed table's curves of n and k, measured at its fewest rows (matrix-vector products,
    whose speed depends on the row length), fade log-linearly in m to nothing at its most rows
    (a product blocked for compute, as the rate by m already says)."""
    m, lo, hi = float(features["m"]), table.sizes[0], table.sizes[-1]
    weight = 1.0 if m <= lo or hi <= lo else max(0.0, 1.0 - math.log(m / lo) / math.log(hi / lo))
    return table.shape_efficiency(features) ** weight


def _overhead_s(measured_s: float, hw: "Hardware", features: Mapping[str, float]) -> float:
    """A table's overhead was measured on calls from Python; an op eager runs inside another's call
    (features["internal"]) skips the Python binding, down to a tenth of the measured overhead. On a
    device that measured the autograd engine's cost per node (Hardware.autograd_node_s), the forward
    op that made a node pays it, and the engine's calls of a node's ops skip the binding too (without
    it, a node's first op pays the binding in the engine's stead)."""
    node_s = hw.autograd_node_s
    internal = features.get(INTERNAL_FEATURE) or (node_s is not None and features.get(ENGINE_CALL_FEATURE))
    if internal and hw.python_call_s:
        measured_s = max(measured_s - hw.python_call_s, 0.1 * measured_s)
    if node_s is not None and features.get(AUTOGRAD_NODE_FEATURE):
        measured_s += node_s
    return measured_s


def framework_time_s(module_calls: int, hw: "Hardware") -> float:
    """Eager's cost of the model's nn.Module calls (hooks, dispatch) on a device with a measured
    "module" table; 0 elsewhere."""
    table = hw.kernel_table("module", None)
    return module_calls * table.overhead_s if table is not None else 0.0


def _ramp(ideal_time_s: float, ceiling: float, ramp_s: float) -> float:
    """ceiling * t / (t + ramp): saturating in the op's size, ceiling for ops much longer than ramp."""
    if ideal_time_s <= 0:
        return ceiling
    return ceiling * ideal_time_s / (ideal_time_s + ramp_s)
