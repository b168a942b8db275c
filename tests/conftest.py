"""Shared helpers: PyTorch's own counters as the reference for every estimate."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from costmodel.capture.loss import first_output


def flop_counter_total(factory, inputs: dict[str, tuple[tuple[int, ...], torch.dtype]], mode: str) -> int:
    """FlopCounterMode's total for one forward (inference) or forward + backward (train), counted
    under fake tensors on the meta device (on the CPU it would count SDPA as 0)."""
    with torch.device("meta"):
        model = factory()
    model.train(mode == "train")
    with FakeTensorMode(allow_non_fake_inputs=True):
        values = {n: torch.zeros(shape, dtype=dt, device="meta") for n, (shape, dt) in inputs.items()}
        return count_step(model, values, mode)


def count_step(model, values: dict, mode: str) -> int:
    """FlopCounterMode's total for one no-grad forward (inference) or forward + backward (train)."""
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            first_output(model(**values)).sum().backward()
        else:
            with torch.no_grad():
                model(**values)
    return counter.get_total_flops()
