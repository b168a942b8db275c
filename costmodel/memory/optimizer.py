"""The optimizer step in the memory timeline: its state resident from the start (steady state),
the gradients freed by zero_grad(set_to_none=True) after it, and the temporaries the step itself
allocates (PyTorch's foreach implementation on CUDA, the per-parameter loop on the CPU)."""

from __future__ import annotations

import sympy
import torch

from costmodel.memory.model import GRADS, STATE, TEMPORARIES
from costmodel.rules import optimizer as opt

CPU_STEP_BYTES = 4        # torch.optim keeps `step` as a float32 scalar tensor per parameter, on the CPU


class OptimizerSteps:
    """The optimizer part of memory.timeline._Builder."""

    def _optimizer_step(self, grad_keys: list) -> None:
        """Optimizer state (resident), the step's temporaries, then zero_grad frees the grads."""
        step = self.add_step("optimizer.step", f"optimizer.{self.optimizer}", "(optimizer)", "optimizer")
        for key in grad_keys:
            i = self.by_key.get(key)
            if i is not None:
                self.buffers[i].category = GRADS
                self.buffers[i].end = step
        params = _trainable(self.c)
        groups: dict[str, int] = {}
        largest = 0
        for name, t in params:
            nbytes = t.numel() * t.dtype.itemsize
            state = opt.state_elements(self.optimizer, tuple(t.shape)) * t.dtype.itemsize
            if self.device == "cpu" and self.optimizer != "sgd" and self.optimizer != "sgd-momentum":
                state += CPU_STEP_BYTES
            if state:
                i = self.new_buffer(None, sympy.Integer(state), STATE, 0, f"{name} ({self.optimizer} state)",
                                    param=name)
                self.buffers[i].dtype, self.buffers[i].shape = str(t.dtype).removeprefix("torch."), \
                    str(list(t.shape))
            groups[str(t.dtype)] = groups.get(str(t.dtype), 0) + nbytes
            largest = max(largest, nbytes)
        temp = optimizer_temporary_bytes(self.optimizer, self.device, largest, groups)
        if temp:
            i = self.new_buffer(None, sympy.Integer(temp), TEMPORARIES, step, f"optimizer.{self.optimizer} temporaries")
            self.buffers[i].shape = "foreach: one per parameter" if self.device == "cuda" else "per parameter"


def optimizer_temporary_bytes(name: str, device: str, largest: int, groups: dict[str, int]) -> int:
    """Bytes the optimizer step allocates on top of params, grads and state.

    CUDA runs the foreach implementation (torch.optim's default there): adam/adamw allocate
    `_foreach_sqrt(exp_avg_sqs)`, one tensor per parameter of the dtype group at once; adafactor
    its per-parameter variance estimates likewise. The CPU runs the per-parameter loop: adam/adamw
    hold `exp_avg_sq.sqrt()` and its quotient (2 of the largest parameter), adafactor the row x
    column variance estimate (1). SGD, with or without momentum, updates in place."""
    if name in ("sgd", "sgd-momentum"):
        return 0
    if device == "cuda":
        return max(groups.values(), default=0)
    return (2 if name in ("adam", "adamw") else 1) * largest


def _trainable(c) -> list[tuple[str, torch.Tensor]]:
    out = []
    for node in c.graph.graph.nodes:
        if node.op != "placeholder":
            continue
        role, name = c.roles.get(node.name, ("input", node.name))
        if role == "param" and name in c.trainable:
            out.append((name, node.meta["val"]))
    return out
