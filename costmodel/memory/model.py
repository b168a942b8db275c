"""The memory model of one capture: buffers live over a timeline of steps, reduced to a few
candidate peak formulas (Max over them is the peak), evaluated exactly at any point.

The peak is Max(...) over the steps' live totals, each a sum of monomials in the dimensions; a
candidate that another dominates term by term (every monomial is non-negative) is dropped, so the
formula stays short and evaluates in microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy

import torch

from costmodel import _torch
from costmodel._torch import tree_leaves
from costmodel.formulas import Evaluator

CATEGORIES = ("params", "grads", "optimizer_state", "activations", "temporaries")
PARAMS, GRADS, STATE, ACTIVATIONS, TEMPORARIES = range(5)
_LARGEST = 8              # tensors listed at the peak
# what MemoryModel._reduce makes
_REDUCED = {"monomials", "_scale", "_by_category", "_candidates", "_candidate_steps", "_mono_eval", "_live_at",
            "_size_index", "_size_eval"}


@dataclass
class Buffer:
    """One storage: its size in bytes (sympy, user dims), category, and live steps [start, end]."""

    size: sympy.Expr
    category: int
    start: int
    end: int
    node: str
    dtype: str
    shape: str
    source: str = ""    # the graph node whose value this storage is ("" for none: a constant, the optimizer's)
    param: str = ""     # the parameter whose value, gradient or optimizer state it holds ("" for none)


@dataclass
class Step:
    """One point of the timeline: an op of the graph (or of a spliced attention decomposition)."""

    node: str
    target: str
    module: str
    phase: str
    stack: tuple = ()          # module call stack (forward ops), for the frames that hold arguments


@dataclass
class MemoryPoint:
    peak_bytes: int
    breakdown: dict[str, int]
    at: dict[str, str]
    largest: list[dict]

    def extra(self, model: "MemoryModel") -> dict:
        """What Point.extra["memory"] holds."""
        return {"device": model.device, "attention": dict(model.kernels), "at": self.at,
                "largest": self.largest, "amp": model.amp}


class MemoryModel:
    """The live bytes at every step of one capture, reduced to a few candidate peak formulas."""

    def __init__(self, steps: list[Step], buffers: list[Buffer], dims: list[str], device: str,
                 kernels: dict[str, int], amp: bool = False):
        self.steps, self.buffers, self.dims, self.device = steps, buffers, list(dims), device
        self.kernels, self.amp = kernels, amp
        self.warnings: list[str] = []
        self.reads: list[list[int]] = [[]] * len(steps)   # step -> buffers its op reads (when known)
        self._peak = None

    def __getattr__(self, name: str):
        # the reduction is made on first use: `plan` builds dozens of models and asks each only
        # `peak_at`, which needs none of it
        if name in _REDUCED and "_candidates" not in self.__dict__:
            self._reduce()
            return self.__dict__[name]
        raise AttributeError(name)

    # --- symbolic ------------------------------------------------------------------------------

    def _reduce(self) -> None:
        monos: dict[sympy.Expr, int] = {}
        terms: list[list[tuple[int, sympy.Rational]]] = []
        cache: dict[sympy.Expr, list] = {}
        for b in self.buffers:
            if b.size not in cache:
                row = []
                for term in sympy.Add.make_args(sympy.expand(b.size)):
                    coeff, mono = term.as_coeff_Mul()
                    row.append((monos.setdefault(mono, len(monos)), sympy.Rational(coeff)))
                cache[b.size] = row
            terms.append(cache[b.size])
        self.monomials = list(monos)
        denominators = [int(c.q) for row in terms for _, c in row]
        self._scale = math.lcm(*denominators) if denominators else 1
        n, M = len(self.steps), len(self.monomials)
        delta = np.zeros((n + 1, len(CATEGORIES), M), dtype=np.int64)
        for b, row in zip(self.buffers, terms):
            for j, c in row:
                v = int(c * self._scale)
                delta[b.start, b.category, j] += v
                delta[b.end + 1, b.category, j] -= v
        live = np.cumsum(delta[:n], axis=0)                 # [steps, categories, monomials]
        total = live.sum(axis=1)                            # [steps, monomials]
        self._by_category = live
        rows, first = np.unique(total, axis=0, return_index=True)
        order = np.argsort(-rows.sum(axis=1), kind="stable")
        kept: list[int] = []
        for i in order:
            r = rows[i]
            if kept and np.any(np.all(rows[kept] >= r, axis=1)):
                continue
            kept.append(int(i))
        self._candidates = rows[kept]                       # [K, M]
        self._candidate_steps = [int(first[i]) for i in kept]
        self._mono_eval = Evaluator(self.monomials, self.dims) if self.monomials else None
        starts = np.array([b.start for b in self.buffers])
        ends = np.array([b.end for b in self.buffers])
        self._live_at = {s: np.nonzero((starts <= s) & (ends >= s))[0] for s in self._candidate_steps}
        sizes = list(dict.fromkeys(b.size for b in self.buffers))
        self._size_index = {s: i for i, s in enumerate(sizes)}
        self._size_eval = Evaluator(sizes, self.dims)

    def _expr(self, row) -> sympy.Expr:
        return sympy.Add(*[sympy.Rational(int(c), self._scale) * m for c, m in zip(row, self.monomials) if c])

    @property
    def peak(self) -> sympy.Expr:
        """The peak as a formula: Max over the candidates that are the largest somewhere on a
        log-spaced grid of the dimensions (1 to 2**24 each; see `_formula_candidates`)."""
        if self._peak is None:
            exprs = [self._expr(self._candidates[i]) for i in self._formula_candidates()]
            self._peak = exprs[0] if len(exprs) == 1 else sympy.Max(*exprs, evaluate=False)
        return self._peak

    def _formula_candidates(self) -> list[int]:
        """Of the undominated candidates, those that are the maximum at some point of a grid: every
        dimension at 2**0 .. 2**24 (random log-uniform points beyond 3 dimensions). A candidate left
        out can exceed the formula only between grid points, and there by little; evaluation
        (`evaluate`, `peak_bytes`) always takes the maximum over all undominated candidates."""
        K = len(self._candidates)
        if K == 1 or not self.monomials:
            return list(range(K))
        d = len(self.dims)
        if d <= 3:
            axes = np.meshgrid(*[2.0 ** np.arange(25)] * d, indexing="ij")
            points = np.stack([a.ravel() for a in axes], axis=1)
        else:
            rng = np.random.default_rng(0)
            points = 2.0 ** rng.uniform(0, 24, size=(20000, d))
        fn = sympy.lambdify([sympy.Symbol(x, integer=True, positive=True) for x in self.dims], self.monomials,
                            modules=[{"floor": np.floor, "ceiling": np.ceil, "Max": np.maximum,
                                      "Min": np.minimum}, "numpy"])
        cols = [np.broadcast_to(np.asarray(v, dtype=float), (len(points),)) for v in fn(*points.T)]
        mono = np.stack(cols, axis=1)                                   # [points, M]
        values = mono @ self._candidates.astype(float).T                # [points, K]
        return sorted(set(np.argmax(values, axis=1).tolist()))

    def breakdown_formulas(self, step: int) -> dict[str, sympy.Expr]:
        return {name: self._expr(self._by_category[step, k]) for k, name in enumerate(CATEGORIES)}

    # --- evaluation ----------------------------------------------------------------------------

    def _values(self, values: dict[str, int]) -> list[int]:
        if self._mono_eval is None:
            return []
        return [int(v) if float(v).is_integer() else v for v in self._mono_eval(values)]

    def peak_bytes(self, values: dict[str, int]) -> int:
        mv = self._values(values)
        return max(self._dot(r, mv) for r in self._candidates)

    def _dot(self, row, mv) -> int:
        s = sum(int(c) * v for c, v in zip(row, mv) if c)
        return int(s // self._scale) if self._scale != 1 else int(s)

    def peak_at(self, values: dict[str, int], sizes: dict | None = None) -> int:
        """`peak_bytes(values)` straight from the buffers, without the reduction to candidate
        formulas: the live total at every step, exactly (each size evaluated once; `sizes`, a dict
        of expression -> value, may be shared by the models of one capture), its maximum floored."""
        from fractions import Fraction
        from costmodel.symbols import dim_symbol
        sizes = {} if sizes is None else sizes
        sub = {dim_symbol(d): v for d, v in values.items()}
        exact = []
        for b in self.buffers:
            if b.size not in sizes:
                v = sympy.sympify(b.size).xreplace(sub)
                sizes[b.size] = int(v) if v.is_Integer else Fraction(int(v.p), int(v.q))
            exact.append(sizes[b.size])
        scale = math.lcm(*[x.denominator for x in exact if isinstance(x, Fraction)]) or 1
        delta = np.zeros(len(self.steps) + 1, dtype=np.int64)
        vals = np.array([int(x * scale) for x in exact], dtype=np.int64)
        np.add.at(delta, np.array([b.start for b in self.buffers], dtype=np.int64), vals)
        np.add.at(delta, np.array([b.end + 1 for b in self.buffers], dtype=np.int64), -vals)
        top = int(np.cumsum(delta[:-1]).max()) if len(self.steps) else 0
        return top // scale

    def evaluate(self, values: dict[str, int]) -> MemoryPoint:
        mv = self._values(values)
        totals = [self._dot(r, mv) for r in self._candidates]
        k = max(range(len(totals)), key=lambda i: totals[i])
        step = self._candidate_steps[k]
        breakdown = {name: self._dot(self._by_category[step, c], mv) for c, name in enumerate(CATEGORIES)}
        s = self.steps[step]
        sizes = self._size_eval(values)
        live = [(int(sizes[self._size_index[self.buffers[i].size]]), i) for i in self._live_at[step]]
        live.sort(key=lambda e: -e[0])
        largest = [{"bytes": nbytes, "category": CATEGORIES[self.buffers[i].category], "node": self.buffers[i].node,
                    "dtype": self.buffers[i].dtype, "shape": self.buffers[i].shape}
                   for nbytes, i in live[:_LARGEST]]
        at = {"node": s.node, "target": s.target, "module": s.module, "phase": s.phase}
        return MemoryPoint(totals[k], breakdown, at, largest)


def storage_keys(val) -> list:
    """(storage id, tensor) for every tensor in a node's value."""
    out = []
    for t in tree_leaves(val):
        if isinstance(t, torch.Tensor):
            try:
                out.append((_torch.storage_key(t), t))
            except (NotImplementedError, RuntimeError):
                continue
    return out
