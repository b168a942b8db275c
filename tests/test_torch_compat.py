"""costmodel._torch: the shims for the torch versions costmodel supports (2.11 to 2.13) do what
PyTorch's own kernels do where those keep sizes symbolic."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from costmodel import _torch

F = torch.nn.functional


def mm(a, b):
    return a @ b


# (name, operand shapes: "b", "h", "s" symbolic, the product)
CASES = [
    ("1d@1d", [(8,), (8,)], mm),
    ("2d@1d", [(4, 8), (8,)], mm),
    ("1d@2d", [(8,), (8, 4)], mm),
    ("3d@2d fold", [("b", "s", 8), (8, 4)], mm),
    ("3d@1d fold", [("b", "s", 8), (8,)], mm),
    ("1d@3d", [(8,), ("b", 8, "s")], mm),
    ("2d@3d", [(5, 8), ("b", 8, "s")], mm),
    ("1d@4d", [(8,), ("b", "h", 8, "s")], mm),
    ("3d@3d", [("b", "s", 8), ("b", 8, 4)], mm),
    ("4d@4d", [("b", "h", "s", 8), ("b", "h", 8, "s")], mm),
    ("4d@4d k^T", [("b", "h", "s", 8), ("b", "h", "s", 8)], lambda a, b: a @ b.transpose(-1, -2)),
    ("4d@2d", [("b", "h", "s", 8), (8, 4)], mm),
    ("strided 3d@2d", [("s", "b", 8), (8, 4)], lambda a, b: a.transpose(0, 1) @ b),
    ("strided 3d@1d", [("s", "b", 8), (8,)], lambda a, b: a.transpose(0, 1) @ b),
    ("broadcast 3d@4d", [("h", 8, 4), ("b", "h", 4, 8)], mm),
    ("broadcast 4d@3d", [("b", 1, "s", 8), ("h", 8, 4)], mm),
    ("batch 1 @ batch b", [(1, "s", 8), ("b", 8, 4)], mm),
    ("batch 1 @ batch 1", [(1, "s", 8), (1, 8, 4)], mm),
    ("linear without bias", [("b", "s", 8), (4, 8)], lambda a, w: F.linear(a, w)),
]


def _trace(shapes, fn, grad: bool, force: bool):
    """(ops, output shapes, guards) of fn's forward (and backward) on symbolic fake operands."""
    with _torch._probe_env() as (env, (b, s)):
        h = env.create_symintnode(env.create_symbol(5, _source("h")), hint=5, source=_source("h"))
        sizes = {"b": b, "s": s, "h": h}
        args = [torch.empty([sizes.get(d, d) for d in shape], device="meta").requires_grad_(grad)
                for shape in shapes]

        def f(*a):
            out = fn(*a)
            return [out, *torch.autograd.grad(out.sum(), a)] if grad else [out]
        with _torch.symbolic_matmul(force=force):
            gm = make_fx(f, tracing_mode="real")(*args)
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    outs = [str(tuple(n.meta["val"].shape)) for n in next(n for n in gm.graph.nodes if n.op == "output").args[0]]
    return ops, outs, [str(g.expr) for g in env.guards], dict(env.replacements)


def _source(name):
    from torch._dynamo.source import ConstantSource
    return ConstantSource(f"test_{name}")


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "train"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matmul_kernel_traces_as_the_cpp_kernel(name, grad):
    shapes, fn = next((s, f) for n, s, f in CASES if n == name)
    ops, outs, guards, replacements = _trace(shapes, fn, grad, force=True)
    assert not guards and not replacements, (guards, replacements)     # every size stays symbolic
    assert any("s" in o for o in outs) or all(isinstance(d, int) for sh in shapes for d in sh)
    if _torch._cpp_matmul_is_symbolic():    # torch 2.13: op for op what the C++ kernel traces
        assert (ops, outs) == _trace(shapes, fn, grad, force=False)[:2]


