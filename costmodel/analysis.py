"""The generic engine: a captured graph -> one OpCost per node -> symbolic totals, views, and
evaluation at concrete points. `analyze()` is the public entry point; `Report` the public class.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from costmodel import _torch
from costmodel.capture import trace as cap
from costmodel.capture.blocks import COPY as COPY_OF_BLOCK, COPY_OF
from costmodel.rules.cost import CONV, COPY, NORM, POINTWISE, SOFTMAX, VIEW, OpCost
from costmodel.errors import AnalysisError
from costmodel.formulas import Evaluator, plain
from costmodel.hardware.kernels import (ALLOC_FEATURE, AUTOGRAD_NODE_FEATURE, CHANNELS_LAST, ENGINE_CALL_FEATURE,
                                        INNER_STRIDE_FEATURE, INTERNAL_FEATURE, SHAPE_ONLY_FEATURE, STRIDED_FEATURE)
from costmodel.rules import TensorSpec, rule_for
from costmodel.capture.specs import dtype_name
from costmodel.symbols import dim_symbol

METRICS = ("flops", "matmul_flops", "bytes_read", "bytes_written", "bytes")
SHAPE_ONLY = {"aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
              "aten.sym_storage_offset.default"}


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
    # The kernel class that prices it on a calibrated device (costmodel/hardware/kernels.py).
    kernel: str = "pointwise"
    features: dict[str, sympy.Expr] = field(default_factory=dict)   # shape features, and alloc_bytes
    # The storages it reads (the node that made each, through views) with the bytes it reads of
    # each, and the storage it writes: what the cache model of a calibrated device follows.
    reads: tuple[tuple[str, sympy.Expr], ...] = ()
    writes: str | None = None
    # a dense 2-D convolution's call as eager makes it, less the input's sizes (features in_d0..in_d3):
    # (weight shape, stride, padding, dilation, transposed, output padding, groups, backward), from
    # which a point picks the kernel eager runs there (api.Point.kernel_class, hardware.eager_backend)
    conv_call: tuple | None = None


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
    _feature_evaluator: Evaluator | None = None
    _reads_evaluator: Evaluator | None = None

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
    copies: dict = {}
    calls_seen: set = set()
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
        kernel = kernels.get(node.name, "math")
        # a copy of a repeated block's node (capture.blocks) has its values' shapes: its cost too
        source = node.meta.get(COPY_OF)
        if source is None or (source, kernel) not in copies:
            args, kwargs, out = _spec(c, node.args), _spec(c, dict(node.kwargs)), _spec(c, node.meta.get("val"))
            key = (target, repr(args), repr(kwargs), repr(out), kernel)
            if key not in cache:
                extra = {"kernel": kernel} if node.name in kernels else {}
                try:
                    cost: OpCost = rule(*args, **kwargs, out=out, op=target, **extra)
                except Exception as e:
                    raise AnalysisError(f"the rule for {target} failed on node {node.format_node()} in {module}: "
                                        f"{type(e).__name__}: {e}") from e
                cache[key] = (cost, _op_dtype(args, out),
                              {"flops": sympy.sympify(cost.flops), "matmul_flops": sympy.sympify(cost.matmul_flops),
                               "bytes_read": sympy.sympify(cost.bytes_read),
                               "bytes_written": sympy.sympify(cost.bytes_written),
                               "bytes": sympy.sympify(cost.bytes)})
            if source is not None:
                copies[(source, kernel)] = cache[key]
        cost, dtype, formulas = copies[(source, kernel)] if source is not None else cache[key]
        kernel_class, features = _timing_class(c, node, cost, kernel, calls_seen)
        conv_call = _conv_call(c, node, kernel_class, features)
        ops.append(OpRecord(node.name, str(target), module, node.meta.get("costmodel_phase", "forward"),
                            cost.category, dtype, dict(formulas), kernel_class, features,
                            *_storages(c, node, cost.category), conv_call=conv_call))
    analysis = Analysis(c, ops, dict(unsupported), kernels=dict(kernels))
    analysis.totals = totals_of(ops)
    return analysis


def _timing_class(c: cap.Captured, node: fx.Node, cost: OpCost, attention_kernel: str, calls_seen: set):
    """The op's kernel class and features for a calibrated device: the rule's, with attention as
    the kernel chosen for the node ("attention.flash.backward.causal"), a broadcast-weight bmm as
    eager's folded product, permuted inputs, the bytes of its largest new output, and whether eager
    runs it inside another op's Python call (`calls_seen`: the calls and backward nodes met so far)."""
    kernel = cost.kernel_class
    if kernel.startswith("attention") and node.target.namespace == "costmodel":
        kernel = _attention_class(node, kernel, attention_kernel)
    features = {name: sympy.sympify(v) for name, v in cost.features.items()}
    kernel, features = _eager_product(node, kernel, features)
    kernel, features = _strided_inputs(c, node, cost.category, kernel, features)
    features[ALLOC_FEATURE] = _fresh_output_bytes(node.target, _spec(c, node.meta.get("val")))
    # Eager pays the Python binding once per call the model's code makes (the first of the ops
    # it produced), and the autograd engine once per node of the backward graph; the engine sums
    # a tensor's gradients itself, from C++ (is_gradient_acc). The copies of a repeated block keep
    # its trace's numbers: each copy's calls are its own.
    copy = node.meta.get(COPY_OF_BLOCK)
    copy_id = copy.id if copy is not None else 0
    backward = _torch.is_backward(node)
    call = (("b", node.meta.get("seq_nr")) if backward
            else ("f", node.meta.get(cap.PYTHON_CALL, node.name))) + (copy_id,)
    if str(node.target) in SHAPE_ONLY:        # tracing's size reads: eager dispatches nothing
        features[SHAPE_ONLY_FEATURE] = sympy.Integer(1)
        return kernel, features
    if call in calls_seen or node.meta.get("is_gradient_acc"):
        features[INTERNAL_FEATURE] = sympy.Integer(1)
    else:
        calls_seen.add(call)
        if backward:     # the engine calls it (the Python binding's price where its own is not known)
            features[ENGINE_CALL_FEATURE] = sympy.Integer(1)
    # A training forward's op with a new autograd sequence number made a node (the ops after it
    # under the same number made none): the engine's node, recorded here and run in the backward,
    # whether or not its backward runs any op (an add's passes its gradient on).
    node_key = ("n", node.meta.get("seq_nr"), copy_id)
    if c.mode == "train" and not backward and node_key[1] is not None and node_key not in calls_seen:
        calls_seen.add(node_key)
        features[AUTOGRAD_NODE_FEATURE] = sympy.Integer(1)
    return kernel, features


