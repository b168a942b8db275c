"""Roofline times against hand arithmetic on the a100-80gb figures (312e12 bf16, 19.5e12 fp32, 2.039e12 B/s).

With efficiency ceiling c and ramp r, an op of ideal time t runs in t / (c * t / (t + r)) = (t + r) / c,
plus 5e-6 s of kernel overhead.
"""

import math

import pytest

from costmodel.rules.cost import ATTENTION, CATEGORIES, CONV, COPY, FACTORY, INDEX, MATMUL, NORM, POINTWISE, VIEW
from costmodel.errors import UsageError
from costmodel.hardware.catalog import Hardware, list_hardware, load_hardware
from costmodel.hardware.roofline import DEFAULT_EFFICIENCY, efficiencies, op_time, summarize

A100 = load_hardware("a100-80gb")
BW = 2.039e12
N = 8192
MM_FLOPS = 2 * N**3                  # 2 * 8192^3 = 1_099_511_627_776
MM_BYTES = 3 * N * N * 2             # A, B read and C written in bf16: 3 * 8192^2 * 2 = 402_653_184
LN_ELEMS = 8 * 4096 * 4096           # 134_217_728
LN_FLOPS = 5 * LN_ELEMS              # ~5 FLOPs per element: 671_088_640
LN_BYTES = 2 * LN_ELEMS * 2          # read x, write y, bf16: 536_870_912


def test_big_matmul_is_compute_bound():
    t = op_time(MM_FLOPS, MM_BYTES, MATMUL, "bfloat16", A100)
    assert t.intensity == pytest.approx(2730.67, abs=0.01)   # 1.0995e12 / 4.027e8 = 2730.67 > 153
    assert t.bound == "compute"
    assert t.ridge_point == pytest.approx(153.02, abs=0.01)  # 312e12 / 2.039e12
    ideal_s = MM_FLOPS / 312e12                              # 3.524 ms
    assert t.compute_time_s == pytest.approx((ideal_s + 2e-6) / 0.80)   # 4.408 ms
    assert t.time_s == pytest.approx(t.compute_time_s + 5e-6)
    assert 0.75 <= t.compute_efficiency <= 0.80             # 0.8 * 3.524 / 3.526 = 0.7995


def test_layer_norm_is_memory_bound():
    t = op_time(LN_FLOPS, LN_BYTES, NORM, "bfloat16", A100)
    assert t.intensity == 1.25                               # 5 FLOPs / 4 bytes per element
    assert t.bound == "memory"
    # Norms run on the CUDA-core float32 peak, whose ridge is 19.5e12 / 2.039e12 = 9.56 FLOP/byte.
    assert t.peak_flops_per_s == 19.5e12
    assert t.ridge_point == pytest.approx(9.563, abs=0.001)
    ideal_s = LN_BYTES / BW                                  # 263.3 us
    assert t.memory_time_s == pytest.approx((ideal_s + 1e-6) / 0.85)    # 310.9 us
    assert t.time_s == pytest.approx((ideal_s + 1e-6) / 0.85 + 5e-6)    # 315.9 us


def test_bound_flips_at_the_ridge_point():
    ridge = 312e12 / BW
    bytes_ = 1e9
    assert op_time(ridge * bytes_, bytes_, MATMUL, "bfloat16", A100).bound == "compute"
    assert op_time(0.99 * ridge * bytes_, bytes_, MATMUL, "bfloat16", A100).bound == "memory"


OPS = [(2 * n**3, 3 * n * n * 2, MATMUL, "bfloat16") for n in (16, 64, 256, 1024, 4096, 8192)]
OPS += [(2 * 4096**3, 3 * 4096**2 * 4, MATMUL, "float32"), (1e12, 1e9, CONV, "float16"),
        (4e12, 2e8, ATTENTION, "bfloat16"), (LN_FLOPS, LN_BYTES, NORM, "bfloat16"),
        (10, 1e10, POINTWISE, "float32"), (0, 4e6, COPY, "bfloat16"), (0, 1e6, FACTORY, "float32"),
        (1e6, 8e7, INDEX, "bfloat16"), (1e9, 0, POINTWISE, "float32")]


@pytest.mark.parametrize("hw", list_hardware(), ids=lambda h: h.name)
def test_times_never_beat_the_roofline_lower_bound(hw):
    for flops, bytes_, category, dtype in OPS:
        if category in (MATMUL, CONV, ATTENTION) and dtype not in hw.peak_flops_per_s:
            continue
        t = op_time(flops, bytes_, category, dtype, hw)
        peak = hw.peak_for(dtype) if category in (MATMUL, CONV, ATTENTION) else hw.peak_flops_per_s["float32"]
        assert t.time_s >= flops / peak + hw.kernel_overhead_s
        assert t.time_s >= bytes_ / hw.bandwidth_bytes_per_s + hw.kernel_overhead_s
        assert 0 < t.compute_efficiency <= 1 and 0 < t.memory_efficiency <= 1


def test_per_op_times_sum_to_the_total():
    times = [op_time(f, b, c, d, A100) for f, b, c, d in OPS]
    s = summarize(times, MM_FLOPS, A100, "bfloat16")
    assert s.time_s == pytest.approx(sum(t.time_s for t in times), rel=1e-12)
    assert s.compute_bound_time_s + s.memory_bound_time_s == pytest.approx(s.time_s)
    assert s.memory_bound_share == pytest.approx(s.memory_bound_time_s / s.time_s)
    assert s.overhead_time_s == pytest.approx(len(OPS) * 5e-6)


