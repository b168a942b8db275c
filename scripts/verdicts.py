"""The OOM verdict and the limits of every architecture the tests and benchmarks use, in both modes.

    python scripts/verdicts.py                 # every model, inference and train, on a100-80gb
    python scripts/verdicts.py --only gpt2 --hw h100-sxm

For each model and mode it runs `costmodel analyze MODEL --hw DEVICE --dim ... --format json` in
process, as a user would, and prints whether the point fits and, per dimension, the largest value
that fits with the reason the search stopped there (memory, a limit of the model, a size the model
cannot be captured at). A row that ends in an error is printed as such: the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from costmodel.cli import main                 # noqa: E402
from costmodel.capture.zoo import ZOO                  # noqa: E402

MODELS = os.path.join(os.path.dirname(__file__), "..", "tests", "models.py")
_TEXT = {"batch": 2, "seq": 128}

# (name, model, inputs, dims): the zoo at its default inputs, then the tests' own architectures
CASES = [(name, name, [], {"batch": 1, "seq": 512} if "seq" in " ".join(ZOO[name].inputs) else
          {"batch": 2, **({"height": 224, "width": 224} if "height" in " ".join(ZOO[name].inputs) else {})})
         for name in ZOO] + [
    ("tiny-llama-gqa", f"{MODELS}:tiny_llama_gqa", ["input_ids:int64[batch,seq]"], _TEXT),
    ("tiny-gpt2", f"{MODELS}:tiny_gpt2", ["input_ids:int64[batch,seq]"], _TEXT),
    ("tiny-bert", f"{MODELS}:tiny_bert", ["input_ids:int64[batch,seq]"], _TEXT),
    ("tiny-t5", f"{MODELS}:tiny_t5", ["input_ids:int64[batch,seq]", "decoder_input_ids:int64[batch,seq]"], _TEXT),
    ("tiny-vit", f"{MODELS}:tiny_vit", ["pixel_values:float32[batch,3,32,32]"], {"batch": 4}),
    ("tiny-resnet", f"{MODELS}:tiny_resnet", ["pixel_values:float32[batch,3,height,width]"],
     {"batch": 4, "height": 64, "width": 64}),
    ("tiny-distilbert-classifier", f"{MODELS}:tiny_distilbert_classifier", ["input_ids:int64[batch,seq]"],
     {"batch": 5, "seq": 120}),
    ("sdpa-block", f"{MODELS}:sdpa_block", ["x:float32[batch,seq,32]"], _TEXT),
    ("conv-net", f"{MODELS}:conv_net", ["x:float32[batch,3,height,width]"], {"batch": 4, "height": 64, "width": 64}),
    ("mha", f"{MODELS}:MHA", ["x:float32[batch,seq,32]"], _TEXT),
    ("lstm", f"{MODELS}:LSTM", ["x:float32[batch,seq,16]"], {"batch": 2, "seq": 16}),
    ("torch-encoder", f"{MODELS}:torch_encoder", ["src:float32[batch,seq,32]"], _TEXT),
    ("sliced-positions", f"{MODELS}:SlicedPositions", ["ids:int64[batch,seq]"], {"batch": 2, "seq": 100}),
    ("audio-conv", f"{MODELS}:AudioConv", ["x:float32[batch,1,samples]"], {"batch": 4, "samples": 16000}),
    ("patches", f"{MODELS}:Patches", ["x:float32[batch,3,height,width]"], {"batch": 2, "height": 64, "width": 64}),
    ("convnext", f"{MODELS}:ConvNeXt", ["x:float32[batch,3,height,width]"], {"batch": 4, "height": 128, "width": 128}),
]


def run(model: str, inputs: list[str], dims: dict, mode: str, hw: str) -> tuple[int, dict | None, str]:
    argv = ["analyze", model, "--mode", mode, "--hw", hw, "--format", "json"]
    argv += [a for s in inputs for a in ("--input", s)] + [a for d, v in dims.items() for a in ("--dim", f"{d}={v}")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, json.loads(out.getvalue()) if code == 0 else None, err.getvalue().strip()


def main_() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hw", default="a100-80gb")
    p.add_argument("--only", nargs="*", help="case names to run")
    p.add_argument("--modes", default="inference,train")
    args = p.parse_args()
    failures = 0
    print(f"| model | mode | point | verdict on {args.hw} | largest value that fits, and why | s |")
    print("|---|---|---|---|---|---|")
    for name, model, inputs, dims in CASES:
        if args.only and name not in args.only:
            continue
        for mode in args.modes.split(","):
            start = time.perf_counter()
            code, data, err = run(model, inputs, dims, mode, args.hw)
            seconds = time.perf_counter() - start
            point = ", ".join(f"{d}={v}" for d, v in dims.items())
            if data is None:
                failures += 1
                print(f"| {name} | {mode} | {point} | exit {code}: {err.splitlines()[-1][:160]} | | {seconds:.1f} |",
                      flush=True)
                continue
            oom = data["oom"]
            verdict = (f"fits, {oom['margin_bytes'] / 2**30:.1f} GiB to spare" if oom["fits"] else
                       f"does NOT fit, {-oom['margin_bytes'] / 2**30:.1f} GiB over")
            limits = "; ".join(f"{d}: {e['description']}" for d, e in oom["largest_fitting"].items())
            print(f"| {name} | {mode} | {point} | {verdict} | {limits} | {seconds:.1f} |", flush=True)
    print(f"\n{failures} run(s) without a verdict")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main_())
