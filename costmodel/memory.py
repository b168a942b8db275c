"""Peak memory: liveness of tensor storages over the captured graph, and the training step around it.

A storage (which any number of views and in-place results share) is live from the op that creates
it to the last op that reads a tensor on it; parameters, buffers and inputs are live throughout.
Train is the steady-state step: the optimizer state is resident from the start, gradients appear
during the backward and stay through `optimizer.step()` (then `zero_grad(set_to_none=True)` frees
them), and the step adds its own temporaries (PyTorch's foreach implementation on CUDA allocates
one tensor per parameter at once; the CPU's per-parameter loop, two of the largest parameter).

Attention is modelled for the kernel the target device runs, not the one the capture saw:
  math       the decomposition PyTorch runs (traced once per shape): [B, H, L, S] scores and
             probabilities, the probabilities (and dropout mask) saved for the backward;
  flash / efficient (CUDA), flash (CPU)   out and a float32 logsumexp [B, H, L] saved; the CUDA
             backward adds a float32 dq accumulator [B, H, L, E] and a [B, H, L] delta.
`attention="auto"` resolves per attention node: on "cpu", what `torch._fused_sdp_choice` picks for
the same ranks, dtypes, mask, dropout and causality (flash unless dropout or a 3-D input forces
math); on "cuda" (the default: the contract's figure is torch.cuda.max_memory_allocated), flash for
float16/bfloat16 without a mask, else efficient, else math when enable_gqa needs it.
On "cuda", dropout masks are 1 byte per element (native_dropout's bool mask), not the float mask the
meta-device trace holds.

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
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from . import _torch
from . import optimizer as opt
from .errors import UsageError
from .capture import LIVE_UNTIL
from .formulas import Evaluator, plain

CATEGORIES = ("params", "grads", "optimizer_state", "activations", "temporaries")
PARAMS, GRADS, STATE, ACTIVATIONS, TEMPORARIES = range(5)
DEVICE_KINDS = ("cuda", "cpu")
ATTENTION = ("auto", "math", "flash", "efficient")

SDPA = "costmodel.sdpa.default"
SDPA_BACKWARD = "costmodel.sdpa_backward.default"
# make_fx reads sizes off whichever tensor first had them: no use of the data
SHAPE_ONLY = {"aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
              "aten.sym_storage_offset.default"}
CPU_STEP_BYTES = 4        # torch.optim keeps `step` as a float32 scalar tensor per parameter, on the CPU
_LARGEST = 8              # tensors listed at the peak


def device_kind(device) -> str:
    """"cuda" or "cpu" for a device name, a Hardware, or None (None: "cuda", the contract's figure)."""
    if device is None:
        return "cuda"
    if isinstance(device, str):
        name = device.lower()
        if name in DEVICE_KINDS:
            return name
        if name.startswith(("cuda", "gpu")):
            return "cuda"
        raise UsageError(f"unknown device kind {device!r}; accepted: {', '.join(DEVICE_KINDS)}")
    if getattr(device, "vendor", "") in ("nvidia", "amd"):
        return "cuda"
    if getattr(device, "vendor", "") == "cpu":      # what `hardware calibrate --device cpu` writes
        return "cpu"
    text = " ".join(str(getattr(device, a, "") or "") for a in ("name", "description")).lower()
    return "cpu" if "cpu" in text else "cuda"      # `hardware calibrate --device cpu` names it so


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
        self._peak = None
        self._reduce()

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


# --- building the timeline ------------------------------------------------------------------------

def _storage_keys(val) -> list:
    """(storage id, tensor) for every tensor in a node's value."""
    out = []
    for t in tree_leaves(val):
        if isinstance(t, torch.Tensor):
            try:
                out.append((t.untyped_storage()._cdata, t))
            except (NotImplementedError, RuntimeError):
                continue
    return out


class _Builder:
    def __init__(self, captured, *, optimizer: str, device: str, attention: str, amp: bool):
        self.c = captured
        self.optimizer, self.device, self.attention, self.amp = optimizer, device, attention, amp
        self.steps: list[Step] = []
        self.reads: list[list[int]] = []             # step -> buffers it reads
        self.buffers: list[Buffer] = []
        self.by_key: dict[object, int] = {}          # storage key -> buffer index
        self.node_keys: dict[str, list] = {}         # fx node name (or namespaced) -> storage keys
        self.kernels: dict[str, int] = {}
        self._sizes: dict[object, sympy.Expr] = {}
        self._math_cache: dict[tuple, fx.GraphModule] = {}
        self._bernoulli: set = set()
        self.alias: dict = {}                        # storage key -> the key it really shares
        self._weight_casts: list[int] = []           # buffers of autocast's cached weight copies
        self.fused_out: set = set()                  # storages of fused attention outputs
        self.warnings: list[str] = []                # fallbacks taken, said in the report

    # sizes and buffers

    def size_of(self, t: torch.Tensor) -> sympy.Expr:
        n = t.untyped_storage().nbytes()
        key = n.node.expr if isinstance(n, torch.SymInt) else int(n)
        if key not in self._sizes:
            self._sizes[key] = sympy.expand(plain(self.c.to_user(n)))
        return self._sizes[key]

    def new_buffer(self, key, size, category: int, step: int, node: str, t: torch.Tensor | None = None,
                   end: int | None = None) -> int:
        shape = "" if t is None else "[" + ", ".join(str(plain(self.c.to_user(s))) for s in t.shape) + "]"
        dtype = "" if t is None else str(t.dtype).removeprefix("torch.")
        self.buffers.append(Buffer(size, category, step, step if end is None else end, node, dtype, shape))
        if key is not None:
            self.by_key[key] = len(self.buffers) - 1
        return len(self.buffers) - 1

    def touch(self, keys, step: int) -> None:
        for key in keys:
            i = self.by_key.get(key)
            if i is not None:
                self.reads[step].append(i)
                if self.buffers[i].end < step:
                    self.buffers[i].end = step

    def add_step(self, node: str, target: str, module: str, phase: str, stack: tuple = ()) -> int:
        self.steps.append(Step(node, target, module, phase, stack))
        self.reads.append([])
        return len(self.steps) - 1

    # the graph

    def build(self) -> MemoryModel:
        graph = self.c.graph.graph
        nodes = list(graph.nodes)
        start = self.add_step("(start)", "", "", "start")
        for node in nodes:
            if node.op != "placeholder":
                continue
            role, name = self.c.roles.get(node.name, ("input", node.name))
            cat = ACTIVATIONS if role == "input" else PARAMS
            keys = []
            for key, t in _storage_keys(node.meta.get("val")):
                if key not in self.by_key:
                    self.new_buffer(key, self.size_of(t), cat, start, name, t)
                keys.append(key)
            self.node_keys[node.name] = keys
        backward_of = self._pair_attention(nodes)
        resident = [i for i in range(len(self.buffers))]
        pending_bwd: dict[str, tuple] = {}
        output_node = None
        step_of: dict[str, int] = {}                 # graph node -> the last step made for it
        for node in nodes:
            if node.op == "output":
                output_node = node
                continue
            if node.op != "call_function":
                continue
            target = str(node.target)
            phase = node.meta.get("costmodel_phase", "forward")
            module = node.meta.get("costmodel_module", "")
            if target == SDPA:
                self._attention_forward(node, backward_of.get(node.name), pending_bwd, phase, module)
            elif target == SDPA_BACKWARD and node.name in pending_bwd:
                self._attention_backward(node, pending_bwd.pop(node.name), phase, module)
            else:
                self._op(node, target, phase, module)
            step_of[node.name] = len(self.steps) - 1
        end = len(self.steps) - 1
        self._frame_locals(nodes, step_of)
        if self.amp:
            # autocast caches the cast copy of each weight until the autocast region (forward and
            # loss) exits, whether or not the backward needs it
            last_forward = max((i for i, st in enumerate(self.steps) if st.phase in ("forward", "loss")), default=0)
            for i in self._weight_casts:
                if self.buffers[i].end < last_forward:
                    self.buffers[i].end = last_forward
        grads: list = []
        if output_node is not None:
            outs = list(tree_leaves(output_node.args))
            for j, arg in enumerate(outs):
                if isinstance(arg, fx.Node):
                    keys = self.node_keys.get(arg.name, [])
                    self.touch(keys, end)
                    if self.c.mode == "train" and j > 0:
                        grads.extend(keys)
        if self.c.mode == "train":
            self._optimizer_step(grads)
        self._eager_lifetimes()
        last = len(self.steps) - 1
        for i in resident:
            self.buffers[i].end = last
        for i, b in enumerate(self.buffers):
            if b.category == STATE:
                b.end = last
        model = MemoryModel(self.steps, self.buffers, self.c.dims, self.device, self.kernels, self.amp)
        model.warnings = list(self.warnings)
        return model

    def _op(self, node: fx.Node, target: str, phase: str, module: str, ns: str = "", keymap=None,
            cat: int | None = None, stack: tuple | None = None) -> None:
        if stack is None:
            stack = tuple(node.meta.get("nn_module_stack", ()) or ()) if phase == "forward" else ()
        step = self.add_step(ns + node.name, target, module, phase, stack)
        if target not in SHAPE_ONLY:      # reading a size does not keep the storage alive
            for inp in node.all_input_nodes:
                self.touch(self.node_keys.get(ns + inp.name, []), step)
        keys = []
        category = cat if cat is not None else (ACTIVATIONS if phase in ("forward", "loss") else TEMPORARIES)
        if target == "aten.clone.default" and self._is_fused_out_transposed(node.args[0]):
            # the fused kernels lay out [B, H, L, E] as [B, L, H, E]: transpose(1, 2) is contiguous
            for key, _ in _storage_keys(node.meta.get("val")):
                self.alias[key] = self.node_keys[node.args[0].name][0]
        for key, t in _storage_keys(node.meta.get("val")):
            key = keymap.get(key, (ns, key)) if keymap is not None else key
            key = self.alias.get(key, key)
            if key not in self.by_key:
                size = self.size_of(t)
                self.new_buffer(key, size, category, step, ns + node.name, t)
            keys.append(key)
        if target == "aten.bernoulli_.float" and self.device == "cuda":
            # CUDA's dropout is native_dropout: a bool mask, 1 byte per element
            for key, t in _storage_keys(node.meta.get("val"))[:1]:
                key = keymap.get(key, (ns, key)) if keymap is not None else key
                b = self.buffers[self.by_key[key]]
                if key not in self._bernoulli and t.dtype.itemsize > 1:
                    self._bernoulli.add(key)
                    b.size = sympy.expand(b.size / t.dtype.itemsize)
        if target == "aten.native_dropout.default" and self.device == "cpu":
            # traced whole (Python dispatcher): the CPU runs dropout as input * noise with a noise
            # tensor of the input's dtype (aten/src/ATen/native/Dropout.cpp, _dropout), not a bool mask
            x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            outs = _storage_keys(node.meta.get("val"))
            if x is not None and len(outs) == 2 and x.dtype.itemsize > 1:
                key = outs[1][0]
                key = keymap.get(key, (ns, key)) if keymap is not None else key
                b = self.buffers[self.by_key[key]]
                if key not in self._bernoulli:
                    self._bernoulli.add(key)
                    b.size = sympy.expand(b.size * x.dtype.itemsize)
                    b.dtype = str(x.dtype).removeprefix("torch.")
        self.node_keys[ns + node.name] = keys
        if self.amp and target == "aten._to_copy.default" and node.args and isinstance(node.args[0], fx.Node) \
                and self.c.roles.get(node.args[0].name, ("",))[0] == "param":
            self._weight_casts.extend(self.by_key[k] for k in keys if k in self.by_key)

    def _frame_locals(self, nodes, step_of: dict[str, int]) -> None:
        """Tensors a forward's local variables still name when it returns live until then (the
        capture records which, as node.meta[LIVE_UNTIL])."""
        for node in nodes:
            until = node.meta.get(LIVE_UNTIL)
            if until is None or until not in step_of:
                continue
            for key in self.node_keys.get(node.name, []):
                i = self.by_key.get(key)
                if i is not None and self.buffers[i].end < step_of[until]:
                    self.buffers[i].end = step_of[until]

    def _is_fused_out_transposed(self, arg) -> bool:
        if not isinstance(arg, fx.Node) or str(arg.target) != "aten.transpose.int":
            return False
        keys = self.node_keys.get(arg.name, [])
        return bool(keys) and keys[0] in self.fused_out and sorted(d % 4 for d in arg.args[1:3]) == [1, 2]

    def _eager_lifetimes(self) -> None:
        """Python frames hold tensors past their last use by an op. A module's arguments live until
        its forward returns (the caller's frame holds them), modelled from the module calls
        (contiguous runs of forward ops under one module path). The forward's own locals are read
        from its frame by the capture (`_frame_locals`); expression temporaries are freed at last
        use, as eager does."""
        calls: list[list] = []       # open calls per depth: [path, index into spans]
        spans: list[list[int]] = []  # [start, end] per call
        step_calls: list[list[int]] = [[] for _ in self.steps]
        for s, st in enumerate(self.steps):
            stack = st.stack
            if not stack:
                calls = []
                continue
            depth = 0
            while depth < len(calls) and depth < len(stack) and calls[depth][0] == stack[depth] \
                    and spans[calls[depth][1]][1] == s - 1:
                depth += 1
            del calls[depth:]
            for d in range(depth, len(stack)):
                spans.append([s, s])
                calls.append([stack[d], len(spans) - 1])
            for c in calls:
                spans[c[1]][1] = s
            step_calls[s] = [c[1] for c in calls]

        def extend(b: int, end: int) -> None:
            if self.buffers[b].end < end:
                self.buffers[b].end = end

        for s, ids in enumerate(step_calls):
            if not ids:
                continue
            for b in self.reads[s]:
                start = self.buffers[b].start
                for cid in ids:                       # outermost first
                    if spans[cid][0] > start:
                        extend(b, spans[cid][1])
                        break

    # attention

    def _pair_attention(self, nodes) -> dict[str, fx.Node]:
        forwards = {}
        pairs = {}
        for n in nodes:
            if n.op != "call_function":
                continue
            if str(n.target) == SDPA:
                forwards[tuple(id(a) for a in n.args[:3])] = n
            elif str(n.target) == SDPA_BACKWARD:
                f = forwards.get(tuple(id(a) for a in n.args[1:4]))
                if f is not None:
                    pairs[f.name] = n
        return pairs

    def kernel_for(self, node: fx.Node) -> str:
        q, k, v, mask = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:4]]
        dropout_p, is_causal, scale, gqa = node.args[4:8]
        if self.attention != "auto":
            return self.attention
        notes: list[str] = []
        kernel = auto_kernel(self.device, q, k, v, mask, dropout_p, is_causal, scale, gqa, notes)
        self.warnings.extend(n for n in notes if n not in self.warnings)
        return kernel

    def _attention_forward(self, node: fx.Node, bwd: fx.Node | None, pending: dict, phase: str, module: str):
        kernel = self.kernel_for(node)
        self.kernels[kernel] = self.kernels.get(kernel, 0) + 1
        train = bwd is not None
        if kernel == "math":
            gm = self._math_trace(node, train)
            if gm is not None:
                ns = f"{node.name}/"
                self._splice(gm, node, ns, "forward", phase, module)
                if train:
                    pending[bwd.name] = ("math", gm, node, ns)
                return
            kernel = "math-analytic"
        # a fused kernel: the node as is, plus its float32 logsumexp [B, H, L]; out kept for the backward
        self._op(node, str(node.target), phase, module)
        if kernel != "math-analytic":
            self.fused_out.update(self.node_keys[node.name])
        step = len(self.steps) - 1
        q = node.args[0].meta["val"]
        lse = 4 * sympy.Mul(*[plain(self.c.to_user(s)) for s in q.shape[:-1]])
        if kernel == "math-analytic":   # the [B, H, L, S] probabilities instead (decomposition failed)
            k = node.args[1].meta["val"]
            lse = lse / 4 * plain(self.c.to_user(k.shape[-2])) * q.dtype.itemsize
        i = self.new_buffer(("lse", node.name), sympy.expand(lse), ACTIVATIONS, step, f"{node.name}.logsumexp")
        self.buffers[i].dtype, self.buffers[i].shape = "float32", "[B, H, L]"
        kept = [i]
        mask = node.args[3].meta.get("val") if isinstance(node.args[3], fx.Node) else None
        if kernel != "math-analytic" and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            # SDPA turns a boolean mask into an additive one of the query's dtype before a fused
            # kernel runs (convert_boolean_attn_mask), at the mask's full (broadcast) shape; the
            # kernel's backward reads it again
            size = sympy.Mul(*[plain(self.c.to_user(x)) for x in mask.shape]) * q.dtype.itemsize
            j = self.new_buffer(("float_mask", node.name), sympy.expand(size), ACTIVATIONS, step,
                                f"{node.name}.float_mask")
            self.buffers[j].dtype = str(q.dtype).removeprefix("torch.")
            self.buffers[j].shape = "[" + ", ".join(str(plain(self.c.to_user(x))) for x in mask.shape) + "]"
            kept.append(j)
        if train:
            pending[bwd.name] = ("fused", kept, node)

    def _attention_backward(self, node: fx.Node, pend: tuple, phase: str, module: str):
        if pend[0] == "math":
            _, gm, fwd, ns = pend
            self._splice(gm, node, ns, "backward", phase, module, fwd=fwd)
            return
        _, kept, fwd = pend
        self._op(node, str(node.target), phase, module)
        step = len(self.steps) - 1
        for i in kept:                                             # logsumexp (and a converted mask)
            self.buffers[i].end = step
        self.touch(self.node_keys.get(fwd.name, []), step)        # out is saved by the fused kernels
        if self.device == "cuda":
            q = node.args[1].meta["val"]
            rows = sympy.Mul(*[plain(self.c.to_user(s)) for s in q.shape[:-1]])
            acc = 4 * rows * plain(self.c.to_user(q.shape[-1])) + 4 * rows    # dq accumulator + delta
            i = self.new_buffer(("dq_accum", node.name), sympy.expand(acc), TEMPORARIES, step,
                                f"{node.name}.workspace")
            self.buffers[i].dtype, self.buffers[i].shape = "float32", "[B, H, L, E] + [B, H, L]"

    def _math_trace(self, node: fx.Node, train: bool) -> fx.GraphModule | None:
        """The math kernel's decomposition for this node's shapes, forward (and backward) jointly."""
        vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:4]]
        q, k, v, mask = vals
        dropout_p, is_causal, scale, gqa = node.args[4:8]
        if self.c.mode != "train":
            dropout_p = 0.0
        sig = (tuple((None if t is None else (tuple(map(str, t.shape)), tuple(map(str, t.stride())), t.dtype))
                     for t in vals), dropout_p, is_causal, scale, gqa, train)
        if sig in self._math_cache:
            return self._math_cache[sig]
        from torch.fx.experimental.proxy_tensor import make_fx
        fake_mode = q.fake_mode
        out_val = node.meta["val"]

        def forward(q, k, v, mask):
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=gqa)[0]

        def joint(q, k, v, mask, g):
            out = forward(q, k, v, mask)
            return [out, *torch.autograd.grad(out, [q, k, v], g)]

        def infer(q, k, v, mask):
            with torch.no_grad():
                return [forward(q, k, v, mask)]

        try:
            with _torch.symbolic_kernels(), fake_mode:
                def like(t, grad=False):
                    if t is None:
                        return None
                    x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                    return x.requires_grad_(grad)
                args = [like(q, train), like(k, train), like(v, train), like(mask)]
                if train:
                    args.append(like(out_val))
                gm = make_fx(joint if train else infer, tracing_mode="real")(*args)
        except Exception as e:   # the analytic estimate instead, said so
            self.warnings.append(f"the math attention kernel at {node.name} ({node.meta.get('costmodel_module', '')}) "
                                 f"could not be traced ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 "its memory is the analytic [B, H, L, S] estimate")
            gm = None
        self._math_cache[sig] = gm
        return gm

    def _splice(self, gm: fx.GraphModule, outer: fx.Node, ns: str, part: str, phase: str, module: str,
                fwd: fx.Node | None = None) -> None:
        """Replay the forward (or backward) part of a traced decomposition in place of `outer`."""
        stack = tuple(outer.meta.get("nn_module_stack", ()) or ()) if phase == "forward" else ()
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        output = next(n for n in nodes if n.op == "output")
        backward = _descendants(placeholders[4]) if len(placeholders) == 5 else set()
        keymap = {}
        outer_args = list((fwd or outer).args[:4])
        if part == "backward":
            outer_args = list(outer.args[1:5]) + [outer.args[0]]
        for ph, arg in zip(placeholders, outer_args):
            if isinstance(arg, fx.Node):
                outer_keys = self.node_keys.get(arg.name, [])
                for (key, _), okey in zip(_storage_keys(ph.meta.get("val")), outer_keys):
                    keymap[key] = okey
                self.node_keys[ns + ph.name] = [keymap.get(k, k) for k, _ in _storage_keys(ph.meta.get("val"))]
        results = list(output.args[0])
        if part == "forward":
            targets = [(results[0], outer)]
        else:
            targets = list(zip(results[1:4], [outer] * 3))
        outer_val = list(_storage_keys(outer.meta.get("val")))
        for j, (res, _) in enumerate(targets):
            if isinstance(res, fx.Node) and j < len(outer_val):
                for key, _t in _storage_keys(res.meta.get("val"))[:1]:
                    keymap[key] = outer_val[j][0]
        # other storages of the decomposition are namespaced per attention node
        for n in nodes:
            if n.op != "call_function":
                continue
            in_part = (n in backward) == (part == "backward")
            if not in_part:
                continue
            keymap_ns = _NamespacedMap(keymap, ns)
            self._op(n, str(n.target), phase, module, ns=ns, keymap=keymap_ns, stack=stack)
        self.node_keys[outer.name] = [k for k, _ in outer_val]
        # the outer node's own output: make sure it exists (a decomposition that returned an input view)
        step = len(self.steps) - 1
        for key, t in outer_val:
            if key not in self.by_key:
                self.new_buffer(key, self.size_of(t), ACTIVATIONS if part == "forward" else TEMPORARIES, step,
                                outer.name, t)

    # the optimizer

    def _optimizer_step(self, grad_keys: list) -> None:
        """Optimizer state (resident), the step's temporaries, then zero_grad frees the grads."""
        step = self.add_step("optimizer.step", f"optimizer.{self.optimizer}", "(optimizer)", "optimizer")
        for key in grad_keys:
            i = self.by_key.get(key)
            if i is not None:
                self.buffers[i].category = GRADS
                self.buffers[i].end = step
        params = _trainable(self.c)
        groups: dict[str, int] = {}
        largest = 0
        for name, t in params:
            nbytes = t.numel() * t.dtype.itemsize
            state = opt.state_elements(self.optimizer, tuple(t.shape)) * t.dtype.itemsize
            if self.device == "cpu" and self.optimizer != "sgd" and self.optimizer != "sgd-momentum":
                state += CPU_STEP_BYTES
            if state:
                i = self.new_buffer(None, sympy.Integer(state), STATE, 0, f"{name} ({self.optimizer} state)")
                self.buffers[i].dtype, self.buffers[i].shape = str(t.dtype).removeprefix("torch."), \
                    str(list(t.shape))
            groups[str(t.dtype)] = groups.get(str(t.dtype), 0) + nbytes
            largest = max(largest, nbytes)
        temp = optimizer_temporary_bytes(self.optimizer, self.device, largest, groups)
        if temp:
            i = self.new_buffer(None, sympy.Integer(temp), TEMPORARIES, step, f"optimizer.{self.optimizer} temporaries")
            self.buffers[i].shape = "foreach: one per parameter" if self.device == "cuda" else "per parameter"


def optimizer_temporary_bytes(name: str, device: str, largest: int, groups: dict[str, int]) -> int:
    """Bytes the optimizer step allocates on top of params, grads and state.

    CUDA runs the foreach implementation (torch.optim's default there): adam/adamw allocate
    `_foreach_sqrt(exp_avg_sqs)`, one tensor per parameter of the dtype group at once; adafactor
    its per-parameter variance estimates likewise. The CPU runs the per-parameter loop: adam/adamw
    hold `exp_avg_sq.sqrt()` and its quotient (2 of the largest parameter), adafactor the row x
    column variance estimate (1). SGD, with or without momentum, updates in place."""
    if name in ("sgd", "sgd-momentum"):
        return 0
    if device == "cuda":
        return max(groups.values(), default=0)
    return (2 if name in ("adam", "adamw") else 1) * largest


def _trainable(c) -> list[tuple[str, torch.Tensor]]:
    out = []
    for node in c.graph.graph.nodes:
        if node.op != "placeholder":
            continue
        role, name = c.roles.get(node.name, ("input", node.name))
        if role == "param" and name in c.trainable:
            out.append((name, node.meta["val"]))
    return out


class _NamespacedMap:
    """Storage keys of a spliced decomposition: mapped to the outer graph's, else namespaced."""

    def __init__(self, mapping: dict, ns: str):
        self.mapping, self.ns = mapping, ns

    def get(self, key, default=None):
        return self.mapping.get(key, (self.ns, key))


def _descendants(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def auto_kernel(device: str, q, k, v, mask, dropout_p: float, is_causal: bool, scale, gqa: bool,
                notes: list[str] | None = None) -> str:
    """The SDPA kernel PyTorch would run for these inputs on `device` ("cpu" or "cuda"); where it has
    to be assumed, a sentence saying so is appended to `notes`."""
    if device == "cpu":
        try:
            def small(t, last=None):
                shape = [2] * (t.dim() - 1) + [last if last is not None else _concrete(t.shape[-1], 8)]
                return torch.zeros(shape, dtype=t.dtype)
            qs, ks, vs = small(q), small(k), small(v)
            if gqa and q.dim() == 4:
                qs = torch.zeros([2, 4, 2, qs.shape[-1]], dtype=q.dtype)
            ms = None if mask is None else torch.zeros([2] * mask.dim(), dtype=mask.dtype)
            choice = torch._fused_sdp_choice(qs, ks, vs, ms, float(dropout_p), bool(is_causal), scale=scale,
                                             enable_gqa=bool(gqa))
        except (RuntimeError, TypeError, ValueError) as e:
            if notes is not None:
                notes.append(f"PyTorch's CPU kernel choice could not be asked for attention of dtype {q.dtype} "
                             f"({type(e).__name__}: {e}); assumed the math kernel")
            return "math"
        return "flash" if int(choice) == 1 else "math"
    if q.dim() != 4:
        return "math"
    E = _concrete(q.shape[-1], None)
    if E is None or E % 8 or E > 256:
        return "efficient" if E is not None and E % 4 == 0 and q.dtype == torch.float32 else "math"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and mask is None:
        return "flash"
    if gqa:
        return "math"        # the efficient kernel has no enable_gqa; flash takes no mask
    return "efficient" if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "math"


def _concrete(s, default):
    """An int for a size that is a number (or a symbol with no range), else `default`."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt) and s.node.expr.is_number:
        return int(s.node.expr)
    return default


def build(captured, *, optimizer: str = "adamw", device=None, attention: str = "auto",
          amp: bool = False) -> MemoryModel:
    """The memory model of one capture for a device kind ("cuda" default, or "cpu")."""
    if attention not in ATTENTION:
        raise UsageError(f"unknown --attention {attention!r}; accepted: {', '.join(ATTENTION)}")
    opt.check(optimizer)
    return _Builder(captured, optimizer=optimizer, device=device_kind(device), attention=attention,
                    amp=amp).build()

