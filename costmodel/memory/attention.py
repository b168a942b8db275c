"""Attention in the memory timeline: the kernel each attention node runs (chosen once, by
rules.attention.choose_kernel, as the costs use it), and what it keeps alive.
  math       the decomposition PyTorch runs (traced once per shape) spliced in place of the node:
             [B, H, L, S] scores and probabilities, the probabilities (and dropout mask) saved;
  flash / efficient (CUDA), flash (CPU)   out and a float32 logsumexp [B, H, L] saved; a boolean
             mask converted to an additive one of the query's dtype; the CUDA backward adds a
             float32 dq accumulator [B, H, L, E] and a [B, H, L] delta.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from costmodel import _torch
from costmodel.formulas import plain
from costmodel.memory.model import storage_keys, ACTIVATIONS, TEMPORARIES

SDPA = "costmodel.sdpa.default"
SDPA_BACKWARD = "costmodel.sdpa_backward.default"


class AttentionSteps:
    """The attention part of memory.timeline._Builder."""

    def _pair_attention(self, nodes) -> dict[str, fx.Node]:
        """Each attention backward's forward: the one whose q, k, v it reads. Activation
        checkpointing hands the backward detached aliases of the recomputed q, k, v."""
        forwards = {}
        pairs = {}
        for n in nodes:
            if n.op != "call_function":
                continue
            if str(n.target) == SDPA:
                forwards[tuple(id(_undetached(a)) for a in n.args[:3])] = n
            elif str(n.target) == SDPA_BACKWARD:
                f = forwards.get(tuple(id(_undetached(a)) for a in n.args[1:4]))
                if f is not None:
                    pairs[f.name] = n
        return pairs

    def kernel_for(self, node: fx.Node) -> str:
        return self.node_kernels[node.name]

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
        i = self.new_buffer(("lse", node.name), sympy.expand(lse), ACTIVATIONS, step, f"{node.name}.logsumexp",
                            source=node.name)
        self.buffers[i].dtype, self.buffers[i].shape = "float32", "[B, H, L]"
        kept = [i]
        mask = node.args[3].meta.get("val") if isinstance(node.args[3], fx.Node) else None
        if kernel != "math-analytic" and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            # SDPA turns a boolean mask into an additive one of the query's dtype before a fused
            # kernel runs (convert_boolean_attn_mask), at the mask's full (broadcast) shape; the
            # kernel's backward reads it again
            size = sympy.Mul(*[plain(self.c.to_user(x)) for x in mask.shape]) * q.dtype.itemsize
            j = self.new_buffer(("float_mask", node.name), sympy.expand(size), ACTIVATIONS, step,
                                f"{node.name}.float_mask", source=node.args[3].name)
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
                                f"{node.name}.workspace", source=node.name)
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
                gm = _torch.trace_plain(joint if train else infer, *args)
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
        # storages computed from q, k, v (or the gradient) are the attention node's values; those
        # computed from the mask or nothing (a causal mask made inside) are not
        data = set().union(*(_descendants(p) for i, p in enumerate(placeholders) if i != 3))
        keymap = {}
        outer_args = list((fwd or outer).args[:4])
        if part == "backward":
            outer_args = list(outer.args[1:5]) + [outer.args[0]]
        for ph, arg in zip(placeholders, outer_args):
            if isinstance(arg, fx.Node):
                outer_keys = self.node_keys.get(arg.name, [])
                for (key, _), okey in zip(storage_keys(ph.meta.get("val")), outer_keys):
                    keymap[key] = okey
                self.node_keys[ns + ph.name] = [keymap.get(k, k) for k, _ in storage_keys(ph.meta.get("val"))]
        results = list(output.args[0])
        if part == "forward":
            targets = [(results[0], outer)]
        else:
            targets = list(zip(results[1:4], [outer] * 3))
        outer_val = self.keys_of(outer)
        for j, (res, _) in enumerate(targets):
            if isinstance(res, fx.Node) and j < len(outer_val):
                for key, _t in storage_keys(res.meta.get("val"))[:1]:
                    keymap[key] = outer_val[j][0]
        # other storages of the decomposition are namespaced per attention node
        for n in nodes:
            if n.op != "call_function":
                continue
            in_part = (n in backward) == (part == "backward")
            if not in_part:
                continue
            keymap_ns = _NamespacedMap(keymap, ns)
            source = outer.name if n in data else ""
            self._op(n, str(n.target), phase, module, ns=ns, keymap=keymap_ns, stack=stack, source=source)
        self.node_keys[outer.name] = [k for k, _ in outer_val]
        # the outer node's own output: make sure it exists (a decomposition that returned an input view)
        step = len(self.steps) - 1
        for key, t in outer_val:
            if key not in self.by_key:
                self.new_buffer(key, self.size_of(t), ACTIVATIONS if part == "forward" else TEMPORARIES, step,
                                outer.name, t, source=outer.name)


def _undetached(node):
    """The node a chain of aten.detach calls starts from."""
    while isinstance(node, fx.Node) and str(node.target) == "aten.detach.default":
        node = node.args[0]
    return node


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


