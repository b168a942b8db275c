"""Repeated blocks traced once: capture cost that grows with the distinct layers, not the depth.

Deep models are stacks of blocks built alike (32 `LlamaDecoderLayer`s with the same parameter
shapes and config). Tracing each through make_fx on symbolic fake tensors costs about a second of
the 7B capture per layer, for graphs that are the same but for their parameters. Here:

- the candidates are the children of a ModuleList or Sequential with a sibling of the same static
  signature (class, submodules, parameter and buffer shapes), outermost first;
- when the trace calls one, its identity is the call's signature (the shapes, strides, dtypes and
  requires_grad of its tensors, its other arguments, grad mode and autocast) and the values of
  every attribute the block's modules read from their own `__dict__` while the first block of that
  signature was traced (recorded by a spy subclass swapped in for the duration). A block whose
  attributes hold the same values, called the same way, runs the same code on the same shapes:
  it is the same graph with other parameters and arguments. A block that differs in anything its
  forward looks at (`self.sliding_window` on every other layer, `self.layer_idx` if it is read,
  a dense layer among MoE ones, whose structure differs) gets a trace of its own; one that writes
  an attribute while it runs is never copied;
- the first block of each identity is traced on its own, in a nested make_fx over the same shape
  environment: forward, and in training its backward for gradients seeded at its outputs;
- every block of that identity, the first included, stands in the model's trace as one opaque op
  (`costmodel::block`, and `costmodel::block_backward` in the backward) whose outputs have the
  traced shapes;
- after the trace, `splice` replaces each stand-in by a copy of the block's traced nodes, with the
  block's own parameters and arguments, module paths renamed to the block's (`model.layers.17.mlp`),
  frame lifetimes and storage identities kept per copy, so the graph, per-module views and memory
  liveness are those a full trace gives.

A block whose trace cannot be repeated exactly (it mutates its inputs or its attributes, runs
under saved-tensor hooks, leaves an output without a gradient, is passed an object that holds
tensors or that it changes, as a KV cache's `update` does) is traced inline as before; a capture that finds out too late is traced again with every block
inline (`Unrepeatable`).
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from costmodel import _torch

COPY = "costmodel_copy"          # node.meta: the Copy (one call of a repeated block) a node belongs to
COPY_OF = "costmodel_copy_of"    # node.meta: the node of the block's own trace this one repeats


class Unrepeatable(Exception):
    """Raised inside a trace when a stand-in cannot be replaced exactly: the capture is redone with
    the blocks at `paths` (those alike to the one that failed) traced inline, or every block if None."""

    def __init__(self, message: str, paths: frozenset | None = None):
        super().__init__(message)
        self.paths = paths


@dataclass(eq=False)
class Copy:
    """One call of a repeated block in the spliced graph. `external`: storage identity (see
    `_torch.storage_key`) of a value of the block's own trace -> the graph node whose value holds
    that storage here (the block's arguments, parameters and, in the backward, its output gradients)."""

    id: int
    external: dict = field(default_factory=dict)


# --- which modules are candidates --------------------------------------------------------------

def static_signature(module: nn.Module) -> tuple:
    """Class, submodules and parameter/buffer shapes: what two blocks share before they are traced."""
    def own(m: nn.Module) -> tuple:
        return (type(m).__module__, type(m).__qualname__,
                tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters(recurse=False)),
                tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers(recurse=False)))
    return tuple((name, own(m)) for name, m in module.named_modules(remove_duplicate=False))


def candidates(model: nn.Module) -> dict[nn.Module, str]:
    """Module -> path of every child of a ModuleList/Sequential that has a sibling of the same
    static signature; a candidate inside another is dropped (the outer one is traced once)."""
    paths = {}
    for name, m in model.named_modules():
        paths.setdefault(m, name)
    found: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        alike = collections.defaultdict(list)
        for child_name, child in m.named_children():
            alike[static_signature(child)].append(child)
        for group in alike.values():
            if len(group) >= 2:
                for child in group:
                    found.setdefault(child, paths[child])
    paths_found = set(found.values())

    def inside_another(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in paths_found for i in range(1, len(parts)))
    return {m: p for m, p in found.items() if not inside_another(p)}


