"""Each rule against its closed form, on tiny modules captured through the public API."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import costmodel
from costmodel.rules.cost import OpCost
from costmodel.rules import TensorSpec, is_metadata_only, rule_for
from costmodel.symbols import symbols_for

aten = torch.ops.aten
b, s = symbols_for("b", "s")


def ops_at(module_fn, inputs, mode="inference", **point):
    # attention as the math kernel: what these tests spell out (the fused kernels have their own test)
    report = costmodel.analyze(module_fn, inputs=inputs, mode=mode, attention="math")
    assert report.unsupported == {}, report.unsupported_where
    return report.evaluate(**point).ops


def only(ops, target):
    found = [op for op in ops if op["target"] == target]
    assert found, f"{target} not in {sorted({op['target'] for op in ops})}"
    return found


class Lambda(nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.w = nn.ParameterList([nn.Parameter(torch.empty(*p)) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.w)


def fn_model(fn, *params):
    return lambda: Lambda(fn, *params)


# --- products -------------------------------------------------------------------------------------

def test_mm_symbolic_closed_form():
    spec = lambda *shape: TensorSpec(tuple(sympy.sympify(x) for x in shape), torch.float32)
    cost = rule_for(aten.mm.default)(spec(b, 16), spec(16, 8), out=spec(b, 8))
    assert cost.flops == 2 * b * 16 * 8              # 2*m*n*k
    assert cost.bytes_read == 4 * (16 * b + 16 * 8)  # A and B, float32
    assert cost.bytes_written == 4 * 8 * b


def test_linear_addmm_and_bmm():
    ops = ops_at(fn_model(lambda x, w, bias: F.linear(x, w, bias), (8, 16), (8,)), ["x:float32[b,16]"], b=5)
    (addmm,) = only(ops, "aten.addmm.default")
    assert addmm["flops"] == 2 * 5 * 8 * 16          # 1280
    assert addmm["bytes_read"] == 4 * (8 + 5 * 16 + 16 * 8)
    ops = ops_at(fn_model(lambda x, y: torch.bmm(x, y)), ["x:float32[b,3,4]", "y:float32[b,4,5]"], b=2)
    assert only(ops, "aten.bmm.default")[0]["flops"] == 2 * 2 * 3 * 4 * 5   # 240
    ops = ops_at(fn_model(lambda x, y, z: torch.baddbmm(z, x, y)),
                 ["x:float32[b,3,4]", "y:float32[b,4,5]", "z:float32[b,3,5]"], b=2)
    assert only(ops, "aten.baddbmm.default")[0]["flops"] == 240


def test_matmul_broadcast_decomposes_to_counted_products():
    ops = ops_at(fn_model(lambda x, w: x @ w, (16, 8)), ["x:float32[b,s,16]"], b=2, s=3)
    assert sum(op["matmul_flops"] for op in ops) == 2 * 2 * 3 * 16 * 8      # 1536


# --- convolution ----------------------------------------------------------------------------------

@pytest.mark.parametrize("conv,shape,out_spatial", [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), "x:float32[b,4,17]", [9]),
    (lambda: nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2, groups=2), "x:float32[b,4,10,12]", [10, 12]),
    (lambda: nn.Conv3d(2, 4, 2, stride=2), "x:float32[b,2,4,6,8]", [2, 3, 4]),
])
def test_conv_forward(conv, shape, out_spatial):
    m = conv()
    (op,) = only(ops_at(conv, [shape], b=3), "aten.convolution.default")
    c_out, c_in_per_group, *kernel = m.weight.shape
    positions = 1
    for p in out_spatial:
        positions *= p
    kernel_elems = 1
    for k in kernel:
        kernel_elems *= k
    assert op["flops"] == 2 * 3 * c_out * c_in_per_group * kernel_elems * positions


def test_conv_transposed_and_backward():
    # transposed: positions are the input's: 2 * b * c_out * c_in * k * L_in = 2*2*3*4*3*5 = 720
    (op,) = only(ops_at(lambda: nn.ConvTranspose1d(4, 3, 3, stride=2), ["x:float32[b,4,5]"], b=2),
                 "aten.convolution.default")
    assert op["flops"] == 2 * 2 * 3 * 4 * 3 * 5
    ops = ops_at(lambda: nn.Conv2d(3, 4, 3), ["x:float32[b,3,8,8]"], mode="train", b=2)
    (bwd,) = only(ops, "aten.convolution_backward.default")
    fwd = only(ops, "aten.convolution.default")[0]["flops"]   # 2*2*4*3*9*36 = 15552
    assert fwd == 2 * 2 * 4 * 3 * 9 * 36
    assert bwd["flops"] == fwd   # input needs no grad: only grad_weight, same product count


# --- attention ------------------------------------------------------------------------------------

def test_sdpa_forward_backward_and_kernels():
    def attn():
        return Lambda(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    specs = ["q:float32[b,2,s,8]", "k:float32[b,2,s,8]", "v:float32[b,2,s,8]"]
    ops = ops_at(attn, specs, b=3, s=10)
    (fwd,) = only(ops, "costmodel.sdpa.default")
    assert fwd["matmul_flops"] == 4 * 3 * 2 * 10 * 10 * 8                   # 4*b*h*s^2*d = 19200
    assert fwd["flops"] == fwd["matmul_flops"] + 5 * 3 * 2 * 10 * 10       # softmax: 5 per score
    scores_bytes = 3 * 2 * 10 * 10 * 4
    assert fwd["bytes_written"] == 3 * 2 * 10 * 8 * 4 + 2 * scores_bytes   # out + scores + probabilities
    q = TensorSpec((b, 2, s, 8), torch.float32)
    flash = rule_for(torch.ops.costmodel.sdpa.default)(q, q, q, None, 0.0, False, None, False, out=q,
                                                        kernel="flash")
    assert flash.bytes_written == 4 * b * 2 * s * 8 + 4 * b * 2 * s         # out + float32 logsumexp
    grads = [q, q, q]
    math_bwd = rule_for(torch.ops.costmodel.sdpa_backward.default)(q, q, q, q, None, 0.0, False, None, False,
                                                                    out=grads)
    flash_bwd = rule_for(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(q, q, q, q, q, q, 0.0,
                                                                                             False, out=grads)
    assert math_bwd.matmul_flops == 8 * b * 2 * s * s * 8                  # 4 products
    assert flash_bwd.matmul_flops == 10 * b * 2 * s * s * 8                # 5: recomputes q @ k^T


def test_gqa_attention_counts_query_heads():
    q = TensorSpec((b, 8, s, 16), torch.bfloat16)
    kv = TensorSpec((b, 2, s, 16), torch.bfloat16)
    cost = rule_for(torch.ops.costmodel.sdpa.default)(q, kv, kv, None, 0.0, True, None, True, out=q)
    assert cost.matmul_flops == 4 * b * 8 * s * s * 16


# --- embedding, norms, softmax, pointwise ---------------------------------------------------------

def test_embedding_and_backward():
    ops = ops_at(lambda: nn.Embedding(100, 16), ["ids:int64[b,s]"], mode="train", b=2, s=5)
    (emb,) = only(ops, "aten.embedding.default")
    assert emb["bytes_read"] == 2 * 5 * 8 + 2 * 5 * 16 * 4   # indices + gathered rows, not the table
    (bwd,) = only(ops, "aten.embedding_dense_backward.default")
    assert bwd["flops"] == 2 * 5 * 16                        # one add per gradient element


@pytest.mark.parametrize("norm,target,per_elem", [
    (lambda: nn.LayerNorm(16), "aten.native_layer_norm.default", 8),
    (lambda: nn.GroupNorm(4, 16), "aten.native_group_norm.default", 8),
    (lambda: nn.RMSNorm(16), None, None),
])
def test_norms(norm, target, per_elem):
    shape = "x:float32[b,16,6]" if target and "group" in target else "x:float32[b,6,16]"
    ops = ops_at(norm, [shape], mode="train", b=2)
    if target is None:   # RMSNorm: a fused op or its decomposition, each op costed
        assert sum(op["flops"] for op in ops) > 0
        return
    (op,) = only(ops, target)
    assert op["flops"] == per_elem * 2 * 6 * 16
    assert only(ops, target.replace(".default", "_backward.default"))[0]["flops"] == 2 * per_elem * 2 * 6 * 16


def test_batch_norm_train_and_eval():
    ops = ops_at(lambda: nn.BatchNorm2d(4), ["x:float32[b,4,5,5]"], mode="train", b=2)
    norms = [op for op in ops if op["category"] == "norm"]
    assert [op["flops"] for op in norms if op["phase"] == "forward"] == [8 * 2 * 4 * 25]


def test_softmax_and_backward():
    ops = ops_at(fn_model(lambda x, w: torch.softmax(x * w, -1), (7,)), ["x:float32[b,7]"], mode="train", b=3)
    assert only(ops, "aten._softmax.default")[0]["flops"] == 5 * 21
    assert only(ops, "aten._softmax_backward_data.default")[0]["flops"] == 4 * 21


def test_pointwise_broadcasting_reads_each_input_at_its_own_size():
    ops = ops_at(fn_model(lambda x, w: x + w, (8,)), ["x:float32[b,s,8]"], b=2, s=3)
    (add,) = only(ops, "aten.add.Tensor")
    assert add["flops"] == 2 * 3 * 8                    # one per output element
    assert add["bytes_read"] == 4 * (2 * 3 * 8 + 8)     # x, and w once (not broadcast)
    assert add["bytes_written"] == 4 * 2 * 3 * 8


def test_gelu_and_silu_costs():
    ops = ops_at(lambda: nn.GELU(), ["x:float32[b,10]"], b=2)
    assert only(ops, "aten.gelu.default")[0]["flops"] == 8 * 20


# --- reductions, indexing, copies, pooling, dropout, losses, views -------------------------------

def test_reductions():
    ops = ops_at(fn_model(lambda x: (x.sum(-1), x.mean(0), x.var(-1))), ["x:float32[b,10]"], b=3)
    assert only(ops, "aten.sum.dim_IntList")[0]["flops"] == 30
    assert only(ops, "aten.mean.dim")[0]["flops"] == 30
    assert only(ops, "aten.var.correction")[0]["flops"] == 90


def test_gather_scatter_index():
    def model():
        return Lambda(lambda x, i: (x.gather(1, i), x.scatter(1, i, 1.0), x[:, i[0]], torch.index_select(x, 0, i[0])))
    ops = ops_at(model, ["x:float32[b,10]", "i:int64[b,3]"], b=2)
    g = only(ops, "aten.gather.default")[0]
    assert g["bytes_read"] == 2 * 3 * 8 + 2 * 3 * 4 and g["bytes_written"] == 2 * 3 * 4
    assert only(ops, "aten.scatter.value")[0]["bytes_written"] == 2 * 10 * 4
    assert only(ops, "aten.index.Tensor")[0]["bytes_written"] == 2 * 3 * 4
    assert only(ops, "aten.index_select.default")[0]["bytes_written"] == 3 * 10 * 4


def test_cat_stack_clone_copy():
    ops = ops_at(fn_model(lambda x, y: (torch.cat([x, y], 1), torch.stack([x, x]), x.clone(), x.to(torch.float16))),
                 ["x:float32[b,4]", "y:float32[b,6]"], b=2)
    assert only(ops, "aten.cat.default")[0]["bytes_read"] == 4 * 2 * 10
    assert only(ops, "aten.cat.default")[0]["bytes_written"] == 4 * 2 * 10
    assert only(ops, "aten.clone.default")[0]["bytes"] == 2 * 4 * 8
    to = only(ops, "aten._to_copy.default")[0]
    assert (to["bytes_read"], to["bytes_written"]) == (4 * 8, 2 * 8)


def test_pooling():
    ops = ops_at(lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2)), ["x:float32[b,3,8,8]"], mode="train",
                 b=1)
    assert only(ops, "aten.max_pool2d_with_indices.default")[0]["flops"] == 3 * 4 * 4 * 4   # outputs * window
    assert only(ops, "aten.max_pool2d_with_indices_backward.default")[0]["flops"] == 3 * 4 * 4 * 4
    ops = ops_at(lambda: nn.AdaptiveAvgPool2d(1), ["x:float32[b,3,8,8]"], b=2)
    assert sum(op["flops"] for op in ops) == 2 * 3 * 64


def test_pooling_features_are_the_window_and_stride_areas():
    from costmodel.hardware.calibrate_kernels import rule_cost
    x = torch.empty(1, 4, 16, 16)
    aten = torch.ops.aten
    cost = rule_cost(aten.max_pool2d_with_indices.default, x, [3, 3], [1, 1], [1, 1])
    assert (cost.kernel, cost.features["window"], cost.features["stride"]) == ("pool.max", 9, 1)
    # no stride: the window's; one size: every spatial dimension's
    cost = rule_cost(aten.avg_pool2d.default, x, [2], [])
    assert (cost.kernel, cost.features["window"], cost.features["stride"]) == ("pool.avg", 4, 4)
    y, idx = aten.max_pool2d_with_indices.default(x, [2, 2], [2, 2])
    cost = rule_cost(aten.max_pool2d_with_indices_backward.default, y, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    assert (cost.kernel, cost.features["window"], cost.features["stride"]) == ("pool.max.backward", 4, 4)


def test_dropout_train_and_eval():
    train = ops_at(lambda: nn.Sequential(nn.Linear(10, 10), nn.Dropout(0.1)), ["x:float32[b,10]"], mode="train", b=2)
    # dropout decomposes here: mask = bernoulli_(empty_like(x)) / (1 - p); out = x * mask
    assert only(train, "aten.bernoulli_.float")[0]["bytes_written"] == 2 * 10 * 4
    assert [op["flops"] for op in only(train, "aten.mul.Tensor") if op["phase"] == "forward"] == [20]
    assert all(op["category"] in ("view", "matmul") for op in ops_at(lambda: nn.Dropout(0.1), ["x:float32[b,10]"], b=2))


def test_cross_entropy_loss():
    def model():
        return Lambda(lambda x, t: F.cross_entropy(x, t))
    ops = ops_at(model, ["x:float32[b,5]", "t:int64[b]"], b=4)
    assert only(ops, "aten.nll_loss_forward.default")[0]["flops"] == 2 * 4
    assert only(ops, "aten._log_softmax.default")[0]["flops"] == 5 * 20


def test_views_are_declared_zero_cost():
    ops = ops_at(fn_model(lambda x: x.view(-1).unsqueeze(0).transpose(0, 1).expand(-1, 2) * 1), ["x:float32[b,3]"], b=2)
    views = [op for op in ops if op["category"] == "view"]
    assert views and all(op["flops"] == 0 and op["bytes"] == 0 for op in views)
    assert is_metadata_only(aten.transpose.int) and not is_metadata_only(aten.add.Tensor)


def test_optimizer_update_costs():
    def lin():
        return nn.Linear(4, 3)
    for name, flops, moved in [("adamw", 15, 7), ("sgd", 2, 3), ("sgd-momentum", 4, 5)]:
        r = costmodel.analyze(lin, inputs=["x:float32[b,4]"], mode="train", optimizer=name)
        opt = [op for op in r.evaluate(b=2).ops if op["phase"] == "optimizer"]
        assert sum(op["flops"] for op in opt) == flops * 15                  # 12 weights + 3 biases
        assert sum(op["bytes"] for op in opt) == moved * 15 * 4              # p, g, state read + written


def test_unsupported_op_is_reported_never_zero():
    def model():
        return Lambda(lambda x: torch.fft.fft(x).real)
    report = costmodel.analyze(model, inputs=["x:float32[b,8]"])
    assert report.unsupported and any("fft" in t for t in report.unsupported)
    assert all("fft" not in op.target for op in report.primary.ops)


def test_registering_twice_is_an_error():
    from costmodel.rules import register
    with pytest.raises(RuntimeError, match="already has a rule"):
        register(aten.mm)(lambda *a, **k: OpCost())
