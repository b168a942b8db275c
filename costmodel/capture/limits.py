"""Limits of a model that no guard records: where the real model fails although the capture runs.

Fake tensors do not look at index values, so a learned position table caps the sequence without
any guard saying so: GPT-2 builds `position_ids = arange(seq)` and looks them up in a 1024-row
table; at seq = 1025 the real model raises `IndexError`, the capture does not. `index_limits` finds
such limits in the graph by following the value range of integer tensors made by `arange` through
views, casts and additions to the embedding/index/gather ops that read a table with them:

    arange(end)               -> values in [0, end - 1]
    arange(start, end)        -> [start, end - 1]
    view, expand, slice, cast -> the same range (a subset of it, for slices)
    x + c, x - c, x * c       -> the range shifted or scaled (c a number or a size)
    embedding(W, idx)         -> the table's limit: max(idx) <= W.shape[0] - 1

`config_limits` adds what a Hugging Face config declares (`max_position_embeddings`, `n_positions`)
for the sequence dimension of the token inputs: the context the model was built for. A table limit
is hard (the real model fails past it); a config limit is soft (rotary models run past it, with
the quality their training gives); both are reported, and searches for the largest value that fits
stop at both.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from costmodel.formulas import plain

# ops whose output holds (a subset of) the values of their first argument
_SAME_VALUES = {
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.default", "aten.squeeze.dims", "aten.expand.default",
    "aten.slice.Tensor", "aten.select.int", "aten.clone.default", "aten._to_copy.default",
    "aten.contiguous.default", "aten.alias.default", "aten.permute.default", "aten.transpose.int",
    "aten.t.default", "aten.lift_fresh_copy.default", "aten.detach.default", "aten.repeat.default",
    "aten.flatten.using_ints", "aten.narrow.default", "aten.index_select.default",
}


@dataclass(frozen=True)
class Limit:
    """A bound on the dimensions outside which the real model cannot run (hard) or was not built
    to run (soft). `expr` is a sympy relation in the user's dimension symbols."""

    expr: sympy.Basic
    reason: str          # what imposes it, in words
    where: str = ""      # module path or source line
    hard: bool = True

    def holds(self, values: dict[sympy.Symbol, int]) -> bool:
        result = self.expr.xreplace({s: sympy.Integer(v) for s, v in values.items()})
        return bool(result) if result in (sympy.true, sympy.false) else True

    def bound(self, dim: sympy.Symbol, values: dict | None = None) -> int | None:
        """The largest value of `dim` the limit admits when it bounds `dim` from above, the other
        dimensions at `values` (names or symbols -> int; a limit on the sum prompt + gen bounds gen
        once prompt has a value)."""
        expr = self.expr
        if values:
            expr = expr.xreplace({(k if isinstance(k, sympy.Symbol) else sympy.Symbol(k, integer=True, positive=True)):
                                  sympy.Integer(v) for k, v in values.items()})
        if expr.free_symbols != {dim} or not isinstance(expr, (sympy.Le, sympy.Lt)):
            return None
        solved = sympy.solve_univariate_inequality(expr, dim, relational=False)
        if isinstance(solved, sympy.Interval) and solved.sup.is_finite:
            top = sympy.floor(solved.sup)
            return int(top - 1 if solved.right_open and top == solved.sup else top)
        return None

    def describe(self) -> str:
        """'seq <= 1024, the embedding table of 1024 rows ... (transformer.wpe)'."""
        return f"{self.expr}, {self.reason}" + (f" ({self.where})" if self.where else "")

    def __str__(self) -> str:
        return self.describe()


