"""Calibrate this CPU, then compare roofline predictions with measured times of single ops.

Run by hand: `python scripts/calibrate_cpu_benchmark.py [--out cpu.toml] [--quick]`. Prints one row
per op: FLOPs and bytes as the cost model counts them, predicted and measured time, and their ratio.
"""

import argparse

import torch
from torch.utils import benchmark

from costmodel.hardware.calibrate import calibrate
from costmodel.hardware.roofline import op_time


def ops():
    """(label, category, flops, bytes, statement, tensors) for ops whose cost is easy to count."""
    for n in (64, 256, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        # C[n, n] = A @ B: 2 n^3 FLOPs; A and B read, C written, float32
        yield f"mm {n}^3 fp32", "matmul", 2 * n**3, 3 * n * n * 4, "torch.mm(a, b)", {"a": a, "b": b}
    x = torch.randn(8, 1024, 1024)
    w, bias = torch.ones(1024), torch.zeros(1024)
    # ~5 FLOPs per element (mean, variance, normalize, scale, shift); x read, y written
    yield "layer_norm 8x1024x1024", "norm", 5 * x.numel(), 2 * x.nbytes, \
        "torch.nn.functional.layer_norm(x, (1024,), w, bias)", {"x": x, "w": w, "bias": bias}
    # 1 FLOP per element; two inputs read, one output written
    yield "add 8x1024x1024", "pointwise", x.numel(), 3 * x.nbytes, "x + x", {"x": x}
    yield "softmax 8x1024x1024", "softmax", 5 * x.numel(), 2 * x.nbytes, "x.softmax(-1)", {"x": x}
    yield "clone 8x1024x1024", "copy", 0, 2 * x.nbytes, "x.clone()", {"x": x}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="where to write the calibrated TOML")
    parser.add_argument("--quick", action="store_true", help="small sizes, ~1 s of measuring")
    args = parser.parse_args()
    hw = calibrate("cpu", args.out, quick=args.quick)
    print(f"{hw.name}: {hw.description}")
    for dtype, peak in hw.peak_flops_per_s.items():
        print(f"  {dtype:9} {peak / 1e9:10.1f} GFLOP/s   ({hw.sources[f'peak_flops_per_s.{dtype}']})")
    print(f"  bandwidth {hw.bandwidth_bytes_per_s / 1e9:10.2f} GB/s")
    print(f"  overhead  {hw.kernel_overhead_s * 1e6:10.2f} us per op")
    print(f"\n{'op':26} {'bound':8} {'predicted':>12} {'measured':>12} {'pred/meas':>10}")
    for label, category, flops, bytes_, stmt, tensors in ops():
        predicted = op_time(flops, bytes_, category, "float32", hw)
        measured_s = benchmark.Timer(stmt, globals={"torch": torch, **tensors}) \
            .blocked_autorange(min_run_time=0.3).median
        print(f"{label:26} {predicted.bound:8} {predicted.time_s * 1e3:10.3f}ms {measured_s * 1e3:10.3f}ms "
              f"{predicted.time_s / measured_s:10.2f}")


if __name__ == "__main__":
    main()
