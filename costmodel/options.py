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

MODES = ("inference", "train", "generate")
KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
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
    kv_dtype: torch.dtype | None = None   # generate: the KV cache's dtype; None: the model's (dtype)
    # repeated blocks traced once and copied (capture.blocks); False traces every block
    repeated_blocks: bool = True

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype the KV cache stores (generate mode): kv_dtype, else the model's."""
        return self.kv_dtype if self.kv_dtype is not None else self.dtype

    @classmethod
    def make(cls, *, mode: str = "inference", dtype: str | torch.dtype = "float32", optimizer: str = "adamw",
             attention: str = "auto", loss: str = "sum", amp: bool | str = False, device: str | None = None,
             moe_imbalance=1, targets=(), trust_remote_code: bool = False, tf32: bool = False,
             kv_dtype: str | torch.dtype | None = None, repeated_blocks: bool = True) -> "Options":
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
        kv = None
        if kv_dtype is not None:
            if mode != "generate":
                raise UsageError(f"--kv-dtype is the KV cache's dtype; it takes --mode generate, got --mode {mode}")
            kv = getattr(torch, kv_dtype, None) if isinstance(kv_dtype, str) and kv_dtype in KV_DTYPES else kv_dtype
            if kv is None or not isinstance(kv, torch.dtype) or dtype_name(kv) not in KV_DTYPES:
                raise UsageError(f"unknown --kv-dtype {kv_dtype!r}; accepted: {', '.join(KV_DTYPES)}")
            if kv == torch_dtype:
                kv = None
        if mode == "generate" and amp:
            raise UsageError("--mode generate runs the model in --dtype (no autocast); --amp takes --mode inference "
                             "or train")
        if device is not None and device not in DEVICE_KINDS:
            raise UsageError(f"unknown --device {device!r}; accepted: {', '.join(DEVICE_KINDS)}")
        from costmodel.capture.moe import check_imbalance
        specs = tuple(parse_input(t) if isinstance(t, str) else t for t in (targets or ()))
        return cls(mode=mode, dtype=torch_dtype, optimizer=optimizer, attention=attention, loss=loss,
                   amp="cuda" if amp is True else amp, device=device, moe_imbalance=check_imbalance(moe_imbalance),
                   targets=specs, trust_remote_code=bool(trust_remote_code), tf32=bool(tf32), kv_dtype=kv,
                   repeated_blocks=bool(repeated_blocks))

    def with_(self, **changes) -> "Options":
        return replace(self, **changes)
