"""Convolutions, forward and backward, with stride, padding, dilation, groups and transposition.

Counted as torch.utils.flop_counter counts them: every output position of a (non-transposed)
convolution does c_in/groups * prod(kernel) multiply-adds per output channel. Stride, padding and
dilation enter through the output's spatial size; groups through the weight's c_in/groups. One
exception, in `flops` only: a grouped weight gradient is the work the kernel does (the forward's
multiply-adds), where FlopCounterMode counts it `groups` times over; `matmul_flops` keeps the
counter's figure.

Kernel classes, from the weight against the input (the groups argument's position differs between
the aten convolution ops, the shapes do not): conv.transposed; conv.dense (one group);
conv.depthwise (one input channel per group); conv.grouped (the rest); ".backward" for the gradients
(".backward.weight" when the input needs none, as in a first layer).
"""

from __future__ import annotations

import sympy
import torch

from costmodel.rules.cost import CONV, OpCost
from costmodel.rules.registry import TensorSpec, nbytes_of, prod, register

aten = torch.ops.aten


def conv_flops(x_shape, w_shape, out_shape, transposed: bool):
    """2 * batch * c_out * c_in_per_group * prod(kernel) * prod(spatial positions).

    A transposed convolution scatters each *input* position, so its positions are the input's."""
    batch = x_shape[0]
    positions = prod((x_shape if transposed else out_shape)[2:])
    c_out, c_in_per_group, *kernel = w_shape
    return 2 * batch * c_out * c_in_per_group * prod(kernel) * positions


def conv_class(x_shape, w_shape, out_shape, transposed: bool, backward: bool = False,
               input_grad: bool = True) -> dict:
    """kernel class and features: the convolution as the GEMM it lowers to (im2col), per group:
    m = output positions (times batch), n = output channels, k = input channels * kernel area;
    groups; and where the stride outruns the kernel (a 1x1 stride-2 shortcut), "skipped": the
    input positions per output position the kernel does not cover (the whole input is still read
    and reordered). A backward without the input's gradient (a first layer) is ".backward.weight"."""
    if transposed:   # weight [c_in, c_out / groups, *kernel]
        cout = w_shape[1]
        groups = out_shape[1] / cout
        cin = x_shape[1] / groups
    else:            # weight [c_out, c_in / groups, *kernel]
        cout_total, cin = w_shape[0], w_shape[1]
        groups = x_shape[1] / cin
        cout = cout_total / groups
    if transposed:
        kind = "transposed"
    elif groups == 1:
        kind = "dense"
    elif cin == 1:
        kind = "depthwise"
    else:
        kind = "grouped"
    suffix = (".backward" + ("" if input_grad else ".weight")) if backward else ""
    features = {"m": out_shape[0] * prod(out_shape[2:]), "n": cout, "k": cin * prod(w_shape[2:]), "groups": groups}
    inputs, outputs = (out_shape, x_shape) if transposed else (x_shape, out_shape)
    skipped = sympy.sympify(prod(inputs[2:])) / (prod(outputs[2:]) * prod(w_shape[2:]))
    features["skipped"] = 1 if skipped.is_number and skipped <= 1 else sympy.Max(1, skipped)
    return {"kernel": f"conv.{kind}{suffix}", "features": features}


@register(aten.convolution, aten._convolution, aten.cudnn_convolution, aten.convolution_overrideable)
def convolution(x: TensorSpec, w: TensorSpec, bias: TensorSpec | None, stride, padding, dilation,
                transposed: bool, *rest, out: TensorSpec, **_) -> OpCost:
    """out = conv(x, w) + b"""
    return OpCost(conv_flops(x.shape, w.shape, out.shape, transposed), nbytes_of([x, w, bias]),
                  out.nbytes, CONV, **conv_class(x.shape, w.shape, out.shape, transposed))


@register(aten._slow_conv2d_forward)
def slow_conv2d(x: TensorSpec, w: TensorSpec, kernel_size, bias, stride, padding, *, out, **_) -> OpCost:
    return OpCost(conv_flops(x.shape, w.shape, out.shape, False), nbytes_of([x, w, bias]), out.nbytes, CONV,
                  **conv_class(x.shape, w.shape, out.shape, False))


@register(aten.convolution_backward)
def convolution_backward(grad_out: TensorSpec, x: TensorSpec, w: TensorSpec, bias_sizes, stride, padding,
                         dilation, transposed: bool, output_padding, groups, output_mask, *,
                         out, **_) -> OpCost:
    """grad_input = conv^T(grad_out, w); grad_weight = conv(x^T, grad_out^T); grad_bias = sum(grad_out)."""

    def t(shape):  # swap the batch and channel axes
        return [shape[1], shape[0], *shape[2:]]

    grad_input, grad_weight, grad_bias = out
    counted = work = 0
    if output_mask[0]:
        counted += conv_flops(grad_out.shape, w.shape, grad_input.shape, not transposed)
        work += counted
    if output_mask[1]:
        if transposed:
            weight = conv_flops(t(grad_out.shape), t(x.shape), t(grad_weight.shape), False)
        else:
            weight = conv_flops(t(x.shape), t(grad_out.shape), t(grad_weight.shape), False)
        # FlopCounterMode counts a grouped weight gradient as if every input channel met every
        # output channel; the kernel does 1/groups of that (the forward's multiply-adds)
        counted += weight
        work += weight / groups
    # grad_bias (a sum over grad_out) is not counted by FlopCounterMode; it rides in bytes only.
    read = grad_out.nbytes + (x.nbytes if output_mask[1] else 0) + (w.nbytes if output_mask[0] else 0)
    return OpCost(work, read, nbytes_of([o for o in out if o is not None]), CONV, counted_flops=counted,
                  **conv_class(x.shape, w.shape, grad_out.shape, transposed, backward=True,
                               input_grad=bool(output_mask[0])))
