"""The `costmodel` command: a thin shell over the API. The only module that prints or exits.

Exit codes: 0 success, 1 the analysis failed, 2 bad usage. Results on stdout, warnings on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from .errors import CostModelError, UsageError

FORMATS = ("table", "json", "csv", "markdown")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"costmodel: error: {message}", file=sys.stderr)
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (see `costmodel zoo`), hf:ORG/NAME (its config.json only), a config.json "
                                 "or a directory holding one, FILE.py:FUNC or package.module:FUNC")
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="NAME:DTYPE[D0,D1,...], e.g. input_ids:int64[batch,seq] (zoo models and configs have defaults)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=V[,V...]",
                   help="value(s) of a named dimension; a comma list is a sweep")
    p.add_argument("--mode", default="inference", help="inference | train")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--optimizer", default="adamw", help="adamw | adam | sgd | sgd-momentum | adafactor")
    p.add_argument("--amp", action="store_true", help="mixed precision: float32 master weights, bf16/fp16 compute")
    p.add_argument("--attention", default="auto", help="auto | math | flash | efficient")
    p.add_argument("--loss", default="sum", help="sum | cross-entropy")
    p.add_argument("--moe-imbalance", type=float, default=1.0, metavar="F",
                   help="mixture-of-experts: the busiest expert's load over the mean (default 1: balanced)")
    p.add_argument("--format", default="table", help="table | json | csv | markdown")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a Hugging Face config's auto_map run the repository's Python code (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="costmodel", description="Static FLOPs, bytes, memory and roofline time of PyTorch "
                                                   "models, as formulas in the dimensions you name.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    a = sub.add_parser("analyze", help="capture a model and cost every op")
    _model_args(a)
    a.add_argument("--hw", help="device name(s) from `costmodel hardware list`, comma separated, or a .toml path")
    a.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="whose kernels the memory and bytes model (attention kernel, dropout masks); "
                        "default: the kind of the first --hw device, else cuda")
    a.add_argument("--tf32", action="store_true", help="float32 matmuls run on TF32 tensor cores")
    a.add_argument("--by", default="module", help="op | module: the roll-up to print")
    a.add_argument("--depth", type=int, default=2, help="module path components in the roll-up (default 2)")
    a.add_argument("--top", type=int, default=10, help="rows in the top-ops table")
    a.add_argument("--plot", help="write a roofline chart (PNG/SVG/PDF) of the last point on the first --hw")

    f = sub.add_parser("fit", help="largest value of a dimension whose peak memory fits a device")
    _model_args(f)
    f.add_argument("--hw", required=True, help="device name or .toml path")
    f.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="whose kernels the memory model assumes; default: the kind of the --hw device")
    f.add_argument("--max", required=True, metavar="DIM", help="the dimension to maximise")
    f.add_argument("--capacity", type=float, help="usable bytes (default: the device's, less the reserve)")

    v = sub.add_parser("validate", help="run the real model at several sizes and compare with the prediction")
    _model_args(v)
    v.add_argument("--device", required=True, help="cpu | cuda")
    v.add_argument("--hw", help="device spec for the predicted time (default: calibrate the local device)")
    v.add_argument("--plot", help="write a log-log plot of measured vs predicted")
    v.add_argument("--repeats", type=int, default=5)

    h = sub.add_parser("hardware", help="the device catalog")
    hs = h.add_subparsers(dest="hw_command", parser_class=_Parser)
    hl = hs.add_parser("list")
    hl.add_argument("--format", default="table")
    hsh = hs.add_parser("show")
    hsh.add_argument("device")
    hsh.add_argument("--format", default="table")
    hc = hs.add_parser("calibrate")
    hc.add_argument("--device", required=True, help="cpu | cuda")
    hc.add_argument("--out", required=True, help="the .toml file to write")
    hc.add_argument("--quick", action="store_true", help="small sizes (a few seconds; for tests, not for predictions)")
    hc.add_argument("--name", help="the device's name in the file (default calibrated-DEVICE)")

    sub.add_parser("zoo", help="the built-in models").add_argument("--format", default="table")
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


def _check_format(fmt: str, allowed=FORMATS) -> str:
    if fmt not in allowed:
        raise UsageError(f"unknown --format {fmt!r}; accepted: {', '.join(allowed)}")
    return fmt


def _analyze_report(args, dims: dict[str, list[int]], hardware=None, tf32=False, complete=True):
    from .api import analyze
    return analyze(args.model, inputs=args.input or None, mode=args.mode, dtype=args.dtype,
                   optimizer=args.optimizer, attention=args.attention, loss=args.loss, dims=dims,
                   hardware=hardware, tf32=tf32, complete=complete, amp=args.amp,
                   device=getattr(args, "device", None), trust_remote_code=args.trust_remote_code,
                   moe_imbalance=args.moe_imbalance)


def cmd_analyze(args) -> str:
    from . import report as fmt
    from .specs import parse_dims
    _check_format(args.format)
    if args.by not in ("op", "module"):
        raise UsageError(f"unknown --by {args.by!r}; accepted: op, module")
    if args.depth is not None and args.depth < 1:
        raise UsageError(f"--depth must be >= 1; got {args.depth}")
    dims = parse_dims(args.dim)
    rep = _analyze_report(args, dims, hardware=args.hw, tf32=args.tf32)
    valued = {d: v for d, v in dims.items() if v}
    points = []
    if valued:
        points = rep.points(valued)
    if points and rep.hardware:
        _oom_verdicts(rep, points)
    if args.plot:
        if not points or not rep.hardware:
            raise UsageError("--plot draws a roofline of a concrete point on a device: give --dim values and --hw")
        _roofline_plot(rep, points[-1], args.plot)
    comparison = _comparison(rep, points[-1]) if points and len(rep.hardware) > 1 else None
    if args.format == "json":
        text = fmt.to_json(rep, points, args.depth)
        if comparison:
            data = json.loads(text)
            data["comparison"] = comparison
            text = json.dumps(data, indent=2)
        return text
    if args.format == "csv":
        return fmt.to_csv(rep, points)
    text = fmt.to_table(rep, points, args.depth, args.top, args.by, "github" if args.format == "markdown" else "simple")
    if comparison:
        from tabulate import tabulate
        text += "\nDevices compared at the last point\n" + tabulate(
            [[c["device"], fmt._time(c["time_s"]), f"{(c['memory_bound_share'] or 0) * 100:.0f}%",
              f"{(c['mfu'] or 0) * 100:.0f}%"] for c in comparison],
            headers=["device", "time", "memory-bound", "MFU"]) + "\n"
    if args.plot:
        text += f"\nroofline chart written to {args.plot}\n"
    return text


def _oom_verdicts(rep, points) -> None:
    """Does each point fit the first --hw device, and how far can each dimension grow at that point?"""
    from .fit import largest_fitting, verdict
    hw = rep.hardware[0]
    for p in points:
        v = verdict(rep, hw, p.dims)
        v["largest_fitting"] = {d: {**l.to_dict(), "description": l.describe()}
                                for d, l in largest_fitting(rep, hw, p.dims).items()}
        p.extra["oom"] = v


def _comparison(rep, point) -> list[dict]:
    rows = []
    for hw in rep.hardware:
        s = point.timing(hw, rep.tf32)["summary"]
        rows.append({"device": hw.name, "time_s": s.time_s, "memory_bound_share": s.memory_bound_share, "mfu": s.mfu})
    return rows


def _roofline_plot(rep, point, path: str) -> None:
    from .plot import roofline_plot
    hw = rep.hardware[0]
    t = point.timing(hw, rep.tf32)
    pts = [{"intensity": ot.intensity, "flops_per_s": ot.flops_per_s, "time_s": ot.time_s, "label": op["module"],
            "bound": ot.bound} for op, ot in zip(point.ops, t["op_times"]) if ot.time_s > 0]
    dtype = next((op["dtype"] for op in point.ops if op["category"] in ("matmul", "conv", "attention")), "float32")
    roofline_plot(hw, pts, path, dtype, tf32=rep.tf32, title=f"{rep.model} ({rep.mode}) on {hw.name}")


def cmd_fit(args) -> str:
    from .hardware import load_hardware
    from .specs import parse_dims
    _check_format(args.format, ("table", "json"))
    from .fit import fit
    dims = parse_dims(args.dim)
    if args.max in dims:
        raise UsageError(f"--max {args.max} is solved for; do not also give --dim {args.max}")
    fixed = {}
    for d, v in dims.items():
        if len(v) != 1:
            raise UsageError(f"fit takes one value per fixed dimension; got --dim {d}={','.join(map(str, v))}")
        fixed[d] = v[0]
    hw = load_hardware(args.hw)
    rep = _analyze_report(args, {d: [v] for d, v in fixed.items()}, hardware=hw, complete=False)
    result = fit(rep, hw, args.max, fixed, capacity_bytes=int(args.capacity) if args.capacity else None)
    if args.format == "json":
        return json.dumps(result, indent=2, default=str)
    from .report import _bytes
    reserve = result.get("reserve") or {}
    lines = [f"{rep.model} ({rep.mode}, {args.dtype}) on {hw.name}: {_bytes(result['capacity_bytes'])} usable"
             + (f" of {_bytes(result['memory_bytes'])}" if result.get("memory_bytes") else "")
             + (f" (reserved: {_bytes(reserve['context_bytes'])} CUDA context, "
                f"{reserve['fragmentation'] * 100:.0f}% fragmentation)"
                if reserve.get("context_bytes") is not None and reserve.get("fragmentation") is not None
                else " (--capacity)")]
    for d, v in result["max"].items():
        others = ", ".join(f"{k}={x}" for k, x in result.get("dims", {}).items() if k != d)
        limit = result["limit"]
        if limit["kind"] == "capacity":
            why = (f"at {d}={limit['next_value']}: {_bytes(limit['next_peak_bytes'])}, does not fit"
                   if limit.get("next_value") else "the next value does not fit")
        elif limit["kind"] == "model":
            why = f"the model's limit: {limit['reason']}" + (
                f"; memory alone allows {result['memory_only_value']}" if result.get("memory_only_value") else "")
        else:
            why = f"above {v} the model could not be captured: {limit['reason']}"
        lines.append(f"largest {d} that fits: {v}" + (f" at {others}" if others else "")
                     + f" (peak {_bytes(result['peak_memory_bytes'])}; {why})")
    if result.get("memory"):
        lines.append("at the peak: " + ", ".join(f"{k.replace('_', ' ')} {_bytes(b)}"
                                                 for k, b in sorted(result["memory"].items(), key=lambda kv: -kv[1]) if b))
    return "\n".join(lines)


def cmd_validate(args) -> str:
    from .validate import run_cli
    return run_cli(args)


def cmd_hardware(args) -> str:
    from tabulate import tabulate
    from .hardware import DTYPES, list_hardware, load_hardware
    from .report import _bytes, _num
    if args.hw_command is None:
        raise UsageError("hardware needs a subcommand: list, show DEVICE, or calibrate --device cpu|cuda --out FILE")
    if args.hw_command == "calibrate":
        from .calibrate import calibrate
        if args.device not in ("cpu", "cuda"):
            raise UsageError(f"unknown --device {args.device!r}; accepted: cpu, cuda")
        start = time.perf_counter()
        hw = calibrate(args.device, args.out, quick=args.quick, name=args.name)
        peaks = ", ".join(f"{d} {_num(p, 'FLOP/s')}" for d, p in hw.peak_flops_per_s.items())
        return (f"wrote {args.out}: {hw.name}, {len(hw.kernels)} kernel classes measured in "
                f"{time.perf_counter() - start:.0f} s"
                + (f" at {hw.threads} CPU threads" if hw.threads else "")
                + f"; matmul peaks {peaks}, bandwidth {_num(hw.bandwidth_bytes_per_s, 'B/s')}, "
                f"use it with --hw {args.out}")
    _check_format(args.format, ("table", "json"))
    if args.hw_command == "list":
        devices = list_hardware()
        if args.format == "json":
            return json.dumps([d.to_dict() for d in devices], indent=2)
        rows = [[d.name, _bytes(d.memory_bytes), _num(d.bandwidth_bytes_per_s, "B/s")]
                + [_num(d.peak_flops_per_s.get(t), "FLOP/s") for t in DTYPES]
                + [d.gpus_per_node, _num(d.intra_node_bandwidth_bytes_per_s, "B/s"),
                   _num(d.inter_node_bandwidth_bytes_per_s, "B/s")] for d in devices]
        return tabulate(rows, headers=["device", "memory", "bandwidth"] + list(DTYPES)
                        + ["GPUs/node", "intra-node", "inter-node/GPU"])
    hw = load_hardware(args.device)
    if args.format == "json":
        return json.dumps(hw.to_dict(), indent=2)
    d = hw.to_dict()
    rows = [[t, _num(d["peak_flops_per_s"].get(t), "FLOP/s"), f"{d['ridge_point'][t]:.1f}" if t in d["ridge_point"]
             else "-"] for t in DTYPES]
    head = (f"{hw.name}: {_bytes(hw.memory_bytes)}, {_num(hw.bandwidth_bytes_per_s, 'B/s')}, "
            f"kernel overhead {hw.kernel_overhead_s * 1e6:.1f} us\n"
            f"interconnect: {hw.gpus_per_node} GPUs per node; bus bandwidth "
            f"{_num(hw.intra_node_bandwidth_bytes_per_s, 'B/s')} inside a node, "
            f"{_num(hw.inter_node_bandwidth_bytes_per_s, 'B/s')} per GPU across nodes; latency "
            f"{hw.intra_node_latency_s * 1e6:.1f} us / {hw.inter_node_latency_s * 1e6:.1f} us per step\n")
    src = "\n".join(f"  {k}: {v}" for k, v in hw.sources.items())
    return head + tabulate(rows, headers=["dtype", "dense peak", "ridge (FLOP/byte)"]) + "\nsources:\n" + src


def cmd_zoo(args) -> str:
    from tabulate import tabulate
    from .zoo import ZOO
    _check_format(args.format, ("table", "json"))
    if args.format == "json":
        return json.dumps([{"name": m.name, "params": m.params, "inputs": list(m.inputs),
                            "description": m.description} for m in ZOO.values()], indent=2)
    return tabulate([[m.name, f"{m.params:,}", " ".join(m.inputs), m.description] for m in ZOO.values()],
                    headers=["model", "parameters", "default inputs", "description"])


COMMANDS = {"analyze": cmd_analyze, "fit": cmd_fit, "validate": cmd_validate, "hardware": cmd_hardware,
            "zoo": cmd_zoo}

if __name__ == "__main__":
    sys.exit(main())
