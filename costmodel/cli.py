"""The `costmodel` command: argparse -> the API -> render. The only module that prints or exits.

Exit codes: 0 success, 1 the analysis failed, 2 bad usage. Results on stdout, warnings on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import warnings

from costmodel.capture.loss import LOSSES
from costmodel.capture.specs import MODEL_DTYPES, parse_dims, parse_size
from costmodel.errors import CostModelError, UsageError
from costmodel.options import DEVICE_KINDS, KV_DTYPES, MODES
from costmodel.rules.attention import ATTENTION_CHOICES
from costmodel.rules.optimizer import OPTIMIZERS

FORMATS = ("table", "json", "csv", "markdown")

EXAMPLES = """examples:
  costmodel analyze gpt2 --dim batch=8 --dim seq=1024 --hw a100-80gb
  costmodel analyze llama-2-7b --mode train --dtype bfloat16 --dim batch=1 --dim seq=512,1024,2048 --format json
  costmodel analyze resnet-50 --dim batch=16                      (height and width default to 224)
  costmodel analyze my_models.py:build --input "x:float32[batch,3,height,width]" --dim batch=16 --dim height=224 --dim width=224
  costmodel analyze hf:meta-llama/Meta-Llama-3-8B --dim batch=1 --dim seq=8192 --hw h100-sxm
  costmodel analyze my_models.py:classifier --mode train --loss cross-entropy --target "labels:int64[batch]" --dim batch=32
  costmodel fit llama-2-7b --hw a100-80gb --max seq --dim batch=1
  costmodel analyze llama-2-7b --mode generate --dtype bfloat16 --dim batch=1,64 --dim prompt=4096 --dim gen=128 --hw a100-80gb
  costmodel fit llama-2-7b --mode generate --dtype bfloat16 --hw a100-80gb --max batch --dim prompt=4096 --dim gen=128
  costmodel validate gpt2 --device cpu --dim batch=1 --dim seq=128,256,512
  costmodel analyze llama-2-7b --mode train --dtype bfloat16 --dim batch=1 --dim seq=4096 --hw a100-80gb --parallel fsdp=8 --checkpointing selective
  costmodel plan llama-2-7b --hw a100-80gb --gpus 8 --dim batch=1 --dim seq=4096
  costmodel validate my_models.py:build --mode train --device cpu --dim batch=2 --dim seq=256 --parallel fsdp=2
  costmodel hardware show h100-sxm
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"costmodel: error: {message}", file=sys.stderr)
        sys.exit(2)


def _sub(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help, epilog=EXAMPLES,
                          formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (see `costmodel zoo`), hf:ORG/NAME (its config.json only), a config.json "
                                 "or a directory holding one, FILE.py:FUNC or package.module:FUNC")
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="NAME:DTYPE[D0,D1,...], e.g. input_ids:int64[batch,seq]; repeat for several inputs "
                        "(zoo models and configs have defaults)")
    p.add_argument("--target", action="append", default=[], metavar="SPEC",
                   help="a training target, not a forward() argument, e.g. labels:int64[batch] for "
                        "--loss cross-entropy (language models default to their next token)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=V[,V...]",
                   help="value(s) of a named dimension; a comma list is a sweep")
    p.add_argument("--mode", default="inference", choices=MODES,
                   help="default: inference; generate: a prefill of `prompt` tokens, then `gen` decode steps with a "
                        "KV cache (dimensions batch, prompt, gen)")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES, help="default: float32")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="train mode; default: adamw")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: float32 weights and optimizer, bfloat16 autocast compute")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="SDPA kernel; default auto: the one PyTorch picks on --device")
    p.add_argument("--loss", default="sum", choices=LOSSES,
                   help="train mode: sum of the first output (default), or cross-entropy against --target")
    p.add_argument("--moe-imbalance", type=float, default=1.0, metavar="F",
                   help="mixture-of-experts: the busiest expert's load over the mean (default: 1, balanced)")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                   help="--mode generate: the KV cache's dtype (default: --dtype)")
    p.add_argument("--format", default="table", choices=FORMATS, help="default: table")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a Hugging Face config's auto_map run the repository's Python code (off by default)")


