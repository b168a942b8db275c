"""Generation (`mode="generate"`): a prefill over the prompt, then `gen` decode steps that each read
the whole KV cache, as formulas in batch, prompt and gen.

The prefill and the decode step are each captured once (capture/generate.py), with the model's own
cache code. The decode step's costs are formulas in batch and ctx, the tokens in the cache before
the step; the whole generation is

    prefill(batch, prompt) + sum over ctx = prompt .. prompt + gen - 1 of decode(batch, ctx)

in closed form: with F(n) = sum_{c < n} f(c) (sympy's summation of the step's polynomial), the
decode part is F(prompt + gen) - F(prompt). A decode capture holds on an interval of ctx (its
guards: a sliding window's cache stops growing at the window, and the model's code branches
there), so the context axis is covered by pieces, each captured where the one before stops, and
the sum is taken piece by piece.

Memory: the peak over the generation is the larger of the prefill's peak and the largest decode
step's, each from its own liveness (a decode step holds the weights, the cache it reads, which each
layer frees when it concatenates the new token, the cache it writes, and its activations). A step's
peak grows with ctx (checked: its formulas have no negative term in ctx), so the last step of each
piece is its largest. `kv_cache_bytes` is the bytes of the cache's keys and values after the last
step (prompt + gen tokens; a sliding layer keeps its window).

Time: the prefill's roofline time is the time to first token; each decode step is timed op by op on
the roofline at its own ctx, every ctx of the range (an op's time is not linear in its size: a step
is memory-bound at small batch, its attention grows with ctx), and tokens/s is batch * gen over the
decode time: the rate at which the decode steps emit tokens, all sequences of the batch together.
On a device with measured kernel tables (`hardware calibrate`) a step is priced as any forward is,
op by op from its kernel class's table (a decode step's products read weights from memory: the
"matmul.streamed" table), at up to MAX_TIMED_STEPS contexts per piece, linear in ctx between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch

from costmodel.analysis import METRICS, Analysis
from costmodel.api import Point, Report, _analyze_once, _first_analysis
from costmodel.capture import generate as gen
from costmodel.capture.limits import Limit
from costmodel.capture.specs import InputSpec, dtype_name
from costmodel.errors import AnalysisError, UsageError
from costmodel.formulas import Evaluator
from costmodel.memory.model import MemoryPoint
from costmodel.symbols import dim_symbol

BATCH, PROMPT, GEN, CTX = "batch", "prompt", "gen", gen.CTX
DEFAULT_GEN = 128            # new tokens when no value is given
MAX_PIECES = 16              # decode captures over the context axis before giving up
_N = dim_symbol("n")         # F(n) = sum_{ctx < n} f(ctx); made as Evaluator makes its symbols
_LOWEST_CTX = 2              # symbolic sizes start at 2 (PyTorch specialises 0 and 1)
MAX_TIMED_STEPS = 33         # decode steps priced per piece on a calibrated device (the rest interpolated)


def generation_inputs(specs: list[InputSpec], defaults: list[InputSpec]) -> list[InputSpec]:
    """The prefill's input: one integer token tensor [batch, prompt]. Without --input, the model's
    token input with its sequence dimension renamed `prompt` (input_ids for a model without defaults)."""
    if not specs:
        if not defaults:
            return [InputSpec("input_ids", torch.int64, (BATCH, PROMPT))]
        token = [s for s in defaults if not s.dtype.is_floating_point and s.dtype != torch.bool and len(s.dims) == 2]
        if len(token) != 1 or len(defaults) != 1:
            raise UsageError("--mode generate takes one token input NAME:int64[batch,prompt]; the model's default "
                             f"inputs are {', '.join(str(s) for s in defaults) or 'none'}: give --input "
                             "input_ids:int64[batch,prompt]")
        return [InputSpec(token[0].name, token[0].dtype, (BATCH, PROMPT))]
    if len(specs) != 1 or specs[0].dtype.is_floating_point or specs[0].dtype == torch.bool \
            or tuple(specs[0].dims) != (BATCH, PROMPT):
        raise UsageError("--mode generate takes one token input NAME:int64[batch,prompt] (the decode step feeds "
                         f"[batch, 1]); got {', '.join(str(s) for s in specs)}")
    return list(specs)


def default_dims(model_defaults: dict[str, int]) -> dict[str, int]:
    """Sizes for dimensions given no value: the model's batch, its default sequence as the prompt, and
    DEFAULT_GEN new tokens."""
    return {BATCH: model_defaults.get(BATCH, 1), PROMPT: model_defaults.get("seq", 512), GEN: DEFAULT_GEN}


def decode_inputs(specs: list[InputSpec]) -> list[InputSpec]:
    return [InputSpec(specs[0].name, specs[0].dtype, (BATCH, 1))]


# --- the decode step over the context axis ---------------------------------------------------------

@dataclass
class Piece:
    """A decode capture and the contexts it covers here: ctx in [lo, hi] (hi None: unbounded)."""

    lo: int
    hi: int | None
    analysis: Analysis


@dataclass
class DecodeTiming:
    """The decode steps of one range timed on one device."""

    ctx: np.ndarray                # the contexts, a .. z
    step_time_s: np.ndarray        # each step's roofline time
    memory_bound_s: float          # the part of the time spent in memory-bound ops
    overhead_s: float
    op_times: list[list]           # per piece, per op of its analysis: an OpTime summed over its contexts
                                   # (its efficiencies, which vary with ctx, are nan)
    framework_s: float = 0.0       # eager's module calls over the steps (measured devices), inside step_time_s

    @property
    def time_s(self) -> float:
        return float(self.step_time_s.sum())


class DecodeSteps:
    """The decode step as a function of ctx: pieces of captures, their closed-form sums, peaks and times."""

    def __init__(self, report: Report, warn):
        self.report = report             # the decode captures: dims batch, ctx
        self.warn = warn
        self._intervals: dict = {}
        self._prefix: dict = {}
        self._op_sums: dict = {}
        self._groups: dict = {}
        self._monotone: dict = {}

    # pieces

    def interval(self, analysis: Analysis, batch: int | None, at: int) -> tuple[int, int | None]:
        """The contexts around `at` where `analysis` holds at this batch (None: at the capture's batch)."""
        key = (id(analysis), batch, at)
        if key not in self._intervals:
            self._intervals[key] = _interval(analysis, batch, at)
        return self._intervals[key]

    def pieces(self, batch: int, a: int, z: int) -> list[tuple[int, int, Analysis]]:
        """(first ctx, last ctx, analysis) covering a .. z at this batch, captured where needed."""
        out, c = [], a
        while c <= z:
            analysis = self.report._analysis_for({BATCH: batch, CTX: c}, quiet=True)
            lo, hi = self.interval(analysis, batch, c)
            top = z if hi is None else min(z, hi)
            out.append((c, top, analysis))
            c = top + 1
            if len(out) > MAX_PIECES:
                raise AnalysisError(f"{self.report.model}: the decode step changes form more than {MAX_PIECES} times "
                                    f"over ctx {a} .. {z}; generate mode sums it piece by piece")
        return out

    def symbolic_pieces(self) -> list[Piece]:
        """Pieces covering ctx >= 2 at the capture's batch: what the formulas are made of."""
        if not hasattr(self, "_symbolic"):
            primary = self.report.primary
            batch = primary.captured.fixed.get(BATCH)
            out, c = [], _LOWEST_CTX
            while True:
                point = {BATCH: batch if batch is not None else primary.captured.hints.get(BATCH, 2), CTX: c}
                analysis = primary if primary.valid_at(point) and CTX not in primary.captured.fixed \
                    else self.report._analysis_for(point, quiet=True)
                lo, hi = self.interval(analysis, None, c)
                out.append(Piece(c, hi, analysis))
                if hi is None:
                    break
                c = hi + 1
                if len(out) > MAX_PIECES:
                    raise AnalysisError(f"{self.report.model}: the decode step changes form more than {MAX_PIECES} "
                                        "times over the context; generate mode sums it piece by piece")
            self._symbolic = out
        return self._symbolic

    # sums

    def prefix(self, expr: sympy.Expr) -> sympy.Expr | None:
        """F(n) = sum_{ctx=0}^{n-1} expr, closed form in batch and n (None when sympy finds none)."""
        if expr not in self._prefix:
            ctx = dim_symbol(CTX)
            if ctx not in expr.free_symbols:
                result = sympy.expand(expr * _N)
            else:
                c = sympy.Symbol("c", integer=True, nonnegative=True)
                result = sympy.expand(sympy.summation(expr.xreplace({ctx: c}), (c, 0, _N - 1)))
                if result.has(sympy.Sum):
                    result = None
            self._prefix[expr] = result
        return self._prefix[expr]

    def sum(self, expr: sympy.Expr, batch: int, a: int, z: int) -> int:
        """sum_{ctx=a}^{z} expr at this batch, exactly."""
        b = dim_symbol(BATCH)
        F = self.prefix(expr)
        if F is None:
            f = sympy.lambdify([dim_symbol(CTX)], expr.xreplace({b: batch}), "math")
            return int(sum(int(f(c)) for c in range(a, z + 1)))
        return int(F.xreplace({b: sympy.Integer(batch), _N: sympy.Integer(z + 1)})
                   - F.xreplace({b: sympy.Integer(batch), _N: sympy.Integer(a)}))

    def totals(self, batch: int, a: int, z: int) -> dict[str, int]:
        """METRICS summed over the steps at ctx = a .. z."""
        out = {m: 0 for m in METRICS}
        for lo, hi, analysis in self.pieces(batch, a, z):
            for m in METRICS:
                out[m] += self.sum(analysis.totals[m], batch, lo, hi)
        return out

    def op_sums(self, analysis: Analysis, batch: int, a: int, z: int) -> list[dict[str, int]]:
        """Each op's METRICS summed over ctx = a .. z (one piece)."""
        key = id(analysis)
        if key not in self._op_sums:
            exprs = [op.cost[m] for op in analysis.ops for m in METRICS]
            prefixes = [self.prefix(e) for e in exprs]
            if any(p is None for p in prefixes):
                self._op_sums[key] = None
            else:
                self._op_sums[key] = Evaluator(prefixes, [BATCH, "n"])
        ev = self._op_sums[key]
        n = len(METRICS)
        if ev is None:
            flat = [self.sum(op.cost[m], batch, a, z) for op in analysis.ops for m in METRICS]
        else:
            top, bottom = ev({BATCH: batch, "n": z + 1}), ev({BATCH: batch, "n": a})
            flat = [int(t - s) for t, s in zip(top, bottom)]
        return [dict(zip(METRICS, flat[i * n:(i + 1) * n])) for i in range(len(analysis.ops))]

    def symbolic_totals(self) -> dict[str, sympy.Expr]:
        """METRICS of all decode steps as formulas in batch, prompt and gen."""
        out = {m: sympy.Integer(0) for m in METRICS}
        for piece in self.symbolic_pieces():
            for m in METRICS:
                F = self.prefix(piece.analysis.totals[m])
                if F is None:
                    c = sympy.Symbol("c", integer=True, positive=True)
                    out[m] += sympy.Sum(piece.analysis.totals[m].xreplace({dim_symbol(CTX): c}),
                                        (c, dim_symbol(PROMPT), dim_symbol(PROMPT) + dim_symbol(GEN) - 1))
                    continue
                out[m] += _clamped_sum(F, piece.lo, piece.hi)
        return {m: sympy.expand(v) if not v.has(sympy.Max, sympy.Min, sympy.Sum) else v for m, v in out.items()}

    # memory

    def monotone(self, model) -> bool:
        """Whether every candidate peak of a decode memory model is non-decreasing in ctx (no negative
        coefficient on a term with ctx): then a piece's last step is its largest."""
        key = id(model)
        if key not in self._monotone:
            ctx = dim_symbol(CTX)
            peak = model.peak
            candidates = peak.args if isinstance(peak, sympy.Max) else (peak,)
            ok = True
            for cand in candidates:
                for term in sympy.Add.make_args(sympy.expand(cand)):
                    if ctx in term.free_symbols and term.as_coeff_Mul()[0] < 0:
                        ok = False
            self._monotone[key] = ok
        return self._monotone[key]

    def memory(self, batch: int, a: int, z: int, device) -> tuple[MemoryPoint, int]:
        """The largest decode step's MemoryPoint over ctx = a .. z, and its ctx."""
        best = None
        for lo, hi, analysis in self.pieces(batch, a, z):
            model = self.report.memory_model(device, analysis)
            ends = (hi,) if self.monotone(model) else sorted({lo, hi})
            for c in ends:
                values = {d: v for d, v in {BATCH: batch, CTX: c}.items() if d in analysis.captured.dims}
                m = model.evaluate(values)
                if best is None or m.peak_bytes > best[0].peak_bytes:
                    best = (m, c)
        return best

    def symbolic_peak(self, device) -> sympy.Expr:
        """The largest decode step's peak as a formula in batch, prompt and gen."""
        P, G = dim_symbol(PROMPT), dim_symbol(GEN)
        top = P + G - 1
        ctx = dim_symbol(CTX)
        pieces = self.symbolic_pieces()
        terms = []
        for piece in pieces:
            model = self.report.memory_model(device, piece.analysis)
            at_top = top if piece.hi is None else sympy.Min(top, piece.hi)
            ends = [at_top] if self.monotone(model) else [at_top, P if piece.lo <= _LOWEST_CTX
                                                           else sympy.Max(P, piece.lo)]
            value = sympy.Max(*[model.peak.xreplace({ctx: e}) for e in ends])
            if len(pieces) == 1:
                return value
            inside = [] if piece.hi is None else [P <= piece.hi]
            if piece.lo > _LOWEST_CTX:
                inside.append(top >= piece.lo)
            terms.append(sympy.Piecewise((value, sympy.And(*inside)), (0, True)) if inside else value)
        return sympy.Max(*terms)

    def cache_bytes(self, batch: int, ctx: int) -> int:
        """Bytes of the cache's keys and values after the step at ctx."""
        analysis = self.report._analysis_for({BATCH: batch, CTX: ctx}, quiet=True)
        values = {dim_symbol(d): v for d, v in {BATCH: batch, CTX: ctx}.items()}
        return int(analysis.captured.cache_bytes.xreplace(values))

    def symbolic_cache_bytes(self) -> sympy.Expr:
        """kv_cache_bytes after the last step (ctx = prompt + gen - 1) as a formula."""
        top = dim_symbol(PROMPT) + dim_symbol(GEN) - 1
        ctx = dim_symbol(CTX)
        pieces = self.symbolic_pieces()
        branches = [(p.analysis.captured.cache_bytes.xreplace({ctx: top}), top >= p.lo) for p in reversed(pieces)]
        if len(branches) == 1:
            return sympy.expand(branches[0][0])
        return sympy.Piecewise(*branches[:-1], (branches[-1][0], True))

    # time

    def timing(self, hw, batch: int, a: int, z: int, tf32: bool = False) -> DecodeTiming:
        """Every step at ctx = a .. z on `hw`, op by op (see the module docstring)."""
        if hw.kernels or hw.allocation:
            return self._measured_timing(hw, batch, a, z, tf32)
        from costmodel.hardware.roofline import OpTime, op_times
        ctx_all = np.arange(a, z + 1)
        step = np.zeros(len(ctx_all))
        memory_bound = overhead = 0.0
        per_piece = []
        for lo, hi, analysis in self.pieces(batch, a, z):
            cs = np.arange(lo, hi + 1)
            ops = []
            for op in analysis.ops:
                flops, nbytes = self._values(op.cost["flops"], batch, cs), self._values(op.cost["bytes"], batch, cs)
                t = op_times(flops, nbytes, op.category, op.dtype, hw, tf32)
                step[lo - a:hi - a + 1] += t["time_s"]
                memory_bound += float(t["time_s"][t["memory_bound"]].sum())
                launched = float(np.count_nonzero(t["time_s"])) * hw.kernel_overhead_s
                overhead += launched
                f, b = float(flops.sum()), float(nbytes.sum())
                ridge = _ridge(op, hw, tf32)
                intensity = (f / b if b else math.inf) if (f or b) else None
                ops.append(OpTime(f, b, float(t["time_s"].sum()), float(t["compute_time_s"].sum()),
                                  float(t["memory_time_s"].sum()), launched, intensity,
                                  None if intensity is None else "compute" if intensity >= ridge else "memory",
                                  ridge * hw.bandwidth_bytes_per_s, ridge, math.nan, math.nan))
            per_piece.append(ops)
        return DecodeTiming(ctx_all, step, memory_bound, overhead, per_piece)

    def _measured_timing(self, hw, batch: int, a: int, z: int, tf32: bool) -> DecodeTiming:
        """The steps on a device with measured kernel tables, priced as a single forward is
        (Point.timing: each op by its kernel class and shape, the cache it misses, eager's module
        calls). A table's price is not a formula in ctx, so the steps are priced at up to
        MAX_TIMED_STEPS contexts of each piece (all of them when there are no more) and each op's
        time is interpolated linearly in ctx between them: its size, and so its time, moves
        smoothly with the cache it reads."""
        from costmodel.hardware.roofline import OpTime
        ctx_all = np.arange(a, z + 1)
        step = np.zeros(len(ctx_all))
        memory_bound = overhead = framework = 0.0
        per_piece = []
        for lo, hi, analysis in self.pieces(batch, a, z):
            cs = np.arange(lo, hi + 1)
            timed = cs if len(cs) <= MAX_TIMED_STEPS else \
                np.unique(np.linspace(lo, hi, MAX_TIMED_STEPS).round().astype(int))
            samples = [self.step_point(analysis, batch, int(c)).timing(hw, tf32) for c in timed]
            framework_s = samples[0]["summary"].framework_time_s
            step[lo - a:hi - a + 1] += framework_s
            framework += framework_s * len(cs)
            nearest = np.clip(np.searchsorted(timed, cs), 0, len(timed) - 1)   # a priced step at or after
            ops = []
            for i, op in enumerate(analysis.ops):
                at = [s["op_times"][i] for s in samples]
                per_step = {name: np.interp(cs, timed, [getattr(t, name) for t in at])
                            for name in ("time_s", "compute_time_s", "memory_time_s", "allocation_s")}
                times = per_step["time_s"]
                step[lo - a:hi - a + 1] += times
                # what is not a time (bound, launches) comes from the nearest priced step
                memory_bound += float(sum(times[j] for j, k in enumerate(nearest) if at[k].bound == "memory"))
                launched = float(sum(at[k].overhead_s for k in nearest))
                overhead += launched
                f = float(self._values(op.cost["flops"], batch, cs).sum())
                b = float(self._values(op.cost["bytes"], batch, cs).sum())
                intensity = (f / b if b else math.inf) if (f or b) else None
                ridge = at[-1].ridge_point
                ops.append(OpTime(f, b, float(times.sum()), float(per_step["compute_time_s"].sum()),
                                  float(per_step["memory_time_s"].sum()), launched, intensity,
                                  None if intensity is None else "compute" if intensity >= ridge else "memory",
                                  at[-1].peak_flops_per_s, ridge, math.nan, math.nan, at[-1].kernel,
                                  float(per_step["allocation_s"].sum())))
            per_piece.append(ops)
        return DecodeTiming(ctx_all, step, memory_bound, overhead + framework, per_piece, framework)

    def step_point(self, analysis: Analysis, batch: int, ctx: int) -> Point:
        """The decode step of `analysis` at (batch, ctx) as a Point (costs and timing; no memory)."""
        return self.report.costs_at(analysis, {BATCH: batch, CTX: ctx})

    def _values(self, expr: sympy.Expr, batch: int, cs: np.ndarray) -> np.ndarray:
        key = (expr, batch)
        if key not in self._groups:
            e = expr.xreplace({dim_symbol(BATCH): batch})
            self._groups[key] = sympy.lambdify([dim_symbol(CTX)], e, modules=["numpy"])
        v = self._groups[key](cs.astype(float))
        return np.broadcast_to(np.asarray(v, dtype=float), cs.shape)


def _ridge(op, hw, tf32: bool) -> float:
    from costmodel.hardware.roofline import _TENSOR_CATEGORIES
    peak = hw.peak_for(op.dtype, tf32) if op.category in _TENSOR_CATEGORIES else hw.vector_flops_per_s
    return peak / hw.bandwidth_bytes_per_s


def _clamped_sum(F: sympy.Expr, lo: int, hi: int | None) -> sympy.Expr:
    """sum over ctx in [prompt, prompt + gen - 1] intersected with [lo, hi] of the step whose prefix
    sum is F: F(upper + 1) - F(lower), 0 when the intersection is empty. The symbolic capture of the
    prefill needs prompt >= 2, so a piece from 2 up starts at prompt."""
    P, G = dim_symbol(PROMPT), dim_symbol(GEN)
    lower = P if lo <= _LOWEST_CTX else sympy.Max(P, lo)
    upper1 = P + G if hi is None else sympy.Min(P + G, hi + 1)
    if lo <= _LOWEST_CTX and hi is None:
        return sympy.expand(F.xreplace({_N: upper1}) - F.xreplace({_N: lower}))
    return F.xreplace({_N: sympy.Max(upper1, lower)}) - F.xreplace({_N: lower})


def _interval(analysis: Analysis, batch: int | None, at: int) -> tuple[int, int | None]:
    """The integer interval of ctx around `at` on which the capture's guards hold (batch substituted;
    None: the capture's own batch), from each guard solved for ctx."""
    c = analysis.captured
    if CTX in c.fixed:
        return c.fixed[CTX], c.fixed[CTX]
    ctx, b = dim_symbol(CTX), dim_symbol(BATCH)
    batch_value = batch if batch is not None else c.fixed.get(BATCH, c.hints.get(BATCH))
    x = sympy.Symbol("x", real=True)
    region = sympy.Interval(_LOWEST_CTX, sympy.oo)
    for g in c.guards:
        expr = g.expr
        if ctx not in expr.free_symbols:
            continue
        if batch_value is not None:
            expr = expr.xreplace({b: sympy.Integer(batch_value)})
        if expr.free_symbols - {ctx}:
            return at, at
        try:
            solved = sympy.solveset(expr.xreplace({ctx: x}), x, domain=sympy.S.Reals)
        except (NotImplementedError, ValueError, TypeError):
            return at, at
        if isinstance(solved, sympy.ConditionSet):
            return at, at
        region = sympy.Intersection(region, solved)
    parts = region.args if isinstance(region, sympy.Union) else (region,)
    for part in parts:
        if part.contains(at) != sympy.true:
            continue
        if isinstance(part, sympy.FiniteSet):
            return at, at
        if not isinstance(part, sympy.Interval):
            return at, at
        lo = int(sympy.ceiling(part.inf))
        if part.left_open and part.inf == lo:
            lo += 1
        if part.sup == sympy.oo:
            return max(lo, _LOWEST_CTX), None
        hi = int(sympy.floor(part.sup))
        if part.right_open and part.sup == hi:
            hi -= 1
        return max(lo, _LOWEST_CTX), hi
    return at, at


# --- the report ---------------------------------------------------------------------------------------

class GenerateReport(Report):
    """`analyze(..., mode="generate")`: the prefill capture is the primary (dimensions batch, prompt);
    `decode` holds the decode captures (batch, ctx); the totals are the whole generation's."""

    def __init__(self, name: str, specs: list[InputSpec], loaded, prefill: Analysis, decode: Report, options,
                 device_kind: str, hardware: list | None = None, capability: str = "",
                 defaulted: dict[str, int] | None = None):
        super().__init__(name, specs, loaded, prefill, options, device_kind, hardware, capability, defaulted,
                         step=prefill.captured.step)
        self.dims = [BATCH, PROMPT, GEN]
        self.decode = decode
        decode.warn = self.warn
        self.steps = DecodeSteps(decode, self.warn)
        self._symbolic = None

    @property
    def default_sizes(self) -> dict[str, int]:
        return default_dims(self._loaded.default_dims)

    @property
    def interpolation(self):
        return None          # pinned dimensions are captured point by point in generate mode

    @property
    def symbolic(self):
        """The whole generation's totals in batch, prompt and gen, its peak and kv_cache_bytes."""
        if self._symbolic is None:
            from types import SimpleNamespace
            decode = self.steps.symbolic_totals()
            totals = {m: _tidy(self.primary.totals[m] + decode[m]) for m in METRICS}
            self._symbolic = SimpleNamespace(**totals, params=sympy.Integer(self.params),
                                             param_bytes=sympy.Integer(self.param_bytes),
                                             peak_memory_bytes=self.memory_formula(),
                                             kv_cache_bytes=self.steps.symbolic_cache_bytes())
        return self._symbolic

    @property
    def symbolic_method(self) -> dict[str, dict]:
        metrics = list(METRICS) + ["peak_memory_bytes", "kv_cache_bytes"]
        pinned = {d: v for d, v in self.fixed.items() if d in self.dims}
        if pinned:
            return {m: {"method": "pinned", "at": pinned} for m in metrics}
        return {m: {"method": "traced"} for m in metrics}

    @property
    def unsupported(self) -> dict[str, int]:
        out = {t: len(m) for t, m in self.primary.unsupported.items()}
        for t, m in self.decode.primary.unsupported.items():
            out[t] = out.get(t, 0) + len(m)
        return out

    @property
    def unsupported_where(self) -> dict[str, list[str]]:
        out: dict[str, set] = {}
        for a in (self.primary, self.decode.primary):
            for t, m in a.unsupported.items():
                out.setdefault(t, set()).update(m)
        return {t: sorted(m) for t, m in out.items()}

    @property
    def guards(self):
        """The prefill's, and the decode step's that do not involve ctx (those bound its pieces)."""
        ctx = dim_symbol(CTX)
        return list(self.primary.captured.guards) + [g for piece in self.steps.symbolic_pieces()
                                                     for g in piece.analysis.captured.guards
                                                     if ctx not in g.expr.free_symbols]

    @property
    def decode_pieces(self) -> list[tuple[int, int | None]]:
        """The context intervals the decode captures cover: [(2, None)] for one formula over all ctx."""
        return [(p.lo, p.hi) for p in self.steps.symbolic_pieces()]

    @property
    def limits(self) -> list[Limit]:
        """The prefill's position tables (in prompt), the decode step's (in ctx, reached at the last
        step: in prompt + gen) and the context the config declares, for prompt + gen."""
        if self._limits is None:
            from costmodel.capture.limits import config_limits
            top = dim_symbol(PROMPT) + dim_symbol(GEN) - 1
            hard = list(self.primary.captured.limits)
            for limit in self.decode.primary.captured.limits:
                expr = _linear_bound(limit.expr.xreplace({dim_symbol(CTX): top}))
                hard.append(Limit(expr, limit.reason, limit.where, limit.hard))
            tokens = InputSpec("tokens", torch.int64, (BATCH, "_tokens"))
            soft = [Limit(_linear_bound(l.expr.xreplace({dim_symbol("_tokens"): top + 1})), l.reason, l.where, l.hard)
                    for l in config_limits(self._loaded.module, [tokens])]
            unique: dict[str, Limit] = {}
            for l in hard + soft:
                unique.setdefault(str(l.expr), l)
            self._limits = list(unique.values())
        return self._limits

    def memory_formula(self, device=None) -> sympy.Expr:
        """The peak over the generation: Max(prefill's peak, the largest decode step's)."""
        kind = self.memory_device(device)
        return sympy.Max(self.memory_model(kind).peak, self.steps.symbolic_peak(kind))

    def memory_at(self, dims: dict[str, int], device=None, quiet: bool = False) -> MemoryPoint:
        """The larger of the prefill's peak and the largest decode step's at this point."""
        point = self._complete(dict(dims))
        prefill = Report.memory_at(self, point, device, quiet)
        decode, ctx = self.steps.memory(point[BATCH], point[PROMPT], point[PROMPT] + point[GEN] - 1,
                                        self.memory_device(device))
        return _larger(prefill, decode, ctx)

    def by_module(self, depth: int | None = None) -> list[dict]:
        """Symbolic totals per module: the prefill's ops and the decode steps' summed over ctx."""
        from costmodel.api import _truncate
        rows: dict[str, dict] = {}
        for op, cost in self._symbolic_ops():
            name = _truncate(op.module, depth)
            row = rows.setdefault(name, {"module": name, **{m: sympy.Integer(0) for m in METRICS}})
            for m in METRICS:
                row[m] += cost[m]
        return list(rows.values())

    def by_op(self) -> list[dict]:
        rows: dict[str, dict] = {}
        for op, cost in self._symbolic_ops():
            row = rows.setdefault(op.target, {"target": op.target, "category": op.category, "count": 0,
                                              **{m: sympy.Integer(0) for m in METRICS}})
            row["count"] += 1
            for m in METRICS:
                row[m] += cost[m]
        return list(rows.values())

    def _symbolic_ops(self):
        for op in self.primary.ops:
            yield op, op.cost
        for piece in self.steps.symbolic_pieces():
            for op in piece.analysis.ops:
                cost = {}
                for m in METRICS:
                    F = self.steps.prefix(op.cost[m])
                    cost[m] = op.cost[m] if F is None else _clamped_sum(F, piece.lo, piece.hi)
                yield op, cost

    def evaluate(self, **dims: int) -> "GeneratePoint":
        """The whole generation at (batch, prompt, gen): totals, per-op figures (the prefill's ops, then
        each decode op summed over the steps), peak, the contract's `generate` object, and with hardware
        the roofline times (time to first token, every decode step)."""
        point = self._complete(dims)
        if point[GEN] < 1:
            raise UsageError(f"gen={point[GEN]}: generate mode needs at least one new token")
        prefill = Report.evaluate(self, **point)
        b, p, g = point[BATCH], point[PROMPT], point[GEN]
        top = p + g - 1
        decode = self.steps.totals(b, p, top)
        totals = {m: prefill.totals[m] + decode[m] for m in METRICS}
        totals.update(params=self.params, param_bytes=self.param_bytes)
        m_decode, ctx = self.steps.memory(b, p, top, self.device_kind)
        pre_mem = MemoryPoint(prefill.totals["peak_memory_bytes"], prefill.totals["memory"],
                              prefill.extra["memory"]["at"], prefill.extra["memory"]["largest"])
        peak = _larger(pre_mem, m_decode, ctx)
        totals["peak_memory_bytes"], totals["memory"], totals["time_s"] = peak.peak_bytes, peak.breakdown, None
        result = GeneratePoint(point, totals, prefill, self, decode)
        result.extra["memory"] = {**prefill.extra["memory"], "at": peak.at, "largest": peak.largest}
        result.extra["generate"] = result.generate_dict()
        if self.hardware:
            result.apply_timing(self.hardware[0], self.tf32)
        return result


class GeneratePoint(Point):
    """One point of a generation: `prefill` is the prefill's own Point (at batch, prompt)."""

    def __init__(self, dims: dict[str, int], totals: dict, prefill: Point, report: GenerateReport, decode: dict):
        super().__init__(dims, totals, prefill.analysis, None, report)
        self.prefill, self.decode_totals = prefill, decode
        self.first_ctx, self.last_ctx = dims[PROMPT], dims[PROMPT] + dims[GEN] - 1
        self.decode_memory_bound_share: float | None = None     # of the decode steps' time, once timed

    @property
    def pieces(self) -> list[tuple[int, int, Analysis]]:
        return self.report.steps.pieces(self.dims[BATCH], self.first_ctx, self.last_ctx)

    @property
    def ops(self) -> list[dict]:
        if self._ops is None:
            ops = [{**op, "name": f"prefill.{op['name']}", "phase": "prefill"} for op in self.prefill.ops]
            pieces = self.pieces
            for lo, hi, analysis in pieces:
                where = "decode" if len(pieces) == 1 else f"decode[{lo}:{hi}]"
                sums = self.report.steps.op_sums(analysis, self.dims[BATCH], lo, hi)
                for op, cost in zip(analysis.ops, sums):
                    ops.append({"name": f"{where}.{op.name}", "target": op.target, "module": op.module,
                                "phase": "decode", "category": op.category, "dtype": op.dtype, **cost,
                                "intensity": None, "bound": None, "time_s": None})
            self._ops = ops
        return self._ops

    def decode_timing(self, hw, tf32: bool = False) -> DecodeTiming:
        return self.report.steps.timing(hw, self.dims[BATCH], self.first_ctx, self.last_ctx, tf32)

    def timing(self, hw, tf32: bool = False) -> dict:
        """Roofline on `hw`: OpTimes in the order of `ops` (decode ops summed over the steps), the
        summary of the whole generation, the prefill's summary and the decode steps' DecodeTiming."""
        from costmodel.hardware import roofline
        pre = self.prefill.timing(hw, tf32)
        dec = self.decode_timing(hw, tf32)
        times = list(pre["op_times"]) + [t for piece in dec.op_times for t in piece]
        model_dtype = next((op["dtype"] for op in self.ops if op["category"] in ("matmul", "conv", "attention")),
                           "float32")
        summary = roofline.summarize(times, self.totals["matmul_flops"], hw, model_dtype, tf32,
                                     pre["summary"].framework_time_s + dec.framework_s)
        return {"hardware": hw, "op_times": times, "summary": summary, "prefill": pre["summary"], "decode": dec}

    def apply_timing(self, hw, tf32: bool = False) -> dict:
        t = self.timing(hw, tf32)
        for op, ot in zip(self.ops, t["op_times"]):
            op.update(time_s=ot.time_s, intensity=ot.intensity, bound=ot.bound)
        s = t["summary"]
        self.totals["time_s"] = s.time_s
        self.extra["time"] = {"device": hw.name, "tf32": tf32, "memory_bound_share": s.memory_bound_share,
                              "mfu": s.mfu, "overhead_time_s": s.overhead_time_s}
        self.extra["generate"] = self.generate_dict(t)
        d = t["decode"]
        self.decode_memory_bound_share = d.memory_bound_s / d.time_s if d.time_s else None
        return t

    def kv_bytes_per_token(self) -> int:
        """What one more token adds to the cache per sequence (0 once a sliding window is full)."""
        b = self.dims[BATCH]
        steps = self.report.steps
        return (steps.cache_bytes(b, self.last_ctx + 1) - steps.cache_bytes(b, self.last_ctx)) // b

    def generate_dict(self, timing: dict | None = None) -> dict:
        """The contract's `generate` object (times null without hardware)."""
        b, g = self.dims[BATCH], self.dims[GEN]
        pre = {"flops": self.prefill.totals["flops"], "bytes": self.prefill.totals["bytes"], "time_s": None}
        dec = {"flops": self.decode_totals["flops"], "bytes": self.decode_totals["bytes"], "time_s": None,
               "first_token_time_s": None, "last_token_time_s": None}
        out = {"prefill": pre, "decode": dec,
               "kv_cache_bytes": self.report.steps.cache_bytes(b, self.last_ctx),
               "time_to_first_token_s": None, "tokens_per_s": None}
        if timing is not None:
            d = timing["decode"]
            pre["time_s"] = timing["prefill"].time_s
            dec["time_s"] = d.time_s
            dec["first_token_time_s"], dec["last_token_time_s"] = float(d.step_time_s[0]), float(d.step_time_s[-1])
            out["time_to_first_token_s"] = pre["time_s"]
            out["tokens_per_s"] = b * g / d.time_s if d.time_s > 0 else None
        return out

    def compare(self, devices: list) -> list[dict]:
        """The generation on each device: time, memory-bound share, MFU, time to first token, tokens/s."""
        rows = []
        for hw in devices:
            t = self.timing(hw, self.report.tf32)
            s, d = t["summary"], t["decode"]
            rows.append({"device": hw.name, "time_s": s.time_s, "memory_bound_share": s.memory_bound_share,
                         "mfu": s.mfu, "time_to_first_token_s": t["prefill"].time_s,
                         "first_token_time_s": float(d.step_time_s[0]), "last_token_time_s": float(d.step_time_s[-1]),
                         "decode_memory_bound_share": d.memory_bound_s / d.time_s if d.time_s else None,
                         "tokens_per_s": self.dims[BATCH] * self.dims[GEN] / d.time_s if d.time_s else None})
        return rows

    def decode_point(self, ctx: int | None = None) -> Point:
        """The decode step at `ctx` (default: the last) as a Point of its own, timed on the first device."""
        p = self.report.decode.evaluate(batch=self.dims[BATCH], ctx=self.last_ctx if ctx is None else ctx)
        return p


def _larger(prefill: MemoryPoint, decode: MemoryPoint, ctx: int) -> MemoryPoint:
    """The larger peak, its `at` saying which step it is in."""
    if decode is not None and decode.peak_bytes > prefill.peak_bytes:
        return MemoryPoint(decode.peak_bytes, decode.breakdown, {**decode.at, "phase": f"decode (ctx={ctx})"},
                           decode.largest)
    return MemoryPoint(prefill.peak_bytes, prefill.breakdown, {**prefill.at, "phase": "prefill"}, prefill.largest)


def _linear_bound(rel: sympy.Rel) -> sympy.Rel:
    """`prompt + gen - 1 <= 1023` -> `prompt + gen <= 1024`: the constant moved to the right."""
    if not isinstance(rel, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return rel
    diff = sympy.expand(rel.lhs - rel.rhs)
    const = diff.as_coeff_Add()[0]
    return type(rel)(diff - const, -const)


def _tidy(expr: sympy.Expr) -> sympy.Expr:
    return sympy.expand(expr) if not expr.has(sympy.Max, sympy.Min, sympy.Sum, sympy.Piecewise) else expr


def analyze_generation(loaded, name: str, specs: list[InputSpec], options, kind: str, devices: list,
                       capability: str, hints: dict[str, int], defaulted: dict[str, int]) -> GenerateReport:
    """Capture the prefill (the primary) and the decode step, and put them together."""
    gen.cache_argument(loaded.module)
    kv = options.kv_dtype
    prefill_step = gen.Step("prefill", dtype=options.dtype, kv_dtype=kv)
    prefill_hints = {d: v for d, v in hints.items() if d in (BATCH, PROMPT)}
    prefill = _first_analysis(loaded, specs, options, kind, prefill_hints, capability, step=prefill_step)
    decode_step = gen.Step("decode", prefill.captured.cache_layers, dtype=options.dtype, kv_dtype=kv)
    decode_specs = decode_inputs(specs)
    decode_hints = {BATCH: hints[BATCH]} if BATCH in hints else {}
    if PROMPT in hints:
        decode_hints[CTX] = max(hints[PROMPT] + hints.get(GEN, 1) - 1, _LOWEST_CTX)
    first = _first_analysis(loaded, decode_specs, options, kind, decode_hints, capability, step=decode_step)
    decode = Report(f"{name} (decode step)", decode_specs, loaded, first, options, kind, devices, capability,
                    step=decode_step)
    report = GenerateReport(name, specs, loaded, prefill, decode, options, kind, devices, capability, defaulted)
    for note in prefill.notes + first.notes:
        report.warn(note)
    return report