_CONVOLUTIONS = {"aten.convolution.default": 0, "aten._convolution.default": 0, "aten.convolution_backward.default": 1}
IN_DIMS = tuple(f"in_d{i}" for i in range(4))     # features: a dense convolution's input sizes


def _conv_call(c: cap.Captured, node: fx.Node, kernel: str, features: dict) -> tuple | None:
    """A dense 2-D convolution's call less its input's sizes (those go into `features` as
    IN_DIMS, formulas a point evaluates), for the backend eager picks at a point; None for any
    other op, or a weight whose sizes are not numbers."""
    first = _CONVOLUTIONS.get(str(node.target))
    if first is None or not kernel.startswith("conv.dense"):
        return None
    x, w = (arg.meta.get("val") if isinstance(arg, fx.Node) else None for arg in node.args[first:first + 2])
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 4 or w.dim() != 4:
        return None
    w_shape = tensor_spec(c, w).shape
    if not all(sympy.sympify(v).is_Integer for v in w_shape):
        return None
    stride, padding, dilation, transposed, output_padding, groups = node.args[first + 3:first + 9]
    if not all(isinstance(v, int) for v in (*stride, *padding, *dilation, *output_padding, groups)):
        return None
    features.update({name: sympy.sympify(v) for name, v in zip(IN_DIMS, tensor_spec(c, x).shape)})
    return (tuple(int(v) for v in w_shape), tuple(stride), tuple(padding), tuple(dilation), bool(transposed),
            tuple(output_padding), int(groups), first == 1)


