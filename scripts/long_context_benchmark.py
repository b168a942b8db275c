"""Peak memory at long context: predicted vs measured, for decoders whose attention masks differ.

    python scripts/long_context_benchmark.py                     # seq 4096 and 8192, both modes
    python scripts/long_context_benchmark.py --seqs 8192 --modes inference --models llama

Tiny widths (hidden 128, 4 heads, 2 KV heads, 2 layers, a 256-token vocabulary), so that the
[seq, seq] terms dominate and the CPU run is quick: a mask that eager never allocates shows up as
tens of percent. Families:
  llama, qwen2    SDPA with no padding: eager passes is_causal=True and builds no mask
  mistral         sliding window 1024 < seq: eager builds the [B, 1, S, S] window mask
  gpt2-eager      GPT-2 with its eager attention: builds its mask and keeps [B, H, S, S] scores
Measured: costmodel.memtrack on the CPU (live tensor storage, as PyTorch's MemTracker counts it),
one no-grad forward or one steady-state AdamW step, float32. Predicted: costmodel.analyze with
--device cpu. Also printed: the degree of seq in the symbolic peak (1 where no S x S tensor lives).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import costmodel  # noqa: E402
from costmodel.validate import meters as memtrack  # noqa: E402
from costmodel.capture.zoo import hf_factory  # noqa: E402

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=16384)
MODELS = {
    "llama": hf_factory("LlamaForCausalLM", "LlamaConfig", **SMALL),
    "qwen2": hf_factory("Qwen2ForCausalLM", "Qwen2Config", **SMALL),
    "mistral": hf_factory("MistralForCausalLM", "MistralConfig", sliding_window=1024, **SMALL),
    "gpt2-eager": hf_factory("GPT2LMHeadModel", "GPT2Config", attention="eager", n_embd=128, n_layer=2, n_head=4,
                             vocab_size=256, n_positions=16384),
}
TEXT = ["input_ids:int64[batch,seq]"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default="inference,train")
    p.add_argument("--seqs", default="4096,8192")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| model | mode | seq | measured | predicted | error | seq degree of the peak | s |")
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for name in args.models.split(","):
        factory = MODELS[name]
        for mode in args.modes.split(","):
            seqs = [int(s) for s in args.seqs.split(",")]
            start = time.perf_counter()
            report = costmodel.analyze(factory, inputs=TEXT, mode=mode, dims={"batch": 1, "seq": seqs},
                                       device="cpu")
            degree = report.complexity["seq"]["peak_memory_bytes"]
            for seq in seqs:
                dims = {"batch": 1, "seq": seq}
                predicted = report.memory_at(dims).peak_bytes
                torch.manual_seed(0)
                model = factory()
                measure = memtrack.measure_train_step if mode == "train" else memtrack.measure_inference
                measured = measure(model, TEXT, dims).peak_bytes
                err = (predicted - measured) / measured * 100
                errors.append(abs(err))
                print(f"| {name} | {mode} | {seq} | {measured / 2**20:.1f} MiB | {predicted / 2**20:.1f} MiB | "
                      f"{err:+.1f}% | seq^{degree} | {time.perf_counter() - start:.0f} |", flush=True)
                del model
    print(f"\nmean |error| {sum(errors) / len(errors):.1f}%, worst {max(errors):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
