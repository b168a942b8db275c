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
The kernel of each attention node is chosen once, by `rules.attention.choose_kernel` (for the
device kind: "cuda" by default, the contract's figure being torch.cuda.max_memory_allocated, or
"cpu"), and the costs and this model both use it.
On "cuda", dropout masks are 1 byte per element (native_dropout's bool mask), not the float mask the
meta-device trace holds.

The peak is Max(...) over the steps' live totals, each a sum of monomials in the dimensions; a
candidate that another dominates term by term (every monomial is non-negative) is dropped, so the
formula stays short and evaluates in microseconds.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from costmodel._torch import tree_leaves
from costmodel.capture.blocks import COPY
from costmodel.capture.generate import CACHE_ROLE
from costmodel.errors import UsageError
from costmodel.formulas import plain
from costmodel.memory.attention import SDPA, SDPA_BACKWARD, AttentionSteps
from costmodel.memory.frames import FrameLifetimes
from costmodel.memory.model import (ACTIVATIONS, storage_keys, CATEGORIES, GRADS, PARAMS, STATE, TEMPORARIES, Buffer,  # noqa: F401
                                    MemoryModel, MemoryPoint, Step)
from costmodel.memory.optimizer import OptimizerSteps, optimizer_temporary_bytes  # noqa: F401
from costmodel.rules import optimizer as opt

DEVICE_KINDS = ("cuda", "cpu")
_BLAS_MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}
# make_fx reads sizes off whichever tensor first had them: no use of the data
SHAPE_ONLY = {"aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
              "aten.sym_storage_offset.default"}


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