def _attention_class(node: fx.Node, kernel: str, attention_kernel: str) -> str:
    """"attention.<kernel>", then ".backward", ".causal", and ".dropout" for a forward that draws a
    dropout mask ("attention.math.causal.dropout")."""
    backward = kernel.endswith(".backward")
    first = 1 if backward else 0
    dropout_p, is_causal = node.args[first + 4:first + 6]
    return (f"attention.{attention_kernel}" + (".backward" if backward else "") + (".causal" if is_causal else "")
            + (".dropout" if not backward and isinstance(dropout_p, (int, float)) and dropout_p > 0 else ""))


def _storages(c: cap.Captured, node: fx.Node, category: str) -> tuple[tuple, str | None]:
    """(storage, bytes read) of each tensor the op reads, and the storage it writes. A storage is
    named by the node that made it, found through views; a view op itself moves no data."""
    if category == VIEW:
        return (), None
    reads = {}
    for arg in node.all_input_nodes:
        value = arg.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        reads[_base(arg)] = reads.get(_base(arg), 0) + _read_bytes(c, value)
    writes = _base(node.args[0]) if _writes_first_input(node) and isinstance(node.args[0], fx.Node) else node.name
    return tuple(reads.items()), writes


def _read_bytes(c: cap.Captured, value: torch.Tensor):
    """Bytes a read of `value` takes from its storage: a broadcast dimension (stride 0, an expand)
    reads the same elements again, not more of the storage (a GRU's input weight expanded over a
    batch of 64 is 786 KB of memory, not 50 MB)."""
    spec = tensor_spec(c, value)
    broadcast = [i for i, stride in enumerate(value.stride()) if _is_zero(stride)] if value.dim() else []
    if not broadcast:
        return spec.nbytes
    return value.element_size() * sympy.Mul(*(v for i, v in enumerate(spec.shape) if i not in broadcast))


def _base(node: fx.Node) -> str:
    """The node that wrote the storage `node` names: through views, and through the getitem that
    takes one output of an op of several (native_group_norm's output, read by the SiLU after it,
    was written by native_group_norm, not first read in the step)."""
    from costmodel.rules import rule_for, view_rule
    while node.op == "call_function" and node.all_input_nodes:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif isinstance(node.target, torch._ops.OpOverload) and rule_for(node.target) is view_rule:
            node = node.all_input_nodes[0]
        else:
            break
    return node.name


def _writes_first_input(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None
                and schema.returns[0].alias_info.is_write)