def index_limits(captured) -> list[Limit]:
    """Upper limits on the dimensions from tables indexed by arange-derived positions."""
    ranges: dict[fx.Node, tuple[sympy.Expr, sympy.Expr]] = {}
    limits: dict[str, Limit] = {}

    def size(x) -> sympy.Expr | None:
        if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
            return sympy.expand(plain(captured.to_user(x)))
        if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.SymInt):
            return sympy.expand(plain(captured.to_user(x.meta["val"])))
        return None

    def check(node: fx.Node, table: fx.Node, index, dim: int, what: str) -> None:
        if not isinstance(index, fx.Node) or index not in ranges or not isinstance(table, fx.Node):
            return
        val = table.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() <= dim:
            return
        rows = sympy.expand(plain(captured.to_user(val.shape[dim])))
        top = ranges[index][1]
        slack = sympy.expand(rows - 1 - top)
        if not slack.free_symbols or slack.is_nonnegative:
            return           # always inside the table (e.g. a mask indexed by arange of its own size)
        module = node.meta.get("costmodel_module", "")
        expr = _solved(sympy.Le(top, rows - 1))
        key = str(expr)
        if key not in limits:
            limits[key] = Limit(expr, f"{what} of {rows} rows indexed by positions up to {top}", module)

    for node in captured.graph.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        args = node.args
        if target.startswith("aten.arange"):
            if target == "aten.arange.default":
                start, end = sympy.Integer(0), size(args[0])
            else:
                start, end = size(args[0]), size(args[1])
            step = size(args[2]) if target == "aten.arange.start_step" and len(args) > 2 else sympy.Integer(1)
            if start is not None and end is not None and step is not None and step.is_positive:
                ranges[node] = (start, end - 1)
        elif target in _SAME_VALUES and args and isinstance(args[0], fx.Node) and args[0] in ranges:
            if target == "aten.index_select.default":
                check(node, args[0], args[2], args[1], "a table")
                continue
            ranges[node] = ranges[args[0]]
        elif target in ("aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.add.Scalar",
                        "aten.sub.Scalar", "aten.mul.Scalar") and len(args) >= 2:
            a, b = args[0], args[1]
            ra = ranges.get(a) if isinstance(a, fx.Node) else None
            rb = ranges.get(b) if isinstance(b, fx.Node) else None
            cb = size(b) if rb is None else None
            ca = size(a) if ra is None else None
            op = target.split(".")[1]
            combined = None
            if ra is not None and (rb is not None or cb is not None):
                combined = _combine(op, ra, rb if rb is not None else (cb, cb))
            elif rb is not None and ca is not None and op != "sub":
                combined = _combine(op, rb, (ca, ca))
            if combined is not None:
                ranges[node] = combined
        elif target == "aten.embedding.default":
            check(node, args[0], args[1], 0, "the embedding table")
        elif target in ("aten.index.Tensor", "aten._unsafe_index.Tensor"):
            for dim, idx in enumerate(args[1] if len(args) > 1 else []):
                check(node, args[0], idx, dim, "the indexed tensor")
        elif target == "aten.gather.default":
            check(node, args[0], args[2], args[1], "the gathered tensor")
    return list(limits.values())


def _solved(rel: sympy.Rel) -> sympy.Rel:
    """`seq - 1 <= 511` -> `seq <= 512`: a linear bound on one dimension, solved for it."""
    free = rel.free_symbols
    if len(free) != 1:
        return rel
    d = next(iter(free))
    diff = sympy.expand(rel.lhs - rel.rhs)            # diff <= 0
    poly = sympy.Poly(diff, d) if diff.is_polynomial(d) else None
    if poly is None or poly.degree() != 1:
        return rel
    a, b = poly.all_coeffs()
    if not (a.is_positive and a.is_number and b.is_number):
        return rel
    return sympy.Le(d, sympy.floor(-b / a))


def _combine(op: str, a, b):
    """The range of a + b, a - b or a * b; None where it is not known (a product with negatives)."""
    (lo_a, hi_a), (lo_b, hi_b) = a, b
    if op == "add":
        return sympy.expand(lo_a + lo_b), sympy.expand(hi_a + hi_b)
    if op == "sub":
        return sympy.expand(lo_a - hi_b), sympy.expand(hi_a - lo_b)
    if lo_a.is_nonnegative and lo_b.is_nonnegative:
        return sympy.expand(lo_a * lo_b), sympy.expand(hi_a * hi_b)
    return None


_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_limits(model: torch.nn.Module, inputs) -> list[Limit]:
    """The context a Hugging Face config declares, on the sequence dimension (the last named one)
    of each integer token input: soft limits."""
    from costmodel.symbols import dim_symbol
    config = getattr(model, "config", None)
    if config is None:
        return []
    for key in _CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            break
    else:
        return []
    out: dict[str, Limit] = {}
    for spec in inputs:
        if spec.dtype.is_floating_point or spec.dtype == torch.bool or len(spec.dims) < 2:
            continue
        last = spec.dims[-1]
        if isinstance(last, str) and last not in out:
            out[last] = Limit(sympy.Le(dim_symbol(last), value), f"config.{key} = {value}",
                              type(config).__name__, hard=False)
    return list(out.values())