# --- the stand-in ops --------------------------------------------------------------------------

_GROUPS: dict[int, "Group"] = {}
_ids = itertools.count(1)


@torch.library.custom_op("costmodel::block", mutates_args=())
def block_op(group: int, call: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    raise RuntimeError("costmodel::block stands in for a repeated block while capturing; it never runs")


@block_op.register_fake
def _(group, call, inputs):
    return [_like(v) for v in _GROUPS[group].output_vals[:_GROUPS[group].n_outputs]]


@torch.library.custom_op("costmodel::block_backward", mutates_args=())
def block_backward_op(group: int, call: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    raise RuntimeError("costmodel::block_backward stands in for a repeated block while capturing; it never runs")


@block_backward_op.register_fake
def _(group, call, grads):
    return [_like(v) for v in _GROUPS[group].output_vals[_GROUPS[group].n_outputs:]]


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


BLOCK = torch.ops.costmodel.block.default
BLOCK_BACKWARD = torch.ops.costmodel.block_backward.default


class _StandIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: int, call: int, *inputs):
        ctx.set_materialize_grads(False)
        ctx.group, ctx.call = group, call
        g = _GROUPS[group]
        outs = torch.ops.costmodel.block(group, call, list(inputs))
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, g.differentiable) if not d])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        g = _GROUPS[ctx.group]
        seeds = [gr for gr, d in zip(grads, g.differentiable) if d]
        if any(s is None for s in seeds):
            raise Unrepeatable(f"an output of the repeated block {g.path} gets no gradient")
        result = torch.ops.costmodel.block_backward(ctx.group, ctx.call, seeds) if g.n_grads else []
        return (None, None) + tuple(None if j is None else result[j] for j in g.grad_index)


# --- one identity of blocks: its own trace ------------------------------------------------------

@dataclass(eq=False)
class Group:
    id: int
    path: str                      # the block traced
    stack: tuple                   # the module stack when it was called (its path last)
    gm: fx.GraphModule
    placeholders: list             # the call's tensors, then the block's parameters and buffers
    forward: list                  # call nodes (and get_attr) of the forward, in order
    seeds: list                    # the gradient seeds of the differentiable outputs
    backward: list                 # nodes of the backward, in order
    outputs: list                  # output nodes: the forward's tensors, then the gradients
    output_vals: list
    n_outputs: int                 # forward tensors among outputs
    differentiable: list           # per forward output tensor
    grad_index: list               # per stand-in input: index into the gradients, or None
    out_spec: object               # pytree spec of the forward's return value
    out_leaves: list               # its leaves, _TENSOR where a tensor goes
    state: list                    # names of the parameters and buffers (relative to the block)
    module_calls: int = 0          # nn.Module calls inside the block (its own not included)

    @property
    def n_grads(self) -> int:
        return len(self.outputs) - self.n_outputs


@dataclass(eq=False)
class _Call:
    group: Group
    path: str
    stack: tuple


