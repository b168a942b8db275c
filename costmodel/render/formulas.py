"""Formulas for people: the exact expressions, rewritten to be read (JSON keeps the exact form).

Conv nets make every size a floor division: a stride-2 conv with padding turns `height` into
`floor(height/2 - 1/2) + 1`, and ResNet-50's peak memory is thousands of characters of such terms.
For display:
  floor(x/k - 1/k) + 1  ->  ceiling(x/k)      (for integer x >= 1 and positive integer k)
and each floor/ceiling of a dimension is named once and defined below the formulas:
  28835840*batch*height_32*width_32 + ...    where height_32 = ceiling(height/32)
"""

from __future__ import annotations

import re

import sympy


def _ceiling_form(expr: sympy.Expr) -> sympy.Expr:
    """floor(x/k - 1/k) -> ceiling(x/k) - 1 wherever it occurs (then sympy cancels the +1)."""
    def rewrite(f):
        arg = sympy.expand(f.args[0])
        const, rest = arg.as_independent(*arg.free_symbols, as_Add=True)
        if not rest.free_symbols or const == 0:
            return f
        k = sympy.denom(sympy.together(rest))
        if k.is_Integer and k > 1 and const == sympy.Rational(-1, k):
            return sympy.ceiling(rest) - 1
        return f
    return expr.replace(lambda e: isinstance(e, sympy.floor), rewrite)


def _name(f: sympy.Expr) -> str:
    """ceiling(height/32) -> height_32, floor(seq/4) -> seq_4f; anything else -> a generic name."""
    arg = sympy.expand(f.args[0])
    free = sorted(arg.free_symbols, key=str)
    if len(free) == 1:
        k = sympy.denom(sympy.together(arg))
        if sympy.expand(arg * k) == free[0] and k.is_Integer:
            return f"{free[0]}_{k}" + ("" if isinstance(f, sympy.ceiling) else "f")
    return ""


def readable(formulas: dict[str, sympy.Expr]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({name: formula text}, [(short name, definition), ...]) for display."""
    rewritten = {k: sympy.expand(_ceiling_form(sympy.sympify(v))) if isinstance(v, sympy.Basic) else v
                 for k, v in formulas.items()}
    atoms: dict[sympy.Expr, sympy.Symbol] = {}
    for v in rewritten.values():
        if not isinstance(v, sympy.Basic):
            continue
        for a in sorted(v.atoms(sympy.floor, sympy.ceiling), key=str):
            if a not in atoms and not a.atoms(sympy.floor, sympy.ceiling) - {a}:
                name = _name(a)
                if name:
                    atoms[a] = sympy.Symbol(name, integer=True, positive=True)
    shown = {k: _text(v.xreplace(atoms)) if isinstance(v, sympy.Basic) else str(v) for k, v in rewritten.items()}
    used = {str(s) for text in shown.values() for s in re.findall(r"\b\w+_\d+f?\b", text)}
    where = [(str(s), str(a)) for a, s in sorted(atoms.items(), key=lambda kv: str(kv[1])) if str(s) in used]
    return shown, where


def _text(expr: sympy.Expr) -> str:
    return str(expr)
