"""Plain sympy from torch's shape expressions, fast evaluation, and complexity degrees.

Shapes from the shape environment use torch's own sympy functions (FloorDiv, CeilDiv, Max, ...).
`plain` rewrites them into standard sympy, so a printed formula parses back with `sympy.sympify`
and compiles with `sympy.lambdify`. `Evaluator` compiles many formulas once and evaluates them
exactly (Python integers) at any point in microseconds.
"""

from __future__ import annotations

import math

import sympy
from costmodel._torch import sympy_functions

tf = sympy_functions()

_REWRITES = {
    tf.FloorDiv: lambda a, b: sympy.floor(a / b),
    tf.CleanDiv: lambda a, b: a / b,
    tf.CeilDiv: lambda a, b: sympy.ceiling(a / b),
    tf.IntTrueDiv: lambda a, b: a / b,
    tf.FloatTrueDiv: lambda a, b: a / b,
    tf.PowByNatural: lambda a, b: a ** b,
    tf.FloatPow: lambda a, b: a ** b,
    tf.Max: lambda *a: sympy.Max(*a),
    tf.Min: lambda *a: sympy.Min(*a),
    tf.Identity: lambda a: a,
    tf.ToFloat: lambda a: a,
    tf.TruncToInt: lambda a: sympy.floor(a),
    tf.FloorToInt: lambda a: sympy.floor(a),
    tf.CeilToInt: lambda a: sympy.ceiling(a),
    tf.ModularIndexing: lambda x, d, m: sympy.Mod(sympy.floor(x / d), m),
    tf.PythonMod: lambda a, b: sympy.Mod(a, b),
    tf.Mod: lambda a, b: sympy.Mod(a, b),
}


def plain(expr):
    """Torch's sympy functions -> standard sympy, recursively."""
    if not isinstance(expr, sympy.Basic) or not expr.args:
        return expr
    args = [plain(a) for a in expr.args]
    rewrite = _REWRITES.get(expr.func)
    if rewrite is not None:
        return rewrite(*args)
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


def degree(expr, sym: sympy.Symbol) -> int:
    """Polynomial degree of expr in sym, reading floor(x) and ceiling(x) as x and Max as its
    largest argument: degree(24*b*s**2 + 10*s, s) == 2; a conv's floor((h - 1)/2) + 1 has degree 1."""
    if not isinstance(expr, sympy.Basic) or sym not in expr.free_symbols:
        return 0
    if expr == sym:
        return 1
    if isinstance(expr, sympy.Add):
        return max(degree(a, sym) for a in expr.args)
    if isinstance(expr, (sympy.Max, sympy.Min)):
        degrees = [degree(a, sym) for a in expr.args]
        return max(degrees) if isinstance(expr, sympy.Max) else min(degrees)
    if isinstance(expr, sympy.Mul):
        return sum(degree(a, sym) for a in expr.args)
    if isinstance(expr, sympy.Pow) and expr.exp.is_number:
        return int(math.ceil(degree(expr.base, sym) * float(expr.exp)))
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        return degree(expr.args[0], sym)
    if isinstance(expr, sympy.Mod):
        return 0
    return max(degree(a, sym) for a in expr.args)


class Evaluator:
    """Compile formulas once; evaluate them at points. Unique formulas are compiled once each."""

    def __init__(self, exprs: list, dims: list[str]):
        self.dims = list(dims)
        uniq: dict = {}
        self.index = [uniq.setdefault(e, len(uniq)) for e in exprs]
        self.unique = list(uniq)
        self.symbols = [sympy.Symbol(d, integer=True, positive=True) for d in self.dims]
        self._fn = sympy.lambdify(self.symbols, self.unique, modules=[{"floor": _floor, "ceiling": _ceil,
                                                                        "Max": max, "Min": min}, "math"])

    def __call__(self, values: dict[str, int]) -> list:
        results = self._fn(*(values[d] for d in self.dims))
        for i, r in enumerate(results):
            if isinstance(r, float):  # a rational coefficient went through floats: redo it exactly
                exact = sympy.sympify(self.unique[i]).xreplace(
                    {s: sympy.Integer(values[d]) for s, d in zip(self.symbols, self.dims)})
                results[i] = int(exact) if exact.is_integer else float(exact)
        return [results[i] for i in self.index]


def _floor(x):
    return x.__floor__() if hasattr(x, "__floor__") else math.floor(x)


def _ceil(x):
    return x.__ceil__() if hasattr(x, "__ceil__") else math.ceil(x)
