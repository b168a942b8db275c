"""`costmodel::sdpa`: scaled-dot-product attention kept as one op in captured graphs.

On the meta device PyTorch runs SDPA through its math decomposition (bmm, softmax, bmm), which
loses the fact that it is attention: the kernel a GPU would run (flash, efficient) has the same
matmul FLOPs forward but no [L, S] scores in memory. Capture routes
`torch.nn.functional.scaled_dot_product_attention` here (see `route_sdpa`), so the graph holds one
forward and one backward attention node whose cost the rules compute for the chosen kernel.
"""

from __future__ import annotations

import contextlib

import torch

from costmodel import _torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from costmodel.errors import UsageError
from costmodel.capture.moe import GROUPED_MM_FUNCTIONS, call_grouped_mm
from costmodel.capture.rnn import cpu_rnn
from costmodel.rules.registry import TensorSpec, register
from costmodel.rules.attention import KERNELS, MASK_GRAD, attention_backward, attention_forward


@torch.library.custom_op("costmodel::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
         dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@sdpa.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("costmodel::sdpa_backward", mutates_args=())
def sdpa_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None,
                  enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def f(q, k, v):
        return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    _, vjp = torch.func.vjp(f, q, k, v)
    gq, gk, gv = vjp(grad_out)
    return gq.contiguous(), gk.contiguous(), gv.contiguous()


@sdpa_backward.register_fake
def _(grad_out, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    gq, gk, gv = torch.ops.costmodel.sdpa_backward(grad_out, q, k, v, attn_mask, *ctx.args)
    return gq, gk, gv, None, None, None, None, None


sdpa.register_autograd(_backward, setup_context=_setup_context)


_ORIGINAL_SDPA = F.scaled_dot_product_attention


_BADDBMM = (torch.baddbmm, torch.Tensor.baddbmm)   # the originals (route_sdpa swaps the attributes)
# C++ composite kernels that read sizes as plain integers, which pins every symbolic size they
# touch (the batch of an RNN, the image size of an upsample); their Python decompositions, which
# PyTorch's Python dispatcher runs, keep the sizes symbolic (an RNN still unrolls its sequence);
# F.interpolate's stop at the upsample op eager runs (`_torch.eager_upsampling`).
_RNN_FUNCTIONS = _torch.rnn_functions()
_PYTHON_DECOMPOSED = _RNN_FUNCTIONS | {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
                                               F.pad}


def _constant_pad_with_grad(input, pad, mode="constant", value=None) -> tuple | None:
    """_ConstantPad's arguments for an F.pad call that pads with a constant an input needing a
    gradient; None for any other."""
    if mode == "constant" and torch.is_grad_enabled() and isinstance(input, torch.Tensor) and input.requires_grad:
        return input, tuple(pad), 0.0 if value is None else value
    return None


class _ConstantPad(torch.autograd.Function):
    """F.pad(mode="constant") in a training capture: the op eager runs (aten.constant_pad_nd)
    forward and backward, both under the Python dispatcher. Eager's gradient is the same op with
    the pads negated, but autograd calls its C++ composite kernel, which narrows with sizes read as
    plain integers and fails on symbolic ones (a causal TCN's left pad of a seq-long signal); the
    Python decomposition keeps them symbolic. Other modes' gradients are their own ops."""

    @staticmethod
    def forward(ctx, input, pad, value):
        ctx.pad = pad
        with _torch.python_dispatcher():
            return torch.constant_pad_nd(input, pad, value)

    @staticmethod
    def backward(ctx, grad):
        with _torch.python_dispatcher():
            return torch.constant_pad_nd(grad, [-p for p in ctx.pad], 0.0), None, None


class _RouteSDPA(TorchFunctionMode):
    def __init__(self, device: str | None):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device == "cpu" and func in _RNN_FUNCTIONS:
            out = cpu_rnn(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func is _ORIGINAL_SDPA:
            return _call_sdpa(*args, **kwargs)
        if func in _BADDBMM:
            args, kwargs = _broadcast_baddbmm_input(*args, **kwargs)
        elif func in GROUPED_MM_FUNCTIONS:
            return call_grouped_mm(*args, **kwargs)
        elif func is F.pad and (padded := _constant_pad_with_grad(*args, **kwargs)) is not None:
            return _ConstantPad.apply(*padded)
        elif func in _PYTHON_DECOMPOSED:
            with _torch.python_dispatcher(), _torch.eager_upsampling():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _broadcasting(baddbmm):
    def call(*args, **kwargs):
        args, kwargs = _broadcast_baddbmm_input(*args, **kwargs)
        return baddbmm(*args, **kwargs)
    return call


def _broadcast_baddbmm_input(self, batch1=None, batch2=None, *rest, **kwargs):
    """ALiBi's `alibi.baddbmm(q, k)` adds a [B*H, 1, S] bias to [B*H, L, S] scores. PyTorch's meta
    kernel broadcasts it with an expand that cannot take symbolic sizes (it fails with "SymIntArrayRef
    expected to contain only concrete integers"); the same expand done first, as a view, can."""
    b1 = batch1 if batch1 is not None else kwargs.get("batch1")
    b2 = batch2 if batch2 is not None else kwargs.get("batch2")
    if isinstance(self, torch.Tensor) and isinstance(b1, torch.Tensor) and isinstance(b2, torch.Tensor) \
            and self.dim() <= 3 and b1.dim() == 3 and b2.dim() == 3:
        shape = (b1.shape[0], b1.shape[1], b2.shape[2])
        if tuple(self.shape) != shape:
            self = self.expand(shape)
    args = (self,) + tuple(a for a in (batch1, batch2) if a is not None) + rest
    return args, kwargs


def _call_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    out = torch.ops.costmodel.sdpa(query, key, value, attn_mask, float(dropout_p), bool(is_causal),
                                   scale, bool(enable_gqa))
    if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad and torch.is_grad_enabled():
        # a mask made from parameters (Swin's relative position bias) needs a gradient, which
        # PyTorch's CPU flash kernel cannot give: the choice of kernel reads this
        node = _torch.traced_node(out)
        if node is not None:
            node.meta[MASK_GRAD] = True
    return out


@contextlib.contextmanager
def route_sdpa(device: str | None = None):
    """Within this context, F.scaled_dot_product_attention calls become costmodel::sdpa; with
    `device` "cpu", RNNs run as the CPU's kernels do (capture.rnn).

    Calls through the module attribute (`F.scaled_dot_product_attention(...)`, as Hugging Face
    and most code write it) are rerouted by swapping the attribute, which costs nothing per op; the
    torch-function mode catches the rest (a name imported before capture), at a small cost per call."""
    original = F.scaled_dot_product_attention
    baddbmm, tensor_baddbmm = torch.baddbmm, torch.Tensor.baddbmm
    F.scaled_dot_product_attention = _call_sdpa
    # torch.baddbmm is also called from inside other torch functions (multi_head_attention_forward),
    # where a torch-function mode does not see it: swap the attributes too
    torch.baddbmm, torch.Tensor.baddbmm = _broadcasting(baddbmm), _broadcasting(tensor_baddbmm)
    try:
        with _RouteSDPA(device):
            yield
    finally:
        F.scaled_dot_product_attention = original
        torch.baddbmm, torch.Tensor.baddbmm = baddbmm, tensor_baddbmm


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise UsageError(f"unknown attention kernel {kernel!r}; accepted: {', '.join(KERNELS)}")


@register(torch.ops.costmodel.sdpa)
def sdpa_rule(q: TensorSpec, k: TensorSpec, v: TensorSpec, attn_mask, dropout_p, is_causal, scale,
              enable_gqa, *, out: TensorSpec, kernel: str = "math", **_):
    _check_kernel(kernel)
    return attention_forward(q, k, v, out, attn_mask, kernel)


@register(torch.ops.costmodel.sdpa_backward)
def sdpa_backward_rule(grad_out: TensorSpec, q: TensorSpec, k: TensorSpec, v: TensorSpec, attn_mask,
                       dropout_p, is_causal, scale, enable_gqa, *, out, kernel: str = "math", **_):
    _check_kernel(kernel)
    return attention_backward(grad_out, q, k, v, list(out), attn_mask, kernel)