def test_matmul_override_is_scoped_and_reentrant():
    with _torch.symbolic_matmul(force=True):
        with _torch.symbolic_matmul(force=True):
            assert _torch._matmul_override_depth == 2
        assert _torch._matmul_library is not None
    assert _torch._matmul_override_depth == 0 and _torch._matmul_library is None
    a, b = torch.randn(2, 3, 4), torch.randn(4, 5)                 # real tensors: the C++ kernel again
    torch.testing.assert_close(a @ b, torch.einsum("bij,jk->bik", a, b))


def test_pooling_floor_division_equals_div_rtn():
    import torch._meta_registrations as meta
    if not hasattr(meta, "div_rtn"):
        pytest.skip("no torch._meta_registrations.div_rtn in this torch")
    for x in range(-25, 26):
        for y in (-4, -3, -2, -1, 1, 2, 3, 4):
            assert _torch._floor_div(x, y) == meta.div_rtn(x, y), (x, y)


def test_pooling_shape_stays_symbolic():
    with _torch._probe_env() as (env, (b, s)):
        x = torch.empty(b, 3, s, s + 1, device="meta")
        with _torch.symbolic_pooling():
            y = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    assert not env.guards, [str(g.expr) for g in env.guards]
    assert not all(isinstance(d, int) for d in y.shape)


# --- every private API costmodel touches, through costmodel._torch: it still exists and behaves ----

def test_private_api_wrappers_behave():
    import torch.nn as nn

    from costmodel import _torch as T
    env = T.new_shape_env()
    sym, n = T.symbolic_size(env, "seq", 7)
    assert str(sym).startswith("s") and int(n.node.hint) == 7
    seen = []
    T.on_guard_location(env, lambda frame: (seen.append(frame) or "here.py:1 in f", ""))
    with T.fake_mode(env):
        x = torch.empty(n, 3, device="meta")
        if x.shape[0] > 3:          # a guard: its location comes from our locator
            pass
    assert seen and any(getattr(g.sloc, "maybe_user_loc", None) == "here.py:1 in f" for g in env.guards)

    lin = nn.Linear(3, 2)
    w = torch.zeros(2, 3)
    with T.reparametrize(lin, {"weight": w, "bias": torch.zeros(2)}):
        assert lin.weight is w
    assert T.tree_leaves({"a": [1, (2, 3)]}) == [1, 2, 3] and T.tree_map(lambda v: v * 2, [1, [2]]) == [2, [4]]
    t = torch.zeros(4)
    assert T.storage_key(t) == T.storage_key(t[1:]) != T.storage_key(torch.zeros(4))
    assert issubclass(T.dispatch_mode_class(), object)
    q = torch.zeros(2, 2, 2, 8)
    assert T.fused_sdp_choice(q, q, q, None, 0.0, True, None, False) in (0, 1)
    assert T.is_op_overload(torch.ops.aten.mm.default) and not T.is_op_overload(torch.mm)
    assert torch._VF.lstm in T.rnn_functions()
    assert hasattr(T.sympy_functions(), "FloorDiv")

    def f(a):
        node = T.traced_node(a)
        assert node is not None and node.op == "placeholder"
        b = a + 1
        assert T.last_traced_node().name == T.traced_node(b).name
        return b
    gm = T.trace_plain(f, torch.zeros(3))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]
    assert T.traced_node(torch.zeros(1)) is None and T.last_traced_node() is None


def _trace_step(step, *args):
    import torch.fx.traceback as fx_traceback
    with _torch.backward_meta_fields(), fx_traceback.preserve_node_meta():
        return _torch.trace(step, *args)


def test_backward_meta_marks_only_the_gradient_accumulation():
    """backward_meta: every node of the backward is_backward, and only the engine's sum of a
    tensor's two gradients is marked is_gradient_acc (torch 2.11 left the mark on every node after
    the first grad_fn). Each backward node's seq_nr is that of the forward op it differentiates."""
    def step(x, w1, w2):
        h = x @ w1
        loss = (h @ w2 + h).sum()           # h used twice: its gradients are summed
        with _torch.backward_meta([loss]):
            return torch.autograd.grad(loss, [w1, w2])
    w = torch.zeros(4, 4, requires_grad=True)
    gm = _trace_step(step, torch.zeros(2, 4), w, w.detach().clone().requires_grad_())
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    forward_mm = [n for n in nodes if n.target == torch.ops.aten.mm.default and not _torch.is_backward(n)]
    backward = nodes[nodes.index(next(n for n in nodes if n.target == torch.ops.aten.expand.default)) + 1:]
    assert len(forward_mm) == 2 and backward and all(_torch.is_backward(n) for n in backward)
    summed = [n for n in backward if n.meta.get("is_gradient_acc")]
    assert [n.target for n in summed] == [torch.ops.aten.add.Tensor], [n.format_node() for n in summed]
    backward_mm = [n for n in backward if n.target == torch.ops.aten.mm.default]
    assert {n.meta["seq_nr"] for n in backward_mm} == {n.meta["seq_nr"] for n in forward_mm}


