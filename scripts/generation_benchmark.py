"""Generation with a KV cache: predicted vs measured on this CPU, and llama-2-7b on an A100 80GB.

    python scripts/generation_benchmark.py [--out generation_out] [--threads N] [--repeats 3]
    python scripts/generation_benchmark.py --quick            # the test suite's tiny decoders

CPU: zoo decoders run a real greedy generation (`validate --mode generate`: the prefill, then `gen`
decode steps, no early stop), measured against the prediction: peak memory (the live-storage meter
over the whole generation; target within 5%), time to first token and the mean decode-step time
(medians of several generations; target within 25%) on this CPU calibrated just before each
model (`costmodel.calibrate`: on a shared machine the achievable rates move with other work).
gpt2 is the zoo model whole; llama-2-7b and mistral-7b are the zoo configs cut to their first 2
layers (every width as published: d=4096, MHA / GQA with 8 KV heads, 32000 tokens), which a 2-core
CPU can run.

Beside them, predicted only: llama-2-7b in bfloat16 on a100-80gb (`analyze --mode generate`): KV
bytes per token, the largest batch at a 4k context (prompt + gen = 4096), time to first token and
tokens/s at batch 1 and 64, and the ceiling a batch-1 decode cannot beat (bandwidth / weight bytes).

Prints Markdown tables and writes <model>.json and <model>.png (validation plot) under --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

TOKENS = ["input_ids:int64[batch,prompt]"]
PEAK_TARGET_PCT, TIME_TARGET_PCT = 5.0, 25.0


def zoo_decoder(name: str, layers: int | None = None):
    """A factory of the zoo model `name`, with its first `layers` decoder layers only (None: all)."""
    from costmodel.capture import zoo
    hf = zoo.get(name).hf
    if layers is not None:
        config = copy.deepcopy(hf.config)
        config.num_hidden_layers = layers
        hf = dataclasses.replace(hf, config=config)

    def build():
        return hf.build()
    build.__name__ = name if layers is None else f"{name}[{layers} layers]"
    return build


def cpu_runs(quick: bool) -> list[dict]:
    if quick:
        from tests.models import tiny_gpt2, tiny_llama_gqa
        dims = {"batch": [1, 2], "prompt": [32], "gen": [16]}
        return [{"name": "tiny-gpt2", "model": tiny_gpt2, "dims": dims},
                {"name": "tiny-llama-gqa", "model": tiny_llama_gqa, "dims": dims}]
    seven_b = {"batch": [1, 2], "prompt": [32, 128], "gen": [8]}
    return [{"name": "gpt2", "model": zoo_decoder("gpt2"), "dims": {"batch": [1, 4], "prompt": [128, 512], "gen": [16]}},
            {"name": "llama-2-7b[2 layers]", "model": zoo_decoder("llama-2-7b", 2), "dims": seven_b},
            {"name": "mistral-7b[2 layers]", "model": zoo_decoder("mistral-7b", 2), "dims": seven_b}]


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait until the 1-minute load average is below max_load (at most wait_s); the load then. Other
    work on the machine inflates measured times, so the table records the load around each run."""
    deadline = time.time() + wait_s
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() >= deadline:
            return load
        time.sleep(10)


def pct(predicted, measured) -> float | None:
    if predicted is None or not measured:
        return None
    return 100.0 * (predicted - measured) / measured


def fmt_pct(v: float | None, target: float) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}%" + ("" if abs(v) <= target else " (over target)")


def cpu_table(args, out: Path) -> list[str]:
    from costmodel.hardware.calibrate import calibrate
    from costmodel.render.validation_plot import validation_plot
    from costmodel.validate.engine import validate

    rows = ["| model | batch | prompt | gen | peak measured | predicted | error | TTFT measured | predicted | error "
            "| per-token measured | predicted | error | token-time slope measured / predicted (ns per ctx token) "
            "| load before / after |",
            "|---" * 15 + "|"]
    for run in cpu_runs(args.quick):
        if args.only and run["name"] not in args.only:
            continue
        before = wait_for_quiet(args.max_load, args.wait_s)
        safe = run["name"].replace("[", "-").replace(" ", "-").replace("]", "")
        # calibrated just before each run: on a shared machine the rates move with other work
        hw = args.hw or calibrate("cpu", out / f"calibrated-cpu-{safe}.toml")
        t = time.perf_counter()
        r = validate(run["model"], TOKENS, dims=run["dims"], mode="generate", hardware=hw, repeats=args.repeats,
                     progress=True)
        load = f"{before:.1f} / {os.getloadavg()[0]:.1f}"
        print(f"{run['name']}: {time.perf_counter() - t:.0f} s, load {load}", file=sys.stderr)
        (out / f"{safe}.json").write_text(r.to_json())
        validation_plot(r, out / f"{safe}.png", title=f"{run['name']} generate on {r.device_name}")
        for p in r.points:
            m, q = p.measured, p.predicted
            if "peak_memory_bytes" not in m:
                rows.append(f"| {run['name']} | {p.dims} | not run: {m.get('skipped') or m.get('error')} |")
                continue
            slope = (f"{1e9 * m['token_time_slope_s']:.1f} / {1e9 * q['token_time_slope_s']:.1f}"
                     if "token_time_slope_s" in m and "token_time_slope_s" in q else "-")
            rows.append(
                f"| {run['name']} | {p.dims['batch']} | {p.dims['prompt']} | {p.dims['gen']} "
                f"| {m['peak_memory_bytes'] / 2**20:.1f} MiB | {q['peak_memory_bytes'] / 2**20:.1f} MiB "
                f"| {fmt_pct(pct(q['peak_memory_bytes'], m['peak_memory_bytes']), PEAK_TARGET_PCT)} "
                f"| {1e3 * m['time_to_first_token_s']:.1f} ms | {1e3 * q['time_to_first_token_s']:.1f} ms "
                f"| {fmt_pct(pct(q['time_to_first_token_s'], m['time_to_first_token_s']), TIME_TARGET_PCT)} "
                f"| {1e3 * m['token_time_s']:.2f} ms | {1e3 * q['token_time_s']:.2f} ms "
                f"| {fmt_pct(pct(q['token_time_s'], m['token_time_s']), TIME_TARGET_PCT)} | {slope} | {load} |")
    return rows


