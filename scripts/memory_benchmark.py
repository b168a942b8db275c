"""Predicted vs measured peak memory, per model and mode: the memory model's accuracy table.

    python scripts/memory_benchmark.py                   # CPU, float32, every model, both modes
    python scripts/memory_benchmark.py --amp             # mixed precision (autocast to bfloat16)
    python scripts/memory_benchmark.py --device cuda     # torch.cuda.max_memory_allocated on a GPU
    python scripts/memory_benchmark.py --models gpt2,opt --modes train

Measured: costmodel.memtrack (live tensor storage bytes on the CPU, each storage once; on CUDA
max_memory_allocated) over one no-grad forward, or one steady-state AdamW step. Predicted:
costmodel.analyze(...).evaluate(...).totals["peak_memory_bytes"] for the same device kind.
"dev" models were looked at while the model was built; "held-out" ones were not; "coverage" ones are
the architectures that need more than a plain trace (experts, ALiBi, unrolled RNNs, windows, U-Net).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import costmodel
from costmodel.validate import meters as memtrack
from tests import models as M
from tests.models import _hf

TEXT = ["input_ids:int64[batch,seq]"]
IMAGE = ["pixel_values:float32[batch,3,height,width]"]
SEQ = {"batch": 4, "seq": 256}

MODELS = {
    # name: (set, factory, inputs, dims)
    "gpt2": ("dev", M.tiny_gpt2, TEXT, SEQ),
    "llama-gqa": ("dev", M.tiny_llama_gqa, TEXT, SEQ),
    "bert": ("dev", M.tiny_bert, TEXT, SEQ),
    "t5": ("dev", M.tiny_t5, TEXT + ["decoder_input_ids:int64[batch,seq]"], {"batch": 4, "seq": 128}),
    "vit": ("dev", M.tiny_vit, ["pixel_values:float32[batch,3,32,32]"], {"batch": 16}),
    "resnet": ("dev", M.tiny_resnet, IMAGE, {"batch": 4, "height": 64, "width": 64}),
    "sdpa-block": ("dev", M.sdpa_block, ["x:float32[batch,seq,32]"], SEQ),
    "conv-net": ("dev", M.conv_net, ["x:float32[batch,3,height,width]"], {"batch": 4, "height": 64, "width": 64}),
    "distilbert": ("held-out", _hf("DistilBertModel", "DistilBertConfig", dim=64, hidden_dim=128, n_layers=2,
                                   n_heads=4, vocab_size=256, max_position_embeddings=512), TEXT, SEQ),
    "roberta": ("held-out", _hf("RobertaModel", "RobertaConfig", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                                max_position_embeddings=520), TEXT, SEQ),
    "opt": ("held-out", _hf("OPTForCausalLM", "OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, vocab_size=256, max_position_embeddings=512,
                            word_embed_proj_dim=64), TEXT, SEQ),
    "qwen2": ("held-out", _hf("Qwen2ForCausalLM", "Qwen2Config", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                              max_position_embeddings=512), TEXT, SEQ),
    "gpt-neox": ("held-out", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                                 max_position_embeddings=512), TEXT, SEQ),
    "convnext": ("held-out", _hf("ConvNextModel", "ConvNextConfig", attention=None, num_stages=2,
                                 hidden_sizes=[16, 32], depths=[1, 1]), IMAGE, {"batch": 4, "height": 64, "width": 64}),
    # coverage (issue 10): captured with balanced experts, ALiBi, unrolled recurrences, windows, U-Net
    "mixtral-grouped": ("coverage", M.mixtral_grouped, TEXT, {"batch": 2, "seq": 128}),
    "bloom": ("coverage", M.bloom, TEXT, SEQ),
    "gru": ("coverage", M.GRUTagger, ["ids:int64[batch,seq]"], {"batch": 4, "seq": 16}),
    "lstm": ("coverage", M.LSTM, ["x:float32[batch,seq,16]"], {"batch": 4, "seq": 16}),
    "swin": ("coverage", M.swin, ["pixel_values:float32[batch,3,32,32]"], {"batch": 8}),
    "unet": ("coverage", M.UNet, ["x:float32[batch,3,height,width]"], {"batch": 4, "height": 64, "width": 64}),
}


def run(name: str, mode: str, device: str, amp: bool) -> dict:
    group, factory, inputs, dims = MODELS[name]
    start = time.perf_counter()
    amp_arg = ("cpu" if device == "cpu" else True) if amp else False
    report = costmodel.analyze(factory, inputs=inputs, mode=mode, dims=dims, device=device, amp=amp_arg)
    point = report.evaluate(**dims)
    predicted = point.totals["peak_memory_bytes"]
    torch.manual_seed(0)
    real = factory()
    measure = memtrack.measure_train_step if mode == "train" else memtrack.measure_inference
    measured = measure(real, inputs, dims, device=device, amp=amp).peak_bytes
    return {"model": name, "set": group, "mode": mode + ("+amp" if amp else ""), "predicted": predicted,
            "measured": measured, "error": predicted / measured - 1, "at": point.extra["memory"]["at"]["node"],
            "attention": point.extra["memory"]["attention"], "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--amp", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'model':12s} {'set':9s} {'mode':14s} {'predicted':>14s} {'measured':>14s} {'error':>8s}  attention")
    for name in names:
        for mode in args.modes.split(","):
            r = run(name, mode, args.device, args.amp)
            rows.append(r)
            print(f"{r['model']:12s} {r['set']:9s} {r['mode']:14s} {r['predicted']:>14,d} {r['measured']:>14,d} "
                  f"{r['error'] * 100:>+7.1f}%  {r['attention'] or '-'}", flush=True)
    for group in ("dev", "held-out", "coverage", None):
        errs = [abs(r["error"]) for r in rows if group is None or r["set"] == group]
        if errs:
            print(f"{group or 'all':9s} mean |error| {sum(errs) / len(errs) * 100:.1f}%, worst "
                  f"{max(errs) * 100:.1f}% over {len(errs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
