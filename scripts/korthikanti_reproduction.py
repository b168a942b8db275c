"""Reproduce Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198): per-GPU memory (Fig. 1) and step times on Selene (Table 5), from costmodel's
analysis of a Megatron-style GPT (scripts/megatron_gpt.py), printed beside the paper's figures.

    python scripts/korthikanti_reproduction.py [--only 22B|175B] [--json FILE]

Setup, as the paper's: A100-80GB (costmodel's a100-80gb: DGX A100, NVLink3 230 GB/s busbw, one 200 Gb/s
HDR InfiniBand NIC per GPU), float16, sequence 2048, vocabulary 51200, Megatron's mixed precision
(--master-weights: float16 weights, float32 main gradients, master weights and Adam moments, 18
bytes per parameter), the attention core written out as Megatron runs it (no flash attention; its
softmax output, dropout mask and dropped probabilities are the 5as^2b bytes).
  GPT 22B: hidden 6144, 48 layers, 64 heads, tp 8, pp 1, micro-batch 4 (global batch 4);
  GPT-3 175B: hidden 12288, 96 layers, 96 heads, tp 8, pp 8 interleaved x3, micro-batch 1, 64 micro-
  batches (global batch 64).
What the paper counts, and so what is printed beside it (costmodel's full per-GPU peak follows):
  parameters + optimizer state: the transformer layers' weights only (12 h^2 per layer over tp * pp,
    the same 2.72e9 for both models, hence their equal 45.6 GiB), at 18 bytes each;
  activations: what one micro-batch's forward leaves for the backward in the transformer layers
    (costmodel: live at the stage's first backward op, made inside the repeated blocks), times the
    micro-batches the first stage holds (1F1B: pp; interleaved: pp * (1 + (pp - 1) / (pp * v)));
  step time: one iteration; costmodel's is its roofline time of each op on the rank that runs it
    (matmuls at up to 80% of the float16 peak, elementwise ops at HBM bandwidth, as eager PyTorch
    runs them unfused), tensor-parallel collectives exposed, pipeline bubble (pp - 1) / (v * m).
Full recomputation is --checkpointing blocks; "sequence parallelism + selective recomputation" is
--sequence-parallel --checkpointing selective.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import costmodel  # noqa: E402
from costmodel.hardware.parallel_step import breakdown  # noqa: E402
from megatron_gpt import gpt  # noqa: E402

GiB = 2 ** 30
SEQ = 2048
# name: (hidden, layers, heads, parallel, micro-batch, micro-batches, interleave)
MODELS = {"22B": (6144, 48, 64, "tp=8", 4, 1, 1), "175B": (12288, 96, 96, "tp=8,pp=8", 1, 64, 3)}
# Fig. 1 (GiB per GPU) and Table 5 (seconds per iteration)
PAPER_MEMORY = {"22B": {"model_states": 45.6, "none": 59.3, "selective": 9.6},
                "175B": {"model_states": 45.6, "none": 66.8, "selective": 12.4}}
PAPER_TIME = {"22B": {"blocks": 1.42, "selective": 1.10}, "175B": {"blocks": 18.13, "selective": 13.75}}
TIME_TARGET = 0.10


def analyze(name: str, checkpointing: str):
    hidden, layers, heads, parallel, batch, m, v = MODELS[name]
    report = costmodel.analyze(functools.partial(gpt, hidden=hidden, layers=layers, heads=heads),
                               inputs=["input_ids:int64[batch,seq]"], mode="train", dtype="float16",
                               attention="math", device="cuda", master_weights=True, parallel=parallel,
                               microbatches=m, pp_interleave=v, sequence_parallel=checkpointing == "selective",
                               checkpointing=checkpointing, hardware="a100-80gb")
    return report, {"batch": batch, "seq": SEQ}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(MODELS))
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    rows, times = [], []
    for name in ([args.only] if args.only else list(MODELS)):
        for ckpt in ("none", "selective", "blocks"):
            start = time.monotonic()
            report, dims = analyze(name, ckpt)
            par = report.parallel_memory()
            values = {d: dims[d] for d in report.primary.captured.dims}
            first = par.saved_activations(values)[0]
            states = par.model_states(values)[0]
            point = report.evaluate(**dims)
            peak = max(r["peak_memory_bytes"] for r in point.extra["ranks"])
            activations = first["blocks_bytes"] * first["microbatches_held"]
            if ckpt != "blocks":
                rows.append({"model": name, "setting": "no recomputation" if ckpt == "none" else
                             "sequence parallel + selective recomputation",
                             "model_states_gib": states["blocks_bytes"] / GiB,
                             "model_states_all_gib": (states["blocks_bytes"] + states["other_bytes"]) / GiB,
                             "activations_gib": float(activations) / GiB,
                             "paper_model_states_gib": PAPER_MEMORY[name]["model_states"],
                             "paper_activations_gib": PAPER_MEMORY[name][ckpt],
                             "microbatches_held": str(first["microbatches_held"]),
                             "peak_per_gpu_gib": peak / GiB})
            if ckpt != "none":
                b = breakdown(point.extra)
                times.append({"model": name, "setting": "full recomputation" if ckpt == "blocks" else
                              "sequence parallel + selective recomputation", **b, "mfu": point.extra["mfu"],
                              "paper_s": PAPER_TIME[name][ckpt],
                              "error_pct": (b["step_s"] / PAPER_TIME[name][ckpt] - 1) * 100})
            print(f"[{name} --checkpointing {ckpt}: {time.monotonic() - start:.0f} s]", file=sys.stderr, flush=True)

    print("Per-GPU memory (Korthikanti et al. 2022, Fig. 1), GiB")
    print(f"{'model':6} {'setting':45} {'params+opt':>10} {'paper':>6} {'activations':>11} {'paper':>6} "
          f"{'error':>7}  (mb held)  costmodel: all params+opt, peak/GPU")
    for r in rows:
        err = (r["activations_gib"] / r["paper_activations_gib"] - 1) * 100
        print(f"{r['model']:6} {r['setting']:45} {r['model_states_gib']:10.1f} {r['paper_model_states_gib']:6.1f} "
              f"{r['activations_gib']:11.1f} {r['paper_activations_gib']:6.1f} {err:+6.1f}%  ({r['microbatches_held']:>6})"
              f"  {r['model_states_all_gib']:.1f}, {r['peak_per_gpu_gib']:.1f}")
    print("\nStep time on Selene (Korthikanti et al. 2022, Table 5), seconds")
    print(f"{'model':6} {'setting':45} {'compute':>8} {'exp.comm':>8} {'bubble':>7} {'step':>7} {'paper':>6} "
          f"{'error':>7} {'MFU':>6}")
    worst = 0.0
    for t in times:
        worst = max(worst, abs(t["error_pct"]))
        print(f"{t['model']:6} {t['setting']:45} {t['compute_s']:8.3f} {t['exposed_communication_s']:8.3f} "
              f"{t['bubble_s']:7.3f} {t['step_s']:7.3f} {t['paper_s']:6.2f} {t['error_pct']:+6.1f}% "
              f"{t['mfu'] * 100:5.1f}%")
    print(f"\nlargest step-time error {worst:.1f}% (target: within {TIME_TARGET * 100:.0f}% each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": rows, "time": times}, f, indent=2)
    return 0 if worst <= TIME_TARGET * 100 else 1


if __name__ == "__main__":
    sys.exit(main())
