"""Speed of capture and evaluation on llama-2-7b (run by hand: python scripts/benchmark_capture.py).

Prints, for each mode: capture + analysis time and peak RSS (each in a fresh process), the time to
evaluate all total formulas at a new point, and, on one 100-point sequence sweep, our time against
re-running torch.utils.flop_counter.FlopCounterMode on the meta device (fake tensors) per point.
Targets (issue 2): train analysis < 30 s and < 3 GB RSS; a new point < 10 ms.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_mode(model: str, mode: str, points: int, reference_points: int) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import costmodel
    from costmodel.capture.loss import first_output
    from costmodel.capture.zoo import get

    t0 = time.perf_counter()
    report = costmodel.analyze(model, mode=mode)
    analysis_s = time.perf_counter() - t0
    rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    seqs = [64 + 32 * i for i in range(points)]
    report.evaluate(batch=1, seq=seqs[0])                 # compiles the formulas once
    t0 = time.perf_counter()
    ours = [report.evaluate(batch=1, seq=s).totals["matmul_flops"] for s in seqs]
    ours_s = time.perf_counter() - t0

    with torch.device("meta"):
        module = get(model).build()
    module.train(mode == "train")
    t0 = time.perf_counter()
    mismatches = 0
    for s, expected in zip(seqs[:reference_points], ours):
        with FakeTensorMode(allow_non_fake_inputs=True):
            ids = torch.zeros(1, s, dtype=torch.long, device="meta")
            counter = FlopCounterMode(display=False)
            with counter:
                if mode == "train":
                    first_output(module(input_ids=ids)).sum().backward()
                else:
                    with torch.no_grad():
                        module(input_ids=ids)
        mismatches += counter.get_total_flops() != expected
    reference_s = (time.perf_counter() - t0) / reference_points * points
    return {"model": model, "mode": mode, "analysis_s": analysis_s, "peak_rss_bytes": rss_bytes,
            "ops": len(report.primary.ops), "new_point_ms": ours_s / points * 1e3, "sweep_points": points,
            "sweep_ours_s": ours_s, "sweep_flop_counter_s": reference_s,
            "flop_counter_points_run": reference_points, "flop_counter_mismatches": mismatches}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--reference-points", type=int, default=100,
                   help="FlopCounterMode runs actually made (the sweep time is scaled to --points)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_mode(args.model, args.one, args.points, args.reference_points)))
        return
    rows = []
    for mode in ("inference", "train"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model, "--points",
                              str(args.points), "--reference-points", str(args.reference_points)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from tabulate import tabulate
    print(tabulate([[r["model"], r["mode"], r["ops"], f"{r['analysis_s']:.1f} s", f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
                     f"{r['new_point_ms']:.2f} ms", f"{r['sweep_ours_s'] * 1e3:.0f} ms",
                     f"{r['sweep_flop_counter_s']:.1f} s", r["flop_counter_mismatches"]] for r in rows],
                   headers=["model", "mode", "ops", "capture+analysis", "peak RSS", "new point",
                            f"{args.points}-point sweep: ours", "FlopCounterMode", "mismatches"]))


if __name__ == "__main__":
    main()
