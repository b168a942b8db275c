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

from costmodel import _torch
from costmodel.errors import UsageError
from costmodel.rules.cost import ATTENTION, OpCost
from costmodel.rules.registry import TensorSpec, nbytes_of, prod, register

aten = torch.ops.aten

SOFTMAX_FLOPS = 5            # scale, max-subtract, exp, sum, divide per score
SOFTMAX_BACKWARD_FLOPS = 4   # dP * P, row sum, subtract, multiply
KERNELS = ("math", "flash", "efficient")
ATTENTION_CHOICES = ("auto",) + KERNELS
SDPA_TARGET = "costmodel.sdpa.default"
SDPA_BACKWARD_TARGET = "costmodel.sdpa_backward.default"
MASK_GRAD = "costmodel_mask_grad"     # node.meta of an attention node whose mask requires grad


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



# --- the one choice of kernel ------------------------------------------------------------------

def choose_kernel(requested: str, device: str, q, k, v, mask, dropout_p: float, is_causal: bool, scale,
                  gqa: bool, notes: list[str] | None = None, capability: str = "", mask_grad: bool = False) -> str:
    """The SDPA kernel of one attention call: `requested` unless it is "auto", else the one PyTorch
    runs for these inputs on `device` ("cpu" or "cuda"). Costs and memory both use this choice.
    Where it has to be assumed, or a requested kernel is one PyTorch would not run, a sentence
    saying so is appended to `notes`.
    CPU: what `torch._fused_sdp_choice` picks for inputs of the same ranks, dtypes, mask, dropout
    and causality (flash unless dropout, a 3-D input or a mask that requires grad, `mask_grad`,
    forces math). CUDA: flash for float16 and
    bfloat16 without a mask on compute capability 8.0 or newer (`capability`, "" when unknown), else
    memory-efficient (which has no enable_gqa: math then)."""
    if requested not in ATTENTION_CHOICES:
        raise UsageError(f"unknown attention kernel {requested!r}; accepted: {', '.join(ATTENTION_CHOICES)}")
    old_gpu = bool(capability) and tuple(map(int, capability.split("."))) < (8, 0)
    if requested != "auto":
        if requested == "flash" and device == "cuda" and notes is not None:
            auto = choose_kernel("auto", device, q, k, v, mask, dropout_p, is_causal, scale, gqa, capability=capability)
            if q.dtype not in (torch.float16, torch.bfloat16):
                notes.append(f"--attention flash: PyTorch's CUDA flash kernel takes float16 and bfloat16 only; "
                             f"for {str(q.dtype).removeprefix('torch.')} it would run {auto}. Costed as flash, "
                             "as asked")
            elif old_gpu:
                notes.append(f"--attention flash: PyTorch's flash kernel needs compute capability 8.0 or newer; "
                             f"this GPU has {capability}, where it would run {auto}. Costed as flash, as asked")
        return requested
    if device == "cpu":
        try:
            def small(t):
                return torch.zeros([2] * (t.dim() - 1) + [_concrete(t.shape[-1], 8)], dtype=t.dtype)
            qs, ks, vs = small(q), small(k), small(v)
            if gqa and q.dim() == 4:
                qs = torch.zeros([2, 4, 2, qs.shape[-1]], dtype=q.dtype)
            ms = None if mask is None else torch.zeros([2] * mask.dim(), dtype=mask.dtype).requires_grad_(mask_grad)
            choice = _torch.fused_sdp_choice(qs, ks, vs, ms, float(dropout_p), bool(is_causal), scale, bool(gqa))
        except (RuntimeError, TypeError, ValueError) as e:
            if notes is not None:
                notes.append(f"PyTorch's CPU kernel choice could not be asked for attention of dtype {q.dtype} "
                             f"({type(e).__name__}: {e}); assumed the math kernel")
            return "math"
        return "flash" if int(choice) == 1 else "math"
    if q.dim() != 4:
        return "math"
    E = _concrete(q.shape[-1], None)
    if E is None or E % 8 or E > 256:
        return "efficient" if E is not None and E % 4 == 0 and q.dtype == torch.float32 else "math"
    if q.dtype in (torch.float16, torch.bfloat16) and mask is None and not old_gpu:
        return "flash"
    if gqa:
        return "math"        # the efficient kernel has no enable_gqa; flash takes no mask
    return "efficient" if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "math"


def attention_kernels(graph, requested: str, device: str, capability: str = "") -> tuple[dict[str, str], list[str]]:
    """({node name: kernel} for every costmodel::sdpa node of an fx graph and its backward, notes).
    A backward node (costmodel::sdpa_backward) takes the kernel of the forward whose q, k, v it
    differentiates."""
    import torch.fx as fx
    kernels, notes, forwards = {}, [], {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if str(node.target) == SDPA_TARGET:
            q, k, v, mask = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:4]]
            dropout_p, is_causal, scale, gqa = node.args[4:8]
            kernels[node.name] = choose_kernel(requested, device, q, k, v, mask, dropout_p, is_causal, scale, gqa,
                                               notes, capability, mask_grad=bool(node.meta.get(MASK_GRAD)))
            forwards[tuple(node.args[:3])] = node.name
        elif str(node.target) == SDPA_BACKWARD_TARGET:
            forward = forwards.get(tuple(node.args[1:4]))
            if forward is not None:
                kernels[node.name] = kernels[forward]
    return kernels, list(dict.fromkeys(notes))


def _concrete(s, default):
    """An int for a size that is a number, else `default`."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt) and s.node.expr.is_number:
        return int(s.node.expr)
    return default