def _eager_product(node: fx.Node, kernel: str, features: dict) -> tuple[str, dict]:
    """A batched product whose second operand is one matrix broadcast over the batch (stride 0) is
    what tracing makes of x[b, m, k] @ W[k, n]; eager folds the batch into the rows and runs one
    product: class "matmul" with m = b * m."""
    index = 2 if str(node.target).startswith("aten.baddbmm") else 1   # baddbmm(bias, a, b)
    if kernel != "bmm" or len(node.args) <= index:
        return kernel, features
    second = node.args[index]
    value = second.meta.get("val") if isinstance(second, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or not _is_zero(value.stride()[0]):
        return kernel, features
    folded = {k: v for k, v in features.items() if k != "batch"}
    folded["m"] = features["batch"] * features["m"]
    return "matmul", folded


def _strided_inputs(c: cap.Captured, node: fx.Node, category: str, kernel, features: dict):
    """Inputs whose memory order is permuted (a channels-last view of a channels-first tensor):
    an elementwise op or a copy reads them with strided loads (classes "pointwise.strided",
    "copy.strided"); a norm, softmax or convolution first copies them contiguous
    (feature strided_bytes, priced as that copy)."""
    if category not in (POINTWISE, COPY, NORM, SOFTMAX, CONV) or not isinstance(kernel, str):
        return kernel, features
    strided = [tensor_spec(c, a.meta["val"]).nbytes for a in node.all_input_nodes
               if isinstance(a.meta.get("val"), torch.Tensor) and _permuted(a.meta["val"])]
    if not strided:
        return kernel, features
    if category == POINTWISE:
        stride = _inner_stride_bytes(c, node)
        return "pointwise.strided", features if stride is None else {**features, INNER_STRIDE_FEATURE: stride}
    if category == COPY:
        return "copy.strided", features
    if category == CONV and _channels_last_data(node):
        # eager runs a convolution of a channels-last input channels-last (oneDNN, no copy): its
        # own class where the device measured one; the copy stays for one that did not
        kernel = kernel + CHANNELS_LAST
    return kernel, {**features, STRIDED_FEATURE: sympy.Add(*strided)}


def _channels_last_data(node: fx.Node) -> bool:
    """Whether a convolution's data input (a backward's saved input, not its gradient) is laid
    out channels-last: what eager's choice of layout follows."""
    index = 1 if "backward" in str(node.target) else 0
    arg = node.args[index] if len(node.args) > index else None
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 4 and _permuted(value)


def _hint(x) -> int:
    """A size or stride at the trace's example sizes."""
    return int(x.node.hint) if isinstance(x, torch.SymInt) else int(x)


def _inner_stride_bytes(c: cap.Captured, node: fx.Node):
    """Bytes between consecutive loads of the input an elementwise op reads most against its loop:
    eager's loop runs along its first full-size input's densest dimension (TensorIterator lays a
    new output out as that input), and each other input is read with its own stride along it. A
    contiguous tensor plus a channels-last view of the same shape steps a channel's width through
    the view; the view plus the contiguous tensor, a whole plane through the tensor (4x slower on
    a CPU with 1K-element planes). None where every input is read along its own densest dimension."""
    out = node.meta.get("val")
    values = [a.meta["val"] for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    try:
        full = [v for v in values if isinstance(out, torch.Tensor) and v.dim() == out.dim()
                and [_hint(s) for s in v.shape] == [_hint(s) for s in out.shape]]
        if not full:
            return None
        sizes = [_hint(s) for s in full[0].shape]

        def densest(v):
            dims = [(_hint(st), d) for d, st in enumerate(v.stride()) if sizes[d] > 1 and _hint(st) > 0]
            return min(dims)[1] if dims else None
        inner = densest(full[0])
        if inner is None:
            return None
        against = [v for v in full[1:] if densest(v) != inner and _hint(v.stride()[inner]) > 0]
        if not against:
            return None
        worst = max(against, key=lambda v: _hint(v.stride()[inner]))
        return plain(c.to_user(worst.stride()[inner])) * worst.element_size()
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def _permuted(value: torch.Tensor) -> bool:
    """Strides not in decreasing order over the dimensions of more than one element (at the
    sizes of the trace: a permutation does not depend on them)."""
    try:
        dims = [(_hint(st), _hint(sz)) for st, sz in zip(value.stride(), value.shape) if _hint(sz) != 1]
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return any(a < b for (a, _), (b, _) in zip(dims, dims[1:]))


def _is_zero(value) -> bool:
    if isinstance(value, torch.SymInt):
        return value.node.expr == 0
    return value == 0


def _fresh_output_bytes(target, out) -> sympy.Expr:
    """Bytes of the op's largest newly allocated output: 0 for views and in-place ops (their
    outputs alias an input)."""
    from costmodel.rules import tensors_in
    schema = getattr(target, "_schema", None)
    if schema is not None and any(r.alias_info is not None for r in schema.returns):
        return sympy.Integer(0)
    sizes = [sympy.sympify(t.nbytes) for t in tensors_in(out)]
    if not sizes:
        return sympy.Integer(0)
    return sizes[0] if len(sizes) == 1 else sympy.Max(*sizes)


def totals_of(ops: list[OpRecord]) -> dict[str, sympy.Expr]:
    """Each metric summed over the ops, as one formula."""
    return {m: sympy.Add(*[op.cost[m] for op in ops]) for m in METRICS}


def params_of(model: torch.nn.Module) -> tuple[int, int]:
    """(count, bytes) of the model's parameters, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

