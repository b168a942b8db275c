"""The real step: the one place a model runs for real, for the memory meters and the validator.

The contract's scenarios on a real module:
  inference  one forward in eval mode under no_grad;
  train      one steady-state step: forward in train mode, the loss (capture/loss.py, the same
             function the capture traces), backward, `optimizer.step()`,
             `zero_grad(set_to_none=True)`; the optimizer state is allocated by a first step;
  generate   greedy generation of a fixed number of new tokens (no early stop) under no_grad: the
             prefill over the prompt fills a fresh cache (capture/generate.py's `new_cache`, the one
             the capture traces), then `gen` decode steps each feed the last token chosen
             (argmax of the last logits) and append it to the cache, as `model.generate` does.
Mixed precision (`amp`) is torch.autocast to bfloat16 on both devices: the dtype capture/amp.py
emulates. Inputs are random: floats normal, integers in [0, high) so that any embedding accepts
them, booleans all True (no padding).
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch
import torch.nn as nn

from costmodel.capture.loss import compute_loss
from costmodel.capture.trace import call_plan
from costmodel.capture.specs import InputSpec, parse_input
from costmodel.errors import AnalysisError, CostModelError, UsageError
from costmodel.rules.optimizer import OPTIMIZERS
from costmodel.validate.stats import cpu_clock

AMP_DTYPE = torch.bfloat16     # what capture.amp emulates, and what the real runs autocast to


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """PyTorch's optimizer for a costmodel name, at its default settings (foreach/fused left to torch)."""
    table = {"adamw": (torch.optim.AdamW, {"lr": 1e-3}), "adam": (torch.optim.Adam, {"lr": 1e-3}),
             "sgd": (torch.optim.SGD, {"lr": 1e-3}), "sgd-momentum": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
             "adafactor": (torch.optim.Adafactor, {"lr": 1e-2})}
    if name not in table:
        raise UsageError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    cls, kwargs = table[name]
    return cls(params, **kwargs)


def autocast(amp: bool, device: str):
    """--amp: torch.autocast to bfloat16 (the dtype the capture emulates; no loss scaler needed)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPE)


def make_inputs(specs: list[str | InputSpec], dims: dict[str, int], device: str = "cpu",
                dtype: torch.dtype | None = None, high: int = 2) -> list[torch.Tensor]:
    """Real tensors for input specs at `dims`: floats random normal (in `dtype` when given), integers
    drawn from [0, high) so that any embedding table accepts them, booleans all True."""
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


class Runner:
    """A real model on a device, and the step of one point as a closure (see the module docstring)."""

    def __init__(self, model: nn.Module, inputs: list[InputSpec], *, mode: str = "inference",
                 targets: list[InputSpec] = (), optimizer: str = "adamw", loss: str = "sum", amp: bool = False,
                 device: str = "cpu", kv_dtype: torch.dtype | None = None):
        self.model, self.inputs, self.targets = model.to(device), list(inputs), list(targets)
        self.mode, self.loss, self.amp, self.device = mode, loss, amp, device
        self.kv_dtype = kv_dtype
        if mode == "generate":
            from costmodel.capture.generate import cache_argument
            cache_argument(self.model)
        self.model.train(mode == "train")
        config = getattr(self.model, "config", None)
        self.high = int(getattr(config, "vocab_size", None) or 2)
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        self.call = call_plan(self.model, self.inputs)
        self.optimizer = None
        if mode == "train":
            params = [p for p in self.model.parameters() if p.requires_grad]
            if not params:
                raise UsageError("--mode train needs parameters that require grad; this model has none")
            self.optimizer = make_optimizer(optimizer, params)

    def values(self, dims: dict[str, int]) -> list[torch.Tensor]:
        """Random inputs (then targets, in [0, 2): a valid class id for any classifier) at `dims`."""
        return (make_inputs(self.inputs, dims, self.device, dtype=None if self.amp else self.dtype, high=self.high)
                + make_inputs(self.targets, dims, self.device))

    def step(self, values: list[torch.Tensor], gen: int | None = None, times: list | None = None):
        """The scenario as a zero-argument callable, on these inputs (generate: `gen` new tokens; with
        `times`, each run appends the seconds of its prefill and of each decode step, a list)."""
        if self.mode == "generate":
            if gen is None or gen < 1:
                raise UsageError(f"generate mode runs gen >= 1 decode steps; got gen={gen!r}")
            return self._generation(values, gen, times)
        inputs, targets = values[:len(self.inputs)], values[len(self.inputs):]
        args, kwargs = self.call(inputs)
        model, opt = self.model, self.optimizer
        if self.mode == "inference":
            def run():
                with torch.no_grad(), autocast(self.amp, self.device):
                    model(*args, **kwargs)
            return run

        def train_step():
            with autocast(self.amp, self.device):
                loss = compute_loss(model(*args, **kwargs), self.loss, inputs, self.inputs, targets, self.targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    def _generation(self, values: list[torch.Tensor], gen: int, times: list | None):
        from costmodel.capture.generate import call_kwargs, new_cache
        from costmodel.capture.loss import first_output
        model, name, device = self.model, self.inputs[0].name, self.device
        cuda = torch.device(device).type == "cuda"

        thread_clock = cpu_clock()     # as the other modes time: one thread's own clock at one thread

        def clock() -> float:
            if cuda:
                torch.cuda.synchronize()
                return time.perf_counter()
            return thread_clock()

        def run():
            cache = new_cache(model, self.kv_dtype)
            kwargs = call_kwargs(model, cache)
            tokens, seconds = values[0], []
            with torch.no_grad():
                for i in range(gen + 1):        # the prefill, then gen decode steps
                    start = clock()
                    out = model(**{name: tokens}, **kwargs)
                    tokens = first_output(out)[:, -1:].argmax(-1)
                    del out                      # generate drops each step's logits before the next
                    seconds.append(clock() - start)
            if times is not None:
                times.append(seconds)
            return cache
        return run

    def state(self) -> list[torch.Tensor]:
        """The optimizer's state tensors (allocated by a first step)."""
        if self.optimizer is None:
            return []
        return [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

    def resident(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """What lives before the step: weights, buffers, inputs, optimizer state."""
        return [*self.model.parameters(), *self.model.buffers(), *values, *self.state()]


def build_real(source, name: str, device: str, trust_remote_code: bool = False) -> nn.Module:
    """The model with real weights on `device` (the analysis built it on meta): zoo names, configs
    and factories are called again under the device, so a large model is initialised where it runs."""
    from costmodel.capture.trace import resolve_source
    if isinstance(source, nn.Module):
        if any(t.is_meta for t in itertools.chain(source.parameters(), source.buffers())):
            raise UsageError(f"validate runs the model, but {name} has meta (unallocated) weights; pass its "
                             "factory instead of the module")
        return source.to(device)
    factory = source if callable(source) else resolve_source(source, trust_remote_code)[1]
    try:
        with torch.device(device):
            module = factory()
    except CostModelError:
        raise
    except Exception as e:
        raise AnalysisError(f"the factory of {name} raised {type(e).__name__}: {e} while building real weights "
                            f"on {device}") from e
    if all(t.device.type == torch.device(device).type for t in itertools.chain(module.parameters(), module.buffers())):
        return module           # already there (and fake tensors, under FakeTensorMode, cannot be swapped)
    return module.to(device)
