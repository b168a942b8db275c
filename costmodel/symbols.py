"""The only place sympy symbols for the user's dimensions are made.

Every dimension (batch, seq, height, ...) is a positive integer symbol named exactly as the user
named it, so formulas print in the user's words and `sympy.sympify` of a printed formula gives
back the same symbols.
"""

from __future__ import annotations

import functools

import sympy


@functools.lru_cache(maxsize=None)
def dim_symbol(name: str) -> sympy.Symbol:
    """dim_symbol("seq") -> seq, an integer, positive sympy Symbol."""
    return sympy.Symbol(name, integer=True, positive=True)


def parse_formula(text: str, dims: list[str]) -> sympy.Expr:
    """Parse a printed formula back into an expression over the dimension symbols."""
    return sympy.sympify(text, locals={d: dim_symbol(d) for d in dims} | {"Max": sympy.Max, "Min": sympy.Min})


def symbols_for(*names: str) -> tuple[sympy.Symbol, ...]:
    """symbols_for("batch", "seq") -> (batch, seq): the symbols formulas are written in."""
    return tuple(dim_symbol(n) for n in names)
