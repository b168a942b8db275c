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


def test_profiler_allocations_are_read():
    from torch.profiler import ProfilerActivity, profile

    from costmodel._torch import profiler_allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.ones(1 << 16)
        del x
    sizes = [size for _, size in profiler_allocations(prof)]
    assert (1 << 16) * 4 in sizes and -(1 << 16) * 4 in sizes
