"""Normalisations (layer, batch, group, RMS) and their backwards.

FLOPs per element are estimates of the arithmetic a kernel does, stated per rule; bytes are the
input read once (plus weights and statistics) and each output written once.
  layer/batch/group norm forward: mean 1 + variance 3 + normalise 2 + affine 2 = 8 per element
  RMS norm forward: square 1 + mean 1 + scale 1 + weight 1 = 4 per element
  backward: about twice the forward's arithmetic (two reductions over grad*xhat and grad)
Kernel classes norm.layer, norm.rms, norm.batch (batch statistics), norm.batch.eval (running
statistics), norm.group, each with ".backward".
"""

from __future__ import annotations

import torch

from costmodel.rules.cost import NORM, OpCost
from costmodel.rules.registry import TensorSpec, nbytes_of, register

aten = torch.ops.aten

NORM_FLOPS = 8
NORM_BACKWARD_FLOPS = 16
RMS_NORM_FLOPS = 4
RMS_NORM_BACKWARD_FLOPS = 8


def _outputs(out) -> list[TensorSpec]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, TensorSpec)]


def _norm(x: TensorSpec, params, out, flops_per_elem: int, kernel: str) -> OpCost:
    return OpCost(flops_per_elem * x.numel, x.nbytes + nbytes_of(params), nbytes_of(_outputs(out)), NORM,
                  kernel=kernel)


@register(aten.native_layer_norm)
def layer_norm(x, normalized_shape, weight, bias, eps, *, out, **_) -> OpCost:
    """out = (x - mean) * rstd * w + b over the last len(normalized_shape) dims"""
    return _norm(x, [weight, bias], out, NORM_FLOPS, "norm.layer")


@register(aten.native_layer_norm_backward)
def layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask, *, out, **_):
    return _norm(x, [grad_out, mean, rstd, weight], out, NORM_BACKWARD_FLOPS, "norm.layer.backward")


@register(aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training,
          aten._native_batch_norm_legit_functional, aten._batch_norm_with_update,
          aten._batch_norm_with_update_functional, aten._batch_norm_no_update, aten.cudnn_batch_norm)
def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *args, out, op=None, **_) -> OpCost:
    """out = (x - mean_c) * rstd_c * w_c + b_c per channel; in eval, with the running statistics"""
    return _norm(x, [weight, bias, running_mean, running_var], out, NORM_FLOPS,
                 "norm.batch" if _batch_stats(op, [running_mean, running_var, *args]) else "norm.batch.eval")


def _batch_stats(op, args) -> bool:
    """Whether a batch norm computes the batch's statistics (training) or uses the running ones."""
    name = str(getattr(op, "overloadpacket", op) or "")
    if "no_training" in name or "no_update" in name:
        return False
    return next((a for a in args if isinstance(a, bool)), True)


@register(aten.native_batch_norm_backward, aten.batch_norm_backward, aten.cudnn_batch_norm_backward)
def batch_norm_backward(grad_out, x, *args, out, **_) -> OpCost:
    return _norm(x, [grad_out, *[a for a in args if isinstance(a, TensorSpec)]], out, NORM_BACKWARD_FLOPS,
                 "norm.batch.backward")


@register(aten.native_group_norm)
def group_norm(x, weight, bias, N, C, HxW, group, eps, *, out, **_) -> OpCost:
    return _norm(x, [weight, bias], out, NORM_FLOPS, "norm.group")


@register(aten.native_group_norm_backward)
def group_norm_backward(grad_out, x, mean, rstd, weight, N, C, HxW, group, output_mask, *, out, **_):
    return _norm(x, [grad_out, mean, rstd, weight], out, NORM_BACKWARD_FLOPS, "norm.group.backward")


@register(aten._fused_rms_norm, aten.rms_norm)
def rms_norm(x, normalized_shape, weight=None, eps=None, *, out, **_) -> OpCost:
    """out = x * rsqrt(mean(x^2) + eps) * w"""
    return _norm(x, [weight], out, RMS_NORM_FLOPS, "norm.rms")


@register(aten._fused_rms_norm_backward)
def rms_norm_backward(grad_out, x, normalized_shape, rstd, weight, output_mask, *, out, **_) -> OpCost:
    return _norm(x, [grad_out, rstd, weight], out, RMS_NORM_BACKWARD_FLOPS, "norm.rms.backward")
