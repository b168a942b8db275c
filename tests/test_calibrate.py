"""Calibration writes a device file that loads back, with measured figures and their sources."""

import pytest
import torch
from torch.utils import benchmark

from costmodel.hardware.calibrate import calibrate
from costmodel.errors import UsageError
from costmodel.hardware.catalog import load_hardware
from costmodel.hardware.roofline import op_time


def test_cpu_calibration_round_trips(tmp_path):
    out = tmp_path / "cpu.toml"
    measured = calibrate("cpu", out, quick=True)
    loaded = load_hardware(str(out))
    assert loaded == measured
    assert loaded.name == "calibrated-cpu" and loaded.calibrated
    assert set(loaded.peak_flops_per_s) == {"float32", "bfloat16"}
    # Sanity ranges for any CPU that runs the tests: 1e8..1e14 FLOP/s, 1e8..1e13 B/s, 0..1 ms per op.
    assert all(1e8 < p < 1e14 for p in loaded.peak_flops_per_s.values())
    assert 1e8 < loaded.bandwidth_bytes_per_s < 1e13
    assert 0 < loaded.kernel_overhead_s < 1e-3
    assert loaded.memory_bytes > 2**28
    for figure in ("memory_bytes", "bandwidth_bytes_per_s", "kernel_overhead_s",
                   "peak_flops_per_s.float32", "peak_flops_per_s.bfloat16"):
        assert torch.__version__ in loaded.sources[figure] or figure == "memory_bytes"
    assert "measured by costmodel hardware calibrate" in loaded.sources["peak_flops_per_s.float32"]


def test_calibrated_cpu_predicts_a_matmul_it_did_not_measure():
    hw = calibrate("cpu", None, quick=True)
    n = 384  # the quick run times 256^3 and 512^3 float32 matmuls, not this one
    a, b = torch.randn(n, n), torch.randn(n, n)
    measured_s = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}) \
        .blocked_autorange(min_run_time=0.1).median
    predicted = op_time(2 * n**3, 3 * n * n * 4, "matmul", "float32", hw)
    assert predicted.bound == "compute"
    # Calibrated: no discount on the measured matmul rate beyond the size ramp.
    assert predicted.compute_efficiency > 0.9
    # A noisy shared CPU still lands within a factor of 3 of its own measured rate.
    assert measured_s / 3 < predicted.time_s < measured_s * 3


def test_unknown_device_and_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="--device got 'tpu'; accepted: cpu, cuda"):
        calibrate("tpu", tmp_path / "x.toml")
    with pytest.raises(UsageError, match="directory .* does not exist"):
        calibrate("cpu", tmp_path / "missing" / "x.toml", quick=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calibration_round_trips(tmp_path):
    out = tmp_path / "gpu.toml"
    measured = calibrate("cuda", out, quick=True)
    assert load_hardware(str(out)) == measured
    assert {"float32", "bfloat16", "float16"} <= set(measured.peak_flops_per_s)
    assert measured.memory_bytes == torch.cuda.get_device_properties(0).total_memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="sees no CUDA device"):
        calibrate("cuda", tmp_path / "gpu.toml")