class RepeatedBlocks:
    """Around make_fx (inside ModulePaths): repeated blocks become stand-ins while tracing, and
    `splice` puts their traced nodes back. `enabled=False`: a no-op."""

    def __init__(self, model: nn.Module, paths, train: bool, enabled: bool = True, exclude: frozenset = frozenset()):
        self.blocks = {m: p for m, p in candidates(model).items() if p not in exclude} if enabled else {}
        self.paths = paths
        self.train = train
        self.signatures = {m: static_signature(m) for m in self.blocks}
        self.meta_state = {m: _state(m) for m in self.blocks}
        self.kinds: dict = {}              # call signature -> [(attribute reads, Group or None)]
        self._submodules: dict = {}
        self.calls: list[_Call] = []
        self.inline: set[int] = set()      # id(module) of blocks running their own forward now
        self._wrappers: set[int] = set()
        self._keep: list = []              # objects whose identity is part of a key
        self._saved: dict = {}
        self.reasons: dict[str, str] = {}  # path of a block traced inline -> why (the first reason)
        self.written: set[int] = set()     # id() of objects a block changed when traced: its calls run inline
        self.traced = 0                    # blocks traced on their own
        self.stood_in = 0                  # calls made stand-ins

    def __enter__(self) -> "RepeatedBlocks":
        for m in self.blocks:
            self._saved[m] = m.__dict__.get("forward", _MISSING)
            m.forward = self._wrap(m)
        return self

    def __exit__(self, *exc) -> None:
        for m, f in self._saved.items():
            if f is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f
        self._saved.clear()

    def copied(self) -> dict[str, str]:
        """Each block call replaced by a copy: its path -> the path of the block traced."""
        return {c.path: c.group.path for c in self.calls}

    def close(self) -> None:
        for kinds in self.kinds.values():
            for _, g in kinds:
                if g is not None:
                    _GROUPS.pop(g.id, None)
        self.kinds.clear()
        self._keep.clear()

    def _original(self, m: nn.Module):
        f = self._saved.get(m, _MISSING)
        return type(m).forward.__get__(m) if f is _MISSING else f

    def _wrap(self, m: nn.Module):
        original = self._original(m)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if id(m) in self.inline or not _torch.in_trace():
                return original(*args, **kwargs)
            group = self._group(m, args, kwargs)
            if group is None:
                self.inline.add(id(m))
                try:
                    return original(*args, **kwargs)
                finally:
                    self.inline.discard(id(m))
            return self._stand_in(group, m, args, kwargs)
        self._wrappers.add(id(forward))
        return forward

    # identity

    def _group(self, m: nn.Module, args, kwargs) -> Group | None:
        flat, spec = _torch.tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if _torch.saved_tensor_hooks_active():
            return self._inline(m, "called under saved-tensor hooks (activation checkpointing)")
        if any(_torch.traced_node(t) is None for t in tensors):
            return self._inline(m, "an argument is a tensor the trace does not know (a constant)")
        keys = [_torch.storage_key(t) for t in tensors]
        if len(set(keys)) != len(keys):
            return self._inline(m, "arguments share storage")
        objects = _Objects(flat)
        if objects.tensors:
            return self._inline(m, "an argument is an object holding tensors (a KV cache's keys and values), "
                                   "which a copy would not read")
        if any(id(o) in self.written for o in objects.roots):
            return self._inline(m, "it is given an object a block changes (a KV cache, which its update writes)")
        try:
            call = (self.signatures[m], str(spec), tuple(self._describe(x) for x in flat),
                    torch.is_grad_enabled(), _torch.autocast_state())
        except _NotRepeatable:
            return self._inline(m, "a symbolic float or bool argument")
        kinds = self.kinds.setdefault(call, [])
        for reads, group in kinds:
            if self._reads_match(m, reads):
                return group
        reads: list = []
        group = self._trace(m, flat, spec, reads, objects)
        kinds.append((reads, group))
        return group

    def _inline(self, m: nn.Module, reason: str) -> None:
        self.reasons.setdefault(self.blocks[m], reason)
        return None

    def _describe(self, x):
        if isinstance(x, torch.Tensor):
            return ("tensor", tuple(map(str, x.shape)), tuple(map(str, x.stride())), x.dtype, x.requires_grad,
                    x.device.type)
        if isinstance(x, torch.SymInt):
            return ("symint", str(x.node.expr))
        if isinstance(x, (torch.SymFloat, torch.SymBool)):
            raise _NotRepeatable()
        return self._value(x)

    def _value(self, v, depth: int = 0, values_only: bool = False):
        """A comparable description of an attribute's value: plain values by value, containers and
        partial functions by their items, anything else (a config, a function, a tensor) by identity."""
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                       torch.layout, torch.memory_format)):
            return (type(v).__name__, v)
        if isinstance(v, (tuple, list, frozenset, set)) and depth < 4:
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            return (type(v).__name__, tuple(self._value(x, depth + 1) for x in items))
        if isinstance(v, dict) and depth < 4:
            if values_only:
                return ("dict", tuple(self._value(x, depth + 1) for x in v.values()))
            return ("dict", tuple((self._value(k, depth + 1), self._value(x, depth + 1)) for k, x in v.items()))
        if isinstance(v, functools.partial) and depth < 4:
            return ("partial", self._value(v.func, depth + 1), self._value(v.args, depth + 1),
                    self._value(v.keywords, depth + 1))
        self._keep.append(v)
        return ("object", id(v))

    def _reads_match(self, m: nn.Module, reads: list) -> bool:
        modules = self._modules_of(m)
        for path, name, value in reads:
            sub = modules.get(path)
            if sub is None:
                return False
            d = vars(sub)
            if name not in d:
                if value is not _ABSENT:
                    return False
            elif value is _ABSENT or (_structure(d[name]) if name in _STRUCTURE else
                                      self._value(d[name], values_only=_hooks(name))) != value:
                return False
        return True

    def _modules_of(self, m: nn.Module) -> dict[str, nn.Module]:
        if m not in self._submodules:
            self._submodules[m] = dict(m.named_modules(remove_duplicate=False))
        return self._submodules[m]

    # the block's own trace

    def _trace(self, m: nn.Module, flat: list, spec, reads: list, objects: "_Objects") -> Group | None:
        path = self.blocks[m]
        positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        names = list(self.meta_state[m])
        current = dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        state = [current[n] for n in names]
        original = self._original(m)
        train = self.train and torch.is_grad_enabled()
        box: dict = {}

        def step(*tensors):
            inputs, st = tensors[:len(positions)], tensors[len(positions):]
            leaves = list(flat)
            for i, t in zip(positions, inputs):
                leaves[i] = t
            args, kwargs = _torch.tree_unflatten(leaves, spec)
            # the block's state stays the trace's own through the backward too: a checkpoint's
            # recomputation reads the parameters again there
            with _torch.reparametrize(m, dict(zip(names, st))):
                return differentiate(tensors, args, kwargs)

        def differentiate(tensors, args, kwargs):
            self.inline.add(id(m))
            try:
                with _Spy(self, m, reads) as spy:
                    out = original(*args, **kwargs)
                self.paths.frames.returned(m)
            finally:
                self.inline.discard(id(m))
            box["wrote"] = spy.wrote
            out_flat, box["spec"] = _torch.tree_flatten(out)
            given = {id(t): j for j, t in enumerate(tensors)}
            # an argument returned as it came (T5's position bias) stays the caller's own tensor
            outs = [x for x in out_flat if isinstance(x, torch.Tensor) and id(x) not in given]
            box["leaves"] = [(_Given(given[id(x)]) if id(x) in given else _TENSOR) if isinstance(x, torch.Tensor)
                             else x for x in out_flat]
            box["differentiable"] = [train and o.requires_grad for o in outs]
            diff = [o for o in outs if train and o.requires_grad]
            wrt = [t for t in tensors if t.requires_grad] if train else []
            grads, box["seeds"] = [], []
            if diff and wrt:
                seeds = [torch.empty_like(o) for o in diff]
                box["seeds"] = [_torch.traced_node(s) for s in seeds]
                with _torch.backward_meta(diff):
                    grads = list(torch.autograd.grad(diff, wrt, seeds, allow_unused=True))
            box["grad_index"], kept = [], []
            it = iter(grads)
            for t in tensors:
                g = next(it) if (t.requires_grad and diff and wrt) else None
                box["grad_index"].append(None if g is None else len(kept))
                if g is not None:
                    kept.append(g)
            box["n_outputs"] = len(outs)
            return outs + kept

        meta = dict(_torch.current_node_meta())
        # a checkpoint's recomputation stops early by raising out of the modules it reruns, whose
        # forward hooks then never pop: the module stack is put back as it was
        stack, calls = list(self.paths.stack), len(self.paths.frames.calls)
        # module calls inside the block: counted once per stand-in (or again by an inline trace)
        module_calls = self.paths.count
        try:
            with _torch.disable_proxy_tracing():
                fresh = [_like(t).requires_grad_(t.requires_grad) for t in [flat[i] for i in positions] + state]
                gm = _torch.trace(step, *fresh)
        except Exception as e:
            return self._inline(m, f"its own trace failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        finally:
            current_meta = _torch.current_node_meta()
            current_meta.clear()
            current_meta.update(meta)
            self.paths.stack[:] = stack
            del self.paths.frames.calls[calls:]
            changed = objects.restore()
            module_calls, self.paths.count = self.paths.count - module_calls, module_calls
        if changed:
            # the stand-in would not make the change (a KV cache's update): every call of a block
            # given these objects runs inline, on the objects as they were before this trace
            self.written.update(id(o) for o in objects.roots)
            self._keep.extend(objects.roots)
            return self._inline(m, "it changes an object it is given (a KV cache, which its update writes)")
        if box.get("wrote"):
            return self._inline(m, "it sets attributes while running")
        try:
            group = _group_of(gm, box, path, tuple(self.paths.stack), names)
        except _NotRepeatable as e:
            return self._inline(m, str(e))
        group.module_calls = module_calls
        _GROUPS[group.id] = group
        self.traced += 1
        return group

    # standing in

    def _stand_in(self, group: Group, m: nn.Module, args, kwargs):
        flat, _ = _torch.tree_flatten((args, kwargs))
        current = dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        inputs = [x for x in flat if isinstance(x, torch.Tensor)] + [current[n] for n in group.state]
        call = len(self.calls)
        self.calls.append(_Call(group, self.blocks[m], tuple(self.paths.stack)))
        self.stood_in += 1
        self.paths.count += group.module_calls
        if self.train and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            outs = list(_StandIn.apply(group.id, call, *inputs))
        else:
            outs = list(torch.ops.costmodel.block(group.id, call, inputs))
        it = iter(outs)
        leaves = [next(it) if leaf is _TENSOR else inputs[leaf.index] if isinstance(leaf, _Given) else leaf
                  for leaf in group.out_leaves]
        return _torch.tree_unflatten(leaves, group.out_spec)

    # after the trace

    def splice(self, gm: fx.GraphModule) -> None:
        """Replace every stand-in of `gm` by a copy of its block's traced nodes."""
        if not self.calls:
            return
        from costmodel.capture.trace import LIVE_UNTIL
        graph = gm.graph
        self._check_sums(graph)
        copies: dict[int, tuple[dict, Copy]] = {}
        renamed: dict[str, str] = {}      # a stand-in node's name -> the last node copied for it
        ids = itertools.count(1)
        sizes: dict[str, fx.Node] = {}    # a symbolic size's expression -> the node that first has it
        held: list = []                   # (a copied output, the node until which the caller holds it)
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (BLOCK, BLOCK_BACKWARD):
                _note_size(sizes, node)
                continue
            group_id, call_index, args = node.args
            call = self.calls[call_index]
            group = call.group
            if node.target is BLOCK:
                env = dict(zip(group.placeholders, args))
                copy = Copy(next(ids), {_torch.storage_key(ph.meta["val"]): a.name
                                        for ph, a in zip(group.placeholders, args)})
                copies[call_index] = (env, copy)
                nodes, first_out = group.forward, 0
            else:
                env, copy = copies[call_index]
                for seed, a in zip(group.seeds, args):
                    env[seed] = a
                    copy.external[_torch.storage_key(seed.meta["val"])] = a.name
                nodes, first_out = group.backward, group.n_outputs
            made = []
            with graph.inserting_before(node):
                for sub in nodes:
                    value = sub.meta.get("val")
                    if isinstance(value, torch.SymInt) and str(value.node.expr) in sizes:
                        env[sub] = sizes[str(value.node.expr)]    # as make_fx reuses a size's node
                        continue
                    new = graph.node_copy(sub, lambda n: env[n]) if sub.op != "get_attr" else \
                        self._copy_attr(gm, group, sub)
                    self._meta(new, sub, call, group, copy)
                    _note_size(sizes, new)
                    env[sub] = new
                    made.append(new)
            names = {sub.name: env[sub].name for sub in nodes}
            for new in made:
                if LIVE_UNTIL in new.meta:
                    target = names.get(new.meta[LIVE_UNTIL])
                    if target is None:
                        del new.meta[LIVE_UNTIL]
                    else:
                        new.meta[LIVE_UNTIL] = target
            last = made[-1].name if made else None
            for user in list(node.users):
                index = user.args[1]
                replacement = env[group.outputs[first_out + index]]
                user.replace_all_uses_with(replacement)
                if LIVE_UNTIL in user.meta:          # the caller's frame holds the output (see trace._FrameLocals)
                    held.append((replacement, user.meta[LIVE_UNTIL]))
                if last is not None:
                    renamed[user.name] = last
                graph.erase_node(user)
            if last is not None:
                renamed[node.name] = last
            graph.erase_node(node)
        for node in graph.nodes:
            until = node.meta.get(LIVE_UNTIL)
            if until in renamed:
                node.meta[LIVE_UNTIL] = renamed[until]
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        for node, until in held:
            until = renamed.get(until, until)
            mine = node.meta.get(LIVE_UNTIL)
            if until in order and (mine not in order or order[until] > order[mine]):
                node.meta[LIVE_UNTIL] = until

    def alike(self, group: Group) -> frozenset:
        """Paths of the blocks of the same static signature as the block `group` traced."""
        signature = next(self.signatures[m] for m, p in self.blocks.items() if p == group.path)
        return frozenset(p for m, p in self.blocks.items() if self.signatures[m] == signature)

    def _check_sums(self, graph: fx.Graph) -> None:
        """A block argument used twice inside the block and again outside it (T5's encoder output,
        read by every decoder block): a full trace sums all its gradients in one chain, in the order
        they arrive, while the copy sums the block's own first; the totals agree but not which module
        each addition belongs to. Such a capture is redone with those blocks (all of them, found in one
        pass) traced where they run."""
        paths: set = set()
        found: list[str] = []
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not BLOCK_BACKWARD:
                continue
            group = self.calls[node.args[1]].group
            if group.path in paths:
                continue
            for user in node.users:
                inner = group.outputs[group.n_outputs + user.args[1]]
                if _summed(inner) and any(u.meta.get("is_gradient_acc") for u in user.users):
                    paths |= self.alike(group)
                    found.append(group.path)
                    break
        if found:
            raise Unrepeatable(f"the gradient of an argument of {' and '.join(found)} is summed inside the block "
                               "and out", frozenset(paths))

    @staticmethod
    def _copy_attr(gm: fx.GraphModule, group: Group, sub: fx.Node) -> fx.Node:
        name = f"_block{group.id}_{sub.target}"
        if not hasattr(gm, name):
            setattr(gm, name, getattr(group.gm, sub.target))
        return gm.graph.get_attr(name)

    @staticmethod
    def _meta(new: fx.Node, sub: fx.Node, call: _Call, group: Group, copy: Copy) -> None:
        new.meta = dict(sub.meta)
        new.meta[COPY], new.meta[COPY_OF] = copy, sub

        def rename(path: str) -> str:
            if path == group.path:
                return call.path
            if path.startswith(group.path + "."):
                return call.path + path[len(group.path):]
            return path
        stack = sub.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = call.stack + tuple(rename(p) for p in stack[len(group.stack):])
        if "costmodel_module" in sub.meta:
            new.meta["costmodel_module"] = rename(sub.meta["costmodel_module"])


_MISSING = object()
_TENSOR = object()


@dataclass(frozen=True)
class _Given:
    """An output leaf that is the block's own argument (or state) number `index`, returned as is."""
    index: int


def _note_size(sizes: dict, node: fx.Node) -> None:
    value = node.meta.get("val")
    if isinstance(value, torch.SymInt):
        sizes.setdefault(str(value.node.expr), node)


class _NotRepeatable(Exception):
    pass


class _Objects:
    """The objects among a block's arguments (not tensors, modules, functions or plain values) and
    what they hold, reachable through attributes, list items and dict entries: a snapshot by
    identity, taken before the block's own trace. `tensors`: one of them holds a tensor, which the
    block would read from the caller's trace. `restore()` puts back every attribute, item and entry
    the trace changed (a KV cache's `update` sets its layers' keys and values) and says whether any
    had changed."""

    MAX_DEPTH = 4

    def __init__(self, leaves: list):
        self.roots = [x for x in leaves if _is_object(x)]
        self.saved: list = []           # (container, its contents then)
        self.tensors = False
        seen: set[int] = set()
        todo = [(x, 0) for x in self.roots]
        while todo:
            x, depth = todo.pop()
            if id(x) in seen or depth > self.MAX_DEPTH:
                continue
            seen.add(id(x))
            if isinstance(x, list):
                contents, items = list(x), x
            elif isinstance(x, dict):
                contents, items = dict(x), x.values()
            elif isinstance(x, tuple):
                contents, items = None, x
            else:
                contents = dict(vars(x))
                items = contents.values()
            if contents is not None:
                self.saved.append((x, contents))
            for v in items:
                if isinstance(v, torch.Tensor):
                    self.tensors = True
                elif isinstance(v, (list, dict, tuple)) or _is_object(v):
                    todo.append((v, depth + 1))

    def restore(self) -> bool:
        changed = False
        for x, contents in self.saved:
            now = x if isinstance(x, (list, dict)) else vars(x)
            same = len(now) == len(contents) and (
                all(a is b for a, b in zip(now, contents)) if isinstance(x, list)
                else all(k in now and now[k] is v for k, v in contents.items()))
            if same:
                continue
            changed = True
            if isinstance(x, list):
                x[:] = contents
            else:
                now.clear()
                now.update(contents)
        return changed


def _is_object(x) -> bool:
    """An instance with attributes of its own that a block could read or change."""
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.Tensor, torch.SymInt, torch.SymFloat,
                                   torch.SymBool, torch.dtype, torch.device, torch.layout, torch.memory_format,
                                   nn.Module, type, functools.partial)):
        return False
    return not inspect.isroutine(x) and hasattr(x, "__dict__")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The block's parameters and buffers by name inside it (the meta tensors of the model)."""
    state = dict(m.named_parameters(remove_duplicate=False))
    state.update(m.named_buffers(remove_duplicate=False))
    return state


