"""Where a predicted step time differs from the measured one: predicted time per aten op against the
profiler's self time per aten op, for one architecture of time_accuracy_benchmark.py at one point.

Run by hand: `python scripts/time_breakdown.py decoder --dim batch=1 --dim seq=512 --hw cpu.toml
[--mode train] [--threads 1]`; any other model as costmodel takes one (a zoo name, hf:ORG/NAME,
FILE.py:FUNC with --input NAME:DTYPE[D0,...]). The profiler's own cost inflates small ops a little; the measured
step (no profiler) is printed above the table. Ops eager runs inside a composite (linear's addmm)
appear under their own names on both sides. With `--ops CLASS`, each op of that kernel class: its
prediction in parts (overhead, cold reads, evicted state, the kernel) beside its time in the model and
alone in a loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import sympy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from time_accuracy_benchmark import ARCHS

    from costmodel.api import analyze
    from costmodel.capture.specs import parse_dims
    from costmodel.errors import CostModelError
    from costmodel.hardware.catalog import load_hardware
    from costmodel.validate.engine import _Runner
    from costmodel.validate.stats import settle_heap, time_call

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("arch", help=f"one of {', '.join(a.name for a in ARCHS)}, or a model as costmodel takes one "
                                "(zoo name, hf:ORG/NAME, FILE.py:FUNC with --input)")
    p.add_argument("--input", action="append", default=[], help="NAME:DTYPE[D0,...] of a model outside ARCHS")
    p.add_argument("--dim", action="append", default=[])
    p.add_argument("--mode", default="inference")
    p.add_argument("--hw", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--by", choices=("op", "kernel"), default="op")
    p.add_argument("--ops", metavar="CLASS", help="instead: each op of this kernel class (prefix) timed in the "
                                                   "model and alone (random tensors of its shapes), against its "
                                                   "prediction and the parts of it")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    arch = next((a for a in ARCHS if a.name == args.arch), None)
    if arch is None:   # a model of the user's: its inputs from --input (or its defaults), sizes from --dim
        if not args.dim:
            p.error(f"{args.arch} is not one of the benchmark's architectures: give its sizes with --dim")
        arch = SimpleNamespace(name=args.arch, build=args.arch, inputs=args.input or None)
    dims = {d: v[0] for d, v in parse_dims(args.dim).items()} if args.dim else \
        {d: v[0] for d, v in (arch.dims if args.mode == "inference" else arch.train_dims).items()}
    try:
        hw = load_hardware(args.hw)
        rep = analyze(arch.build, inputs=arch.inputs, mode=args.mode, dims={d: [v] for d, v in dims.items()},
                      hardware=hw, complete=True)
    except CostModelError as e:
        p.error(str(e))
    pt = rep.evaluate(**dims)
    timing = pt.timing(hw)
    runner = _Runner(arch.build, rep, "cpu", torch.float32, args.mode, "adamw", "sum", False).runner
    settle_heap()    # as validate times it
    values = runner.values(dims)
    step = runner.step(values)
    if args.ops:
        return alone(pt, timing, args.ops, step, args.threads)
    pred, count = collections.Counter(), collections.Counter()
    for i, (op, t) in enumerate(zip(pt.ops, timing["op_times"])):
        key = pt.kernel_class(i, timing["hardware"]) if args.by == "kernel" else op["target"].replace("aten.", "aten::").rsplit(".", 1)[0]
        pred[key] += t.time_s
        count[key] += 1
    measured = time_call(step, repeats=5, warmup=2, min_time_s=1.0)
    iters = 3
    meas, mcount = collections.Counter(), collections.Counter()
    if args.threads == 1:
        # Each aten op's CPU time on this thread, in the model (its real cache state), by a
        # dispatch mode: other processes' time slices do not count, as they would in wall time.
        import time as _time

        def record(func, args, elapsed):
            key = "aten::" + func.overloadpacket.__name__ if func.namespace == "aten" else str(func)
            meas[key] += elapsed / iters
            mcount[key] += 1 / iters
        for _ in range(iters):
            with clocked(_time.thread_time, record):
                step()
        clock = "thread CPU time per op"
    else:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                step()
        for e in prof.key_averages():
            meas[e.key] += e.self_cpu_time_total / 1e6 / iters
            mcount[e.key] += e.count / iters
        clock = "profiled self time"
    print(f"{arch.name} {args.mode} at {dims}, {args.threads} threads: measured {measured.median_s * 1e3:.2f} ms "
          f"({clock} {sum(meas.values()) * 1e3:.2f} ms), predicted {pt.totals['time_s'] * 1e3:.2f} ms; "
          f"load {os.getloadavg()[0]:.2f}")
    keys = sorted(set(pred) | set(meas), key=lambda k: -max(pred.get(k, 0), meas.get(k, 0)))
    print(f"{'':48s} {'predicted':>10s} {'n':>5s}   {'measured':>10s} {'n':>6s}")
    for k in keys[:args.top]:
        print(f"{k[:48]:48s} {pred.get(k, 0) * 1e3:8.3f}ms {count.get(k, 0):5d}   "
              f"{meas.get(k, 0) * 1e3:8.3f}ms {mcount.get(k, 0):6.0f}")
    return 0


def clocked(clock, record):
    """A dispatch mode that times each aten call with `clock` and hands record(func, args, seconds)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clock(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = clock()
            out = func(*args, **(kwargs or {}))
            record(func, args, clock() - t0)
            return out
    return Clock()


def in_model_calls(step, threads: int, iters: int = 5) -> dict[tuple, list[float]]:
    """Each aten call's seconds in the model (its real cache state), by a dispatch-mode clock around
    the call (thread CPU time at one thread, wall time at more): {(op, its tensors' shapes):
    [the median over `iters` steps of the k-th such call in a step, for each k]}."""
    import statistics
    import time as _time

    clock = _time.thread_time if threads == 1 else _time.perf_counter
    runs: list[dict[tuple, list[float]]] = []

    def record(func, args, elapsed):
        runs[-1].setdefault(call_key(func, args), []).append(elapsed)
    step()
    for _ in range(iters):
        runs.append({})
        with clocked(clock, record):
            step()
    return {key: [statistics.median(r[key][k] for r in runs if len(r.get(key, ())) > k)
                  for k in range(max(len(r.get(key, ())) for r in runs))]
            for key in runs[-1]}


# ops the capture puts in a graph for an eager aten op on the same tensors (capture/rnn.py; their
# states [1, B, H] where eager's are [B, H])
EAGER_OP = {"costmodel.onednn_lstm_layer.default": "aten.mkldnn_rnn_layer.default",
            "costmodel.onednn_lstm_layer_backward.default": "aten.mkldnn_rnn_layer_backward.default"}


def _squeezed(shapes: tuple) -> tuple:
    """Shapes without their leading 1s (a state the capture passes as [1, B, H], eager as [B, H])."""
    out = []
    for shape in shapes:
        while shape and shape[0] == 1:
            shape = shape[1:]
        out.append(shape)
    return tuple(out)


def call_key(func, args) -> tuple:
    """An aten call's op and the shapes of its tensor arguments (nested lists flattened)."""
    shapes = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            shapes.append(tuple(x.shape))
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(args)
    return str(func), tuple(shapes)


def alone(pt, timing, prefix: str, step, threads: int) -> int:
    """Each op of the class: its predicted time and the parts of it (overhead, cold reads, evicted
    state: `OpTime`), its time in the model (the k-th call of its op and shapes in the step) and
    alone (its shapes, random data, in a loop)."""
    import dataclasses

    from costmodel.hardware.calibrate_kernels import Timer, kernel_plan
    from costmodel.validate.stats import minor_faults
    nodes = {n.name: n for n in pt.analysis.captured.graph.graph.nodes}
    timer = Timer("cpu", dataclasses.replace(kernel_plan("cpu", quick=True), block_s=0.004, blocks=7))
    model = in_model_calls(step, threads)
    seen = collections.Counter()

    captured = pt.analysis.captured

    def hint_int(s):   # a size at the point's dims (the trace's own hints are its example sizes)
        if isinstance(s, int):
            return s
        expr = sympy.sympify(captured.to_user(s))
        value = sympy.sympify(expr.xreplace({x: pt.dims[x.name] for x in expr.free_symbols if x.name in pt.dims}))
        return int(value) if value.is_number else int(s.node.hint)

    def real(x):
        if isinstance(x, torch.fx.Node):
            x = x.meta.get("val")
        if isinstance(x, torch.Tensor):   # the graph's shape and strides (a transposed view stays one)
            shape, stride = [hint_int(s) for s in x.shape], [hint_int(s) for s in x.stride()]
            # filled through its storage: an expanded view (stride 0) has elements that share one
            storage = torch.empty(1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0), dtype=x.dtype)
            if x.dtype.is_floating_point:
                storage.normal_()
            else:
                storage.fill_(x.dtype == torch.bool)
            return storage.as_strided(shape, stride)
        if isinstance(x, torch.SymInt):
            return hint_int(x)
        if isinstance(x, (list, tuple)):
            return type(x)(real(v) for v in x)
        return x
    print(f"{'op':28s} {'class':24s} {'predicted':>9s} = {'overhead':>8s} + {'cold':>6s} + {'evicted':>7s} + "
          f"{'rest':>7s}   {'in model':>8s} {'alone':>8s} (ms)")
    totals = collections.Counter()
    for i, (op, t) in enumerate(zip(pt.ops, timing["op_times"])):
        kernel = pt.kernel_class(i, timing["hardware"])
        if not kernel.startswith(prefix) or op["name"] not in nodes:
            continue
        node = nodes[op["name"]]
        args, kwargs = real(list(node.args)), {k: real(v) for k, v in node.kwargs.items()}
        key = call_key(node.target, args)
        if str(node.target) in EAGER_OP:   # the capture's own op for an aten op eager runs on the same tensors
            name, shapes = EAGER_OP[str(node.target)], _squeezed(key[1])
            key = next((k for k in model if k[0] == name and _squeezed(k[1]) == shapes), key)
        calls = model.get(key, [])
        in_model = calls[seen[key]] if seen[key] < len(calls) else float("nan")
        seen[key] += 1
        try:
            f0, c0 = minor_faults() or 0, timer.calls
            measured = timer(lambda: node.target(*args, **kwargs))
            faults = ((minor_faults() or 0) - f0) / max(1, timer.calls - c0)
        except Exception as e:   # noqa: BLE001 - a diagnostic: say it and go on
            print(f"{op['name']}: could not run alone: {e}")
            continue
        rest = t.time_s - t.overhead_s - t.cold_s - t.evicted_s
        parts = {"predicted": t.time_s, "overhead": t.overhead_s, "cold": t.cold_s, "evicted": t.evicted_s,
                 "rest": rest, "in model": in_model, "alone": measured}
        totals.update({k: v for k, v in parts.items() if v == v})
        feats = {k: round(v, 2) if isinstance(v, float) and v < 10 else int(v)
                 for k, v in pt.features[i].items() if v}
        print(f"{op['name'][:28]:28s} {kernel[:24]:24s} {t.time_s * 1e3:9.3f} = {t.overhead_s * 1e3:8.3f} + "
              f"{t.cold_s * 1e3:6.3f} + {t.evicted_s * 1e3:7.3f} + {rest * 1e3:7.3f}   {in_model * 1e3:8.3f} "
              f"{measured * 1e3:8.3f}  {faults:4.0f} faults/call {feats}")
    print("total: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
