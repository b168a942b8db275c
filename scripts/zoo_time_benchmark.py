"""Predicted forward time of zoo models on this CPU (calibrated) against the measured time.

Run by hand: `OMP_NUM_THREADS=1 python scripts/zoo_time_benchmark.py [--hw cpu.toml]`. Issue 4's
target: within 25% at compute-heavy sizes. Uses `costmodel.validate` (real weights, warm-up, median
of repeats) on the CPU, one thread (a shared 2-core machine times one thread far more steadily).
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from costmodel.validate.engine import validate

CASES = [
    ("gpt2", {"batch": [1], "seq": [256, 512]}),
    ("bert-base", {"batch": [2], "seq": [256, 512]}),
    ("resnet-50", {"batch": [2], "height": [224], "width": [224]}),
    ("vit-base", {"batch": [2]}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hw", help="device spec for predictions (default: calibrate this CPU)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model, dims in CASES:
        result = validate(model, dims=dims, device="cpu", hardware=args.hw, repeats=args.repeats, progress=False,
                          cross_check=False, min_time_s=0.0)
        for pt in result.to_dict()["points"]:
            measured, predicted = pt["measured"].get("time_s"), pt["predicted"].get("time_s")
            err = (predicted / measured - 1) * 100 if measured and predicted else None
            rows.append([model, ", ".join(f"{k}={v}" for k, v in pt["dims"].items()), f"{predicted:.3f}",
                         f"{measured:.3f}", f"{err:+.1f}%" if err is not None else "-",
                         "yes" if err is not None and abs(err) <= 25 else "no"])
    print(tabulate(rows, headers=["model", "point", "predicted s", "measured s", "error", "within 25%"]))


if __name__ == "__main__":
    main()