def _group_of(gm: fx.GraphModule, box: dict, path: str, stack: tuple, names: list) -> Group:
    """The block's own trace split into forward and backward; _NotRepeatable(why) if it cannot be repeated."""
    from costmodel.capture.trace import attribute_modules
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    seeds = box.get("seeds") or []
    if any(s is None for s in seeds):
        raise _NotRepeatable("a gradient seed was not traced")
    body = [n for n in nodes if n.op in ("call_function", "get_attr")]
    if seeds:
        positions = [body.index(s) for s in seeds]
        if max(positions) - min(positions) != len(seeds) - 1:
            raise _NotRepeatable("its trace does not split into forward and backward")
        forward, backward = body[:min(positions)], body[max(positions) + 1:]
    else:
        forward, backward = body, []
    if _mutates(forward, placeholders):
        raise _NotRepeatable("it writes into an argument or its state")
    attribute_modules(gm.graph)
    outputs = list(output.args[0])
    if any(not isinstance(o, fx.Node) for o in outputs):
        raise _NotRepeatable("it returns a value that is not a traced tensor")
    return Group(next(_ids), path, stack, gm, placeholders, forward, seeds, backward, outputs,
                 [o.meta["val"] for o in outputs], box["n_outputs"], box["differentiable"], box["grad_index"],
                 box["spec"], box["leaves"], names)


