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

from costmodel.errors import UsageError

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


def update_bytes(name: str, shape: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """(bytes read, bytes written) by one parameter's update: p, g and the state read; p and the state
    written (adafactor's factored state counted at its own, smaller, size)."""
    numel = 1
    for s in shape:
        numel *= s
    if name == "adafactor":
        state = state_elements(name, shape)
        return (2 * numel + state) * itemsize, (numel + state) * itemsize
    rule = UPDATES[name]
    return rule.reads_per_elem * numel * itemsize, rule.writes_per_elem * numel * itemsize


def optimizer_ops(model, trainable: set[str], name: str, root: str = "(root)") -> list:
    """One update per trainable parameter tensor, attributed to the module that owns it."""
    import sympy

    from costmodel.analysis import OpRecord
    from costmodel.capture.specs import dtype_name
    from costmodel.rules.cost import OPTIMIZER
    check(name)
    records = []
    for pname, p in model.named_parameters():
        if pname not in trainable:
            continue
        read, written = update_bytes(name, tuple(p.shape), p.element_size())
        cost = {"flops": sympy.Integer(UPDATES[name].flops_per_elem * p.numel()), "matmul_flops": sympy.Integer(0),
                "bytes_read": sympy.Integer(read), "bytes_written": sympy.Integer(written),
                "bytes": sympy.Integer(read + written)}
        records.append(OpRecord(f"{name}:{pname}", f"optimizer.{name}", pname.rpartition(".")[0] or root,
                                "optimizer", OPTIMIZER, dtype_name(p.dtype), cost,
                                kernel=f"optimizer.{name.replace('-', '_')}"))
    return records