def gpu_table(device: str) -> list[str]:
    """llama-2-7b in bfloat16 on `device`, predicted: the figures the issue asks for."""
    import costmodel
    from costmodel.hardware.catalog import load_hardware

    hw = load_hardware(device)
    t = time.perf_counter()
    report = costmodel.analyze("llama-2-7b", mode="generate", dtype="bfloat16", hardware=hw)
    print(f"llama-2-7b generate capture: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    gen = 128
    context = 4096
    fit = report.fit("batch", {"prompt": context - gen, "gen": gen})
    rows = [f"llama-2-7b, bfloat16, on {hw.name}: predicted",
            "",
            "| batch | prompt | gen | KV bytes per token (per sequence) | KV cache | peak | fits | time to first token "
            "| first / last decode step | decode memory-bound share | tokens/s |",
            "|---" * 11 + "|"]
    for b, prompt in [(1, context - gen), (64, context - gen), (1, 1024 - gen), (64, 1024 - gen)]:
        p = report.evaluate(batch=b, prompt=prompt, gen=gen)
        g = p.extra["generate"]
        fits = p.fits(hw)
        rows.append(
            f"| {b} | {prompt} | {gen} | {p.kv_bytes_per_token() / 2**10:.0f} KiB | {g['kv_cache_bytes'] / 2**30:.2f} GiB "
            f"| {p.totals['peak_memory_bytes'] / 2**30:.2f} GiB | {'yes' if fits else 'no'} "
            f"| {1e3 * g['time_to_first_token_s']:.1f} ms | {1e3 * g['decode']['first_token_time_s']:.2f} / "
            f"{1e3 * g['decode']['last_token_time_s']:.2f} ms | {100 * p.decode_memory_bound_share:.0f}% "
            f"| {g['tokens_per_s']:.0f} |")
    weights = report.param_bytes
    rows += ["",
             f"largest batch at a {context}-token context (prompt {context - gen} + gen {gen}): {fit['max']['batch']} "
             f"(peak {fit['peak_memory_bytes'] / 2**30:.2f} GiB, in the {fit['at']['phase']}; {fit['limit']['reason']})",
             f"batch-1 decode ceiling, bandwidth / weight bytes: {hw.bandwidth_bytes_per_s:.3g} B/s / "
             f"{weights / 1e9:.2f} GB = {hw.bandwidth_bytes_per_s / weights:.0f} tokens/s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="generation_out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load below this")
    parser.add_argument("--wait-s", type=float, default=300.0, help="wait at most this long before each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the test suite's tiny decoders")
    parser.add_argument("--only", action="append", default=[], help="run only these CPU models (repeatable)")
    parser.add_argument("--hw", help="device spec for the CPU's predicted times (default: calibrate this CPU)")
    parser.add_argument("--gpu", default="a100-80gb", help="the device of the llama-2-7b table")
    parser.add_argument("--no-cpu", action="store_true", help="only the llama-2-7b table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = []
    if not args.no_cpu:
        text += [f"CPU ({torch.get_num_threads()} threads), float32, greedy generation: measured vs predicted "
                 f"(targets: peak {PEAK_TARGET_PCT:.0f}%, times {TIME_TARGET_PCT:.0f}%)", ""]
        text += cpu_table(args, out) + [""]
    text += gpu_table(args.gpu)
    body = "\n".join(text) + "\n"
    (out / "summary.md").write_text(body)
    print(body)
    print(json.dumps({"wrote": str(out)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