class _Builder(AttentionSteps, OptimizerSteps, FrameLifetimes):
    """The timeline of one capture: one step per op, a buffer per storage, live from its first
    step to its last use (see the module docstring and the mixins' modules)."""

    def __init__(self, captured, *, optimizer: str, device: str, kernels: dict[str, str], amp: bool):
        self.c = captured
        self.optimizer, self.device, self.node_kernels, self.amp = optimizer, device, kernels, amp
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
        self.cache_inputs: set[int] = set()          # buffers of a decode step's cache placeholders

    # storages

    def keys_of(self, node: fx.Node) -> list:
        """(storage key, tensor) of a graph node's value. The nodes of a repeated block's copies
        (capture.blocks) share the values of the block's own trace: their storages are told apart
        per copy, except those of the block's arguments, parameters and output gradients, which are
        the graph's own (the nodes that hold them here)."""
        keys = storage_keys(node.meta.get("val"))
        copy = node.meta.get(COPY)
        if copy is None:
            return keys
        out = []
        for key, t in keys:
            name = copy.external.get(key)
            mapped = self.node_keys.get(name) if name is not None else None
            out.append((mapped[0] if mapped else ("copy", copy.id, key), t))
        return out

    # sizes and buffers

    def size_of(self, t: torch.Tensor) -> sympy.Expr:
        n = t.untyped_storage().nbytes()
        key = n.node.expr if isinstance(n, torch.SymInt) else int(n)
        if key not in self._sizes:
            self._sizes[key] = sympy.expand(plain(self.c.to_user(n)))
        return self._sizes[key]

    def new_buffer(self, key, size, category: int, step: int, node: str, t: torch.Tensor | None = None,
                   end: int | None = None, source: str = "", param: str = "") -> int:
        shape = "" if t is None else "[" + ", ".join(str(plain(self.c.to_user(s))) for s in t.shape) + "]"
        dtype = "" if t is None else str(t.dtype).removeprefix("torch.")
        self.buffers.append(Buffer(size, category, step, step if end is None else end, node, dtype, shape,
                                   source, param))
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
        resident = []
        for node in nodes:
            if node.op != "placeholder":
                continue
            role, name = self.c.roles.get(node.name, ("input", node.name))
            cat = ACTIVATIONS if role in ("input", CACHE_ROLE) else PARAMS
            keys = []
            for key, t in storage_keys(node.meta.get("val")):
                if key not in self.by_key:
                    i = self.new_buffer(key, self.size_of(t), cat, start, name, t, source=node.name,
                                        param=name if role == "param" else "")
                    if role == CACHE_ROLE:
                        # a decode step's cache: each layer replaces its keys and values with the
                        # concatenation, which frees the old ones at that op (eager drops the last reference)
                        self.cache_inputs.add(i)
                    else:
                        resident.append(i)
                keys.append(key)
            self.node_keys[node.name] = keys
        backward_of = self._pair_attention(nodes)
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
        self._autograd_node_lifetimes(nodes, step_of)
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
            grad_params = list(getattr(self.c, "grad_params", []))
            for j, arg in enumerate(outs):
                if isinstance(arg, fx.Node):
                    keys = self.node_keys.get(arg.name, [])
                    self.touch(keys, end)
                    if self.c.mode == "train" and j > 0:
                        grads.extend(keys)
                        if j - 1 < len(grad_params):
                            for key in keys[:1]:
                                if key in self.by_key and not self.buffers[self.by_key[key]].param:
                                    self.buffers[self.by_key[key]].param = grad_params[j - 1]
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
        model.reads = self.reads
        return model

    def _autograd_node_lifetimes(self, nodes: list[fx.Node], step_of: dict[str, int]) -> None:
        """The autograd engine frees a backward node's saved tensors and incoming gradients when the
        node returns, not at their last use inside it (MulBackward keeps both factors until both
        products are made): what the ops of one node (consecutive backward ops of one seq_nr) read,
        made before the node started, lives until its last op."""
        run: list[int] = []
        seq = None

        def close() -> None:
            if len(run) < 2:
                return
            first, last = run[0], run[-1]
            for s in range(first, last + 1):
                for b in self.reads[s]:
                    buf = self.buffers[b]
                    if buf.start < first and buf.end < last:
                        buf.end = last
        for node in nodes:
            if node.op != "call_function" or node.name not in step_of:
                continue
            number = node.meta.get("seq_nr")
            if node.meta.get("costmodel_phase") != "backward" or node.meta.get("is_gradient_acc") or number is None:
                close()
                run, seq = [], None
                continue
            if number != seq:
                close()
                run, seq = [], number
            run.append(step_of[node.name])
        close()

    def _op(self, node: fx.Node, target: str, phase: str, module: str, ns: str = "", keymap=None,
            cat: int | None = None, stack: tuple | None = None, source: str | None = None) -> None:
        if stack is None:
            stack = tuple(node.meta.get("nn_module_stack", ()) or ()) if phase == "forward" else ()
        step = self.add_step(ns + node.name, target, module, phase, stack)
        if target not in SHAPE_ONLY:      # reading a size does not keep the storage alive
            for inp in node.all_input_nodes:
                self.touch(self.node_keys.get(ns + inp.name, []), step)
        keys = []
        category = cat if cat is not None else (ACTIVATIONS if phase in ("forward", "loss") else TEMPORARIES)
        # a decomposition's own node (keymap: memory.attention), or one of the graph's
        values = [(keymap.get(key, (ns, key)), t) for key, t in storage_keys(node.meta.get("val"))] \
            if keymap is not None else self.keys_of(node)
        if target == "aten.clone.default" and self._is_fused_out_transposed(node.args[0]):
            # the fused kernels lay out [B, H, L, E] as [B, L, H, E]: transpose(1, 2) is contiguous
            for key, _ in values:
                self.alias[key] = self.node_keys[node.args[0].name][0]
        for key, t in values:
            key = self.alias.get(key, key)
            if key not in self.by_key:
                size = self.size_of(t)
                self.new_buffer(key, size, category, step, ns + node.name, t,
                                source=node.name if source is None else source)
            keys.append(key)
        if target in _BLAS_MATMULS and self.device == "cuda":
            self._broadcast_operand_copies(node, step, ns)
        if target == "aten.bernoulli_.float" and self.device == "cuda":
            # CUDA's dropout is native_dropout: a bool mask, 1 byte per element
            for key, t in values[:1]:
                key = self.alias.get(key, key)
                b = self.buffers[self.by_key[key]]
                if key not in self._bernoulli and t.dtype.itemsize > 1:
                    self._bernoulli.add(key)
                    b.size = sympy.expand(b.size / t.dtype.itemsize)
        if target == "aten.native_dropout.default" and self.device == "cpu":
            # traced whole (Python dispatcher): the CPU runs dropout as input * noise with a noise
            # tensor of the input's dtype (aten/src/ATen/native/Dropout.cpp, _dropout), not a bool mask
            x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if x is not None and len(values) == 2 and x.dtype.itemsize > 1:
                key = self.alias.get(values[1][0], values[1][0])
                b = self.buffers[self.by_key[key]]
                if key not in self._bernoulli:
                    self._bernoulli.add(key)
                    b.size = sympy.expand(b.size * x.dtype.itemsize)
                    b.dtype = str(x.dtype).removeprefix("torch.")
        self.node_keys[ns + node.name] = keys
        if self.amp and target == "aten._to_copy.default" and node.args and isinstance(node.args[0], fx.Node) \
                and self.c.roles.get(node.args[0].name, ("",))[0] == "param":
            self._weight_casts.extend(self.by_key[k] for k in keys if k in self.by_key)

    def _broadcast_operand_copies(self, node: fx.Node, step: int, ns: str) -> None:
        """A matmul operand broadcast with a zero stride (the gradient of a sum is an expanded scalar)
        is copied to a contiguous tensor inside the kernel (BLAS takes no zero strides:
        aten/src/ATen/native/LinearAlgebra.cpp on the CPU, prepare_matrix_for_cublas on CUDA); the
        copy lives while the matmul runs. CUDA only: torch.cuda.max_memory_allocated sees it; on the
        CPU the figure is the live tensors an op hands back (validate's meter, FSDPMemTracker), which a
        kernel's internal copy is not."""
        for arg in node.args:
            t = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                continue
            if any(isinstance(st, int) and st == 0 and not (isinstance(sz, int) and sz == 1)
                   for st, sz in zip(t.stride(), t.shape)):
                size = sympy.expand(sympy.Mul(*[plain(self.c.to_user(x)) for x in t.shape]) * t.dtype.itemsize)
                self.new_buffer(None, size, TEMPORARIES, step, f"{ns}{node.name} (contiguous copy of {arg.name})", t,
                                source=arg.name)

    def _is_fused_out_transposed(self, arg) -> bool:
        if not isinstance(arg, fx.Node) or str(arg.target) != "aten.transpose.int":
            return False
        keys = self.node_keys.get(arg.name, [])
        return bool(keys) and keys[0] in self.fused_out and sorted(d % 4 for d in arg.args[1:3]) == [1, 2]


def build(captured, *, optimizer: str = "adamw", device=None, kernels: dict[str, str] | None = None,
          attention: str = "auto", amp: bool = False) -> MemoryModel:
    """The memory model of one capture for a device kind ("cuda" default, or "cpu"). `kernels`:
    the SDPA kernel of each attention node (rules.attention.attention_kernels, the same choice the
    costs use); without it, each node's kernel is `attention`, or with "auto" PyTorch's own choice
    on that device."""
    opt.check(optimizer)
    kind = device_kind(device)
    notes: list[str] = []
    if kernels is None:
        from costmodel.rules.attention import attention_kernels
        kernels, notes = attention_kernels(captured.graph.graph, attention, kind)
    model = _Builder(captured, optimizer=optimizer, device=kind, kernels=kernels, amp=amp).build()
    model.warnings = notes + [w for w in model.warnings if w not in notes]
    return model
