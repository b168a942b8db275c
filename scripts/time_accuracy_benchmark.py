"""Predicted against measured step time on seven architectures, inference and train, at one and two
CPU threads (or on CUDA): time MAPE and fitted exponents per run, through `costmodel.validate`.

Run by hand:
    python scripts/time_accuracy_benchmark.py --out time_out                # CPU, threads 1 and 2
    python scripts/time_accuracy_benchmark.py --threads 1 --only convnext   # one architecture
    python scripts/time_accuracy_benchmark.py --device cuda --out gpu_time  # on a GPU (gpu_check.sh runs it)

The device is calibrated once per thread count (`costmodel hardware calibrate`, in a process of its
own, written under --out as calibrated-<device>-<threads>.toml and reused when present), or --hw
gives the file. Before each
run on the CPU the script waits (up to --wait-s) for the 1-minute load average to drop below
--max-load, and records the load during the run and how fast a calibrated product and add run just
before it against the calibration ("machine vs calibration": 1.0 as calibrated, 0.8 20% slower),
and a small add again just after it: other work on the machine slows measured steps, even on one
thread's own clock, and at two threads the host's state slows every small op's fork and join.
Beside the time MAPE against each point's median step, the table gives it (and the exponent)
against each point's fastest timed block, the statistic the calibration keeps: the machine's
slower spells move that one less. Writes summary.md (the table) and one JSON per run under --out.

    python scripts/time_accuracy_benchmark.py --reprice time_out [--hw other.toml]

prices the measurements stored under a previous --out again (with --hw, or the calibration stored
beside each run), running no model: a change to the cost model, or another calibration, judged on
the same measured steps, apart from the machine's moods between two runs.

Architectures: which ones the kernel classes and calibration were developed against ("dev") and
which were held out (not looked at while developing): see ARCHS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from costmodel.capture.zoo import hf_factory  # noqa: E402
from costmodel.hardware.calibrate import machine_speed  # noqa: E402  (recorded after each run)
from tests.models import ConvNeXtBlock  # noqa: E402  (depthwise 7x7, channels-last LayerNorm, MLP 4x)


# --- architectures --------------------------------------------------------------------------------

class ConvNeXt(nn.Module):
    def __init__(self, dims=(48, 96, 192), depths=(2, 2, 2), classes: int = 100):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4)]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                layers.append(nn.Conv2d(dims[i - 1], d, 2, stride=2))
            layers += [ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class GRULanguageModel(nn.Module):
    """Embedding, a 2-layer GRU, a vocabulary head."""

    recurrent = nn.GRU

    def __init__(self, vocab: int = 4096, d: int = 256, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = self.recurrent(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


class LSTMLanguageModel(GRULanguageModel):
    """Embedding, a 2-layer LSTM (oneDNN's layers on a CPU), a vocabulary head."""

    recurrent = nn.LSTM

    def __init__(self, vocab: int = 4096, d: int = 192, hidden: int = 320):
        super().__init__(vocab, d, hidden)


_TEXT = ["input_ids:int64[batch,seq]"]


@dataclass
class Arch:
    name: str
    build: object
    inputs: list[str]
    dims: dict[str, list[int]]          # inference sweep
    train_dims: dict[str, list[int]]    # train sweep
    held_out: bool
    note: str = ""
    cuda_dims: dict[str, list[int]] = field(default_factory=dict)
    cuda_train_dims: dict[str, list[int]] = field(default_factory=dict)


ARCHS = [
    Arch("decoder", hf_factory("GPT2LMHeadModel", "GPT2Config", n_embd=256, n_layer=4, n_head=4, vocab_size=8192,
                               n_positions=1024), _TEXT,
         {"batch": [1], "seq": [128, 256, 512, 1024]}, {"batch": [1], "seq": [64, 128, 256, 512]}, held_out=False,
         note="GPT-2 shape (HF GPT2LMHeadModel, SDPA), d=256, 4 layers, vocab 8192",
         cuda_dims={"batch": [8], "seq": [256, 512, 1024]}, cuda_train_dims={"batch": [8], "seq": [256, 512, 1024]}),
    Arch("resnet", hf_factory("ResNetForImageClassification", "ResNetConfig", attention=None, embedding_size=32,
                              hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic", num_labels=100),
         ["pixel_values:float32[batch,3,size,size]"], {"batch": [4], "size": [64, 96, 128, 192]},
         {"batch": [4], "size": [64, 96, 128, 160]}, held_out=False,
         note="HF ResNet, basic blocks, widths 32..256, batch 4",
         cuda_dims={"batch": [64], "size": [64, 128, 224]}, cuda_train_dims={"batch": [64], "size": [64, 128, 224]}),
    Arch("encoder", hf_factory("BertModel", "BertConfig", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, vocab_size=8192, max_position_embeddings=512), _TEXT,
         {"batch": [2], "seq": [64, 128, 256, 512]}, {"batch": [2], "seq": [64, 128, 256, 512]}, held_out=True,
         note="HF BertModel (SDPA), d=256, 4 layers",
         cuda_dims={"batch": [16], "seq": [128, 256, 512]}, cuda_train_dims={"batch": [16], "seq": [128, 256, 512]}),
    Arch("convnext", ConvNeXt, ["x:float32[batch,3,128,128]"], {"batch": [1, 2, 4, 8]}, {"batch": [1, 2, 4, 8]},
         held_out=True, note="hand-written ConvNeXt-style: depthwise 7x7, channels-last LayerNorm, widths 48..192, 128 px",
         cuda_dims={"batch": [16, 32, 64]}, cuda_train_dims={"batch": [16, 32, 64]}),
    Arch("vit", hf_factory("ViTModel", "ViTConfig", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4, image_size=224, patch_size=16),
         ["pixel_values:float32[batch,3,224,224]"], {"batch": [1, 2, 4, 8]}, {"batch": [1, 2, 4, 8]}, held_out=True,
         note="HF ViTModel (SDPA), d=256, 4 layers, 224 px, patch 16",
         cuda_dims={"batch": [32, 64, 128]}, cuda_train_dims={"batch": [32, 64, 128]}),
    Arch("rnn", GRULanguageModel, _TEXT, {"batch": [8], "seq": [16, 32, 64, 128]}, {"batch": [8], "seq": [16, 32, 64, 128]},
         held_out=True, note="embedding, nn.GRU 2 layers of 256, vocabulary head 4096",
         cuda_dims={"batch": [64], "seq": [32, 64, 128]}, cuda_train_dims={"batch": [64], "seq": [32, 64, 128]}),
    Arch("lstm", LSTMLanguageModel, _TEXT, {"batch": [8], "seq": [16, 32, 64, 128]},
         {"batch": [8], "seq": [16, 32, 64, 128]}, held_out=False,
         note="embedding, nn.LSTM 2 layers of 320, head 4096: the model matmul.lstm was measured against",
         cuda_dims={"batch": [64], "seq": [32, 64, 128]}, cuda_train_dims={"batch": [64], "seq": [32, 64, 128]}),
]


# --- running ----------------------------------------------------------------------------------------

def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def wait_for_quiet(max_load: float, wait_s: float) -> float | None:
    """Wait until the 1-minute load average is below max_load (at most wait_s); the load then."""
    deadline = time.time() + wait_s
    while True:
        load = load_average()
        if load is None or load < max_load or time.time() >= deadline:
            return load
        time.sleep(10)


def hardware_for(device: str, threads: int | None, out: Path, hw: str | None, quick: bool):
    from costmodel.hardware.calibrate import calibrate_apart
    from costmodel.hardware.catalog import load_hardware
    if hw:
        return load_hardware(hw)
    path = out / f"calibrated-{device}-{threads or 'gpu'}{'-quick' if quick else ''}.toml"
    if path.is_file():
        return load_hardware(str(path))
    print(f"calibrating {device} ({threads} threads) into {path} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = calibrate_apart(device, path, quick=quick)   # this process times the models: see calibrate_apart
    print(f"  calibrated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def run_one(arch: Arch, mode: str, device: str, hw, repeats: int, quick: bool):
    from costmodel.validate.engine import validate
    dims = arch.dims if mode == "inference" else arch.train_dims
    if device == "cuda":
        dims = (arch.cuda_dims if mode == "inference" else arch.cuda_train_dims) or dims
    if quick:
        dims = {d: v[:2] for d, v in dims.items()}
    return validate(arch.build, arch.inputs, dims=dims, device=device, mode=mode, hardware=hw, repeats=repeats,
                    progress=False, cross_check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="time_accuracy_out")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable; default 1 and 2)")
    parser.add_argument("--only", action="append", default=[], help="architecture names (repeatable)")
    parser.add_argument("--mode", action="append", choices=("inference", "train"), help="default: both")
    parser.add_argument("--hw", help="a calibrated device file to price with (default: calibrate per thread count)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-load", type=float, default=1.0, help="CPU: wait for a 1-minute load below this")
    parser.add_argument("--wait-s", type=float, default=300.0, help="CPU: wait at most this long per run")
    parser.add_argument("--quick", action="store_true", help="two points per run, quick calibration (a smoke test)")
    parser.add_argument("--reprice", metavar="DIR", help="price the runs stored under DIR (a previous --out) "
                                                          "again, with --hw or their stored calibration; run nothing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.reprice:
        return reprice(Path(args.reprice), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads_list = [None] if args.device == "cuda" else (args.threads or [1, 2])
    modes = args.mode or ["inference", "train"]
    archs = [a for a in ARCHS if not args.only or a.name in args.only]
    rows = []
    for threads in threads_list:
        if threads:
            torch.set_num_threads(threads)
        if args.device == "cpu":
            wait_for_quiet(args.max_load, args.wait_s)
        hw = hardware_for(args.device, threads, out, args.hw, args.quick)
        for arch in archs:
            for mode in modes:
                load_before = wait_for_quiet(args.max_load, args.wait_s) if args.device == "cpu" else None
                start = time.perf_counter()
                try:
                    r = run_one(arch, mode, args.device, hw, args.repeats, args.quick)
                except Exception as e:   # one failing run must not hide the others
                    rows.append({"arch": arch.name, "mode": mode, "threads": threads, "error": f"{type(e).__name__}: {e}"})
                    print(f"{arch.name} {mode} {threads}t: failed: {e}", file=sys.stderr, flush=True)
                    continue
                wall = time.perf_counter() - start
                load_after = load_average()
                # before: validate's own quick probes against the calibration (environment.calibration)
                speed = r.environment.get("calibration", {}).get("machine_vs_calibration")
                speed_after = machine_speed(hw) if args.device == "cpu" else None
                dim = r.swept[0] if r.swept else None
                e = r.exponents.get(dim, {}) if dim else {}
                row = {"arch": arch.name, "held_out": arch.held_out, "mode": mode, "threads": threads,
                       "dim": dim, "time_mape": r.errors["time_mape"], "exp_measured": e.get("measured"),
                       "exp_predicted": e.get("predicted"), "load": [load_before, load_after], "speed": speed,
                       "speed_after": speed_after,
                       "wall_s": wall,
                       "points": [(p.dims, p.measured.get("time_s"), p.predicted.get("time_s")) for p in r.points],
                       "fastest": _against_fastest([p.dims for p in r.points],
                                                   [p.measured.get("time_min_s") for p in r.points],
                                                   [p.predicted.get("time_s") for p in r.points], dim)}
                rows.append(row)
                (out / f"{arch.name}-{mode}-{threads or 'gpu'}t.json").write_text(r.to_json())
                print(_line(row), flush=True)
    text = _summary(rows, args.device)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    print(text)
    return 0


def reprice(stored: Path, args) -> int:
    """The runs stored under `stored` priced again: each point's measured step against the
    prediction of the cost model as it is now, with --hw or the calibration stored beside the run."""
    from costmodel.api import analyze
    from costmodel.hardware.catalog import load_hardware
    from costmodel.validate.stats import fit_exponent
    rows = []
    for arch in ARCHS:
        if args.only and arch.name not in args.only:
            continue
        for mode in args.mode or ["inference", "train"]:
            for path in sorted(stored.glob(f"{arch.name}-{mode}-*t.json")):
                threads = path.stem.rsplit("-", 1)[1][:-1]
                if args.threads and threads not in {str(t) for t in args.threads}:
                    continue
                hw_path = args.hw or stored / f"calibrated-{args.device}-{threads}.toml"
                if not Path(hw_path).exists() and not args.hw:
                    raise SystemExit(f"--reprice: no calibration for {path.name}: give --hw (looked for {hw_path})")
                hw = load_hardware(str(hw_path))
                run = json.loads(path.read_text())
                points = [p for p in run["points"] if p["measured"].get("time_s")]
                if not points:
                    print(f"{path.name}: no measured step to price", flush=True)
                    continue
                dims = {d: sorted({p["dims"][d] for p in points}) for d in points[0]["dims"]}
                report = analyze(arch.build, inputs=arch.inputs, mode=mode, dims=dims, hardware=hw, complete=True,
                                 device=args.device)
                measured = [p["measured"]["time_s"] for p in points]
                predicted = [report.evaluate(**p["dims"]).totals["time_s"] for p in points]
                dim = run["swept"][0] if run["swept"] else None
                sizes = [p["dims"][dim] for p in points] if dim else []
                row = {"arch": arch.name, "held_out": arch.held_out, "mode": mode,
                       "threads": int(threads) if threads.isdigit() else None, "dim": dim,
                       "time_mape": sum(abs(q - m) / m for q, m in zip(predicted, measured)) / len(points) * 100,
                       "exp_measured": fit_exponent(sizes, measured) if dim else None,
                       "exp_predicted": fit_exponent(sizes, predicted) if dim else None,
                       "load": [None, None], "speed": None,
                       "points": [(p["dims"], m, q) for p, m, q in zip(points, measured, predicted)],
                       "fastest": _against_fastest([p["dims"] for p in points],
                                                   [p["measured"].get("time_min_s") for p in points], predicted, dim)}
                rows.append(row)
                print(_line(row), flush=True)
    if not rows:
        raise SystemExit(f"--reprice: no stored runs (<arch>-<mode>-<threads>t.json) under {stored}")
    print(_summary(rows, args.device))
    return 0


def _against_fastest(dims: list[dict], fastest: list, predicted: list, dim: str | None) -> dict | None:
    """Time MAPE and fitted exponent against each point's fastest timed block (`time_min_s`) instead
    of the median: the statistic the calibration keeps (the fastest of its blocks, the one other work
    on the machine disturbed least), so a host that slowed the run for a while moves it less. None
    where a point has no such time."""
    from costmodel.validate.stats import fit_exponent
    pairs = [(d, m, q) for d, m, q in zip(dims, fastest, predicted) if q]
    if not pairs or any(not m for _, m, _ in pairs):
        return None
    mape = sum(abs(q - m) / m for _, m, q in pairs) / len(pairs) * 100
    exponent = fit_exponent([d[dim] for d, _, _ in pairs], [m for _, m, _ in pairs]) if dim else None
    return {"time_mape": mape, "exp_measured": exponent}


def _within(mape: float, measured: float | None, predicted: float | None) -> bool:
    return mape <= 15 and (measured is None or predicted is None or abs(measured - predicted) <= 0.1)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _line(row: dict) -> str:
    load = "/".join("-" if x is None else f"{x:.2f}" for x in row["load"])
    pts = " ".join(f"{m * 1e3:.1f}/{p * 1e3:.1f}" for _, m, p in row["points"] if m and p)
    fastest = row.get("fastest")
    against = f"  fastest: MAPE {fastest['time_mape']:5.1f}% exp {_number(fastest['exp_measured'])}" if fastest else ""
    return (f"{row['arch']:9s} {row['mode']:9s} {row['threads'] or '-'}t  MAPE {row['time_mape']:5.1f}%  "
            f"exp {row['exp_measured']:.2f}/{row['exp_predicted']:.2f}{against}  load {load}  speed {_speed(row)}  "
            f"ms meas/pred: {pts}")


def _speed(row: dict) -> str:
    speed, after = row.get("speed"), row.get("speed_after")
    if not speed:
        return "-"
    text = "/".join(f"{v:.2f}" for v in speed.values())
    return text + (f" -> {after['small']:.2f}" if after and "small" in after else "")


def _summary(rows: list[dict], device: str) -> str:
    head = ["| architecture | held out | mode | threads | swept | time MAPE | exponent measured / predicted | "
            "diff | against the fastest block: MAPE, exponent | load (before / after) | "
            "machine vs calibration before (matmul / add / copy / small) -> small after |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            head.append(f"| {r['arch']} | | {r['mode']} | {r['threads']} | | failed: {r['error'][:80]} | | | | | |")
            continue
        diff = abs(r["exp_measured"] - r["exp_predicted"]) if r["exp_measured"] is not None else None
        load = " / ".join("-" if x is None else f"{x:.2f}" for x in r["load"])
        fastest = r.get("fastest")
        against = f"{fastest['time_mape']:.1f}%, {_number(fastest['exp_measured'])}" if fastest else "-"
        head.append(f"| {r['arch']} | {'yes' if r['held_out'] else 'no (dev)'} | {r['mode']} | {r['threads'] or device} | "
                    f"{r['dim']} | {r['time_mape']:.1f}% | {r['exp_measured']:.2f} / {r['exp_predicted']:.2f} | "
                    f"{diff:.2f} | {against} | {load} | {_speed(r)} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst = max(r["time_mape"] for r in ok)
        within = sum(1 for r in ok if _within(r["time_mape"], r["exp_measured"], r["exp_predicted"]))
        head += ["", f"{within} of {len(ok)} runs within 15% MAPE and 0.1 of the measured exponent; "
                     f"worst MAPE {worst:.1f}%"]
        fastest = [r for r in ok if r.get("fastest")]
        if fastest:
            within = sum(1 for r in fastest if _within(r["fastest"]["time_mape"], r["fastest"]["exp_measured"],
                                                       r["exp_predicted"]))
            head.append(f"against each point's fastest block: {within} of {len(fastest)}; worst MAPE "
                        f"{max(r['fastest']['time_mape'] for r in fastest):.1f}%")
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    sys.exit(main())
