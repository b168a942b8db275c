"""The public API: `analyze()` captures a model once and returns a `Report`.

    >>> import costmodel
    >>> r = costmodel.analyze("gpt2", mode="inference")
    >>> r.symbolic.matmul_flops
    36864*batch*seq**2 + 247064064*batch*seq
    >>> r.evaluate(batch=1, seq=1024).totals["matmul_flops"]
    291648307200

A Report holds one or more analyses: the symbolic one, plus a recapture for every requested point
at which the first capture's guards fail (a model that pins or bounds a dimension), so a formula
is never evaluated where it does not hold.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import networkx as nx
import sympy
import torch

from costmodel.analysis import IN_DIMS, METRICS, Analysis, cost_graph, params_of, totals_of
from costmodel.capture import trace as cap
from costmodel.capture.limits import Limit, config_limits
from costmodel.capture.specs import InputSpec, parse_input
from costmodel.errors import AnalysisError, CaptureFailed, OutsideLimits, UsageError
from costmodel.formulas import Evaluator, degree
from costmodel.hardware.eager_backend import SLOW_CONV_CLASS, runs_native
from costmodel.hardware.kernels import (COLD_FEATURE, EVICTED_FEATURE, INPUTS_OUT_FEATURE, INTERLEAVED_FEATURE,
                                        LLC_EVICTED_FEATURE, PROBE_CLASSES)
from costmodel.memory import timeline as memory
from costmodel.options import Options
from costmodel.rules.attention import attention_kernels
from costmodel.rules.cost import OPTIMIZER
from costmodel.rules.optimizer import optimizer_ops
from costmodel.symbols import dim_symbol


def _per_sample(kernel: str, features: dict) -> dict:
    """Eager's native convolution runs one GEMM per sample: its table's m is one sample's output
    positions (calibrate measures it at batch 1), where the class's feature counts the batch's."""
    if not kernel.startswith(SLOW_CONV_CLASS) or not features.get(IN_DIMS[0]):
        return features
    return {**features, "m": features["m"] / features[IN_DIMS[0]]}


class Point:
    """Concrete figures at one point of the dimensions. `ops` (per-op figures) is computed on first
    access, so totals at a new point cost a few formula evaluations only."""

    def __init__(self, dims: dict[str, int], totals: dict, analysis: Analysis, op_values, report: "Report"):
        self.dims, self.totals, self.analysis, self.report = dims, totals, analysis, report
        self.extra: dict = {}
        self._op_values = op_values
        self._ops: list[dict] | None = None
        self._features: list[dict] | None = None
        self._read_bytes: list[list[float]] | None = None

    @property
    def ops(self) -> list[dict]:
        if self._ops is None:
            flat = self._op_values()
            n = len(METRICS)
            self._ops = [{"name": op.name, "target": op.target, "module": op.module, "phase": op.phase,
                          "category": op.category, "dtype": op.dtype, **dict(zip(METRICS, flat[i * n:(i + 1) * n])),
                          "intensity": None, "bound": None, "time_s": None}
                         for i, op in enumerate(self.analysis.ops)]
        return self._ops

    def __repr__(self) -> str:
        return f"Point(dims={self.dims}, totals={self.totals})"

    def modules(self, depth: int | None = None) -> list[dict]:
        """Figures per module path cut at `depth` components, largest FLOPs first."""
        rows = _rollup(self.ops, lambda op: {"module": _truncate(op["module"], depth)})
        return sorted(rows, key=lambda r: -r["flops"])

    @property
    def features(self) -> list[dict]:
        """Per op (same order as `ops`), its shape features at this point: {"m": 512, "n": 768, ...}."""
        if self._features is None:
            a = self.analysis
            keys = [(i, name) for i, op in enumerate(a.ops) for name in op.features]
            if a._feature_evaluator is None:
                a._feature_evaluator = Evaluator([a.ops[i].features[name] for i, name in keys], a.captured.dims)
            values = a._feature_evaluator({d: self.dims[d] for d in a.captured.dims}) if keys else []
            self._features = [{} for _ in a.ops]
            for (i, name), value in zip(keys, values):
                self._features[i][name] = value
        return self._features

    def kernel_class(self, i: int, hw=None) -> str:
        """The kernel class that prices op `i` on a calibrated device (costmodel/hardware/kernels.py).
        With `hw`, a CPU whose file measured eager's native convolution (conv.dense.slow): a dense
        convolution that eager runs natively at this point's sizes and `hw`'s threads is priced by
        that table (hardware/eager_backend.py), its gradient by the native gradient's
        (conv.dense.slow.backward, .backward.weight without the input's) where the file has it."""
        op = self.analysis.ops[i]
        if hw is None or op.conv_call is None:
            return op.kernel
        w_shape, stride, padding, dilation, transposed, output_padding, groups, backward = op.conv_call
        native = SLOW_CONV_CLASS + (".backward.weight" if ".backward.weight" in op.kernel
                                    else ".backward" if backward else "")
        table = hw.kernel_table(native, op.dtype)     # the class itself, not one its chain falls back to
        if table is None or table.kernel != native:
            return op.kernel
        features = self.features[i]
        x_shape = [features.get(name) for name in IN_DIMS]
        if any(v is None for v in x_shape) or not runs_native(x_shape, w_shape, stride, padding, dilation, transposed,
                                                              output_padding, groups, op.dtype, hw.threads):
            return op.kernel
        return native

    def timing(self, hw, tf32: bool = False) -> dict:
        """Roofline time on `hw`: per-op OpTimes (same order as `ops`) and their summary. A device
        with measured kernel tables prices each op by its class, what it reads the cache no longer
        holds, and eager's module calls (costmodel/hardware/roofline.py)."""
        from costmodel.hardware import roofline
        framework_s = 0.0
        if hw.kernels or hw.allocation:
            features = self.features
            kernels = [self.kernel_class(i, hw) for i in range(len(self.ops))]
            if hw.cache_bytes:
                features = self._with_cold_inputs(features, hw.cache_bytes)
            if hw.core_cache_bytes:
                features = self._with_evicted(features, hw.core_cache_bytes * (hw.threads or 1), hw.cache_bytes,
                                              kernels)
                features = self._with_inputs_out(features, hw.core_cache_bytes * (hw.threads or 1))
            times = [roofline.op_time(op["flops"], op["bytes"], op["category"], op["dtype"], hw, tf32,
                                      kernel=kernel, features=_per_sample(kernel, features[i]))
                     for i, (op, kernel) in enumerate(zip(self.ops, kernels))]
            framework_s = roofline.framework_time_s(self.analysis.captured.module_calls, hw)
        else:
            times = [roofline.op_time(op["flops"], op["bytes"], op["category"], op["dtype"], hw, tf32)
                     for op in self.ops]
        model_dtype = next((op["dtype"] for op in self.ops if op["category"] in ("matmul", "conv", "attention")),
                           "float32")
        summary = roofline.summarize(times, self.totals["matmul_flops"], hw, model_dtype, tf32, framework_s)
        return {"hardware": hw, "op_times": times, "summary": summary}

    def _with_cold_inputs(self, features: list[dict], cache_bytes: int) -> list[dict]:
        """Each op's features plus the bytes it reads that the cache no longer holds: all of a
        storage read for the first time in the step (a parameter; the rest of the step went through
        the cache since its last use), else the part that its own size plus the traffic since it
        was last written or read puts beyond `cache_bytes` (an activation the backward reads again
        is gone; an RNN's weight read every timestep stays). An optimizer update reads its
        parameter, gradient and state from memory."""
        out = []
        for record, op, f, (beyond, _) in zip(self.analysis.ops, self.ops, features, self._reads_beyond(cache_bytes)):
            if record.category == OPTIMIZER:
                cold = float(op["bytes_read"])
            else:   # no more than it reads: a gather (an embedding's lookup) reads rows of its table, not all of it
                cold = min(beyond, float(op["bytes_read"]))
            out.append({**f, COLD_FEATURE: cold} if cold else f)
        return out

    def _with_inputs_out(self, features: list[dict], core_bytes: int) -> list[dict]:
        """Each op's features plus INPUTS_OUT_FEATURE: the share of what it reads that is beyond
        the core caches (`core_bytes`, as `_with_cold_inputs` reckons it): an op reading what the
        op before it wrote has its inputs at hand, a backward reading a saved activation has not."""
        return [{**f, INPUTS_OUT_FEATURE: beyond / read if read else 1.0}
                for f, (beyond, read) in zip(features, self._reads_beyond(core_bytes))]

    def _reads_beyond(self, cache_bytes: int) -> list[tuple[float, float]]:
        """Per op, (bytes of its reads beyond `cache_bytes`, bytes of its reads): a storage read
        for the first time in the step is all beyond, else the part that its own size plus the
        traffic since it was last written or read puts beyond."""
        a = self.analysis
        if self._read_bytes is None:    # the sizes of each op's reads at this point, evaluated once
            keys = [(i, j) for i, record in enumerate(a.ops) for j in range(len(record.reads))]
            if a._reads_evaluator is None:
                a._reads_evaluator = Evaluator([a.ops[i].reads[j][1] for i, j in keys], a.captured.dims)
            values = a._reads_evaluator({d: self.dims[d] for d in a.captured.dims}) if keys else []
            self._read_bytes = [[] for _ in a.ops]
            for (i, _), value in zip(keys, values):
                self._read_bytes[i].append(float(value))
        out, seen, traffic = [], {}, 0.0
        for record, op, sizes in zip(a.ops, self.ops, self._read_bytes):
            beyond = sum(size if name not in seen else min(size, max(0.0, traffic - seen[name] + size - cache_bytes))
                         for (name, _), size in zip(record.reads, sizes))
            out.append((beyond, sum(sizes)))
            for name, _ in record.reads:
                seen[name] = traffic
            traffic += float(op["bytes"])
            if record.writes:
                seen[record.writes] = traffic
        return out

    def _with_evicted(self, features: list[dict], core_bytes: int, cache_bytes: int | None = None,
                      kernels: list[str] | None = None) -> list[dict]:
        """Each op's features, with EVICTED_FEATURE = 1 where the kernel's own working state is out
        of the core caches when it runs: its first call in the step, or more than `core_bytes` of
        traffic since the last call of the same class at the same FLOPs and bytes (another layer's
        call of it: evicted; the next timestep's of an RNN cell: not). For those, with a last-level
        cache of `cache_bytes`, LLC_EVICTED_FEATURE: the share of that cache the traffic since the
        last call displaced (a first call's: the step's traffic from the same call's last one in the
        step before), counting no more than the step's peak memory (the point's, where evaluated):
        1 in a training step that holds its activations, gradients and optimizer state past the
        cache; a fraction in an inference step whose activations reuse a few freed blocks.
        Every op with work whose class did not run last, INTERLEAVED_FEATURE: the distinct other
        classes since its class's last call (the step wraps round) over PROBE_CLASSES, at most 1:
        their code took the core's instruction cache and predictors from its own, as the
        calibration's probes measured after PROBE_CLASSES other ops (a recurrent cell's five
        classes repeating take half of that; a convolution after a batch norm and a ReLU, a fifth)."""
        if kernels is None:   # each op's class at this point (timing passes them, chosen with the device)
            kernels = [self.kernel_class(i) for i in range(len(self.ops))]
        keys = [(kernel, float(op["flops"]), float(op["bytes"])) for kernel, op in zip(kernels, self.ops)]
        final: dict[tuple, float] = {}    # the traffic when each key's last call in the step ends
        traffic = 0.0
        for key, op in zip(keys, self.ops):
            traffic += float(op["bytes"])
            final[key] = traffic
        step = traffic
        # what the traffic can have displaced is at most what the step holds: an inference step's
        # activations come and go in the same few freed blocks, a training step's stay (its peak)
        footprint = float(self.totals.get("peak_memory_bytes") or step)
        code = _code_shares([key[0] if op["flops"] or op["bytes"] else None for key, op in zip(keys, self.ops)])
        out, last, traffic = [], {}, 0.0
        for key, op, f, share in zip(keys, self.ops, features, code):
            first = key not in last
            since = step - final[key] + traffic if first else traffic - last[key]
            last[key] = traffic + float(op["bytes"])
            traffic += float(op["bytes"])
            if not (op["flops"] or op["bytes"]):
                out.append(f)
                continue
            if not (first or since > core_bytes):
                out.append({**f, INTERLEAVED_FEATURE: share} if share else f)
                continue
            flags = {EVICTED_FEATURE: 1, INTERLEAVED_FEATURE: share}
            if cache_bytes:
                flags[LLC_EVICTED_FEATURE] = min(1.0, min(since, footprint) / cache_bytes)
            out.append({**f, **flags})
        return out

    def apply_timing(self, hw, tf32: bool = False) -> dict:
        """Fill time_s, intensity and bound into the ops and totals from the roofline on `hw`."""
        t = self.timing(hw, tf32)
        for op, ot in zip(self.ops, t["op_times"]):
            op.update(time_s=ot.time_s, intensity=ot.intensity, bound=ot.bound)
        self.totals["time_s"] = t["summary"].time_s
        self.extra["time"] = {"device": hw.name, "tf32": tf32, "memory_bound_share": t["summary"].memory_bound_share,
                              "mfu": t["summary"].mfu, "overhead_time_s": t["summary"].overhead_time_s}
        return t

    def by_op(self) -> list[dict]:
        """Figures per aten op (with how many times it occurs), largest FLOPs first."""
        rows = _rollup(self.ops, lambda op: {"target": op["target"], "category": op["category"]}, count=True)
        return sorted(rows, key=lambda r: (-r["flops"], -r["bytes"]))

    def compare(self, devices: list) -> list[dict]:
        """The roofline of this point on each device: [{"device", "time_s", "memory_bound_share", "mfu"}]."""
        rows = []
        for hw in devices:
            s = self.timing(hw, self.report.tf32)["summary"]
            rows.append({"device": hw.name, "time_s": s.time_s, "memory_bound_share": s.memory_bound_share,
                         "mfu": s.mfu})
        return rows

    def verdict(self, hw=None, capacity_bytes: int | None = None, limits: bool = True) -> dict:
        """Does this point fit `hw` (default: the report's first device), by how much, what is live at
        the peak, and (with `limits`) how far each dimension can grow from here: the contract's `oom`
        object, also kept in `extra["oom"]` for the JSON.
            {"device", "capacity_bytes", "peak_memory_bytes", "fits", "margin_bytes", "memory", "at",
             "largest_fitting": {dim: {"value", "limit": {"kind", "reason", ...}, "description"}}}"""
        from costmodel.memory.fit import largest_fitting, verdict
        hw = hw if hw is not None else (self.report.hardware[0] if self.report.hardware else None)
        if hw is None:
            raise UsageError("an OOM verdict needs a device: give hw (a name such as 'a100-80gb', a .toml path or "
                             "a Hardware), or set_hardware on the report")
        result = verdict(self.report, hw, self.dims, capacity_bytes)
        if limits:
            result["largest_fitting"] = {d: {**l.to_dict(), "description": l.describe()}
                                         for d, l in largest_fitting(self.report, hw, self.dims, capacity_bytes).items()}
        self.extra["oom"] = result
        return result

    def fits(self, hw=None, capacity_bytes: int | None = None) -> bool:
        """Whether this point's peak fits `hw` (its usable capacity: see memory.fit.usable_bytes)."""
        return self.verdict(hw, capacity_bytes, limits=False)["fits"]


def _code_shares(classes: list[str | None]) -> list[float]:
    """For each op of a step (its kernel class, None for one without work), the distinct other
    classes that ran since its class's last call, over PROBE_CLASSES and at most 1; the step
    repeats, so a class's first call counts from its last in the step before. 0 for ops without
    work. Two passes over the step, the first only to order the classes by their latest call."""
    recent: dict[str, None] = {}    # classes, the latest called last
    out = [0.0] * len(classes)
    for j, c in enumerate(classes * 2):
        if c is None:
            continue
        if j >= len(classes):
            since = 0
            for other in reversed(recent):
                if other == c or since == PROBE_CLASSES:
                    break
                since += 1
            out[j - len(classes)] = since / PROBE_CLASSES
        recent.pop(c, None)
        recent[c] = None
    return out


def _rollup(ops: list[dict], key, count: bool = False) -> list[dict]:
    """Sum flops, matmul_flops, bytes and time_s (None when no op was timed) of ops grouped by key(op)."""
    rows: dict[tuple, dict] = {}
    for op in ops:
        head = key(op)
        row = rows.setdefault(tuple(head.values()), {**head, **({"count": 0} if count else {}), "flops": 0,
                                                     "matmul_flops": 0, "bytes": 0, "time_s": None})
        if count:
            row["count"] += 1
        for k in ("flops", "matmul_flops", "bytes"):
            row[k] += op[k]
        if op.get("time_s") is not None:
            row["time_s"] = (row["time_s"] or 0.0) + op["time_s"]
    return list(rows.values())


class Report:
    """What `analyze()` returns: symbolic totals, views per op and module, coverage, evaluation."""

    def __init__(self, model: str, inputs: list[InputSpec], loaded: cap.LoadedModel, first: Analysis,
                 options: Options, device_kind: str, hardware: list | None = None, capability: str = "",
                 defaulted: dict[str, int] | None = None, step=None):
        self.model, self.inputs, self.options = model, inputs, options
        self.step = step         # generate mode: the forward each capture traces (capture.generate.Step)
        self.params, self.param_bytes = params_of(loaded.module)
        self._loaded = loaded
        self.analyses = [first]
        self.hardware: list = list(hardware or [])   # Hardware to time on (the first one fills time_s)
        # The device kind whose kernels the costs and memory model ("cuda" or "cpu"): --device, else
        # the first --hw device's kind, else "cuda" (the contract's figure is torch.cuda.max_memory_allocated).
        self.device_kind = device_kind
        self.capability = capability         # the compute capability of that device, where known
        self._memory: dict = {}
        self._limits: list[Limit] | None = None
        self._interpolation = False          # not computed yet (None: computed, nothing to interpolate)
        self.warnings: list[str] = []       # assumptions and fallbacks, in the order they were made
        self.defaulted = dict(defaulted or {})   # dimensions given the model's default size (no --dim value)
        self.dims = list(dict.fromkeys([d for s in inputs + list(options.targets) for d in s.dim_names]
                                       + (step.extra_dims if step is not None else [])))

    # the options, by name (read-only)
    mode = property(lambda self: self.options.mode)
    dtype = property(lambda self: self.options.dtype)
    optimizer = property(lambda self: self.options.optimizer)
    attention = property(lambda self: self.options.attention)
    loss = property(lambda self: self.options.loss)
    amp = property(lambda self: self.options.amp)
    tf32 = property(lambda self: self.options.tf32)
    device = property(lambda self: self.options.device)
    moe_imbalance = property(lambda self: self.options.moe_imbalance)
    targets = property(lambda self: list(self.options.targets))

    # --- symbolic views -----------------------------------------------------------------------

    @property
    def primary(self) -> Analysis:
        return self.analyses[0]

    @property
    def symbolic(self) -> SimpleNamespace:
        """Totals as sympy expressions in the dimension names (flops, matmul_flops, bytes, ...).
        In a dimension the capture pins, the totals are interpolated over several captures and
        verified (see `symbolic_method`); where no formula verifies, the dimension is reported as
        pinned and each of its values is captured separately."""
        totals = dict(self.primary.totals)
        peak = self.memory_formula()
        interp = self.interpolation
        if interp is not None:
            totals = dict(interp.totals)
            if interp.peak is not None:
                peak = interp.peak
        return SimpleNamespace(**totals, params=sympy.Integer(self.params), param_bytes=sympy.Integer(self.param_bytes),
                               peak_memory_bytes=peak)

    @property
    def symbolic_method(self) -> dict[str, dict]:
        """How each symbolic total was obtained: {"flops": {"method": "traced"}, ...}, or for a pinned
        dimension {"method": "interpolated", "dim", "degree", "points", "verified_at"} ("per-point"
        for a peak that is no single polynomial; "pinned" where nothing verified)."""
        metrics = list(self.primary.totals) + ["peak_memory_bytes"]
        interp = self.interpolation
        if interp is not None:
            return {m: interp.method(m) for m in metrics}
        pinned = {d: v for d, v in self.fixed.items() if d in self.dims}
        if pinned:
            return {m: {"method": "pinned", "at": pinned} for m in metrics}
        return {m: {"method": "traced"} for m in metrics}

    @property
    def interpolation(self):
        """The interpolated totals in the one dimension the capture pins (None when no dimension is
        pinned, several are, or no polynomial verifies: see costmodel.interpolate)."""
        if self._interpolation is False:
            self._interpolation = None
            pinned = {d: v for d, v in self.fixed.items() if d in self.dims}
            if len(pinned) == 1:
                from costmodel.capture.interpolate import interpolate
                (d, v), = pinned.items()
                self._interpolation = interpolate(self, d, v)
                if self._interpolation is None:
                    self.warn(f"{self.model}: {d} is pinned by the capture and no polynomial in {d} verified "
                              f"over captures at several values; each value of {d} is captured separately")
            elif len(pinned) > 1:
                self.warn(f"{self.model}: the capture pins {', '.join(pinned)}; formulas are not interpolated "
                          "in more than one dimension: each point is captured separately")
        return self._interpolation

    def capture_at(self, values: dict[str, int]) -> Analysis:
        """A capture with `values` fixed and the other dimensions symbolic."""
        analysis = _analyze_once(self._loaded, self.inputs, self.options, self.device_kind, capability=self.capability,
                                 hints={d: v for d, v in self.primary.captured.hints.items() if d not in values},
                                 fixed=dict(values), step=self.step)
        self.analyses.append(analysis)
        return analysis

    @property
    def guards(self) -> list[cap.Guard]:
        return self.primary.captured.guards

    @property
    def fixed(self) -> dict[str, int]:
        """Dimensions the first capture took at one value, or that the model pinned to one (a
        specialisation: e.g. ViT checks the image size against its config)."""
        pinned = {d: v for d, (v, _) in cap.specialized(self.primary.captured).items()}
        return dict(self.primary.captured.fixed) | pinned

    @property
    def complexity(self) -> dict[str, dict[str, int]]:
        """Polynomial degree of each total in each symbolic dimension: {"seq": {"flops": 2, ...}}."""
        fixed = self.fixed
        sym = vars(self.symbolic)
        interp = self.interpolation
        dims = [d for d in self.dims if d not in fixed or (interp is not None and d == interp.dim)]
        out = {}
        for d in dims:
            out[d] = {m: degree(sym[m], dim_symbol(d)) for m in ("flops", "matmul_flops", "bytes")}
            if interp is None or d != interp.dim or interp.peak is not None:
                out[d]["peak_memory_bytes"] = degree(sym["peak_memory_bytes"], dim_symbol(d))
        return out

    @property
    def unsupported(self) -> dict[str, int]:
        """Ops that had no rule: target -> occurrences. Never counted as 0 silently: listed here."""
        return {t: len(m) for t, m in self.primary.unsupported.items()}

    @property
    def unsupported_where(self) -> dict[str, list[str]]:
        return {t: sorted(set(m)) for t, m in self.primary.unsupported.items()}

    def by_op(self) -> list[dict]:
        """Symbolic totals per aten op: [{"target", "category", "count", "flops", "matmul_flops", "bytes"}]."""
        rows: dict[str, dict] = {}
        for op in self.primary.ops:
            row = rows.setdefault(op.target, {"target": op.target, "category": op.category, "count": 0,
                                              **{m: sympy.Integer(0) for m in METRICS}})
            row["count"] += 1
            for m in METRICS:
                row[m] += op.cost[m]
        return list(rows.values())

    def by_module(self, depth: int | None = None) -> list[dict]:
        """Symbolic totals per module path, cut at `depth` components (None: full paths)."""
        rows: dict[str, dict] = {}
        for op in self.primary.ops:
            name = _truncate(op.module, depth)
            row = rows.setdefault(name, {"module": name, **{m: sympy.Integer(0) for m in METRICS}})
            for m in METRICS:
                row[m] += op.cost[m]
        return list(rows.values())

    @property
    def graph(self) -> nx.DiGraph:
        """The captured ops as a DiGraph: nodes carry target, module, phase, category and cost formulas
        (as strings, so the graph exports to GraphML as is); edges follow data flow."""
        g = nx.DiGraph()
        records = {op.name: op for op in self.primary.ops}
        for node in self.primary.captured.graph.graph.nodes:
            if node.op == "placeholder":
                role, name = self.primary.captured.roles.get(node.name, ("input", node.name))
                g.add_node(node.name, kind=role, source=name)
            elif node.name in records:
                op = records[node.name]
                g.add_node(node.name, kind="op", target=op.target, module=op.module, phase=op.phase,
                           category=op.category, dtype=op.dtype, **{m: str(op.cost[m]) for m in METRICS})
            else:
                continue
            for arg in node.all_input_nodes:
                if arg.name in g:
                    g.add_edge(arg.name, node.name)
        return g

    # --- evaluation ---------------------------------------------------------------------------

    def set_hardware(self, hardware, tf32: bool | None = None) -> None:
        """Devices to time on: names ("a100-80gb"), a comma list, .toml paths or Hardware objects. The
        kernels the costs and memory model stay those of the report's device kind."""
        self.hardware = _hardware_list(hardware)
        if tf32 is not None:
            self.options = self.options.with_(tf32=tf32)

    def costs_at(self, analysis: Analysis, point: dict[str, int]) -> Point:
        """`analysis`'s totals and per-op figures at `point` as a Point: costs only (no memory, not timed)."""
        c = analysis.captured
        values = {d: point[d] for d in c.dims}
        if analysis._evaluator is None:
            analysis._evaluator = Evaluator([analysis.totals[m] for m in METRICS], c.dims)
        totals = dict(zip(METRICS, analysis._evaluator(values)))

        def op_values():
            if analysis._op_evaluator is None:
                analysis._op_evaluator = Evaluator([op.cost[m] for op in analysis.ops for m in METRICS], c.dims)
            return analysis._op_evaluator(values)
        return Point(point, totals, analysis, op_values, self)

    def evaluate(self, **dims: int) -> Point:
        """Concrete totals and per-op figures at one point (recaptures where the formulas do not hold)."""
        point = self._complete(dims)
        for limit in self.outside_limits(point):
            if not limit.hard:
                self.warn(f"{self.model} at {', '.join(f'{d}={v}' for d, v in point.items())} is beyond "
                          f"{limit.expr} ({limit.reason}): the model was not built for that length")
        analysis = self._analysis_for(point)
        values = {d: point[d] for d in analysis.captured.dims}
        result = self.costs_at(analysis, point)
        totals = result.totals
        totals.update(params=self.params, param_bytes=self.param_bytes)
        totals["time_s"] = None
        model = self.memory_model(analysis=analysis)
        if self.options.parallel_training:
            par = self.parallel_memory(analysis=analysis)
            stage, m, per_stage = par.largest(values)
        else:
            m = model.evaluate(values)
        totals["peak_memory_bytes"] = m.peak_bytes
        totals["memory"] = m.breakdown
        result.extra["memory"] = m.extra(model)
        if self.options.parallel_training:
            from costmodel.memory.parallel import point_extra
            result.extra.update(point_extra(par, per_stage, point))
        if self.hardware:
            result.apply_timing(self.hardware[0], self.tf32)
            if self.options.parallel_training and self.options.mode == "train":
                from costmodel.hardware.parallel_step import parallel_step
                timing = parallel_step(result, par, self.hardware[0], self.tf32)
                for rank, t in zip(result.extra["ranks"], timing.pop("ranks")):
                    rank.update(t)
                result.extra.update(timing)
                result.totals["time_s"] = timing["step_time_s"]
        return result

    # --- memory ---------------------------------------------------------------------------------

    def memory_device(self, device=None) -> str:
        """The device kind the memory model assumes: `device` (a kind, name or Hardware), else the
        report's (`device_kind`)."""
        return memory.device_kind(device) if device is not None else self.device_kind

    def memory_model(self, device=None, analysis: Analysis | None = None) -> memory.MemoryModel:
        """The liveness model of one capture (the primary by default) for a device kind; built once.
        Its attention kernels are the costs' own (analysis.kernels) on the report's device kind."""
        analysis = analysis or self.primary
        kind = self.memory_device(device)
        key = (id(analysis), kind)
        if key not in self._memory:
            kernels = analysis.kernels
            if kind != self.device_kind:
                kernels, _ = attention_kernels(analysis.captured.graph.graph, self.attention, kind)
            self._memory[key] = memory.build(analysis.captured, optimizer=self.optimizer, device=kind,
                                             kernels=kernels, amp=bool(self.amp))
            for note in self._memory[key].warnings:
                self.warn(note)
        return self._memory[key]

    def fit(self, dim: str, dims: dict[str, int], hw=None, capacity_bytes: int | None = None) -> dict:
        """The largest value of `dim` whose peak fits `hw` (default: the first device), the others at
        `dims`: memory.fit.fit's result (value, why the search stopped, the peak and its breakdown)."""
        from costmodel.memory.fit import fit
        hw = hw if hw is not None else (self.hardware[0] if self.hardware else None)
        if hw is None:
            raise UsageError("fit needs a device: give hw (a name such as 'a100-80gb', a .toml path or a Hardware)")
        return fit(self, hw, dim, dims, capacity_bytes)

    def memory_formula(self, device=None) -> sympy.Expr:
        """Peak memory bytes as a formula in the dimensions: Max(...) over the candidate peaks (per
        GPU under parallel training: the largest pipeline stage's)."""
        if self.options.parallel_training:
            return self.parallel_memory(device).peak
        return self.memory_model(device).peak

    def parallel_memory(self, device=None, analysis: Analysis | None = None):
        """The per-GPU memory of the report's parallel configuration (memory.parallel.ParallelMemory:
        one memory model per pipeline stage), built once per capture and device kind."""
        from costmodel.capture.checkpointing import find_blocks
        from costmodel.memory import parallel
        analysis = analysis or self.primary
        kind = self.memory_device(device)
        key = ("parallel", id(analysis), kind)
        if key not in self._memory:
            base = self.memory_model(device, analysis)
            blocks = find_blocks(self._loaded.module)
            self._memory[key] = parallel.build(base, analysis.captured, blocks, self.options)
            for note in self._memory[key].warnings:
                self.warn(note)
        return self._memory[key]

    def ranks_at(self, dims: dict[str, int], device=None) -> list[memory.MemoryPoint]:
        """Each pipeline stage's memory at one point (one entry without pp)."""
        point = self._complete(dict(dims))
        analysis = self._analysis_for(point)
        values = {d: point[d] for d in analysis.captured.dims}
        return self.parallel_memory(device, analysis).evaluate(values)

    def memory_at(self, dims: dict[str, int], device=None, quiet: bool = False) -> memory.MemoryPoint:
        """Peak memory at one point, for a device kind ("cuda", "cpu", a Hardware); faster than
        `evaluate` (no FLOP totals). Recaptures where the symbolic capture does not hold (`quiet`:
        without a warning)."""
        point = self._complete(dict(dims))
        analysis = self._analysis_for(point, quiet=quiet)
        values = {d: point[d] for d in analysis.captured.dims}
        if self.options.parallel_training:
            return self.parallel_memory(device, analysis).largest(values)[1]
        return self.memory_model(device, analysis).evaluate(values)

    def points(self, sweep: dict[str, list[int]]) -> list[Point]:
        """Evaluate at every point of the cartesian product of the value lists."""
        names = list(sweep)
        return [self.evaluate(**dict(zip(names, combo))) for combo in itertools.product(*(sweep[n] for n in names))]

    def _complete(self, dims: dict[str, int]) -> dict[str, int]:
        unknown = [d for d in dims if d not in self.dims]
        if unknown:
            raise _not_a_dimension(unknown[0], self.inputs)
        missing = [d for d in self.dims if d not in dims]
        if missing:
            raise _no_value(missing[0], self.inputs)
        for d, v in dims.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"dimension {d}={v!r} must be a positive integer")
        return dict(dims)

    @property
    def default_sizes(self) -> dict[str, int]:
        """Sizes of the dimensions a user gives no value (the model's defaults: zoo and configs)."""
        return dict(self._loaded.default_dims)

    # --- limits, recaptures and warnings ---------------------------------------------------------

    @property
    def limits(self) -> list[Limit]:
        """What bounds the dimensions although no guard says so: tables indexed by positions (hard:
        the real model fails past them) and the context a Hugging Face config declares (soft)."""
        if self._limits is None:
            hard = list(self.primary.captured.limits)
            soft = [l for l in config_limits(self._loaded.module, self.inputs)
                    if not any(str(h.expr) == str(l.expr) for h in hard)]
            self._limits = hard + soft
        return self._limits

    def outside_limits(self, point: dict[str, int]) -> list[Limit]:
        """The limits `point` breaks (hard ones first)."""
        values = {dim_symbol(d): v for d, v in point.items()}
        broken = [l for l in self.limits if not l.holds(values)]
        return sorted(broken, key=lambda l: not l.hard)

    def warn(self, message: str) -> None:
        """Record an assumption or fallback (listed under `warnings` in JSON) and warn once."""
        if message not in self.warnings:
            self.warnings.append(message)
            warnings.warn(message, stacklevel=3)

    def _analysis_for(self, point: dict[str, int], quiet: bool = False) -> Analysis:
        """The analysis valid at `point`, capturing the point separately when no capture holds there.
        Raises OutsideLimits past a hard limit and CaptureFailed when the recapture fails. `quiet`:
        no warning (searches probe points the user did not ask for)."""
        hard = [l for l in self.outside_limits(point) if l.hard]
        if hard:
            where = ", ".join(f"{d}={v}" for d, v in point.items())
            raise OutsideLimits(f"{self.model} cannot run at {where}: it needs {hard[0]}", point, hard[0])
        for a in self.analyses:
            if a.valid_at(point):
                return a
        failed = [g for g in self.primary.captured.guards
                  if not g.holds({dim_symbol(d): point[d] for d in self.primary.captured.dims})]
        pinned = {d: v for d, v in self.primary.captured.fixed.items() if point.get(d) != v}
        why = "; ".join(str(g) for g in failed) or f"captured with {pinned}"
        if not quiet:
            self.warn(f"{self.model}: the symbolic capture does not hold at {point} ({why}); "
                      "capturing that point separately")
        try:
            analysis = _analyze_once(self._loaded, self.inputs, self.options, self.device_kind, capability=self.capability,
                                     hints=point, fixed=_pins(self.primary, point), step=self.step)
        except AnalysisError as e:
            where = ", ".join(f"{d}={v}" for d, v in point.items())
            assumed = f"; the symbolic capture assumed {why}" if failed else ""
            raise CaptureFailed(f"{self.model} could not be captured at {where}: {e}{assumed}", point,
                                str(e)) from e
        self.analyses.append(analysis)
        return analysis


