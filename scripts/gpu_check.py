"""The GPU validation: zoo models on one CUDA GPU, inference and train, bfloat16, size sweeps.

Run by hand on a machine with a GPU (or through scripts/gpu_check.sh):

    python scripts/gpu_check.py --out gpu_check_out            # about 5 to 8 minutes on one H100/H200
    python scripts/gpu_check.py --dry-run --out /tmp/gc        # the same pipeline on the CPU, tiny models
    python scripts/gpu_check.py --suite time --out gpu_time    # time_accuracy_benchmark's six architectures

Writes, under --out: gpu_check.json (every run's validation JSON, the device, torch and timings),
gpu_check.md (a summary table, then each run's table) and one log-log plot per run (<run>.png).
Predicted times use this GPU calibrated once (`costmodel.hardware.calibrate`), or --hw. A run that fails is
recorded with its error and the others go on; runs not started within --budget-s are listed as
skipped, so the whole stays under the time it is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from costmodel.validate.engine import calibrated_hardware, validate
from costmodel.render.validation_plot import validation_figure


@dataclass
class Run:
    name: str
    model: object                      # zoo name or factory
    dims: dict[str, list[int]]
    mode: str = "inference"
    inputs: list[str] | None = None
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    kwargs: dict = field(default_factory=dict)


_SQUARE = ["pixel_values:float32[batch,3,size,size]"]   # one image-size dimension, square images


def gpu_plan() -> list[Run]:
    """In priority order: if time runs short, the last ones are skipped. Sizes chosen so that the
    largest point of each run takes well under a second per step on an H100/H200."""
    return [
        Run("gpt2-inference", "gpt2", {"batch": [8], "seq": [128, 256, 512, 1024]}),
        Run("gpt2-train", "gpt2", {"batch": [8], "seq": [128, 256, 512, 1024]}, mode="train"),
        # long context: SDPA without padding builds no mask in eager (issue 9); peak ~ seq^1
        Run("long-context-llama-train", _long_llama(), {"batch": [1], "seq": [4096, 8192, 16384]}, mode="train",
            inputs=["input_ids:int64[batch,seq]"]),
        # GPT-2 stops at 1024 positions; Llama's rotary embeddings go to 4096 (its config's maximum)
        Run("llama-2-7b-inference", "llama-2-7b", {"batch": [1], "seq": [512, 1024, 2048, 4096]}),
        Run("resnet-50-inference", "resnet-50", {"batch": [32], "size": [64, 128, 224, 320]}, inputs=_SQUARE),
        Run("resnet-50-train", "resnet-50", {"batch": [32], "size": [64, 128, 224]}, mode="train", inputs=_SQUARE),
        Run("bert-base-train", "bert-base", {"batch": [8], "seq": [64, 128, 256, 512]}, mode="train"),
        Run("llama-2-7b-train-sgd", "llama-2-7b", {"batch": [1], "seq": [256, 512, 1024, 2048]}, mode="train",
            optimizer="sgd"),
    ]


from costmodel.capture.zoo import hf_factory  # noqa: E402


def _long_llama():
    """A 4-layer Llama of width 1024 with a 32k context: attention's seq^2 work and the seq^1 peak
    of fused attention show within a second per step."""
    build = hf_factory("LlamaForCausalLM", "LlamaConfig", hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=32768)
    build.__name__ = "llama-4x1024-32k"
    return build


def _tiny(model_cls: str, config_cls: str, attention: str | None = "sdpa", **config):
    build = hf_factory(model_cls, config_cls, attention, **config)
    build.__name__ = f"tiny-{model_cls}"
    return build


def time_plan(dry_run: bool) -> list[Run]:
    """The architectures of scripts/time_accuracy_benchmark.py, inference then train, float32 (as
    on the CPU): time MAPE and fitted exponents on this GPU, priced on it calibrated. Dry run: the
    CPU sweeps' first two sizes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from time_accuracy_benchmark import ARCHS
    runs = []
    for mode in ("inference", "train"):
        for arch in ARCHS:
            dims = (arch.dims if mode == "inference" else arch.train_dims) if dry_run else \
                (arch.cuda_dims if mode == "inference" else arch.cuda_train_dims)
            if dry_run:
                dims = {d: v[:2] for d, v in dims.items()}
            runs.append(Run(f"{arch.name}-{mode}", arch.build, dims, mode=mode, inputs=arch.inputs, dtype="float32"))
    return runs


