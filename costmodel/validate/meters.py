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

`measure_inference`, `measure_train_step` and `measure_generation` measure the contract's scenarios
on a real module, as validate/runner.py runs them (the validator runs the same steps).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from costmodel import _torch
from costmodel._torch import tree_leaves
from costmodel.errors import UsageError
from costmodel.validate.runner import Runner, make_inputs, make_optimizer  # noqa: F401 (make_* re-exported)
from costmodel.capture.specs import InputSpec, parse_input


@dataclass
class MeterResult:
    """A run's peak of live storage bytes, the op right after which it was reached, and the largest
    storages live at that moment as (bytes, dtype, shape) of one tensor viewing each."""

    peak_bytes: int
    op: str = ""
    largest: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)


class LiveStorageMeter(_torch.dispatch_mode_class()):
    """Counts live tensor storage bytes on `device` ("cpu"); `.peak` is the high-water mark.

    A storage is counted from the first time a tensor on it is seen (an op's output, an op's input,
    or `add()`) until PyTorch frees it, which a weak reference on the storage reports. A storage
    resized in place (`UntypedStorage.resize_`, which no dispatch mode sees: FSDP frees and
    re-allocates its unsharded parameters so) counts at its new size from then on.
    """

    def __init__(self, device: str = "cpu", keep_largest: int = 8):
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, tuple[int, str, tuple[int, ...]]] = {}
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self.peak_largest: list[tuple[int, str, tuple[int, ...], str]] = []
        self._op = "(resident)"
        self._keep = keep_largest

    def add(self, tensors: Iterable) -> None:
        """Count tensors that exist before the run (weights, inputs, optimizer state)."""
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._update("(resident)")

    def _track(self, t: torch.Tensor) -> None:
        inner = _torch.wrapped_tensors(t)
        if inner is not None:              # DTensor and other wrappers: their local tensors hold the bytes
            for x in inner:
                self._track(x)
            return
        if t.device.type != self.device or t.layout != torch.strided or t.is_nested:
            return
        st = t.untyped_storage()
        key = _torch.storage_key(t)
        if key in self.live:
            return
        nbytes = st.nbytes()
        self.live[key] = (nbytes, str(t.dtype).removeprefix("torch."), tuple(t.shape), self._op)
        self.current += nbytes
        # Storages keep their Python object while the C++ storage lives, so this fires on free.
        weakref.finalize(st, self._free, key)

    def __enter__(self):
        self._orig_resize = torch.UntypedStorage.resize_
        meter, orig = self, self._orig_resize

        def resize_(st, size):
            out = orig(st, size)
            meter._resized(st)
            return out
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    def _resized(self, st) -> None:
        key = st._cdata
        entry = self.live.get(key)
        if entry is not None and entry[0] != st.nbytes():
            self.current += st.nbytes() - entry[0]
            self.live[key] = (st.nbytes(), *entry[1:])
            self._update("UntypedStorage.resize_")

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
        self._op = str(func)              # the op that first handed the storage over (for diagnosis)
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


# --- the contract's two scenarios on a real module (run by validate/runner.py) ------------------

def measure_inference(model: nn.Module, inputs: list[str | InputSpec], dims: dict[str, int], *,
                      device: str = "cpu", amp: bool = False) -> MeterResult:
    """One forward in eval mode under no_grad; weights, buffers and inputs counted as resident."""
    runner = Runner(model, [parse_input(s) if isinstance(s, str) else s for s in inputs], device=device, amp=amp)
    values = runner.values(dims)
    return measure(runner.step(values), resident=runner.resident(values), device=device)


def measure_train_step(model: nn.Module, inputs: list[str | InputSpec], dims: dict[str, int], *,
                       optimizer: str = "adamw", loss: str = "sum", device: str = "cpu", amp: bool = False,
                       targets: list[str | InputSpec] = ()) -> MeterResult:
    """One steady-state training step, measured: forward in train mode, the loss (capture/loss.py),
    backward, `optimizer.step()`, `zero_grad(set_to_none=True)`. A warm-up step first allocates the
    optimizer state, as in any step after the first; parameters, buffers, inputs and that state are
    counted as resident."""
    runner = Runner(model, [parse_input(s) if isinstance(s, str) else s for s in inputs], mode="train",
                    targets=[parse_input(t) if isinstance(t, str) else t for t in targets], optimizer=optimizer,
                    loss=loss, amp=amp, device=device)
    values = runner.values(dims)
    step = runner.step(values)
    step()   # warm-up: allocates the optimizer state
    return measure(step, resident=runner.resident(values), device=device)


def measure_generation(model: nn.Module, inputs: list[str | InputSpec], dims: dict[str, int], *,
                       device: str = "cpu", kv_dtype: torch.dtype | None = None) -> MeterResult:
    """A greedy generation of dims["gen"] new tokens after a prompt of dims["prompt"] (the input's
    [batch, prompt]), in eval mode under no_grad: the peak over the prefill and every decode step;
    weights, buffers and the prompt counted as resident."""
    runner = Runner(model.eval(), [parse_input(s) if isinstance(s, str) else s for s in inputs], mode="generate",
                    device=device, kv_dtype=kv_dtype)
    values = runner.values(dims)
    return measure(runner.step(values, dims["gen"]), resident=runner.resident(values), device=device)
