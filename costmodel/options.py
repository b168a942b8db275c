"""Every option of an analysis, validated once, in one frozen dataclass.

The CLI builds it from argparse (whose `choices` come from here), `analyze()` from its keyword
arguments; capture, rules and memory read it and nothing re-checks it downstream.

    >>> Options.make(mode="train", dtype="bfloat16").dtype
    torch.bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from costmodel.capture.loss import LOSSES
from costmodel.capture.specs import InputSpec, dtype_name, parse_dtype, parse_input
from costmodel.errors import UsageError
from costmodel.rules.attention import ATTENTION_CHOICES
from costmodel.rules.optimizer import OPTIMIZERS

MODES = ("inference", "train")
DEVICE_KINDS = ("cuda", "cpu")
AMP = (False, True, "cuda", "cpu")


@dataclass(frozen=True)
class Options:
    mode: str = "inference"
    dtype: torch.dtype = torch.float32
    optimizer: str = "adamw"
    attention: str = "auto"            # auto | math | flash | efficient
    loss: str = "sum"
    # mixed precision: False, or the autocast policy emulated ("cuda" for True, or "cpu")
    amp: bool | str = False
    # whose kernels the memory and bytes model ("cuda" | "cpu"); None: the first --hw device's kind, else cuda
    device: str | None = None
    moe_imbalance: Fraction = Fraction(1)
    targets: tuple[InputSpec, ...] = ()   # training targets: inputs of the loss, not of forward()
    trust_remote_code: bool = False
    tf32: bool = False
    # repeated blocks traced once and copied (capture.blocks); False traces every block
    repeated_blocks: bool = True

    @classmethod
    def make(cls, *, mode: str = "inference", dtype: str | torch.dtype = "float32", optimizer: str = "adamw",
             attention: str = "auto", loss: str = "sum", amp: bool | str = False, device: str | None = None,
             moe_imbalance=1, targets=(), trust_remote_code: bool = False, tf32: bool = False,
             repeated_blocks: bool = True) -> "Options":
        """Validated options; a bad value raises UsageError saying what is accepted."""
        if mode not in MODES:
            raise UsageError(f"unknown --mode {mode!r}; accepted: {', '.join(MODES)}")
        torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise UsageError(f"--dtype must be a floating dtype; got {dtype!r}")
        if optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown --optimizer {optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if attention not in ATTENTION_CHOICES:
            raise UsageError(f"unknown --attention {attention!r}; accepted: {', '.join(ATTENTION_CHOICES)}")
        if loss not in LOSSES:
            raise UsageError(f"unknown --loss {loss!r}; accepted: {', '.join(LOSSES)}")
        if amp not in AMP:
            raise UsageError(f"amp={amp!r}; accepted: False, True (CUDA's autocast policy), 'cuda', 'cpu'")
        if amp and torch_dtype != torch.float32:
            raise UsageError("--amp keeps float32 weights and casts to bfloat16 where autocast does; it takes "
                             f"--dtype float32, got --dtype {dtype_name(torch_dtype)}")
        if device is not None and device not in DEVICE_KINDS:
            raise UsageError(f"unknown --device {device!r}; accepted: {', '.join(DEVICE_KINDS)}")
        from costmodel.capture.moe import check_imbalance
        specs = tuple(parse_input(t) if isinstance(t, str) else t for t in (targets or ()))
        return cls(mode=mode, dtype=torch_dtype, optimizer=optimizer, attention=attention, loss=loss,
                   amp="cuda" if amp is True else amp, device=device, moe_imbalance=check_imbalance(moe_imbalance),
                   targets=specs, trust_remote_code=bool(trust_remote_code), tf32=bool(tf32),
                   repeated_blocks=bool(repeated_blocks))

    def with_(self, **changes) -> "Options":
        return replace(self, **changes)