def _pins(a: Analysis, point: dict[str, int]) -> dict[str, int]:
    """Dimensions that the model pins (an equality guard) are captured at the point's value."""
    pinned = {str(g.expr.lhs) for g in a.captured.guards
              if isinstance(g.expr, sympy.Eq) and g.expr.lhs.is_Symbol and g.expr.rhs.is_Integer}
    return {d: point[d] for d in pinned | set(a.captured.fixed)}


def _truncate(module: str, depth: int | None) -> str:
    if depth is None or module.startswith("("):
        return module
    return ".".join(module.split(".")[:depth])


def _analyze_once(loaded: cap.LoadedModel, inputs: list[InputSpec], options: Options, device_kind: str,
                  hints: dict[str, int] | None = None, fixed: dict[str, int] | None = None,
                  capability: str = "", step=None) -> Analysis:
    """One capture, its attention kernels on `device_kind` (of compute `capability`), the costs of
    every op (and the optimizer). `step`: generate mode's prefill or decode (capture.generate.Step)."""
    captured = cap.capture(loaded.module, inputs, options.with_(device=device_kind), hints=hints, fixed=fixed, step=step)
    kernels, notes = attention_kernels(captured.graph.graph, options.attention, device_kind, capability)
    analysis = cost_graph(captured, kernels)
    analysis.notes = captured.notes + notes
    if options.mode == "train":
        analysis.ops.extend(optimizer_ops(loaded.module, captured.trainable, options.optimizer, cap.ROOT))
        analysis.totals = totals_of(analysis.ops)
    return analysis


