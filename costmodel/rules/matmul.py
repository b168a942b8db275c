"""Matrix products. C[m, n] = A[m, k] @ B[k, n] costs 2*m*n*k FLOPs (one multiply-add = 2 FLOPs),
as torch.utils.flop_counter counts them; the bias add of addmm/baddbmm is not counted there, so it
is not counted here either (it is m*n adds, negligible next to the product).

Kernel classes: one product is "matmul", a batch of them "bmm"; both carry m, n, k (and batch), from
which a calibrated device's table reads its shape efficiency (m = 1 is a matrix-vector product)."""

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
    return OpCost(2 * m * n * k, a.nbytes + b.nbytes, out.nbytes, MATMUL, **_product(m, n, k))


def _product(m, n, k, batch=None) -> dict:
    """kernel class and shape features of a product: C[batch, m, n] from A[.., m, k] @ B[.., k, n]."""
    if batch is None:
        return {"kernel": "matmul", "features": {"m": m, "n": n, "k": k}}
    return {"kernel": "bmm", "features": {"batch": batch, "m": m, "n": n, "k": k}}


@register(aten.addmm)
def addmm(bias: TensorSpec, a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[m, n] = bias + A[m, k] @ B[k, n]"""
    m, k = a.shape
    _, n = b.shape
    return OpCost(2 * m * n * k, bias.nbytes + a.nbytes + b.nbytes, out.nbytes, MATMUL, **_product(m, n, k))


@register(aten.bmm)
def bmm(a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[b, m, n] = A[b, m, k] @ B[b, k, n]"""
    batch, m, k = a.shape
    _, _, n = b.shape
    return OpCost(2 * batch * m * n * k, a.nbytes + b.nbytes, out.nbytes, MATMUL, **_product(m, n, k, batch))


@register(aten.baddbmm)
def baddbmm(bias: TensorSpec, a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """C[b, m, n] = bias + A[b, m, k] @ B[b, k, n]"""
    batch, m, k = a.shape
    _, _, n = b.shape
    return OpCost(2 * batch * m * n * k, bias.nbytes + a.nbytes + b.nbytes, out.nbytes, MATMUL,
                  **_product(m, n, k, batch))


@register(aten.linear)
def linear(x: TensorSpec, w: TensorSpec, bias: TensorSpec | None = None, *, out: TensorSpec, **_) -> OpCost:
    """y[..., n] = x[..., k] @ W[n, k]^T (+ b): seen only in graphs that keep linear undecomposed."""
    n, k = w.shape
    rows = prod(x.shape[:-1])
    return OpCost(2 * rows * n * k, nbytes_of([x, w, bias]), out.nbytes, MATMUL, **_product(rows, n, k))


@register(aten.matmul)
def matmul(a: TensorSpec, b: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """Broadcast batched product: out[..., m, n], contraction k = a.shape[-1]."""
    k = a.shape[-1]
    m = out.shape[-2] if out.ndim >= 2 else 1
    n = out.shape[-1] if out.ndim >= 1 and b.ndim >= 2 else 1
    batch = prod(out.shape[:-2]) if out.ndim > 2 else None
    return OpCost(2 * out.numel * k, a.nbytes + b.nbytes, out.nbytes, MATMUL, **_product(m, n, k, batch))


@register(aten.mv, aten.addmv, aten.dot, aten.vdot)
def matvec(*args, out: TensorSpec, **_) -> OpCost:
    """Matrix-vector and dot products: 2 FLOPs per multiply-add. FlopCounterMode does not count
    these, so they are a reduction here, outside matmul_flops."""
    tensors = [a for a in args if isinstance(a, TensorSpec)]
    mat = max(tensors, key=lambda t: t.ndim)
    m = mat.shape[0] if mat.ndim == 2 else 1
    return OpCost(2 * mat.numel, nbytes_of(tensors), out.nbytes, REDUCTION, **_product(m, 1, mat.shape[-1]))
