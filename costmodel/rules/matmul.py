"""Matrix products. C[m, n] = A[m, k] @ B[k, n] costs 2*m*n*k FLOPs (one multiply-add = 2 FLOPs),
as torch.utils.flop_counter counts them; the bias add of addmm/baddbmm is not counted there, so it
is not counted here either (it is m*n adds, negligible next to the product)."""

from __future__ import annotations

import torch

from costmodel.rules.cost import MATMUL, REDUCTION, OpCost
from costmodel.rules.registry import TensorSpec, nbytes_of, prod, register

aten = torch.ops.aten


@register(aten.mm)
def mm(a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[m, n] = A[m, k] @ B[k, n]"""
    m, k = a.shape
    _, n = b.shape
    return OpCost(2 * m * n * k, a.nbytes + b.nbytes, out.nbytes, MATMUL)


@register(aten.addmm)
def addmm(bias: TensorSpec, a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[m, n] = bias + A[m, k] @ B[k, n]"""
    m, k = a.shape
    _, n = b.shape
    return OpCost(2 * m * n * k, bias.nbytes + a.nbytes + b.nbytes, out.nbytes, MATMUL)


@register(aten.bmm)
def bmm(a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[b, m, n] = A[b, m, k] @ B[b, k, n]"""
    batch, m, k = a.shape
    _, _, n = b.shape
    return OpCost(2 * batch * m * n * k, a.nbytes + b.nbytes, out.nbytes, MATMUL)


@register(aten.baddbmm)
def baddbmm(bias: TensorSpec, a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[b, m, n] = bias + A[b, m, k] @ B[b, k, n]"""
    batch, m, k = a.shape
    _, _, n = b.shape
    return OpCost(2 * batch * m * n * k, bias.nbytes + a.nbytes + b.nbytes, out.nbytes, MATMUL)


@register(aten.linear)
def linear(x: TensorSpec, w: TensorSpec, bias: TensorSpec | None = None, *, out: TensorSpec, **_) -> OpCost:
    """y[..., n] = x[..., k] @ W[n, k]^T (+ b): seen only in graphs that keep linear undecomposed."""
    n, k = w.shape
    rows = prod(x.shape[:-1])
    return OpCost(2 * rows * n * k, nbytes_of([x, w, bias]), out.nbytes, MATMUL)


@register(aten.matmul)
def matmul(a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """Broadcast batched product: out[..., m, n], contraction k = a.shape[-1]."""
    k = a.shape[-1]
    return OpCost(2 * out.numel * k, a.nbytes + b.nbytes, out.nbytes, MATMUL)


@register(aten.mv, aten.addmv, aten.dot, aten.vdot)
def matvec(*args, out: TensorSpec, **_) -> OpCost:
    """Matrix-vector and dot products: 2 FLOPs per multiply-add. FlopCounterMode does not count
    these, so they are a reduction here, outside matmul_flops."""
    tensors = [a for a in args if isinstance(a, TensorSpec)]
    mat = max(tensors, key=lambda t: t.ndim)
    return OpCost(2 * mat.numel, nbytes_of(tensors), out.nbytes, REDUCTION)
