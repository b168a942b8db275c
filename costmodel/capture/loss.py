"""The training loss: what the captured step and the real step (validate/runner.py) both compute.

    sum            the sum of the model's first output (`logits`, `last_hidden_state` or the first
                   tensor): the contract's default, independent of any labels;
    cross-entropy  against a target: a `--target` input (e.g. `labels:int64[batch]` for a
                   classifier), else, for a language model (an integer input shaped like the output
                   without its class dimension), the next token: logits[..., :-1, :] against
                   input_ids[..., 1:], as Hugging Face's causal-LM loss shifts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from costmodel.errors import UsageError

LOSSES = ("sum", "cross-entropy")


def tensors_of(out) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensor, tuple, dict, ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors_of(v)]
    if hasattr(out, "to_tuple"):
        return tensors_of(out.to_tuple())
    return []


def first_output(out) -> torch.Tensor:
    """`logits`, `last_hidden_state` or the first tensor of a model's output."""
    from costmodel.errors import AnalysisError
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    tensors = tensors_of(out)
    if not tensors:
        raise AnalysisError(f"the model returned {type(out).__name__} with no tensor in it; nothing to train")
    return tensors[0]


def compute_loss(out, loss: str, inputs: list, input_specs: list, targets: list, target_specs: list,
                 describe=lambda shape: "[" + ", ".join(map(str, shape)) + "]") -> torch.Tensor:
    """The loss of one step. `inputs`/`targets` are the tensors of `input_specs`/`target_specs`;
    `describe` prints a shape in the user's dimension names (for errors)."""
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}; accepted: {', '.join(LOSSES)}")
    y = first_output(out)
    if loss == "sum":
        return y.sum()
    classes = y.shape[-1]
    if targets:
        t, spec = targets[0], target_specs[0]
        if spec.dtype.is_floating_point or tuple(t.shape) != tuple(y.shape[:-1]):
            raise UsageError(f"--loss cross-entropy: the target {spec} must be integer class ids shaped like the "
                             f"output without its class dimension; the output is {describe(y.shape)}")
        return F.cross_entropy(y.reshape(-1, classes).float(), t.reshape(-1))
    for x, spec in zip(inputs, input_specs):
        if not spec.dtype.is_floating_point and spec.dtype != torch.bool and tuple(x.shape) == tuple(y.shape[:-1]) \
                and x.dim() >= 2:
            # a language model: predict token i + 1 from the logits at i
            return F.cross_entropy(y[..., :-1, :].reshape(-1, classes).float(), x[..., 1:].reshape(-1))
    raise UsageError(f"--loss cross-entropy needs a target: the output is {describe(y.shape)} and no input is a "
                     f"sequence of class ids shaped like it ({', '.join(str(s) for s in input_specs)}); give one "
                     f"with --target NAME:int64[...], e.g. --target labels:int64{describe(y.shape[:-1])}")
