"""One registry of per-op cost rules, filled by `@register(aten.op, ...)` in the family modules.

A rule receives the op's arguments with every tensor replaced by a `TensorSpec` (sympy shape,
dtype) and every SymInt by a sympy expression, plus `out=` (the output spec, or a tuple of them),
and returns an `OpCost`. `rule_for(op)` finds the rule: the op overload, then its packet, then the
pointwise family (ops PyTorch tags `pointwise`), then the metadata-only family (ops whose schema
says every output aliases an input). No rule: `None`, and the caller reports the op unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
import torch

from costmodel import _torch
from costmodel.rules.cost import VIEW_COST, OpCost

Rule = Callable[..., OpCost]
_REGISTRY: dict[object, Rule] = {}


@dataclass(frozen=True)
class TensorSpec:
    """What a rule needs of a tensor: its shape (sympy expressions) and dtype."""

    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> sympy.Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> sympy.Expr:
        return self.numel * self.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


def register(*ops) -> Callable[[Rule], Rule]:
    """Register one rule for ops (packets cover all their overloads). Registering twice is an error."""

    def wrap(fn: Rule) -> Rule:
        for op in ops:
            if op in _REGISTRY:
                raise RuntimeError(f"{op} already has a rule: {_REGISTRY[op].__name__}")
            _REGISTRY[op] = fn
        return fn

    return wrap


def is_metadata_only(op) -> bool:
    """True for ops whose schema declares that every output aliases an input without writing it."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.returns or getattr(op, "is_view", False) is False:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def rule_for(op) -> Rule | None:
    if op in _REGISTRY:
        return _REGISTRY[op]
    packet = getattr(op, "overloadpacket", None)
    if packet is not None and packet in _REGISTRY:
        return _REGISTRY[packet]
    if _torch.is_op_overload(op):
        if torch.Tag.pointwise in op.tags:
            from costmodel.rules.pointwise import pointwise_rule
            return pointwise_rule
        if is_metadata_only(op):
            return view_rule
    return None


def view_rule(*args, out=None, **kwargs) -> OpCost:
    """Metadata only (a view of its input): no FLOPs, no bytes."""
    return VIEW_COST


def registered_ops() -> list[object]:
    return list(_REGISTRY)


def prod(xs) -> sympy.Expr:
    return sympy.Mul(*xs) if xs else sympy.Integer(1)


def tensors_in(x) -> list[TensorSpec]:
    """All TensorSpecs in a (possibly nested) argument."""
    if isinstance(x, TensorSpec):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in tensors_in(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in tensors_in(item)]
    return []


def nbytes_of(x) -> sympy.Expr:
    return sympy.Add(*[t.nbytes for t in tensors_in(x)])


