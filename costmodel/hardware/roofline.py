"""Roofline time of an op on a device: pure arithmetic on FLOPs, bytes and the device's figures.

An op takes max(flops / achievable FLOP/s, bytes / achievable bandwidth) plus one kernel overhead.
Achievable = datasheet peak * efficiency, where the efficiency has a ceiling per kind of op (data in
DEFAULT_EFFICIENCY, overridable) and ramps up with the op's size. Matmul, conv and attention run
on the tensor-core peak of their dtype; every other op runs on the float32 vector peak.
`bound` compares the op's intensity with the ridge point (datasheet peak / datasheet bandwidth) of
the peak it runs on, so it agrees with `costmodel hardware show` and the roofline plot.
No torch here: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from costmodel.rules.cost import ATTENTION, CONV, INDEX, MATMUL
from costmodel.errors import UsageError

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


def op_time(flops, bytes, category: str, dtype: str, hw: "Hardware", tf32: bool = False,
            efficiency: Mapping[str, float] | None = None) -> OpTime:
    """Roofline time of one op.

    >>> t = op_time(2 * 8192**3, 3 * 8192**2 * 2, "matmul", "bfloat16", load_hardware("a100-80gb"))
    >>> t.bound, round(t.intensity), round(t.compute_efficiency, 3), round(t.time_s * 1e3, 2)
    ('compute', 2731, 0.799, 4.41)
    """
    flops, bytes = float(flops), float(bytes)
    if not (flops >= 0 and bytes >= 0):
        raise UsageError(f"op_time needs flops >= 0 and bytes >= 0; got flops={flops}, bytes={bytes}")
    eff = efficiencies(hw, efficiency)
    tensor_key = _TENSOR_CATEGORIES.get(category)
    if tensor_key is not None:
        peak, compute_ceiling = hw.peak_for(dtype, tf32), eff[tensor_key]
    else:
        peak, compute_ceiling = hw.vector_flops_per_s, eff["vector"]
    bandwidth = hw.bandwidth_bytes_per_s
    memory_ceiling = eff["memory_gather" if category == INDEX else "memory"]
    ridge = peak / bandwidth
    if flops == 0 and bytes == 0:
        # Views, reshapes, empty tensors: no kernel runs, so no launch either.
        return OpTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, None, peak, ridge, 0.0, 0.0)
    compute_efficiency = _ramp(flops / peak, compute_ceiling, eff["compute_ramp_s"])
    memory_efficiency = _ramp(bytes / bandwidth, memory_ceiling, eff["memory_ramp_s"])
    compute_time_s = flops / (peak * compute_efficiency) if flops else 0.0
    memory_time_s = bytes / (bandwidth * memory_efficiency) if bytes else 0.0
    intensity = flops / bytes if bytes else math.inf
    return OpTime(
        flops=flops, bytes=bytes,
        time_s=max(compute_time_s, memory_time_s) + hw.kernel_overhead_s,
        compute_time_s=compute_time_s, memory_time_s=memory_time_s, overhead_s=hw.kernel_overhead_s,
        intensity=intensity, bound="compute" if intensity >= ridge else "memory",
        peak_flops_per_s=peak, ridge_point=ridge,
        compute_efficiency=compute_efficiency, memory_efficiency=memory_efficiency,
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
    tensor_key = _TENSOR_CATEGORIES.get(category)
    if tensor_key is not None:
        peak, compute_ceiling = hw.peak_for(dtype, tf32), eff[tensor_key]
    else:
        peak, compute_ceiling = hw.vector_flops_per_s, eff["vector"]
    bandwidth = hw.bandwidth_bytes_per_s
    memory_ceiling = eff["memory_gather" if category == INDEX else "memory"]
    ridge = peak / bandwidth

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
              tf32: bool = False) -> Summary:
    """Totals over ops run one after another; MFU against the dense peak of `dtype`.

    `total_flops` is the numerator of MFU (the model's FLOPs, usually matmul FLOPs); per-op FLOPs
    only decide each op's time.
    """
    op_times = list(op_times)
    time_s = math.fsum(t.time_s for t in op_times)
    compute_s = math.fsum(t.time_s for t in op_times if t.bound == "compute")
    memory_s = math.fsum(t.time_s for t in op_times if t.bound == "memory")
    overhead_s = math.fsum(t.overhead_s for t in op_times)
    peak = hw.peak_for(dtype, tf32)
    total_flops = float(total_flops)
    return Summary(
        time_s=time_s, compute_bound_time_s=compute_s, memory_bound_time_s=memory_s,
        overhead_time_s=overhead_s, memory_bound_share=memory_s / time_s if time_s else None,
        flops=total_flops, peak_flops_per_s=peak,
        mfu=total_flops / (time_s * peak) if time_s else None,
    )


def _ramp(ideal_time_s: float, ceiling: float, ramp_s: float) -> float:
    """ceiling * t / (t + ramp): saturating in the op's size, ceiling for ops much longer than ramp."""
    if ideal_time_s <= 0:
        return ceiling
    return ceiling * ideal_time_s / (ideal_time_s + ramp_s)
