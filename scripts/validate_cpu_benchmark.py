"""Validate the cost model on this CPU: a transformer with SDPA over sequence length and a conv net
over image size, inference and train, measured against predicted.

Run by hand: `python scripts/validate_cpu_benchmark.py [--out validate_cpu_out] [--threads N] [--quick]`.
For each run it prints the validation table (measured and predicted time and peak per point, the
measured peak beside the CPU allocator's own figure, fitted exponents, doubling ratios, MAPE) and
writes <run>.json and <run>.png under --out, plus summary.md. Predicted times use this CPU
calibrated once (`costmodel.hardware.calibrate`, 3-4 min) at the same thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch


from costmodel.capture.zoo import hf_factory as _hf


def runs(quick: bool) -> list[dict]:
    if quick:
        gpt2 = _hf("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=1024)
        resnet = _hf("ResNetForImageClassification", "ResNetConfig", attention=None, embedding_size=16,
                     hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)
        batch_t, batch_c = 1, 2
    else:
        # GPT-2 shaped, 4 layers of width 256: the matmuls, not Python, dominate from seq 128 up.
        gpt2 = _hf("GPT2LMHeadModel", "GPT2Config", n_embd=256, n_layer=4, n_head=4, vocab_size=8192,
                   n_positions=1024)
        resnet = _hf("ResNetForImageClassification", "ResNetConfig", attention=None, embedding_size=32,
                     hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic", num_labels=10)
        batch_t, batch_c = 2, 8
    text = ["input_ids:int64[batch,seq]"]
    image = ["pixel_values:float32[batch,3,size,size]"]
    seq = {"batch": [batch_t], "seq": [128, 256, 512, 1024]}
    # From 64 px up: at 32 px the oneDNN convolution's internal buffers (reorders the dispatcher never
    # sees) are up to a fifth of the train peak; the measured peak counts tensors, the allocator all.
    size = {"batch": [batch_c], "size": [32, 64, 128] if quick else [64, 128, 256]}
    return [{"name": "transformer-sdpa-inference", "model": gpt2, "inputs": text, "dims": seq, "mode": "inference"},
            {"name": "transformer-sdpa-train", "model": gpt2, "inputs": text, "dims": seq, "mode": "train"},
            {"name": "convnet-inference", "model": resnet, "inputs": image, "dims": size, "mode": "inference"},
            {"name": "convnet-train", "model": resnet, "inputs": image, "dims": size, "mode": "train"}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="validate_cpu_out")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny models (the test-suite sizes)")
    parser.add_argument("--only", action="append", default=[], help="run only these names (repeatable)")
    parser.add_argument("--hw", help="device spec for the predicted time (default: calibrate this CPU)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch|transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)

    from costmodel.hardware.calibrate import calibrate
    from costmodel.validate.engine import validate
    from costmodel.render.validation_plot import validation_plot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = args.hw or calibrate("cpu", out / "calibrated-cpu.toml")
    summary = [("| run | time MAPE | peak MAPE | measured vs allocator (max) | time exponent measured / predicted "
                "| FLOPs exponent | peak exponent measured / predicted | wall |"), "|---" * 8 + "|"]
    for run in runs(args.quick):
        if args.only and run["name"] not in args.only:
            continue
        t = time.perf_counter()
        r = validate(run["model"], run["inputs"], dims=run["dims"], mode=run["mode"], hardware=hw,
                     repeats=args.repeats, progress=True)
        wall = time.perf_counter() - t
        (out / f"{run['name']}.json").write_text(r.to_json())
        validation_plot(r, out / f"{run['name']}.png", title=f"{run['name']} on {r.device_name}, "
                                                              f"{r.environment.get('threads')} threads")
        print(f"## {run['name']} ({wall:.0f} s)\n")
        print(r.to_table())
        dim = r.swept[0]
        e, err = r.exponents[dim], r.errors
        summary.append(f"| {run['name']} | {err['time_mape']:.1f}% | {err['peak_memory_mape']:.1f}% | "
                       f"{err['measured_vs_independent_max_pct']:.1f}% | {e['measured']:.2f} / {e['predicted']:.2f} | "
                       f"{e['flops']:.2f} | {e['memory']:.2f} / {e['predicted_memory']:.2f} | {wall:.0f} s |")
    text = "\n".join(summary) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
