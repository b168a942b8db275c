"""Scaled-dot-product attention: the fused aten kernels (flash, efficient, cudnn, CPU flash) and
the `costmodel::sdpa` op that capture puts in place of `F.scaled_dot_product_attention`.

Matmul FLOPs are counted as torch.utils.flop_counter counts them, with q: [B, H, L, E],
k: [B, Hk, S, E], v: [B, Hk, S, Ev] (H query heads; GQA shares k/v heads, the work is per query head):
  forward:  q @ k^T -> [B, H, L, S] (2*B*H*L*S*E) and P @ v -> [B, H, L, Ev] (2*B*H*L*S*Ev)
  backward, math (autograd of the two products): 4*B*H*L*S*(E + Ev)
  backward, fused (recomputes q @ k^T):           2*B*H*L*S*(3*E + 2*Ev)
NB: causal masking is not accounted for (as in FlopCounterMode): the kernels skip about half the
blocks, which the roofline's efficiency absorbs. Softmax costs SOFTMAX_FLOPS per score forward and
SOFTMAX_BACKWARD_FLOPS backward, counted in `flops` but not in `matmul_flops`.
The math kernel materialises the [B, H, L, S] scores and probabilities (written and read back);
the fused kernels keep them on chip and store only a float32 logsumexp per query row.
Kernel class "attention", with features batch_heads, L, S, E: which SDPA kernel a device runs is
decided where the device is known (analysis.attention_classes), from the same arguments.
"""

from __future__ import annotations

import torch

from ..cost import ATTENTION, OpCost
from . import TensorSpec, nbytes_of, prod, register

aten = torch.ops.aten

SOFTMAX_FLOPS = 5            # scale, max-subtract, exp, sum, divide per score
SOFTMAX_BACKWARD_FLOPS = 4   # dP * P, row sum, subtract, multiply
KERNELS = ("math", "flash", "efficient")


def _dims(q: TensorSpec, k: TensorSpec, v: TensorSpec):
    """-> (batch*heads of q, L, S, E, Ev) for [..., L, E] layouts."""
    *bh, L, E = q.shape
    S = k.shape[-2]
    Ev = v.shape[-1]
    return prod(bh), L, S, E, Ev


def attention_forward(q: TensorSpec, k: TensorSpec, v: TensorSpec, out: TensorSpec, mask=None,
                      kernel: str = "math") -> OpCost:
    """Forward attention cost for [..., L, E] layouts."""
    BH, L, S, E, Ev = _dims(q, k, v)
    matmul = 2 * BH * L * S * E + 2 * BH * L * S * Ev       # q @ k^T, then P @ v
    scores = BH * L * S                                      # elements of [B, H, L, S]
    read, written = nbytes_of([q, k, v, mask]), out.nbytes
    if kernel == "math":
        # scores written, read by softmax, probabilities written, read by P @ v
        read += 2 * scores * q.itemsize
        written += 2 * scores * q.itemsize
    else:
        written += BH * L * 4                                # float32 logsumexp per row
    return OpCost(matmul + SOFTMAX_FLOPS * scores, read, written, ATTENTION, counted_flops=matmul,
                  kernel="attention", features=_features(BH, L, S, E))


def _features(BH, L, S, E) -> dict:
    return {"batch_heads": BH, "L": L, "S": S, "E": E}


def attention_backward(grad_out: TensorSpec, q: TensorSpec, k: TensorSpec, v: TensorSpec, grads,
                       mask=None, kernel: str = "math") -> OpCost:
    """Backward attention cost: grads of q, k, v from grad_out."""
    BH, L, S, E, Ev = _dims(q, k, v)
    scores = BH * L * S
    if kernel == "math":
        matmul = 4 * BH * L * S * (E + Ev)
        # saved probabilities read twice, dP written and read, dS written and read
        extra_read, extra_written = 4 * scores * q.itemsize, 2 * scores * q.itemsize
    else:
        matmul = 2 * BH * L * S * (3 * E + 2 * Ev)
        extra_read, extra_written = BH * L * 4 * 2, 0       # logsumexp and the delta rows
    read = nbytes_of([grad_out, q, k, v, mask]) + extra_read
    written = nbytes_of(grads) + extra_written
    return OpCost(matmul + SOFTMAX_BACKWARD_FLOPS * scores, read, written, ATTENTION, counted_flops=matmul,
                  kernel="attention.backward", features=_features(BH, L, S, E))


def _bshd(t: TensorSpec) -> TensorSpec:
    """The _flash/_efficient_attention_* ops take [B, S, H, D]; rules reason in [B, H, S, D]."""
    b, s, h, d = t.shape
    return TensorSpec((b, h, s, d), t.dtype)


# --- the fused aten kernels (seen when a graph is captured on a device that runs them) ---------

@register(aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
          aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu,
          aten._scaled_dot_product_fused_attention_overrideable)
def sdpa_fused(q, k, v, *args, out, **kwargs) -> OpCost:
    mask = next((a for a in args if isinstance(a, TensorSpec)), kwargs.get("attn_mask"))
    return attention_forward(q, k, v, out[0], mask, kernel="flash")


@register(aten._scaled_dot_product_flash_attention_backward,
          aten._scaled_dot_product_efficient_attention_backward,
          aten._scaled_dot_product_cudnn_attention_backward,
          aten._scaled_dot_product_flash_attention_for_cpu_backward)
def sdpa_fused_backward(grad_out, q, k, v, *args, out, **kwargs) -> OpCost:
    return attention_backward(grad_out, q, k, v, [o for o in out if isinstance(o, TensorSpec)][:3],
                              kernel="flash")


@register(aten._flash_attention_forward, aten._efficient_attention_forward)
def attention_bshd(q, k, v, *args, out, **_) -> OpCost:
    return attention_forward(_bshd(q), _bshd(k), _bshd(v), _bshd(out[0]), kernel="flash")


@register(aten._flash_attention_backward, aten._efficient_attention_backward)
def attention_bshd_backward(grad_out, q, k, v, *args, out, **_) -> OpCost:
    return attention_backward(_bshd(grad_out), _bshd(q), _bshd(k), _bshd(v), list(out[:3]), kernel="flash")


@register(aten.scaled_dot_product_attention, aten._scaled_dot_product_attention_math)
def sdpa_composite(q, k, v, attn_mask=None, *args, out, **_) -> OpCost:
    """Only in graphs that keep the composite op; math decomposition costs."""
    o = out[0] if isinstance(out, tuple) else out
    return attention_forward(q, k, v, o, attn_mask, kernel="math")

