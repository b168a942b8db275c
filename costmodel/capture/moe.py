"""Mixture-of-experts layers, captured with the routing they would have on average.

Which expert a token goes to is data: the eager loop of Hugging Face experts modules
(`for expert_idx in expert_hit:` over `nonzero()`, then `torch.where(expert_mask[expert_idx])`)
cannot be traced with unknown values. But its cost does not depend on the choice: every token is
processed by top_k experts, so the experts' matmuls cost tokens x top_k row-products whatever the
routing, and each expert's weights are read once. Only how the rows are shared among experts
moves memory (the eager loop holds one expert's temporaries at a time) and the busiest expert's
time.

`balanced_experts` makes the capture follow the implementation the model is configured with
(`config._experts_implementation`), with a routing that is fixed in advance:
  eager       the same loop, over every expert, each taking S / E of the S = tokens x top_k rows
              (the last one the remainder, so the rows add up exactly); with `imbalance` F > 1,
              the first expert takes F x S / E (the busiest expert's load over the mean, F) and the
              others share the rest;
  grouped_mm  the implementation as is: one grouped product over all S rows, sorted by expert
              (`torch.nn.functional.grouped_mm`, routed to `costmodel::grouped_mm`, whose fake
              kernel takes any dtype and whose rule counts 2 x S x K x N, which FlopCounterMode
              does not count at all);
  batched_mm  as is (it gathers one weight matrix per row: S x K x N bytes, all traceable).
Experts modules are recognised by the interface `transformers.integrations.moe` gives them:
`forward(hidden_states, top_k_index, top_k_weights)`, `num_experts`, expert weights
`gate_up_proj` (or `up_proj`) and `down_proj` whose first dimension is the expert.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from costmodel.errors import UsageError
from costmodel.rules.registry import TensorSpec, register
from costmodel.rules.cost import MATMUL, OpCost


def is_experts_module(m: nn.Module) -> bool:
    """An experts module with the interface of transformers.integrations.moe (see above)."""
    if not all(hasattr(m, a) for a in ("num_experts", "has_gate", "down_proj")):
        return False
    up = getattr(m, "gate_up_proj", None) if m.has_gate else getattr(m, "up_proj", None)
    down = getattr(m, "down_proj", None)
    return (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3
            and down.dim() == 3 and up.shape[0] == down.shape[0] == m.num_experts)


def implementation(m: nn.Module) -> str:
    """The experts implementation a module is configured with ("eager" when none is set)."""
    config = getattr(m, "config", None)
    return getattr(config, "_experts_implementation", None) or "eager"


def check_imbalance(imbalance) -> Fraction:
    try:
        value = Fraction(str(imbalance)).limit_denominator(1000)
    except (ValueError, ZeroDivisionError) as e:
        raise UsageError(f"--moe-imbalance must be a number >= 1 (the busiest expert's load over the mean); "
                         f"got {imbalance!r}") from e
    if value < 1:
        raise UsageError(f"--moe-imbalance must be >= 1 (1: balanced; 2: the busiest expert takes twice the "
                         f"mean); got {imbalance}")
    return value


def expert_rows(S, E: int, imbalance: Fraction) -> list:
    """Rows per expert adding up to S: the busiest (first) expert takes about imbalance x S / E, the
    others share the rest evenly and the last takes the remainder.
    expert_rows(10, 4, Fraction(1)) -> [2, 2, 2, 4]; expert_rows(16, 4, Fraction(2)) -> [8, 2, 2, 4]."""
    if E == 1:
        return [S]
    if imbalance == 1:
        q = S // E
        return [q] * (E - 1) + [S - (E - 1) * q]
    busiest = (imbalance.numerator * S) // (imbalance.denominator * E)
    rest = S - busiest
    q = rest // (E - 1)
    return [busiest] + [q] * (E - 2) + [rest - (E - 2) * q]


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    return F.linear(x, w.transpose(-2, -1) if transposed else w, bias)


def balanced_loop_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, imbalance: Fraction = Fraction(1)) -> torch.Tensor:
    """The eager experts loop of transformers.integrations.moe over every expert, each taking the rows
    `expert_rows` gives it (rows are token x top_k slots, in order)."""
    E = self.num_experts
    k = top_k_index.shape[-1]
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():      # the eager loop's routing mask, as it builds it
        expert_mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
    start = 0
    for e, rows in enumerate(expert_rows(top_k_index.shape[0] * k, E, imbalance)):
        slots = torch.arange(start, start + rows, device=hidden_states.device)
        token_idx, top_k_pos = slots // k, slots % k
        current_state = hidden_states[token_idx]
        if self.has_gate:
            bias = self.gate_up_proj_bias[e] if getattr(self, "has_bias", False) else None
            up = self._apply_gate(_linear(current_state, self.gate_up_proj[e], bias, self.is_transposed))
        else:
            bias = self.up_proj_bias[e] if getattr(self, "has_bias", False) else None
            up = self.act_fn(_linear(current_state, self.up_proj[e], bias, self.is_transposed))
        bias = self.down_proj_bias[e] if getattr(self, "has_bias", False) else None
        out = _linear(up, self.down_proj[e], bias, self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        start = start + rows
    from costmodel.capture.trace import live_until_now
    live_until_now([expert_mask])      # the eager loop holds its routing mask until it returns
    return final_hidden_states


@contextlib.contextmanager
def balanced_experts(model: nn.Module, imbalance=1):
    """Within this context, the experts modules of `model` that run the data-dependent eager loop
    run `balanced_loop_forward` instead (see the module docstring); the others are left as they are."""
    value = check_imbalance(imbalance)
    swapped = []
    for m in model.modules():
        if is_experts_module(m) and implementation(m) == "eager":
            m.forward = (lambda self: lambda h, i, w: balanced_loop_forward(self, h, i, w, value))(m)
            swapped.append(m)
    try:
        yield swapped
    finally:
        for m in swapped:
            del m.forward


# --- grouped_mm -----------------------------------------------------------------------------------

@torch.library.custom_op("costmodel::grouped_mm", mutates_args=())
def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[r] = input[r] @ weight[group of r], groups given by the cumulative row counts `offs`."""
    out = input.new_empty(input.shape[0], weight.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = input[start:end] @ weight[g]
        start = end
    return out


@grouped_mm.register_fake
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[-1])