def _parallel_args(p: argparse.ArgumentParser, plan: bool = False) -> None:
    from costmodel.capture.checkpointing import CHECKPOINTING
    g = p.add_argument_group("parallel training (--mode train)")
    if not plan:
        g.add_argument("--parallel", metavar="dp=N,fsdp=N,tp=N,pp=N",
                       help="degrees (any subset; default 1); world size = their product")
        g.add_argument("--zero", type=int, default=0, choices=(0, 1, 2),
                       help="ZeRO sharding over dp: 1 optimizer state, 2 and gradients; default: 0")
        g.add_argument("--microbatches", type=int, default=1, metavar="M",
                       help="gradient-accumulation / pipeline micro-batches per step; default: 1")
        g.add_argument("--sequence-parallel", action="store_true",
                       help="with tp: Megatron sequence parallelism (norms and dropout sharded over tp)")
        g.add_argument("--pp-interleave", type=int, default=1, metavar="V",
                       help="with pp: model chunks per stage (interleaved 1F1B); default: 1")
        g.add_argument("--checkpointing", default="none", choices=CHECKPOINTING,
                       help="activation checkpointing of the repeated blocks: blocks = full recomputation, "
                            "selective = Megatron's (attention core), ops = keep matmul outputs; default: none")
    g.add_argument("--master-weights", action="store_true",
                   help="float16/bfloat16 weights with float32 master weights, gradients and optimizer state "
                        "(Megatron-LM's mixed precision; with fsdp: MixedPrecisionPolicy)")


def _parallel_kwargs(args) -> dict:
    return {"parallel": getattr(args, "parallel", None), "zero": getattr(args, "zero", 0),
            "microbatches": getattr(args, "microbatches", 1),
            "sequence_parallel": getattr(args, "sequence_parallel", False),
            "pp_interleave": getattr(args, "pp_interleave", 1), "checkpointing": getattr(args, "checkpointing", "none"),
            "master_weights": getattr(args, "master_weights", False)}


