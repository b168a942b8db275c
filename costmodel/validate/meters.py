"""The real-run peak memory meter: what `peak_memory_bytes` is checked against.

On CUDA the figure is `torch.cuda.max_memory_allocated()`. On the CPU, where PyTorch keeps no such
statistic, `LiveStorageMeter` (a TorchDispatchMode) counts the bytes of every live tensor storage,
each storage once however many views share it, and records the largest total seen after any op.
It sees every op dispatched from Python, autograd's backward and the optimizer included, but not
the scratch buffers a kernel allocates inside itself (e.g. the CPU flash-attention kernel's
per-thread blocks): those never reach the dispatcher's Python key.

    >>> import torch
    >>> x = torch.zeros(1024)                                    # 4096 bytes, resident
    >>> measure_peak(lambda: (x + 1) * 2, resident=[x])          # x, x + 1 and the product: 3 * 4096
    12288

`measure_inference` and `measure_train_step` run the contract's two scenarios on a real module:
one no-grad forward in eval mode, and one steady-state training step (forward, loss, backward,
`optimizer.step()`, `zero_grad(set_to_none=True)`, the optimizer state allocated by a warm-up step).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from costmodel.errors import UsageError
from costmodel.rules.optimizer import OPTIMIZERS
from costmodel.capture.specs import InputSpec, parse_input


@dataclass
class MeterResult:
    """A run's peak of live storage bytes, the op right after which it was reached, and the largest
    storages live at that moment as (bytes, dtype, shape) of one tensor viewing each."""

    peak_bytes: int
    op: str = ""
    largest: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)


class LiveStorageMeter(TorchDispatchMode):
    """Counts live tensor storage bytes on `device` ("cpu"); `.peak` is the high-water mark.

    A storage is counted from the first time a tensor on it is seen (an op's output, an op's input,
    or `add()`) until PyTorch frees it, which a weak reference on the storage reports.
    """

    def __init__(self, device: str = "cpu", keep_largest: int = 8):
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, tuple[int, str, tuple[int, ...]]] = {}
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self.peak_largest: list[tuple[int, str, tuple[int, ...]]] = []
        self._keep = keep_largest

    def add(self, tensors: Iterable) -> None:
        """Count tensors that exist before the run (weights, inputs, optimizer state)."""
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._update("(resident)")

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device or t.layout != torch.strided or t.is_nested:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        nbytes = st.nbytes()
        self.live[key] = (nbytes, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        self.current += nbytes
        # Storages keep their Python object while the C++ storage lives, so this fires on free.
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def _update(self, op: str) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op
            self.peak_largest = sorted(self.live.values(), key=lambda e: -e[0])[:self._keep]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._update(str(func))
        return out


def measure(fn: Callable[[], object], *, resident: Iterable = (), device: str = "cpu") -> MeterResult:
    """Run `fn()` once and return its peak of live tensor storage bytes (resident tensors included).
    CUDA: `torch.cuda.max_memory_allocated()` over the call, everything already allocated counted."""
    kind = torch.device(device).type
    gc.collect()
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return MeterResult(int(torch.cuda.max_memory_allocated()), "(cuda)")
    if kind != "cpu":
        raise UsageError(f"cannot measure memory on device {device!r}; accepted: cpu, cuda")
    meter = LiveStorageMeter(kind)
    with meter:
        meter.add(resident)
        fn()
    return MeterResult(meter.peak, meter.peak_op, meter.peak_largest)


def measure_peak(fn: Callable[[], object], *, resident: Iterable = (), device: str = "cpu") -> int:
    """Peak live tensor storage bytes while `fn()` runs; `resident` tensors count from the start."""
    return measure(fn, resident=resident, device=device).peak_bytes


# --- the contract's two scenarios on a real module -----------------------------------------------

def make_inputs(specs: list[str | InputSpec], dims: dict[str, int], device: str = "cpu",
                dtype: torch.dtype | None = None, high: int = 2) -> list[torch.Tensor]:
    """Real tensors for input specs at `dims`: floats random normal (in `dtype` when given), integers
    drawn from [0, high) so that any embedding table accepts them."""
    out = []
    for s in specs:
        spec = parse_input(s) if isinstance(s, str) else s
        missing = [d for d in spec.dim_names if d not in dims]
        if missing:
            raise UsageError(f"input {spec} needs a value for {missing[0]!r}")
        shape = [dims[d] if isinstance(d, str) else d for d in spec.dims]
        if spec.dtype.is_floating_point:
            out.append(torch.randn(shape, device=device, dtype=dtype or spec.dtype))
        elif spec.dtype == torch.bool:
            out.append(torch.ones(shape, device=device, dtype=torch.bool))
        else:
            out.append(torch.randint(0, high, shape, device=device, dtype=spec.dtype))
    return out


def _caller(model: nn.Module, specs: list[InputSpec], values: list[torch.Tensor]):
    from costmodel.capture.trace import _call_plan
    args, kwargs = _call_plan(model, specs)(values)
    return lambda: model(*args, **kwargs)


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """PyTorch's optimizer for a costmodel name, at its default settings (foreach/fused left to torch)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    raise UsageError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")


def _autocast(amp: bool, device: str):
    if not amp:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16 if kind == "cpu" else torch.float16)


def measure_inference(model: nn.Module, inputs: list[str | InputSpec], dims: dict[str, int], *,
                      device: str = "cpu", amp: bool = False) -> MeterResult:
    """One forward in eval mode under no_grad; weights, buffers and inputs counted as resident."""
    specs = [parse_input(s) if isinstance(s, str) else s for s in inputs]
    model = model.to(device).eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    values = make_inputs(specs, dims, device, dtype=None if amp else dtype)
    call = _caller(model, specs, values)

    def run():
        with torch.no_grad(), _autocast(amp, device):
            call()
    return measure(run, resident=[*model.parameters(), *model.buffers(), *values], device=device)


def measure_train_step(model: nn.Module, inputs: list[str | InputSpec], dims: dict[str, int], *,
                       optimizer: str = "adamw", loss: str = "sum", device: str = "cpu",
                       amp: bool = False) -> MeterResult:
    """One steady-state training step, measured: forward in train mode, loss (`sum` of the first
    output, or `cross-entropy` against the first integer input), backward, `optimizer.step()`,
    `zero_grad(set_to_none=True)`. A warm-up step first allocates the optimizer state, as in any
    step after the first; parameters, buffers, inputs and that state are counted as resident."""
    from costmodel.capture.trace import first_output
    specs = [parse_input(s) if isinstance(s, str) else s for s in inputs]
    model = model.to(device).train()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    values = make_inputs(specs, dims, device, dtype=None if amp else dtype)
    call = _caller(model, specs, values)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
    targets = next((v for v, s in zip(values, specs) if not s.dtype.is_floating_point), None)

    def compute_loss():
        with _autocast(amp, device):
            y = first_output(call())
            if loss == "sum":
                return y.sum()
            if loss == "cross-entropy":
                return F.cross_entropy(y.reshape(-1, y.shape[-1]).float(), targets.reshape(-1))
            raise UsageError(f"unknown loss {loss!r}; accepted: sum, cross-entropy")

    def step():
        compute_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()   # warm-up: allocates the optimizer state
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return measure(step, resident=[*model.parameters(), *model.buffers(), *values, *state], device=device)
