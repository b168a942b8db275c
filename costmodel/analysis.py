"""The generic engine: a captured graph -> one OpCost per node -> symbolic totals, views, and
evaluation at concrete points. `analyze()` is the public entry point; `Report` the public class.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from costmodel import _torch
from costmodel.capture import trace as cap
from costmodel.rules.cost import OpCost
from costmodel.errors import AnalysisError
from costmodel.formulas import Evaluator, plain
from costmodel.rules import TensorSpec, rule_for
from costmodel.capture.specs import dtype_name
from costmodel.symbols import dim_symbol

METRICS = ("flops", "matmul_flops", "bytes_read", "bytes_written", "bytes")


@dataclass
class OpRecord:
    """One costed node of the graph."""

    name: str
    target: str
    module: str
    phase: str                 # forward | loss | backward | optimizer
    category: str
    dtype: str
    cost: dict[str, sympy.Expr]  # METRICS -> formula


@dataclass
class Analysis:
    """The costs of one capture (one graph, valid where its guards hold)."""

    captured: cap.Captured
    ops: list[OpRecord]
    unsupported: dict[str, list[str]]   # target -> modules where it occurred
    totals: dict[str, sympy.Expr] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)     # the SDPA kernel of each attention node
    notes: list[str] = field(default_factory=list)            # assumptions made choosing them
    _evaluator: Evaluator | None = None
    _op_evaluator: Evaluator | None = None

    def valid_at(self, point: dict[str, int]) -> bool:
        if any(point.get(d) != v for d, v in self.captured.fixed.items()):
            return False
        values = {dim_symbol(d): point[d] for d in self.captured.dims if d in point}
        return all(g.holds(values) for g in self.captured.guards)


def tensor_spec(c: cap.Captured, value) -> TensorSpec:
    return TensorSpec(tuple(plain(c.to_user(s)) for s in value.shape), value.dtype)


def _spec(c: cap.Captured, value):
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tensor_spec(c, value)
    if isinstance(value, torch.SymInt):
        return plain(c.to_user(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(c, v) for v in value)
    return value


def _op_dtype(args, out) -> str:
    from costmodel.rules import tensors_in
    for t in tensors_in(list(args)) + tensors_in(out):
        if t.dtype.is_floating_point:
            return dtype_name(t.dtype)
    return "float32"


def cost_graph(c: cap.Captured, kernels: dict[str, str] | None = None) -> Analysis:
    """Apply the rules to every aten call in the graph. `kernels`: the SDPA kernel of each attention
    node (rules.attention.attention_kernels), "math" where none is given."""
    kernels = kernels or {}
    ops: list[OpRecord] = []
    unsupported: dict[str, list[str]] = collections.defaultdict(list)
    cache: dict = {}
    for node in c.graph.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if not _torch.is_op_overload(target):
            if _torch.is_higher_order_op(target):
                unsupported[str(target)].append(node.meta.get("costmodel_module", ""))
            continue   # getitem and SymInt arithmetic: shape bookkeeping, not tensor ops
        if isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, int, bool)):
            continue   # a size read off a tensor (sym_size, sym_numel...): bookkeeping too
        rule = rule_for(target)
        module = node.meta.get("costmodel_module", cap.ROOT)
        if rule is None:
            unsupported[str(target)].append(module)
            continue
        args, kwargs, out = _spec(c, node.args), _spec(c, dict(node.kwargs)), _spec(c, node.meta.get("val"))
        kernel = kernels.get(node.name, "math")
        key = (target, repr(args), repr(kwargs), repr(out), kernel)
        if key not in cache:
            extra = {"kernel": kernel} if node.name in kernels else {}
            try:
                cost: OpCost = rule(*args, **kwargs, out=out, op=target, **extra)
            except Exception as e:
                raise AnalysisError(f"the rule for {target} failed on node {node.format_node()} in {module}: "
                                    f"{type(e).__name__}: {e}") from e
            cache[key] = (cost, _op_dtype(args, out))
        cost, dtype = cache[key]
        ops.append(OpRecord(node.name, str(target), module, node.meta.get("costmodel_phase", "forward"),
                            cost.category, dtype,
                            {"flops": sympy.sympify(cost.flops), "matmul_flops": sympy.sympify(cost.matmul_flops),
                             "bytes_read": sympy.sympify(cost.bytes_read),
                             "bytes_written": sympy.sympify(cost.bytes_written),
                             "bytes": sympy.sympify(cost.bytes)}))
    analysis = Analysis(c, ops, dict(unsupported), kernels=dict(kernels))
    analysis.totals = totals_of(ops)
    return analysis


def totals_of(ops: list[OpRecord]) -> dict[str, sympy.Expr]:
    """Each metric summed over the ops, as one formula."""
    return {m: sympy.Add(*[op.cost[m] for op in ops]) for m in METRICS}


def params_of(model: torch.nn.Module) -> tuple[int, int]:
    """(count, bytes) of the model's parameters, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

