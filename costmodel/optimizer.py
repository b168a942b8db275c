"""The optimizer step, counted from the parameter sizes (one fused update per parameter tensor).

Per parameter element, for PyTorch's update rules (torch/optim/*.py):
  sgd:           p -= lr * g                                        2 FLOPs; reads p, g; writes p
  sgd-momentum:  b = mu * b + g; p -= lr * b                        4 FLOPs; reads p, g, b; writes p, b
  adam / adamw:  m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;       15 FLOPs; reads p, g, m, v; writes p, m, v
                 p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)  (+ decay p *= 1 - lr*wd)
  adafactor:     row/column second-moment statistics (factored for matrices), update, RMS clip:
                 about 20 FLOPs; reads p, g; writes p (its state is O(rows + cols) per matrix)
State elements per parameter element are STATE_PER_PARAM (adafactor's factored state is small and
computed exactly by `state_elements`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adafactor")


@dataclass(frozen=True)
class UpdateRule:
    flops_per_elem: int
    reads_per_elem: int        # tensors of the param's size read (p, g, state)
    writes_per_elem: int       # tensors of the param's size written


UPDATES = {
    "sgd": UpdateRule(2, 2, 1),
    "sgd-momentum": UpdateRule(4, 3, 2),
    "adam": UpdateRule(15, 4, 3),
    "adamw": UpdateRule(15, 4, 3),
    "adafactor": UpdateRule(20, 2, 1),
}
STATE_PER_PARAM = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}


def check(name: str) -> str:
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    return name


def state_elements(name: str, shape: tuple[int, ...]) -> int:
    """Optimizer state elements for one parameter: adam keeps m and v (2 per element); adafactor
    keeps a row and a column statistic for a matrix (factored) and a full one for a vector."""
    numel = 1
    for s in shape:
        numel *= s
    if name == "adafactor":
        if len(shape) >= 2:
            rows = numel // shape[-1]
            cols = numel // shape[-2]
            return rows + cols
        return numel
    return STATE_PER_PARAM[name] * numel


def update_cost(name: str, shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """(FLOPs, bytes read, bytes written) of one parameter tensor's update."""
    rule = UPDATES[name]
    numel = 1
    for s in shape:
        numel *= s
    if name == "adafactor":
        state = state_elements(name, tuple(shape))
        return rule.flops_per_elem * numel, (2 * numel + state) * itemsize, (numel + state) * itemsize
    return (rule.flops_per_elem * numel, rule.reads_per_elem * numel * itemsize,
            rule.writes_per_elem * numel * itemsize)