def _summed(node: fx.Node) -> bool:
    """Whether a gradient is (a view of) the engine's sum of several gradients."""
    for _ in range(4):
        if node.meta.get("is_gradient_acc"):
            return True
        if node.op != "call_function" or not _torch.is_op_overload(node.target) or not node.args \
                or not isinstance(node.args[0], fx.Node):
            return False
        returns = node.target._schema.returns
        if not returns or returns[0].alias_info is None:
            return False
        node = node.args[0]
    return False


def _mutates(nodes: list, placeholders: list) -> bool:
    """Whether an op writes to a placeholder (or a view of one): the stand-in could not say so."""
    rooted = set(placeholders)
    for n in nodes:
        if n.op != "call_function" or not _torch.is_op_overload(n.target):
            continue
        schema = n.target._schema
        for arg, value in zip(schema.arguments, n.args):
            info = arg.alias_info
            if info is not None and info.is_write and value in rooted:
                return True
        if schema.returns and schema.returns[0].alias_info is not None and n.args and n.args[0] in rooted:
            rooted.add(n)          # a view of a placeholder
    return False


_ABSENT = ("absent",)


def _hooks(name: str) -> bool:
    """Module's own hook dicts are keyed by handle ids, which differ per module: compare values."""
    return name.startswith("_") and "hooks" in name