def analyze(model, inputs: list[str] | None = None, mode: str = "inference", dtype: str | torch.dtype = "float32",
            optimizer: str = "adamw", attention: str = "auto", loss: str = "sum",
            dims: dict[str, list[int] | int] | None = None, hardware=None, tf32: bool = False,
            complete: bool = False, amp: bool | str = False, device: str | None = None,
            trust_remote_code: bool = False, moe_imbalance: float = 1, targets: list[str] | None = None,
            kv_dtype: str | None = None, parallel=None, zero: int = 0, microbatches: int = 1,
            sequence_parallel: bool = False, pp_interleave: int = 1, checkpointing: str = "none",
            master_weights: bool = False, repeated_blocks: bool = True) -> Report:
    """Capture `model` (zoo name, "hf:ORG/NAME", a config.json or its directory, "file.py:FUNC",
    "pkg.mod:FUNC", a factory or an nn.Module) with symbolic dimensions and cost every op. `inputs`
    are specs such as "input_ids:int64[batch,seq]" (zoo models and Hugging Face configs bring
    defaults). `dims` (optional) gives the values to be evaluated later: the first value of each is
    used as the tracing size, so branches taken at that size are the ones costed. `complete=True`
    (the CLI's way) requires a value for every dimension once any has one.
    `mode`: "inference" (one no-grad forward) or "train" (forward, loss, backward, optimizer step);
    `loss`: "sum" of the first output, or "cross-entropy" against `targets` (specs of training
    targets, e.g. "labels:int64[batch]"; by default the next token of a language model's input).
    `amp=True`: mixed precision as torch.autocast on CUDA runs it (float32 weights, optimizer state and
    master copies; bfloat16 compute, with the casts' copies counted); needs dtype float32. `amp="cpu"`
    applies the CPU's autocast policy instead (what torch.autocast("cpu") does; used to validate).
    `device` ("cuda" or "cpu"): whose kernels the costs and memory model (the attention kernel,
    dropout masks); default the first `hardware` device's kind, else "cuda". `moe_imbalance`:
    mixture-of-experts layers route tokens evenly (1) or with the busiest expert taking this many
    times the mean (see capture.moe). `trust_remote_code=True` lets a Hugging Face config's auto_map
    code run (the repository's own model classes); off by default.
    Parallel training (train mode; see memory/parallel.py): `parallel` ("dp=2,fsdp=4,tp=2,pp=2" or a
    dict), `zero` (0, 1, 2 over dp), `microbatches`, `sequence_parallel`, `pp_interleave`;
    `checkpointing` ("none", "blocks", "selective", "ops": capture/checkpointing.py) is applied to
    the model's repeated blocks before capture; `master_weights`: float16/bfloat16 weights with
    float32 master weights and optimizer state. Peak memory is then per GPU, that of the rank with
    the largest peak (`Report.ranks_at` gives every pipeline stage's). `repeated_blocks=False` traces
    every block of a deep model instead of tracing each distinct block once and copying it
    (capture.blocks; the result is the same, only slower).
    `mode="generate"`: a prefill over `input_ids[batch, prompt]`, then `gen` decode steps on a KV cache
    (stored in `kv_dtype`, default `dtype`); see costmodel.generation. The Report is a GenerateReport."""
    options = Options.make(mode=mode, dtype=dtype, optimizer=optimizer, attention=attention, loss=loss, amp=amp,
                           device=device, moe_imbalance=moe_imbalance, targets=targets or (),
                           trust_remote_code=trust_remote_code, tf32=tf32, kv_dtype=kv_dtype, parallel=parallel,
                           zero=zero, microbatches=microbatches, sequence_parallel=sequence_parallel,
                           pp_interleave=pp_interleave, checkpointing=checkpointing, master_weights=master_weights,
                           repeated_blocks=repeated_blocks)
    devices = _hardware_list(hardware)
    kind = options.device or (memory.device_kind(devices[0]) if devices else "cuda")
    loaded = cap.load_model(model, options.dtype, trust_remote_code=options.trust_remote_code)
    specs = [parse_input(s) if isinstance(s, str) else s for s in (inputs or [])] or loaded.inputs
    default_dims = dict(loaded.default_dims)
    if options.mode == "generate":
        from costmodel import generation
        given = [parse_input(s) if isinstance(s, str) else s for s in (inputs or [])]
        specs = generation.generation_inputs(given, loaded.inputs)
        default_dims = generation.default_dims(loaded.default_dims)
    if not specs and loaded.no_inputs:
        raise UsageError(f"model {loaded.name} has no default inputs: {loaded.no_inputs}")
    if not specs:
        raise UsageError(f"model {loaded.name} needs --input specs (NAME:DTYPE[D0,D1,...]); zoo models and "
                         "Hugging Face configs have defaults, factories do not")
    names = [s.name for s in specs + list(options.targets)]
    if len(set(names)) != len(names):
        raise UsageError(f"input and target names must be distinct; got {', '.join(names)}")
    if options.targets and options.mode != "train":
        raise UsageError("--target is a training target: it takes --mode train (and --loss cross-entropy)")
    specs = [_cast_input(s, options.dtype) for s in specs]
    every = specs + list(options.targets)
    dims = {d: (v if isinstance(v, list) else [v]) for d, v in (dims or {}).items()}
    used = list(dict.fromkeys([d for s in every for d in s.dim_names] + (["gen"] if options.mode == "generate" else [])))
    for d in dims:
        if d not in used:
            raise _not_a_dimension(d, every)
    valued = [d for d, vs in dims.items() if vs]
    missing = [d for d in used if d not in valued]
    defaulted = {}
    if complete and valued and missing:
        defaulted = {d: default_dims[d] for d in missing if d in default_dims}
        still = [d for d in missing if d not in defaulted]
        if still:
            raise _no_value(still[0], every, ", or give no values at all for formulas only")
        dims.update({d: [v] for d, v in defaulted.items()})
    hints = {d: next((v for v in vs if v >= 2), None) for d, vs in dims.items()}
    hints = {d: v for d, v in hints.items() if v is not None}
    capability = devices[0].compute_capability if devices and kind == memory.device_kind(devices[0]) else ""
    name = model if isinstance(model, str) else loaded.name
    if options.mode == "generate":
        report = generation.analyze_generation(loaded, name, specs, options, kind, devices, capability, hints,
                                               defaulted)
        for d, v in defaulted.items():
            report.warn(f"no value given for {d}: using {name}'s default {d}={v}")
        return report
    first = _first_analysis(loaded, specs, options, kind, hints, capability)
    report = Report(name, specs, loaded, first, options, kind, devices, capability, defaulted)
    for note in first.notes:
        report.warn(note)
    for d, v in defaulted.items():
        report.warn(f"no value given for {d}: using {name}'s default {d}={v}")
    return report


