"""Rules: what each aten op costs. One registry (rules/registry.py), one module per op family, the
one choice of attention kernel (rules/attention.py), the optimizer's per-parameter costs."""

from costmodel.rules.registry import (TensorSpec, is_metadata_only, nbytes_of, prod, register,  # noqa: F401
                                      registered_ops, rule_for, tensors_in, view_rule)
from costmodel.rules import attention, conv, matmul, norm, pointwise  # noqa: E402,F401  (fill the registry)
