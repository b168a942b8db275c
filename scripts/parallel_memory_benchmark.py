"""Per-rank peak memory of parallel training, predicted (costmodel, from the captured graph) against
measured: real torch.distributed runs on the CPU (gloo, one process per rank, each rank's peak of
live tensor bytes) and, for FSDP at W = 8 and 64, PyTorch's FSDPMemTracker under the fake process
group (one process standing in for W ranks, fake tensors).

Target: every rank of every case within 5% of its measured peak.

    OMP_NUM_THREADS=1 python scripts/parallel_memory_benchmark.py [--quick] [--json FILE] [--only SUBSTRING]

--quick runs one model and no checkpointing (a few minutes); the full table takes about half an
hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import costmodel  # noqa: E402
from costmodel.validate.distributed import compare, fake_fsdp_peak, job_for  # noqa: E402

TARGET_PCT = 5.0
MODELS = {
    "gpt2-style": ("tests/parallel_models.py:gpt2_style", ["input_ids:int64[batch,seq]"], {"batch": 2, "seq": 256}),
    "llama-style": ("tests/parallel_models.py:llama_style", ["input_ids:int64[batch,seq]"], {"batch": 2, "seq": 256}),
    "conv-net": ("tests/parallel_models.py:conv_net", ["x:float32[batch,3,height,width]"],
                 {"batch": 4, "height": 32, "width": 32}),
}
# (label, analyze keyword arguments)
REAL = [("fsdp=2", {"parallel": "fsdp=2"}),
        ("fsdp=4", {"parallel": "fsdp=4"}),
        ("dp=2", {"parallel": "dp=2"}),
        ("tp=2", {"parallel": "tp=2"}),
        ("pp=2, 4 micro-batches", {"parallel": "pp=2", "microbatches": 4})]
FAKE = [8, 64]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the GPT-2-style model only, without checkpointing")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--only", help="run the cases whose label contains this text")
    args = ap.parse_args()
    models = ["gpt2-style"] if args.quick else list(MODELS)
    checkpointing = ["none"] if args.quick else ["none", "blocks"]
    rows = []
    print(f"{'model':12} {'strategy':22} {'ckpt':7} {'rank':>4} {'stage':>5} {'measured':>12} {'predicted':>12} "
          f"{'error':>8}  by", flush=True)
    for name in models:
        source, inputs, dims = MODELS[name]
        for ckpt in checkpointing:
            cases = [(label, kw, "gloo") for label, kw in REAL] + \
                    [(f"fsdp={w} (fake)", {"parallel": f"fsdp={w}"}, "fake") for w in FAKE]
            for label, kw, how in cases:
                if args.only and args.only not in f"{name} {label} {ckpt}":
                    continue
                start = time.monotonic()
                report = costmodel.analyze(source, inputs=inputs, mode="train", dims=dims, device="cpu",
                                           checkpointing=ckpt, **kw)
                if how == "gloo":
                    results = [(c.rank, c.stage, c.measured_bytes, c.predicted_bytes) for c in compare(report, dims)]
                    by = "gloo ranks, live-storage meter"
                else:
                    w = int(kw["parallel"].split("=")[1])
                    measured = fake_fsdp_peak(job_for(report, dims), w)["peak_bytes"]
                    predicted = report.ranks_at(dims, device="cpu")[0].peak_bytes
                    results = [(0, 0, measured, predicted)]
                    by = "fake process group, FSDPMemTracker"
                for rank, stage, measured, predicted in results:
                    err = (predicted - measured) / measured * 100
                    rows.append({"model": name, "strategy": label, "checkpointing": ckpt, "rank": rank, "stage": stage,
                                 "measured_bytes": measured, "predicted_bytes": predicted, "error_pct": round(err, 3),
                                 "measured_by": by, "seconds": round(time.monotonic() - start, 1)})
                    print(f"{name:12} {label:22} {ckpt:7} {rank:>4} {stage:>5} {measured:>12,} {predicted:>12,} "
                          f"{err:>+7.2f}%  {by}", flush=True)
    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    within = sum(abs(r["error_pct"]) <= TARGET_PCT for r in rows)
    print(f"\n{within} of {len(rows)} ranks within {TARGET_PCT:g}% (target: all); largest error {worst:.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target_pct": TARGET_PCT, "rows": rows}, f, indent=2)
    return 0 if within == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