@torch.library.custom_op("costmodel::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                        offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_input, grad_weight = torch.empty_like(input), torch.zeros_like(weight)
    start = 0
    for g, end in enumerate(offs.tolist()):
        grad_input[start:end] = grad[start:end] @ weight[g].transpose(-2, -1)
        grad_weight[g] = input[start:end].transpose(-2, -1) @ grad[start:end]
        start = end
    return grad_input, grad_weight


@grouped_mm_backward.register_fake
def _(grad, input, weight, offs):
    return torch.empty_like(input), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    input, weight, offs = inputs
    ctx.save_for_backward(input, weight, offs)


def _backward(ctx, grad):
    input, weight, offs = ctx.saved_tensors
    grad_input, grad_weight = torch.ops.costmodel.grouped_mm_backward(grad, input, weight, offs)
    return grad_input, grad_weight, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)

GROUPED_MM_FUNCTIONS = tuple(f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f)


def call_grouped_mm(input, weight, offs=None, *args, **kwargs):
    """F.grouped_mm / torch._grouped_mm(input [S, K], weight [E, K, N], offs=...) as costmodel::grouped_mm."""
    offs = offs if offs is not None else kwargs.get("offs")
    if offs is None or input.dim() != 2 or weight.dim() != 3 or args or kwargs.get("bias") is not None:
        raise UsageError("costmodel captures grouped_mm(input [S, K], weight [E, K, N], offs=[E]) only; got "
                         f"input {tuple(input.shape)}, weight {tuple(weight.shape)}, offs={offs is not None}")
    return torch.ops.costmodel.grouped_mm(input, weight, offs)


@register(torch.ops.costmodel.grouped_mm)
def grouped_mm_rule(input: TensorSpec, weight: TensorSpec, offs: TensorSpec, *, out: TensorSpec, **_) -> OpCost:
    """out[S, N] = input[S, K] @ weight[group, K, N]: every row is multiplied once, whichever its group."""
    S, K = input.shape
    N = weight.shape[-1]
    return OpCost(2 * S * K * N, input.nbytes + weight.nbytes + offs.nbytes, out.nbytes, MATMUL)


@register(torch.ops.costmodel.grouped_mm_backward)
def grouped_mm_backward_rule(grad: TensorSpec, input: TensorSpec, weight: TensorSpec, offs: TensorSpec, *,
                             out, **_) -> OpCost:
    """grad_input = grad @ W^T per group, grad_weight[g] = input_g^T @ grad_g: 2 x 2 S K N."""
    S, K = input.shape
    N = weight.shape[-1]
    return OpCost(4 * S * K * N, grad.nbytes + input.nbytes + weight.nbytes + offs.nbytes,
                  out[0].nbytes + out[1].nbytes, MATMUL)