# Module's own tables of parameters, buffers and submodules: the static signature compares what
# they hold; a read compares their names only
_STRUCTURE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def _structure(value) -> tuple:
    return ("names", tuple(value)) if isinstance(value, (dict, set)) else ("other", type(value).__name__)


_SPY_CLASSES: dict[type, type] = {}


def _spy_class(cls: type) -> type:
    """A subclass of `cls` that reports reads of instance attributes and writes of any attribute to
    the active `_Spy`; same name, so code that prints or compares names sees no difference."""
    if cls not in _SPY_CLASSES:
        def __getattribute__(self, name):
            try:
                value = cls.__getattribute__(self, name)
            except AttributeError:
                spy = _Spy.active
                if spy is not None:
                    spy.absent(self, name)
                raise
            spy = _Spy.active
            if spy is not None:
                d = object.__getattribute__(self, "__dict__")
                if name in d:
                    spy.read(self, name, d[name])
            return value

        def __setattr__(self, name, value):
            spy = _Spy.active
            if spy is not None:
                spy.wrote = True
            cls.__setattr__(self, name, value)

        spy = type(cls.__name__, (cls,), {
            "__getattribute__": __getattribute__, "__setattr__": __setattr__,
            "__qualname__": cls.__qualname__, "__module__": cls.__module__})
        # a base's __init_subclass__ may have wrapped the subclass's methods (transformers' checkpointing
        # layers wrap `forward`, and only the outermost wrapper checkpoints): the spy inherits them as is
        for name in [k for k in vars(spy) if k not in _SPY_OWN and callable(vars(spy)[k])]:
            delattr(spy, name)
        _SPY_CLASSES[cls] = spy
    return _SPY_CLASSES[cls]


