"""Mixed precision (autocast) for captures on the meta device, where torch.autocast has no effect.

torch.autocast acts through per-backend dispatch keys (AutocastCUDA, AutocastCPU) that meta and
fake-meta tensors do not carry, so a capture under `torch.autocast("cuda")` would trace float32
everywhere. `emulate_autocast` applies autocast's op policy one level up, as a TorchFunctionMode
over the traced forward: the casts it inserts are ordinary `_to_copy` ops in the graph, their
backward runs in the dtypes autograd gives them, and their copies are counted like any tensor.

(`sdpa` is costmodel::sdpa, which capture puts in place of F.scaled_dot_product_attention.)
The policies are PyTorch's tables (aten/src/ATen/autocast_mode.cpp, and the autocast docs), by the
name of the Python-level function that reaches them:
- lower precision: floating arguments are cast to the autocast dtype (bfloat16 by default); a leaf
  that requires grad (a weight) is cast once per forward and the copy cached, as autocast does;
- float32: half arguments are cast to float32;
- float32 output: half arguments stay, the op gets dtype=float32 (softmax, sum, ... on CUDA);
- everything else runs in its inputs' dtypes (type promotion decides mixed ones).
`torch.autocast(..., enabled=False)` regions in the model are respected: the emulation sets
autocast's own enabled flag for the policy's device and checks it on every call.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode
from costmodel._torch import tree_map

_CUDA_LOWER = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr",
    "mv", "einsum", "chain_matmul", "multi_dot", "vecdot", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "sdpa",
}
_CUDA_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "interpolate",
}
_CUDA_FP32_OUTPUT = {"softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod", "norm", "vector_norm",
                     "matrix_norm"}

_CPU_LOWER = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "vecdot",
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "prelu", "scaled_dot_product_attention", "sdpa",
}
_CPU_FP32 = {
    "avg_pool3d", "binary_cross_entropy", "grid_sample", "polar", "prod", "quantile", "nanquantile", "stft",
    "cdist", "trace", "cholesky", "inverse", "pinverse", "max_pool3d", "adaptive_avg_pool3d", "mse_loss",
    "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "poisson_nll_loss", "smooth_l1_loss",
    "cross_entropy", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss", "binary_cross_entropy_with_logits",
}

POLICIES = {
    "cuda": (_CUDA_LOWER, _CUDA_FP32, _CUDA_FP32_OUTPUT),
    "cpu": (_CPU_LOWER, _CPU_FP32, set()),
}
_HALF = (torch.float16, torch.bfloat16)


class _Autocast(TorchFunctionMode):
    def __init__(self, device: str, dtype: torch.dtype, weights: set[int] = frozenset()):
        super().__init__()
        self.device, self.dtype, self.weights = device, dtype, weights
        self.lower, self.fp32, self.fp32_output = POLICIES[device]
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _lower(self, t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (self.dtype, torch.float64):
            return t
        if t.is_leaf and (t.requires_grad or id(t) in self.weights):   # the weight cache: one copy per forward
            hit = self.cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = (t, t.to(self.dtype))
                self.cache[id(t)] = hit
            return hit[1]
        return t.to(self.dtype)

    @staticmethod
    def _fp32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_autocast_enabled(self.device) or not (
                name in self.lower or name in self.fp32 or name in self.fp32_output or name == "cross_entropy"):
            return func(*args, **kwargs)
        if name in self.lower:
            args, kwargs = tree_map(self._lower, (args, kwargs))
        elif name == "cross_entropy" and name not in self.fp32:
            # CUDA: cross_entropy_loss is log_softmax (float32 output) then nll_loss (float32)
            x, target, *rest = args
            if x.dtype in _HALF and not rest and not kwargs.get("label_smoothing"):
                reduction = kwargs.get("reduction", "mean")
                return torch.nn.functional.nll_loss(torch.log_softmax(x, 1, dtype=torch.float32), target,
                                                    weight=kwargs.get("weight"),
                                                    ignore_index=kwargs.get("ignore_index", -100),
                                                    reduction=reduction)
            args, kwargs = tree_map(self._fp32, (args, kwargs))
        elif name in self.fp32:
            args, kwargs = tree_map(self._fp32, (args, kwargs))
        elif kwargs.get("dtype") is None and any(isinstance(a, torch.Tensor) and a.dtype in _HALF for a in args[:1]):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


@contextlib.contextmanager
def autocast(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weights=()):
    """Within this context, Python-level torch calls follow autocast's policy for `device`.
    `weights`: tensors to treat as parameters that require grad (autocast caches their casts even
    under no_grad, as for any nn.Parameter left trainable) though the trace gives them none."""
    if device not in POLICIES:
        raise ValueError(f"no autocast policy for {device!r}; known: {', '.join(POLICIES)}")
    was_enabled, was_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, dtype)
    mode = _Autocast(device, dtype, {id(t) for t in weights})
    try:
        with mode:
            yield mode
    finally:
        mode.cache.clear()
        torch.set_autocast_enabled(device, was_enabled)
        torch.set_autocast_dtype(device, was_dtype)


def emulate_autocast(fn, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """`fn(params, ...)` with its forward under the emulated autocast; `params` (its first argument,
    a list) are cached like trainable weights. A train step's `torch.autograd.grad` may run inside:
    the backward is executed by autograd, below the Python level the policy sees."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        weights = args[0] if args and isinstance(args[0], (list, tuple)) else ()
        with autocast(device, dtype, weights):
            return fn(*args, **kwargs)
    return wrapped