def _device_arg(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> None:
    p.add_argument("--device", choices=DEVICE_KINDS, default=None, required=required,
                   help=help or "whose kernels the costs and memory model (attention kernel, dropout masks); "
                                "default: the kind of the first --hw device, else cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="costmodel", description="Static FLOPs, bytes, memory and roofline time of PyTorch "
                                                   "models, as formulas in the dimensions you name.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    a = _sub(sub, "analyze", "capture a model and cost every op")
    _model_args(a)
    a.add_argument("--hw", help="device name(s) from `costmodel hardware list`, comma separated, or a .toml path")
    _device_arg(a)
    a.add_argument("--tf32", action="store_true", help="float32 matmuls run on TF32 tensor cores")
    a.add_argument("--by", default="module", choices=("op", "module"), help="the roll-up to print; default: module")
    a.add_argument("--depth", type=int, default=2, help="module path components in the roll-up; default: 2")
    a.add_argument("--top", type=int, default=10, help="rows in the top-ops table; default: 10")
    a.add_argument("--plot", help="write a roofline chart (PNG/SVG/PDF) of the last point on the first --hw")
    _parallel_args(a)

    f = _sub(sub, "fit", "largest value of a dimension whose peak memory fits a device")
    _model_args(f)
    f.add_argument("--hw", required=True, help="device name or .toml path")
    _device_arg(f, help="whose kernels the memory model assumes; default: the kind of the --hw device")
    f.add_argument("--max", required=True, metavar="DIM", help="the dimension to maximise")
    f.add_argument("--capacity", help="usable memory: bytes or with a unit (10GB, 80GiB, 500MiB); default: the "
                                      "device's, less the CUDA context and fragmentation reserve")
    _parallel_args(f)

    pl = _sub(sub, "plan", "the ways to train on N GPUs (dp x fsdp x tp x pp, ZeRO, checkpointing, micro-batches): "
                           "those that fit, fastest first")
    _model_args(pl)
    pl.set_defaults(mode="train")
    pl.add_argument("--hw", required=True, help="device name or .toml path (its memory and interconnect)")
    pl.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    pl.add_argument("--top", type=int, default=10, help="plans listed; default: 10")
    pl.add_argument("--capacity", help="usable memory per GPU: bytes or with a unit; default: the device's, less "
                                       "the CUDA context and fragmentation reserve")
    pl.add_argument("--checkpointing", default="none,selective,blocks",
                    help="checkpointing modes tried, comma separated; default: none,selective,blocks")
    _parallel_args(pl, plan=True)

    v = _sub(sub, "validate", "run the real model at several sizes and compare with the prediction")
    _model_args(v)
    _device_arg(v, required=True, help="where the real model runs")
    v.add_argument("--hw", help="device spec for the predicted time (default: calibrate the local device)")
    v.add_argument("--plot", help="write a log-log plot of measured vs predicted (PNG/SVG/PDF)")
    v.add_argument("--repeats", type=int, default=5,
                   help="timed steps per point, at least (more while under half a second); default: 5")
    v.add_argument("--rounds", type=int, default=3,
                   help="passes over the sweep the timing is spread across (a point's time is the median of "
                        "all its steps; at most --repeats passes); default: 3")
    _parallel_args(v)

    h = _sub(sub, "hardware", "the device catalog")
    hs = h.add_subparsers(dest="hw_command", parser_class=_Parser)
    hl = hs.add_parser("list", help="every device: memory, bandwidth, peaks, interconnect")
    hl.add_argument("--format", default="table", choices=("table", "json"))
    hsh = hs.add_parser("show", help="one device with its ridge points and sources")
    hsh.add_argument("device")
    hsh.add_argument("--format", default="table", choices=("table", "json"))
    hc = hs.add_parser("calibrate", help="measure this machine into a device file")
    hc.add_argument("--device", required=True, choices=DEVICE_KINDS)
    hc.add_argument("--out", required=True, help="the .toml file to write")
    hc.add_argument("--quick", action="store_true", help="small sizes (a few seconds; for tests, not for predictions)")
    hc.add_argument("--name", help="the device's name in the file; default: calibrated-DEVICE")

    z = sub.add_parser("zoo", help="the built-in models")
    z.add_argument("--format", default="table", choices=("table", "json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:       # bad usage (exit 2) or --help (exit 0): a return code, as for errors
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    _quiet_libraries()
    _user_path()
    try:
        text = COMMANDS[args.command](args)
    except CostModelError as e:
        print(f"costmodel: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an internal error: one paragraph, the traceback only on request
        if os.environ.get("COSTMODEL_DEBUG"):
            raise
        print(f"costmodel: internal error: {type(e).__name__}: {e} (set COSTMODEL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _quiet_libraries() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"costmodel: warning: {message}", file=sys.stderr)
    warnings.showwarning = show
    for noisy in ("torch", "transformers"):
        warnings.filterwarnings("ignore", module=noisy)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _user_path() -> None:
    """`package.module:FUNC` from the project folder: the current folder on the path, as `python -m`
    puts it there."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


class _Progress:
    """Elapsed seconds on a terminal while a long step runs (a capture of a large model takes tens
    of seconds): `with _Progress("capturing llama-2-70b (train)"): ...`. Nothing when stderr is not a TTY."""

    def __init__(self, label: str, after_s: float = 1.0):
        self.label, self.after_s = label, after_s
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        start = time.monotonic()
        shown = False
        while not self._stop.wait(0.5):
            elapsed = time.monotonic() - start
            if elapsed >= self.after_s:
                sys.stderr.write(f"\r{self.label}... {elapsed:.0f} s")
                sys.stderr.flush()
                shown = True
        if shown:
            sys.stderr.write("\r" + " " * (len(self.label) + 16) + "\r")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


def _analyze(args, dims: dict[str, list[int]], hardware=None, complete: bool = True):
    from costmodel.api import analyze
    with _Progress(f"capturing {args.model} ({args.mode})"):
        return analyze(args.model, inputs=args.input or None, mode=args.mode, dtype=args.dtype,
                       optimizer=args.optimizer, attention=args.attention, loss=args.loss, dims=dims,
                       hardware=hardware, tf32=getattr(args, "tf32", False), complete=complete, amp=args.amp,
                       device=getattr(args, "device", None), trust_remote_code=args.trust_remote_code,
                       moe_imbalance=args.moe_imbalance, targets=args.target or None, kv_dtype=args.kv_dtype,
                       **_parallel_kwargs(args))


def cmd_analyze(args) -> str:
    from costmodel.render import csv as csv_render
    from costmodel.render import json as json_render
    from costmodel.render import text
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be >= 1; got {args.depth}")
    dims = parse_dims(args.dim)
    rep = _analyze(args, dims, hardware=args.hw)
    valued = {d: v for d, v in dims.items() if v} | {d: [v] for d, v in rep.defaulted.items()}
    points = rep.points(valued) if valued else []
    if points and rep.hardware:
        with _Progress("searching the largest sizes that fit"):
            for p in points:
                p.verdict()
    if args.plot:
        if not points or not rep.hardware:
            raise UsageError("--plot draws a roofline of a concrete point on a device: give --dim values and --hw")
        from costmodel.render.roofline_plot import point_roofline_plot
        if rep.mode == "generate":       # the decode step at the last context: what a token costs
            point_roofline_plot(rep.decode, points[-1].decode_point(), args.plot)
        else:
            point_roofline_plot(rep, points[-1], args.plot)
    comparison = points[-1].compare(rep.hardware) if points and len(rep.hardware) > 1 else None
    if args.format == "json":
        out = json.loads(json_render.to_json(rep, points, args.depth))
        if comparison:
            out["comparison"] = comparison
        return json.dumps(out, indent=2)
    if args.format == "csv":
        return csv_render.to_csv(rep, points)
    out = text.to_table(rep, points, args.depth, args.top, args.by, "github" if args.format == "markdown" else "simple")
    if comparison:
        out += text.comparison_text(comparison)
    if args.plot:
        what = "of the last decode step " if rep.mode == "generate" else ""
        out += f"\nroofline chart {what}written to {args.plot}\n"
    return out


def cmd_fit(args) -> str:
    from costmodel.hardware.catalog import load_hardware
    from costmodel.render.text import fit_text
    if args.format not in ("table", "json"):
        raise UsageError(f"fit prints a table or JSON; got --format {args.format}")
    dims = parse_dims(args.dim)
    if args.max in dims:
        raise UsageError(f"--max {args.max} is solved for; do not also give --dim {args.max}")
    fixed = {}
    for d, v in dims.items():
        if len(v) != 1:
            raise UsageError(f"fit takes one value per fixed dimension; got --dim {d}={','.join(map(str, v))}")
        fixed[d] = v[0]
    hw = load_hardware(args.hw)
    rep = _analyze(args, {d: [v] for d, v in fixed.items()}, hardware=hw, complete=False)
    fixed = {**{d: v for d, v in rep.default_sizes.items()
                if d in rep.dims and d != args.max and d not in fixed}, **fixed}
    capacity = parse_size(args.capacity, "--capacity") if args.capacity else None
    with _Progress(f"searching the largest {args.max} that fits"):
        result = rep.fit(args.max, fixed, hw, capacity_bytes=capacity)
    if args.format == "json":
        return json.dumps(result, indent=2, default=str)
    return fit_text(rep, hw, result)


def cmd_plan(args) -> str:
    from costmodel.plan import plan
    from costmodel.render.text import plan_text
    if args.mode != "train":
        raise UsageError(f"plan lays out a training step; it takes --mode train, got --mode {args.mode}")
    if args.format not in ("table", "json", "markdown"):
        raise UsageError(f"plan prints a table, Markdown or JSON; got --format {args.format}")
    if args.top < 1:
        raise UsageError(f"--top must be >= 1; got {args.top}")
    from costmodel.capture.checkpointing import check
    modes = tuple(check(m.strip()) for m in args.checkpointing.split(",") if m.strip())
    dims = {}
    for d, v in parse_dims(args.dim).items():
        if len(v) != 1:
            raise UsageError(f"plan takes one value per dimension; got --dim {d}={','.join(map(str, v))}")
        dims[d] = v[0]
    capacity = parse_size(args.capacity, "--capacity") if args.capacity else None
    progress = _Progress("planning")
    with progress:
        result = plan(args.model, hardware=args.hw, gpus=args.gpus, dims=dims, inputs=args.input or None,
                      dtype=args.dtype, optimizer=args.optimizer, attention=args.attention, loss=args.loss,
                      amp=args.amp, targets=args.target or None, master_weights=args.master_weights,
                      checkpointing=modes, capacity_bytes=capacity, trust_remote_code=args.trust_remote_code)
    if args.format == "json":
        return json.dumps(result, indent=2, default=str)
    return plan_text(result, args.top, "github" if args.format == "markdown" else "simple")


def _validate_parallel(args, dims: dict[str, list[int]]) -> str:
    from costmodel.api import analyze
    from costmodel.validate.distributed import compare
    if args.device != "cpu":
        raise UsageError("validate --parallel runs gloo ranks on the CPU; it takes --device cpu")
    if args.mode != "train":
        raise UsageError(f"validate --parallel runs a training step; it takes --mode train, got --mode {args.mode}")
    names = list(dims)
    points = [dict(zip(names, values)) for values in itertools.product(*(dims[d] for d in names))]
    report = analyze(args.model, inputs=args.input or None, mode="train", dtype=args.dtype, optimizer=args.optimizer,
                     attention=args.attention, loss=args.loss, device="cpu", trust_remote_code=args.trust_remote_code,
                     targets=args.target or None, **_parallel_kwargs(args))
    out = []
    for point in points:
        with _Progress(f"running {report.options.parallel} at {point}"):
            ranks = compare(report, point)
        out.append({"dims": point, "ranks": [r.to_dict() for r in ranks]})
    if args.format == "json":
        return json.dumps({"parallel": str(report.options.parallel), "points": out}, indent=2)
    from costmodel.render.text import parallel_validation_text
    return parallel_validation_text(report, out, "github" if args.format == "markdown" else "simple")


def cmd_validate(args) -> str:
    from costmodel.validate.engine import DEVICES, validate
    if args.format not in ("table", "json", "markdown", "csv"):
        raise UsageError(f"unknown --format {args.format!r}")
    if args.device not in DEVICES:
        raise UsageError(f"unknown --device {args.device!r}; accepted: {', '.join(DEVICES)}")
    dims = parse_dims(args.dim)
    if not dims:
        raise UsageError("validate needs the sizes to run at: --dim NAME=V1,V2,... (e.g. --dim seq=128,256,512)")
    if args.parallel or args.zero or args.microbatches != 1 or args.checkpointing != "none" or args.master_weights:
        return _validate_parallel(args, dims)
    if args.plot:
        from costmodel.render.validation_plot import check_plot_path
        check_plot_path(args.plot)
    result = validate(args.model, inputs=args.input or None, dims=dims, device=args.device, mode=args.mode,
                      dtype=args.dtype, optimizer=args.optimizer, attention=args.attention, loss=args.loss,
                      amp=args.amp, hardware=args.hw, repeats=args.repeats, rounds=args.rounds,
                      progress=args.format != "json",
                      trust_remote_code=args.trust_remote_code, targets=args.target or None, kv_dtype=args.kv_dtype)
    if args.plot:
        from costmodel.render.validation_plot import validation_plot
        validation_plot(result, args.plot)
    if args.format == "json":
        return result.to_json()
    if args.format == "csv":
        return result.to_csv()
    out = result.to_table("github" if args.format == "markdown" else "simple")
    if args.plot:
        out += f"\nlog-log plot written to {args.plot}\n"
    return out


def cmd_hardware(args) -> str:
    from costmodel.hardware.catalog import list_hardware, load_hardware
    from costmodel.render.text import hardware_list_text, hardware_show_text
    if args.hw_command is None:
        raise UsageError("hardware needs a subcommand: list, show DEVICE, or calibrate --device cpu|cuda --out FILE")
    if args.hw_command == "calibrate":
        from costmodel.hardware.calibrate import calibrate
        from costmodel.render.units import num
        start = time.perf_counter()
        with _Progress(f"calibrating {args.device}"):
            hw = calibrate(args.device, args.out, quick=args.quick, name=args.name)
        peaks = ", ".join(f"{d} {num(p, 'FLOP/s')}" for d, p in hw.peak_flops_per_s.items())
        return (f"wrote {args.out}: {hw.name}, {len(hw.kernels)} kernel classes measured in "
                f"{time.perf_counter() - start:.0f} s" + (f" at {hw.threads} CPU threads" if hw.threads else "")
                + f"; matmul peaks {peaks}, bandwidth {num(hw.bandwidth_bytes_per_s, 'B/s')}; "
                f"use it with --hw {args.out}")
    if args.hw_command == "list":
        devices = list_hardware()
        if args.format == "json":
            return json.dumps([d.to_dict() for d in devices], indent=2)
        return hardware_list_text(devices)
    hw = load_hardware(args.device)
    if args.format == "json":
        return json.dumps(hw.to_dict(), indent=2)
    return hardware_show_text(hw)


def cmd_zoo(args) -> str:
    from costmodel.capture.zoo import ZOO
    from costmodel.render.text import zoo_text
    if args.format == "json":
        return json.dumps([{"name": m.name, "params": m.params, "inputs": list(m.inputs),
                            "default_dims": m.default_dims, "description": m.description} for m in ZOO.values()],
                          indent=2)
    return zoo_text(ZOO.values())


COMMANDS = {"analyze": cmd_analyze, "fit": cmd_fit, "plan": cmd_plan, "validate": cmd_validate,
            "hardware": cmd_hardware, "zoo": cmd_zoo}

if __name__ == "__main__":
    sys.exit(main())