_SPY_OWN = {"__getattribute__", "__setattr__", "__qualname__", "__module__", "__init_subclass__"}


class _Spy:
    """Within this context, every module of `block` records in `reads` (path inside the block,
    attribute name, value description) the instance attributes it reads, once each, and `wrote`
    whether any attribute was set."""

    active: "_Spy | None" = None

    def __init__(self, owner: RepeatedBlocks, block: nn.Module, reads: list):
        self.owner, self.reads = owner, reads
        self.paths = {id(m): p for p, m in owner._modules_of(block).items()}
        self.modules = list(owner._modules_of(block).values())
        self.seen: set = set()
        self.wrote = False
        self._classes: list = []
        self._outer = None

    def read(self, module, name: str, value) -> None:
        path = self.paths.get(id(module))
        if path is None or (path, name) in self.seen or name == "forward" and id(value) in self.owner._wrappers:
            return
        self.seen.add((path, name))
        self.reads.append((path, name, self.owner._value(value, values_only=_hooks(name))
                           if name not in _STRUCTURE else _structure(value)))

    def absent(self, module, name: str) -> None:
        path = self.paths.get(id(module))
        if path is None or (path, name) in self.seen:
            return
        d = object.__getattribute__(module, "__dict__")
        if any(name in d.get(k, ()) for k in ("_parameters", "_buffers", "_modules")):
            return                       # a parameter, buffer or submodule: part of the structure
        self.seen.add((path, name))
        self.reads.append((path, name, _ABSENT))

    def __enter__(self) -> "_Spy":
        for m in self.modules:
            self._classes.append(type(m))
            object.__setattr__(m, "__class__", _spy_class(type(m)))
        self._outer, _Spy.active = _Spy.active, self
        return self

    def __exit__(self, *exc) -> None:
        _Spy.active = self._outer
        for m, cls in zip(self.modules, self._classes):
            object.__setattr__(m, "__class__", cls)
