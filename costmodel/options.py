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

from costmodel.capture.checkpointing import CHECKPOINTING
from costmodel.capture.loss import LOSSES
from costmodel.capture.specs import InputSpec, dtype_name, parse_dtype, parse_input
from costmodel.errors import UsageError
from costmodel.rules.attention import ATTENTION_CHOICES
from costmodel.rules.optimizer import OPTIMIZERS

MODES = ("inference", "train", "generate")
KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
DEVICE_KINDS = ("cuda", "cpu")
AMP = (False, True, "cuda", "cpu")
PARALLEL_GROUPS = ("dp", "fsdp", "tp", "pp")
ZERO_STAGES = (0, 1, 2)
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Parallel:
    """Degrees of parallelism; world size = dp * fsdp * tp * pp.

    >>> Parallel.parse("fsdp=8,tp=2")
    Parallel(dp=1, fsdp=8, tp=2, pp=1)
    """

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    @property
    def trivial(self) -> bool:
        return self.world_size == 1

    def to_dict(self) -> dict[str, int]:
        return {g: getattr(self, g) for g in PARALLEL_GROUPS}

    def __str__(self) -> str:
        return ",".join(f"{g}={v}" for g, v in self.to_dict().items() if v != 1) or "none"

    @classmethod
    def parse(cls, value) -> "Parallel":
        """'dp=2,fsdp=4' (any subset, default 1 each), a dict of the same, or a Parallel."""
        if value is None:
            return cls()
        if isinstance(value, Parallel):
            return value
        accepted = "accepted: dp=N,fsdp=N,tp=N,pp=N (any subset, N >= 1)"
        if isinstance(value, str):
            items = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                name, eq, number = part.partition("=")
                if not eq:
                    raise UsageError(f"--parallel {value!r}: {part!r} is not NAME=N; {accepted}")
                if name.strip() in items:
                    raise UsageError(f"--parallel {value!r}: {name.strip()} given twice; {accepted}")
                items[name.strip()] = number.strip()
        elif isinstance(value, dict):
            items = dict(value)
        else:
            raise UsageError(f"parallel={value!r}; {accepted}")
        degrees = {}
        for name, number in items.items():
            if name not in PARALLEL_GROUPS:
                raise UsageError(f"--parallel: unknown group {name!r}; {accepted}")
            try:
                n = int(number)
            except (TypeError, ValueError):
                n = 0
            if isinstance(number, bool) or n < 1 or str(n) != str(number).strip():
                raise UsageError(f"--parallel: {name}={number!r} is not a positive integer; {accepted}")
            degrees[name] = n
        return cls(**degrees)


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
    # parallel training (CONTRACT.md "Parallel training"); see memory/parallel.py
    parallel: Parallel = Parallel()
    zero: int = 0                      # ZeRO stage over the dp group: 1 optimizer state, 2 and gradients
    microbatches: int = 1              # gradient-accumulation / pipeline micro-batches per step
    sequence_parallel: bool = False    # with tp: Megatron sequence parallelism
    pp_interleave: int = 1             # with pp: model chunks per stage (interleaved 1F1B)
    checkpointing: str = "none"        # none | blocks | selective | ops (capture/checkpointing.py)
    # low-precision weights (--dtype float16/bfloat16) with float32 master weights and optimizer state
    master_weights: bool = False
    # repeated blocks traced once and copied (capture.blocks); False traces every block
    repeated_blocks: bool = True

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype the KV cache stores (generate mode): kv_dtype, else the model's."""
        return self.kv_dtype if self.kv_dtype is not None else self.dtype

    @property
    def parallel_training(self) -> bool:
        """Whether the per-rank memory model applies (any parallel or multi-micro-batch option)."""
        return (not self.parallel.trivial or self.zero != 0 or self.microbatches != 1 or self.master_weights)

    @classmethod
    def make(cls, *, mode: str = "inference", dtype: str | torch.dtype = "float32", optimizer: str = "adamw",
             attention: str = "auto", loss: str = "sum", amp: bool | str = False, device: str | None = None,
             moe_imbalance=1, targets=(), trust_remote_code: bool = False, tf32: bool = False,
             kv_dtype: str | torch.dtype | None = None, parallel=None, zero: int = 0, microbatches: int = 1,
             sequence_parallel: bool = False, pp_interleave: int = 1, checkpointing: str = "none",
             master_weights: bool = False, repeated_blocks: bool = True) -> "Options":
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
        par = Parallel.parse(parallel)
        _check_parallel(mode, par, zero, microbatches, sequence_parallel, pp_interleave, checkpointing)
        if master_weights and torch_dtype not in LOW_PRECISION:
            raise UsageError("--master-weights keeps float32 master weights of float16/bfloat16 ones; it takes "
                             f"--dtype float16 or bfloat16, got --dtype {dtype_name(torch_dtype)}")
        if master_weights and mode != "train":
            raise UsageError("--master-weights is about the optimizer; it takes --mode train")
        return cls(mode=mode, dtype=torch_dtype, optimizer=optimizer, attention=attention, loss=loss,
                   amp="cuda" if amp is True else amp, device=device, moe_imbalance=check_imbalance(moe_imbalance),
                   targets=specs, trust_remote_code=bool(trust_remote_code), tf32=bool(tf32), kv_dtype=kv,
                   parallel=par, zero=int(zero), microbatches=int(microbatches),
                   sequence_parallel=bool(sequence_parallel), pp_interleave=int(pp_interleave),
                   checkpointing=checkpointing, master_weights=bool(master_weights),
                   repeated_blocks=bool(repeated_blocks))

    def with_(self, **changes) -> "Options":
        return replace(self, **changes)


def _positive_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} must be a positive integer; got {value!r}")
    return value


def _check_parallel(mode: str, par: Parallel, zero, microbatches, sequence_parallel: bool, pp_interleave,
                    checkpointing: str) -> None:
    """The parallel options together (each alone is checked by its type)."""
    from costmodel.capture.checkpointing import check
    check(checkpointing)
    _positive_int(microbatches, "--microbatches")
    _positive_int(pp_interleave, "--pp-interleave")
    if zero not in ZERO_STAGES or isinstance(zero, bool):
        raise UsageError(f"unknown --zero {zero!r}; accepted: 0, 1 (optimizer state sharded over dp), "
                         "2 (and gradients); stage 3 is --parallel fsdp=N")
    training = (not par.trivial or zero or microbatches != 1 or sequence_parallel or pp_interleave != 1
                or checkpointing != "none")
    if training and mode != "train":
        raise UsageError("--parallel, --zero, --microbatches, --sequence-parallel, --pp-interleave and "
                         f"--checkpointing describe a training step; they take --mode train, got --mode {mode}")
    if zero and par.fsdp > 1:
        raise UsageError(f"--zero {zero} shards over the dp group; with fsdp={par.fsdp} parameters, gradients "
                         "and optimizer state are already sharded (ZeRO-3): use --zero 0 with fsdp, or dp=N "
                         "with --zero")
    if sequence_parallel and par.tp == 1:
        raise UsageError("--sequence-parallel splits the sequence over the tp group; it takes --parallel tp=N "
                         "with N > 1")
    if pp_interleave > 1 and par.pp == 1:
        raise UsageError(f"--pp-interleave {pp_interleave} interleaves model chunks over pipeline stages; it "
                         "takes --parallel pp=N with N > 1")
    if pp_interleave > 1 and microbatches % par.pp:
        raise UsageError(f"interleaved 1F1B needs --microbatches to be a multiple of pp (Megatron-LM's "
                         f"requirement); got --microbatches {microbatches} with pp={par.pp}")