def _hardware_list(hardware) -> list:
    """Devices from a name, a comma list, a .toml path, a Hardware or a list of them."""
    from costmodel.hardware.catalog import Hardware, parse_hardware_list
    if not hardware:
        return []
    if isinstance(hardware, str):
        return parse_hardware_list(hardware)
    if isinstance(hardware, Hardware):
        return [hardware]
    return [parse_hardware_list(h)[0] if isinstance(h, str) else h for h in hardware]


_LARGER_HINTS = (16, 256)     # retries of a failed capture at larger sizes of the dims without values


def _first_analysis(loaded: cap.LoadedModel, specs: list[InputSpec], options: Options, kind: str,
                    hints: dict[str, int], capability: str = "", step=None) -> Analysis:
    """The symbolic capture. Dimensions the user gave no value for are traced at default sizes; a
    model that cannot run that small (a conv stack longer than 72 samples) is tried again at larger
    ones. A failure says which sizes it was captured at and what the config declares for them."""
    dims = list(dict.fromkeys([d for s in specs + list(options.targets) for d in s.dim_names]
                              + (step.extra_dims if step is not None else [])))
    free = [d for d in dims if d not in hints and "batch" not in d.lower()]
    try:
        return _analyze_once(loaded, specs, options, kind, hints=hints, capability=capability, step=step)
    except AnalysisError as first_error:
        error = first_error
    for factor in _LARGER_HINTS if free else ():
        larger = {**hints, **{d: cap.default_hint(d, dims.index(d)) * factor for d in free}}
        try:
            return _analyze_once(loaded, specs, options, kind, hints=larger, capability=capability, step=step)
        except AnalysisError:
            continue
    used = {d: hints.get(d, cap.default_hint(d, i)) for i, d in enumerate(dims)}
    broken = [l for l in config_limits(loaded.module, specs)
              if not l.holds({dim_symbol(d): v for d, v in used.items()})]
    hint = f"; note that the model declares {broken[0].describe()}" if broken else ""
    raise AnalysisError(f"{error} [captured at {', '.join(f'{d}={v}' for d, v in used.items())}]{hint}") from error


def _not_a_dimension(dim: str, specs: list[InputSpec]) -> UsageError:
    used = list(dict.fromkeys(d for s in specs for d in s.dim_names))
    return UsageError(f"--dim {dim} is not a dimension of any input; the inputs "
                      f"({', '.join(str(s) for s in specs)}) have: {', '.join(used) or 'none'}")


def _no_value(dim: str, specs: list[InputSpec], also: str = "") -> UsageError:
    users = [str(s) for s in specs if dim in s.dim_names]
    return UsageError(f"dimension {dim!r} (used by {', '.join(users)}) has no value; give it one, "
                      f"e.g. --dim {dim}=N{also}")


def _cast_input(spec: InputSpec, dtype: torch.dtype) -> InputSpec:
    """Float inputs follow --dtype, as the model's weights do."""
    if spec.dtype.is_floating_point and spec.dtype != dtype:
        return InputSpec(spec.name, dtype, spec.dims)
    return spec

