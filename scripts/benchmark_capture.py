"""Speed of one analysis against what a user would otherwise run (by hand: python scripts/benchmark_capture.py).

Each case runs in a fresh process (imports done before any clock starts, the model's transformers
classes included) and prints:
- ours: `costmodel analyze MODEL --mode M --dim batch=1 --dim seq=2048 --format json`, run in process
  through the CLI's own entry point, wall time and the process's peak RSS; the number of copied
  blocks (capture.blocks) and the time to evaluate every total at a new point;
- the reference, in its own fresh process: for inference, building the model on the meta device and
  counting one forward with torch.utils.flop_counter.FlopCounterMode (fake tensors); for train,
  PyTorch's MemTracker walking the same AdamW step (forward, loss, backward, optimizer step) with
  the model built under FakeTensorMode. Both include building the model, as ours does.
Issue 13's targets: llama-2-7b inference <= 3 s and within 2x of FlopCounterMode's build-and-count;
llama-2-7b train <= 6 s and at most half MemTracker's time; llama-2-70b train <= 8 s; <= 2 GB RSS each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import time

CASES = [("llama-2-7b", "inference"), ("llama-2-7b", "train"), ("llama-2-70b", "train")]
TARGET_S = {("llama-2-7b", "inference"): 3.0, ("llama-2-7b", "train"): 6.0, ("llama-2-70b", "train"): 8.0}
BATCH, SEQ = 1, 2048


def warm_imports(model: str) -> None:
    """Import the model's transformers classes (config and model) before any clock starts, in both
    processes: transformers imports a model's module on first use, about 2 s here, which is neither
    capture nor counting."""
    import pathlib

    import transformers

    from costmodel.capture import zoo
    path = pathlib.Path(zoo.__file__).parent / "zoo_configs" / f"{model}.json"
    if path.exists():
        config = json.loads(path.read_text())
        for name in config.get("architectures", []):
            getattr(transformers, name)
        transformers.AutoConfig.for_model(config["model_type"])


def ours(model: str, mode: str) -> dict:
    import costmodel  # noqa: F401  (imports outside the clock)
    warm_imports(model)
    from costmodel import cli
    import costmodel.api as api

    made = {}
    analyze = api.analyze

    def keep(*a, **k):                   # the report, to read what the capture copied
        made["report"] = analyze(*a, **k)
        return made["report"]
    api.analyze = keep
    out = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["analyze", model, "--mode", mode, "--dim", f"batch={BATCH}", "--dim", f"seq={SEQ}",
                       "--format", "json"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc != 0:
        raise SystemExit(f"costmodel analyze exited {rc}")
    report = made["report"]
    copied = report.primary.captured.copied
    report.evaluate(batch=1, seq=SEQ // 2)
    t0 = time.perf_counter()
    report.evaluate(batch=3, seq=SEQ + 100)
    new_point = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": cpu, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "blocks": len(copied), "blocks_traced": len(set(copied.values())), "new_point_s": new_point,
            "matmul_flops": report.evaluate(batch=BATCH, seq=SEQ).totals["matmul_flops"]}


def reference(model: str, mode: str) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from costmodel.capture.loss import first_output
    from costmodel.capture.zoo import get

    entry = get(model)
    warm_imports(model)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "inference":
        with torch.device("meta"):
            module = entry.build()
        module.eval()
        with FakeTensorMode(allow_non_fake_inputs=True):
            ids = torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta")
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                module(input_ids=ids)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"wall_s": wall, "cpu_s": cpu, "what": "meta build + FlopCounterMode forward", "flops": counter.get_total_flops()}
    from torch.distributed._tools.mem_tracker import MemTracker
    with FakeTensorMode():
        module = entry.build()
        module.train()
        opt = torch.optim.AdamW(module.parameters(), foreach=True)
        built = time.perf_counter() - t0
        ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(module, opt)
        with tracker:
            first_output(module(input_ids=ids)).sum().backward()
            opt.step()
        peak = sum(tracker.get_tracker_snapshot("peak")[torch.device("cpu")].values()) \
            if torch.device("cpu") in tracker.get_tracker_snapshot("peak") else None
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "build_s": built, "what": "FakeTensorMode build + MemTracker AdamW step",
            "peak_bytes": peak}


def run(kind: str, model: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, model, mode, "--seq", str(SEQ)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(f"{m}:{k}" for m, k in CASES),
                   help="comma list of MODEL:MODE (default: %(default)s)")
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="skip the FlopCounterMode / MemTracker runs")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    SEQ = args.seq
    if args.one:
        kind, model, mode = args.one
        print(json.dumps((ours if kind == "ours" else reference)(model, mode)))
        return
    from tabulate import tabulate
    rows = []
    for case in args.cases.split(","):
        model, mode = case.split(":")
        a = run("ours", model, mode)
        if "error" in a:
            rows.append([model, mode, a["error"]] + [""] * 7)
            continue
        ref_name = "flop_counter" if mode == "inference" else "mem_tracker"
        b = None if args.no_reference or model == "llama-2-70b" else run("reference", model, mode)
        target = TARGET_S.get((model, mode))
        ratio = (a["wall_s"] / b["wall_s"], a["cpu_s"] / b["cpu_s"]) if b and "error" not in b else None
        rows.append([model, mode, f"{a['wall_s']:.2f} s, cpu {a['cpu_s']:.2f} s" + (f" (<= {target:g})" if target else ""),
                     f"{a['rss_bytes'] / 1e9:.2f} GB", f"{a['blocks_traced']} of {a['blocks']}",
                     f"{a['new_point_s'] * 1e3:.1f} ms",
                     "" if b is None else (b.get("error") or f"{b['wall_s']:.2f} s, cpu {b['cpu_s']:.2f} s ({b['what']})"),
                     "" if ratio is None else f"{ratio[0]:.2f}, cpu {ratio[1]:.2f} (<= {'2' if mode == 'inference' else '0.5'})",
                     "" if not b or mode != "inference" or "error" in b else
                     ("same" if b["flops"] == a["matmul_flops"] else f"{b['flops']} vs {a['matmul_flops']}")])
        print(f"{model} {mode}: {json.dumps(a)} {ref_name}: {json.dumps(b)}", file=sys.stderr)
    print(tabulate(rows, headers=["model", "mode", "analyze (CLI, JSON): wall, CPU", "peak RSS", "blocks traced",
                                  "new point", "reference: wall, CPU", "ours / reference", "FLOPs vs FlopCounterMode"]))


if __name__ == "__main__":
    main()
