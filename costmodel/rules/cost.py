"""OpCost: what one op costs, as sympy expressions in the user's dimension names.

The FLOP convention is stated once, here: one multiply-add is 2 FLOPs, as in
`torch.utils.flop_counter`. Bytes are storage bytes an op reads and writes, assuming each input is
read once and each output written once (no cache reuse, no fusion across ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

# Categories an op falls into; the roofline's efficiencies and the report's groupings key on them.
MATMUL = "matmul"          # mm, bmm, addmm, baddbmm, linear
CONV = "conv"              # convolutions and their backward
ATTENTION = "attention"    # scaled-dot-product attention and its backward
POINTWISE = "pointwise"    # elementwise unary/binary/ternary ops
REDUCTION = "reduction"    # sum, mean, max, ...
NORM = "norm"              # layer/batch/group/RMS norm
SOFTMAX = "softmax"
EMBEDDING = "embedding"
INDEX = "index"            # gather, scatter, index, index_put, ...
COPY = "copy"              # cat, stack, clone, copy, to, contiguous
POOL = "pool"
LOSS = "loss"
OPTIMIZER = "optimizer"
FACTORY = "factory"        # zeros, ones, arange, full, rand: write only
VIEW = "view"              # metadata only: zero cost, declared

CATEGORIES = (MATMUL, CONV, ATTENTION, POINTWISE, REDUCTION, NORM, SOFTMAX, EMBEDDING, INDEX, COPY,
              POOL, LOSS, OPTIMIZER, FACTORY, VIEW)
# Categories whose FLOPs are the ones torch.utils.flop_counter.FlopCounterMode counts.
MATMUL_CATEGORIES = frozenset({MATMUL, CONV, ATTENTION})

ZERO = sympy.Integer(0)
# The kernel class of an op whose rule names none.
KERNEL_OF_CATEGORY = {MATMUL: "matmul", CONV: "conv", ATTENTION: "attention", POINTWISE: "pointwise",
                      REDUCTION: "reduction", NORM: "norm", SOFTMAX: "softmax", EMBEDDING: "embedding",
                      INDEX: "index", COPY: "copy", POOL: "pool", LOSS: "loss", OPTIMIZER: "optimizer",
                      FACTORY: "fill", VIEW: "view"}


@dataclass(frozen=True)
class OpCost:
    flops: sympy.Expr = ZERO
    bytes_read: sympy.Expr = ZERO
    bytes_written: sympy.Expr = ZERO
    category: str = POINTWISE
    # The FLOPs torch.utils.flop_counter.FlopCounterMode counts for this op. None: all of `flops`
    # for matmul, conv and attention ops, none for the others. Attention sets it explicitly, since
    # its softmax FLOPs are real work that FlopCounterMode does not count.
    counted_flops: sympy.Expr | None = None
    # The kernel class that prices the op on a calibrated device (see costmodel/hardware/kernels.py), decided
    # from the op and its arguments; None: the category's class (KERNEL_OF_CATEGORY).
    kernel: str | None = None
    # Shape features the class's measured table reads (a product's m, n, k), as formulas.
    features: dict[str, sympy.Expr] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown op category {self.category!r}; known: {', '.join(CATEGORIES)}")
        if self.kernel is not None:
            from costmodel.hardware.kernels import check_kernel
            check_kernel(self.kernel)

    @property
    def kernel_class(self) -> str:
        return self.kernel or KERNEL_OF_CATEGORY[self.category]

    @property
    def bytes(self) -> sympy.Expr:
        return self.bytes_read + self.bytes_written

    @property
    def matmul_flops(self) -> sympy.Expr:
        if self.counted_flops is not None:
            return self.counted_flops
        return self.flops if self.category in MATMUL_CATEGORIES else ZERO


VIEW_COST = OpCost(category=VIEW)
