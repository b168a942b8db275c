"""How a call's interleaved seconds grow with the classes run between two of its calls: Timer.interleaved
after the first k of the calibration's ten probe ops (PROBE_CLASSES), k = 1, 2, 3, 5, 10, for a small
convolution, add, product and tanh. The cost model charges a call k/10 of the seconds measured after
all ten (costmodel/api.py _code_shares); this prints what k ops cost, measured.

Run by hand: `python scripts/interleaved_share.py [--threads 1]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from costmodel.hardware.calibrate_kernels import Timer, _ten_ops, kernel_plan
    from costmodel.hardware.kernels import PROBE_CLASSES

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timer = Timer("cpu", dataclasses.replace(kernel_plan("cpu", quick=True), block_s=0.01, blocks=9))
    ops, _ = _ten_ops(16)
    x, w = torch.randn(1, 32, 8, 8), torch.randn(32, 32, 3, 3)
    a, b, h = torch.randn(8, 256), torch.randn(8, 256), torch.randn(8, 256)
    weight, bias = torch.randn(768, 256), torch.randn(768)
    calls = {"conv 3x3, 32 ch, 8x8": lambda: F.conv2d(x, w, None, 1, 1), "add 8x256": lambda: a + b,
             "addmm 8x256 @ 256x768": lambda: torch.addmm(bias, h, weight.t()), "tanh 8x256": lambda: torch.tanh(a)}
    ks = (1, 2, 3, 5, PROBE_CLASSES)
    print(f"{args.threads} threads; extra us a call after the first k probe ops, and as a share of k = {PROBE_CLASSES}")
    print(f"{'call':24s} {'alone':>8s}  " + "  ".join(f"k={k:<2d}" for k in ks))
    with torch.no_grad():
        for name, call in calls.items():
            alone = min(timer.block(call, 1000) / 1000 for _ in range(5))
            extra = []
            for k in ks:
                def run(first=tuple(ops[:k])):
                    for op in first:
                        op()
                extra.append(statistics.median(timer.interleaved(call, alone, run) or 0.0 for _ in range(3)))
            full = extra[-1] or float("nan")
            print(f"{name:24s} {alone * 1e6:7.2f}  " + "  ".join(f"{e * 1e6:5.2f}" for e in extra)
                  + "   share: " + " ".join(f"{e / full:4.2f}" for e in extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