def dry_plan() -> list[Run]:
    """The same pipeline on the CPU with tiny models, in seconds: a check of the script, not of a GPU."""
    gpt2 = _tiny("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=256)
    resnet = _tiny("ResNetForImageClassification", "ResNetConfig", attention=None, embedding_size=8, hidden_sizes=[8, 16],
                   depths=[1, 1], layer_type="basic", num_labels=10)
    return [
        Run("tiny-gpt2-inference", gpt2, {"batch": [1], "seq": [64, 128]}, inputs=["input_ids:int64[batch,seq]"],
            dtype="float32"),
        Run("tiny-resnet-train", resnet, {"batch": [2], "size": [32, 64]},
            inputs=["pixel_values:float32[batch,3,size,size]"], mode="train", dtype="float32"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out", help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: check the pipeline without a GPU")
    parser.add_argument("--hw", help="device spec for predicted times (default: calibrate this GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no new run after this many seconds (default 330: the 8 minutes less the "
                             "GPU tests and the last run)")
    parser.add_argument("--only", action="append", default=[], help="run only these names (repeatable)")
    parser.add_argument("--suite", choices=("zoo", "time"), default="zoo",
                        help="zoo: zoo models in bfloat16 (default); time: the six architectures of "
                             "scripts/time_accuracy_benchmark.py, inference and train")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch "
              f"{torch.__version__}; use --dry-run to check the pipeline on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.suite == "time":
        plan = time_plan(args.dry_run)
    else:
        plan = dry_plan() if args.dry_run else gpu_plan()
    if args.only:
        plan = [r for r in plan if r.name in args.only]
    repeats = 1 if args.dry_run else args.repeats

    t0 = time.perf_counter()
    hw = args.hw or (calibrated_hardware(device) if not args.dry_run else None)
    if hw is None:   # dry run: a quick calibration is enough to exercise the time model
        from costmodel.hardware.calibrate import calibrate
        hw = calibrate("cpu", out / "calibrated-cpu.toml", quick=True)
    calibration_s = time.perf_counter() - t0

    record = {"device": _device_info(device), "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "hardware": hw if isinstance(hw, str) else hw.to_dict(), "calibration_s": calibration_s,
              "repeats": repeats, "runs": []}
    results = []
    for run in plan:
        elapsed = time.perf_counter() - start
        entry = {"name": run.name, "model": run.model if isinstance(run.model, str) else run.model.__name__,
                 "mode": run.mode, "dtype": run.dtype, "dims": run.dims}
        if elapsed > args.budget_s:
            entry["skipped"] = f"time budget ({args.budget_s:.0f} s) spent after {elapsed:.0f} s"
            record["runs"].append(entry)
            print(f"gpu_check: {run.name}: skipped ({entry['skipped']})", file=sys.stderr)
            continue
        t = time.perf_counter()
        print(f"gpu_check: {run.name} ...", file=sys.stderr, flush=True)
        try:
            result = validate(run.model, run.inputs, dims=run.dims, device=device, mode=run.mode, dtype=run.dtype,
                              optimizer=run.optimizer, hardware=hw, repeats=repeats, progress=True, **run.kwargs)
            entry["result"] = result.to_dict()
            results.append((run, result))
        except Exception as e:  # one failing run must not hide the others
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=8)
            print(f"gpu_check: {run.name} failed: {entry['error']}", file=sys.stderr)
        finally:
            entry["elapsed_s"] = time.perf_counter() - t
            if device == "cuda":
                torch.cuda.empty_cache()
        record["runs"].append(entry)
        print(f"gpu_check: {run.name} done in {entry['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
        _write(out, record, results, start)     # after every run: a timeout still leaves a report
    text = _write(out, record, results, start)
    print(text)
    print(f"gpu_check: wrote {out}/gpu_check.json, gpu_check.md and gpu_check_plots.pdf ({len(results)} "
          f"page(s)) in {record['total_s']:.0f} s", file=sys.stderr)
    failed = [r for r in record["runs"] if "error" in r]
    return 1 if failed and not results else 0


def _write(out: Path, record: dict, results, start: float) -> str:
    """gpu_check.json, gpu_check.md and gpu_check_plots.pdf (one page per run): rewritten after
    every run, so a timeout still leaves a report."""
    record["total_s"] = time.perf_counter() - start
    tests = out / "pytest_cuda.txt"
    if tests.exists():
        lines = tests.read_text().strip().splitlines()
        record["gpu_tests"] = lines[-1] if lines else "(no output)"
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
    text = _markdown(record, results)
    (out / "gpu_check.md").write_text(text)
    if results:
        from matplotlib.backends.backend_pdf import PdfPages
        with PdfPages(out / "gpu_check_plots.pdf") as pdf:
            for run, result in results:
                pdf.savefig(validation_figure(result, title=f"{run.name} on {record['device']['name']}"))
    return text


def _device_info(device: str) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"kind": "cuda", "name": p.name, "memory_bytes": p.total_memory,
                "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    from costmodel.hardware.calibrate import _machine
    return {"kind": "cpu", "name": _machine("cpu"), "threads": torch.get_num_threads()}


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _markdown(record: dict, results) -> str:
    from tabulate import tabulate
    rows = []
    for entry in record["runs"]:
        if "result" not in entry:
            why = (entry.get("error") or entry.get("skipped") or "").splitlines()[0]
            rows.append([entry["name"], entry["mode"], "-", "", "", "", "", "", "", why])
            continue
        r = entry["result"]
        dim = r["swept"][0] if r["swept"] else None
        e = r["exponents"].get(dim, {}) if dim else {}
        rows.append([entry["name"], entry["mode"], len(r["points"]), _fmt(r["errors"]["time_mape"], ".1f", "%"),
                     _fmt(r["errors"]["peak_memory_mape"], ".1f", "%"), dim or "-",
                     f"{_fmt(e.get('measured'))} / {_fmt(e.get('predicted'))}",
                     f"{_fmt(e.get('memory'))} / {_fmt(e.get('predicted_memory'))}", r["errors"]["oom_points"],
                     f"{entry['elapsed_s']:.0f} s"])
    dev = record["device"]
    head = [f"# costmodel GPU validation: {dev['name']}", "",
            (f"torch {record['torch']}, {record['date']}, median of {record['repeats']}, predicted time on "
             f"{record['hardware'] if isinstance(record['hardware'], str) else record['hardware']['name']} "
             f"(calibration {record['calibration_s']:.0f} s); total {record['total_s']:.0f} s"), "",
            tabulate(rows, headers=["run", "mode", "points", "time MAPE", "peak MAPE", "swept",
                                    "time exponent measured / predicted", "peak exponent measured / predicted",
                                    "OOM", "note"], tablefmt="github"), "",
            f"GPU tests (pytest -m cuda): {record.get('gpu_tests', 'not run')}", ""]
    for run, result in results:
        head += [f"## {run.name}", "", result.to_table("github"), "(plot: gpu_check_plots.pdf)", ""]
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    sys.exit(main())
