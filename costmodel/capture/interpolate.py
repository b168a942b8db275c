"""Formulas in a dimension the capture pins: captured at several values, interpolated, verified.

Some models fix a dimension while they are traced: an RNN unrolls its sequence (one cell per step),
a Python loop runs as many times as a size says. The trace then holds that dimension as a number,
and its totals are numbers in it. They are still polynomials in it (a cell costs the same at every
step; an unrolled loop of n steps costs n times a step, plus what scales inside a step), and the
graph bounds the degree: a dimension that appears k times in one tensor's shape contributes at
most degree k to that tensor's cost, and repeating the graph once per step adds one more. So:

    capture at n0 (the first capture), n1, n2, ... (small values, each a full capture with the
    other dimensions symbolic);
    fit the polynomial of the lowest degree d <= bound through d + 1 of them (Lagrange's form,
    exact rational coefficients, which may be formulas in the other dimensions);
    verify it at one more captured value; a formula that fails there is not reported.

The peak memory is a Max over candidate peaks (phases of the step); each candidate is interpolated
when every capture has the same number of them, and the Max is verified as a whole; otherwise the
peak is left to the per-point captures (said so). Which modules
scale with the dimension (their op count changes between captures) is reported as the part of the
formula that is fitted rather than traced.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import sympy

from costmodel.errors import AnalysisError
from costmodel.symbols import dim_symbol

_CANDIDATES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37)   # small, prime: no accidental equality with sizes
_MAX_DEGREE = 4


@dataclass
class Interpolation:
    dim: str
    degree: int
    points: list[int]            # the values the fit went through
    verified_at: int             # the value the fit was checked at
    totals: dict[str, sympy.Expr]
    peak: sympy.Expr | None      # None: the peak is not one polynomial; per-point captures give it
    modules: list[str] = field(default_factory=list)   # modules whose ops scale with the dimension

    def method(self, metric: str) -> dict:
        """The contract's symbolic_method entry of one total."""
        if metric == "peak_memory_bytes" and self.peak is None:
            return {"method": "per-point", "dim": self.dim,
                    "note": f"the peak is a maximum that changes form with {self.dim}; each point is captured"}
        return {"method": "interpolated", "dim": self.dim, "degree": self.degree, "points": list(self.points),
                "verified_at": {self.dim: self.verified_at}}


def degree_bound(captured, value: int) -> int:
    """1 + the most times `value` appears in one node's shape (see the module docstring)."""
    import torch
    most = 0
    for node in captured.graph.graph.nodes:
        val = node.meta.get("val")
        for t in (val if isinstance(val, (list, tuple)) else [val]):
            if isinstance(t, torch.Tensor):
                most = max(most, sum(1 for s in t.shape if isinstance(s, int) and s == value))
    return min(_MAX_DEGREE, 1 + most)


def lagrange(points: list[tuple[int, sympy.Expr]], x: sympy.Symbol) -> sympy.Expr:
    """The polynomial through (x_i, y_i), y_i formulas in other symbols: sum y_i * prod (x - x_j)/(x_i - x_j)."""
    total = sympy.Integer(0)
    for i, (xi, yi) in enumerate(points):
        basis = sympy.Integer(1)
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis *= (x - xj) / sympy.Integer(xi - xj)
        total += yi * basis
    return sympy.expand(total)


def interpolate(report, dim: str, value: int) -> Interpolation | None:
    """The totals of `report` as polynomials in the pinned dimension `dim` (pinned at `value` by the
    first capture), or None where no polynomial of degree <= the bound verifies."""
    first = report.primary
    bound = degree_bound(first.captured, value)
    x = dim_symbol(dim)
    captures: list[tuple[int, object]] = [(value, first)]
    candidates = [v for v in _CANDIDATES if v != value]
    metrics = list(first.totals)

    def more() -> bool:
        while candidates:
            v = candidates.pop(0)
            try:
                captures.append((v, report.capture_at({dim: v})))
                return True
            except AnalysisError:
                continue
        return False

    for degree in range(1, bound + 1):
        while len(captures) < degree + 2:
            if not more():
                return None
        fit, check = captures[:degree + 1], captures[degree + 1]
        formulas = {m: lagrange([(v, a.totals[m]) for v, a in fit], x) for m in metrics}
        if all(sympy.expand(formulas[m].subs(x, check[0]) - check[1].totals[m]) == 0 for m in metrics):
            peak = _peak(report, fit, check, x)
            return Interpolation(dim, degree, [v for v, _ in fit], check[0], formulas, peak,
                                 _scaling_modules([a for _, a in captures]))
    return None


def _peak(report, fit, check, x) -> sympy.Expr | None:
    """The peak interpolated candidate by candidate: each capture's peak is Max(c_1, ..., c_K) over
    the same K phases of the step (end of forward, optimizer, ...); they are matched by their order
    at a reference point, interpolated each, and the Max of them verified as a whole."""
    def candidates(analysis):
        peak = report.memory_model(analysis=analysis).peak
        return list(peak.args) if isinstance(peak, sympy.Max) else [peak]

    fitted = [(v, candidates(a)) for v, a in fit]
    actual = candidates(check[1])
    if len({len(c) for _, c in fitted} | {len(actual)}) != 1:
        return None
    reference = {s: 1031 for s in set().union(*(c.free_symbols for _, cs in fitted for c in cs)) - {x}}
    order = lambda cs: sorted(cs, key=lambda c: float(c.xreplace(reference)))
    fitted = [(v, order(cs)) for v, cs in fitted]
    formulas = [lagrange([(v, cs[i]) for v, cs in fitted], x) for i in range(len(actual))]
    at_check = {sympy.expand(f.subs(x, check[0])) for f in formulas}
    if at_check != {sympy.expand(c) for c in actual}:
        return None
    return formulas[0] if len(formulas) == 1 else sympy.Max(*formulas, evaluate=False)


def _scaling_modules(analyses) -> list[str]:
    """Modules whose number of ops differs between the captures (the unrolled ones), outermost."""
    counts = [collections.Counter(op.module for op in a.ops) for a in analyses]
    modules = sorted(m for m in set().union(*counts) if len({c.get(m, 0) for c in counts}) > 1)
    return [m for m in modules if not any(m.startswith(o + ".") for o in modules)]