class _Abort(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward failed")


def test_backward_meta_recovers_from_a_backward_that_raised():
    """A backward that raises (a failed capture) drops torch's end-of-backward callback, which puts
    the stack trace back: nodes made after a later backward (here the graph's output) must not be
    marked gradient accumulations, nor the ops of a forward that follows in the same trace."""
    def failing(x, w):
        loss = (_Abort.apply(x @ w) * 2).sum()
        with _torch.backward_meta([loss]):
            return torch.autograd.grad(loss, [w])

    def step(x, w):
        loss = (x @ w).sum()
        with _torch.backward_meta([loss]):
            (g,) = torch.autograd.grad(loss, [w])
        return [g, x * 3]                   # a forward op after the backward
    w = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="backward failed"):
        _trace_step(failing, torch.zeros(2, 4), w)
    gm = _trace_step(step, torch.zeros(2, 4), w)
    marked = [n.name for n in gm.graph.nodes if n.meta.get("is_gradient_acc")]
    assert marked == [], marked
    (mul,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert not _torch.is_backward(mul)


def test_profiler_allocations_are_read():
    from torch.profiler import ProfilerActivity, profile

    from costmodel._torch import profiler_allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.ones(1 << 16)
        del x
    sizes = [size for _, size in profiler_allocations(prof)]
    assert (1 << 16) * 4 in sizes and -(1 << 16) * 4 in sizes


def test_data_made_on_meta_becomes_a_graph_constant():
    """torch.tensor(data, device=x.device) on a meta input (transformers 5.17's sdpa mask) traces as
    the constant, with its data, moved to the meta device: not as a plain meta tensor, which the fake
    mode rejects at the next op."""
    from torch._subclasses.fake_tensor import FakeTensor
    env = _torch.new_shape_env()
    _, n = _torch.symbolic_size(env, "seq", 5)
    fake = _torch.fake_mode(env)
    with fake:
        x = torch.empty(n, 2, device="meta")

    def where_zero(x):
        return torch.where(x > 0, torch.tensor(0.5, device=x.device), -1.0)

    if _torch._meta_data_escapes_fake():          # why the shim is there: make_fx alone fails
        with fake, pytest.raises(AssertionError, match="convert all Tensors to FakeTensors"):
            make_fx(where_zero, tracing_mode="real")(x)

    def f(x):
        where = where_zero(x)
        made = [torch.tensor([1, 2], device=x.device, dtype=torch.int32), torch.as_tensor([3.0, 4.0], device="meta"),
                torch.asarray([5.0], device=x.device), x.new_tensor([6.0, 7.0]),
                torch.tensor([8.0], device=x.device, requires_grad=True)]
        assert all(isinstance(t, FakeTensor) and t.device.type == "meta" for t in made)
        assert made[0].dtype == torch.int32 and made[3].dtype == x.dtype and made[-1].requires_grad
        return [where] + made
    with fake:
        gm = _torch.trace(f, x)
    constants = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert [getattr(gm, n.target).tolist() for n in constants] == [0.5, [1, 2], [3.0, 4.0], [5.0], [6.0, 7.0], [8.0]]
    for node in constants:
        (lift,) = node.users
        (move,) = lift.users
        assert lift.target == torch.ops.aten.lift_fresh_copy.default and move.target == torch.ops.aten._to_copy.default
        assert move.kwargs["device"] == torch.device("meta")
    assert torch.tensor(0.5, device="meta").device.type == "meta"       # the mode ends with the trace