def test_mfu_of_one_big_matmul():
    t = op_time(MM_FLOPS, MM_BYTES, MATMUL, "bfloat16", A100)
    s = summarize([t], MM_FLOPS, A100, "bfloat16")
    # MFU = flops / (time * peak) = 3.524 ms / (4.408 ms + 5 us) = 0.7986
    assert s.mfu == pytest.approx(MM_FLOPS / (t.time_s * 312e12))
    assert 0.79 < s.mfu < 0.80
    assert s.memory_bound_share == 0.0
    assert summarize([], 0, A100, "bfloat16").mfu is None


def test_small_matmul_is_less_efficient_than_large():
    effs = [op_time(2 * n**3, 3 * n * n * 2, MATMUL, "bfloat16", A100).compute_efficiency
            for n in (64, 256, 1024, 4096, 8192)]
    assert effs == sorted(effs)
    assert effs[0] < 0.01                                   # 0.8 * 1.7e-9 / (1.7e-9 + 2e-6) = 0.0007
    assert effs[2] == pytest.approx(0.8 * 6.88e-6 / (6.88e-6 + 2e-6), rel=1e-3)   # 1024^3: 0.62
    assert effs[-1] > 0.79


def test_view_ops_cost_nothing():
    t = op_time(0, 0, VIEW, "bfloat16", A100)
    assert (t.time_s, t.overhead_s, t.bound, t.intensity) == (0.0, 0.0, None, None)


def test_bytes_without_flops_and_flops_without_bytes():
    copy = op_time(0, 4e9, COPY, "bfloat16", A100)
    assert (copy.bound, copy.intensity, copy.compute_time_s) == ("memory", 0.0, 0.0)
    math_only = op_time(1e9, 0, POINTWISE, "float32", A100)
    assert (math_only.bound, math_only.intensity, math_only.memory_time_s) == ("compute", math.inf, 0.0)


def test_tf32_uses_the_tf32_peak():
    fp32 = op_time(2 * 4096**3, 3 * 4096**2 * 4, MATMUL, "float32", A100)
    tf32 = op_time(2 * 4096**3, 3 * 4096**2 * 4, MATMUL, "float32", A100, tf32=True)
    assert (fp32.peak_flops_per_s, tf32.peak_flops_per_s) == (19.5e12, 156e12)
    assert tf32.time_s < fp32.time_s
    # Elementwise ops ignore tf32 and the storage dtype: always the float32 vector peak.
    assert op_time(1e9, 1e9, POINTWISE, "bfloat16", A100, tf32=True).peak_flops_per_s == 19.5e12


def test_dtype_the_device_lacks():
    t4 = load_hardware("t4")
    with pytest.raises(UsageError, match="t4 has no bfloat16 peak; it has float32, float16"):
        op_time(1e9, 1e6, MATMUL, "bfloat16", t4)
    assert op_time(1e9, 1e9, NORM, "bfloat16", t4).bound == "memory"   # vector path needs no bf16 peak


def test_efficiency_overrides():
    ideal_s = MM_FLOPS / 312e12
    t = op_time(MM_FLOPS, MM_BYTES, MATMUL, "bfloat16", A100, efficiency={"matmul": 0.5, "compute_ramp_s": 0})
    assert t.compute_time_s == pytest.approx(ideal_s / 0.5)
    with pytest.raises(UsageError, match="unknown efficiency 'matmull'"):
        op_time(1, 1, MATMUL, "bfloat16", A100, efficiency={"matmull": 0.5})
    with pytest.raises(UsageError, match="expected 0 < value <= 1"):
        op_time(1, 1, MATMUL, "bfloat16", A100, efficiency={"matmul": 1.2})
    # Device files can carry their own ceilings: MI300X GEMMs reach 60% of peak (ROCm 6.2 MAMF).
    assert efficiencies(load_hardware("mi300x"))["matmul"] == 0.60
    assert set(efficiencies(A100)) == set(DEFAULT_EFFICIENCY)


def test_calibrated_peaks_are_not_discounted_twice():
    cpu = Hardware(name="calibrated-cpu", memory_bytes=2**34, bandwidth_bytes_per_s=1e10,
                   peak_flops_per_s={"float32": 1e11}, kernel_overhead_s=0.0, calibrated=True)
    eff = efficiencies(cpu)
    assert eff["matmul"] == eff["memory"] == 1.0
    assert eff["conv"] == pytest.approx(0.70 / 0.80)       # relative to the measured matmul rate
    t = op_time(2 * 2048**3, 3 * 2048**2 * 4, MATMUL, "float32", cpu)
    # 2 * 2048^3 / 1e11 = 171.8 ms ideal; the 2 us ramp is all that is added.
    assert t.time_s == pytest.approx(2 * 2048**3 / 1e11 + 2e-6)


def test_every_category_has_a_time():
    for category in CATEGORIES:
        t = op_time(1e6, 1e6, category, "bfloat16", A100)
        assert t.time_s > 0, category
