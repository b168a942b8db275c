"""Which kernel eager runs for an op at given sizes, asked of PyTorch itself.

On a CPU, eager runs a convolution in oneDNN where that pays and in its own native kernel (im2col
and a GEMM per sample: `_slow_conv2d_forward`) where it does not: at batch 1 an input of at most
~20k elements with kernels up to 3x3, at one thread a 1x1 stride-1 convolution below batch 16.
The two run the same work at different rates (a 3x3 convolution of 128 channels on a 3x3 image at
batch 1, in a bottleneck ResNet at one thread: 174 us native, priced 72 from oneDNN's tables), and
which one runs depends on the batch, the image, the threads: on the point, not on the graph.
`torch._C._select_conv_backend` is the choice eager makes, called here on tensors of the point's
sizes that own no memory (one element, expanded).
"""

from __future__ import annotations

import functools

import torch

SLOW_CONV_CLASS = "conv.dense.slow"     # the class of the native convolution (calibrate measures it)
NATIVE_BACKENDS = ("Slow2d",)           # _ConvBackend names of that kernel
# the most input elements at which a batch-1 convolution of kernels up to 3x3 stays native (what
# PyTorch's use_mkldnn reads; calibrate keeps its native calls at or under it and checks each)
SLOW_CONV_ELEMENTS = 20480


@functools.lru_cache(maxsize=4096)
def conv_backend(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], transposed: bool,
                 output_padding: tuple[int, ...], groups: int, dtype: str, threads: int | None) -> str | None:
    """The name of the backend eager picks for this CPU convolution with `threads` intra-op threads
    ("Slow2d", "Mkldnn", ...); None where this PyTorch has no `_select_conv_backend`."""
    select = getattr(torch._C, "_select_conv_backend", None)
    dt = getattr(torch, dtype, None)
    if select is None or not isinstance(dt, torch.dtype):
        return None
    x = torch.empty((), dtype=dt).expand(*x_shape)
    w = torch.empty((), dtype=dt).expand(*w_shape)
    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        backend = select(x, w, None, list(stride), list(padding), list(dilation), transposed,
                         list(output_padding), groups, None)
    finally:
        if threads and threads != before:
            torch.set_num_threads(before)
    return str(backend).rsplit(".", 1)[-1]


def runs_native(x_shape, w_shape, stride, padding, dilation, transposed, output_padding, groups,
                dtype: str = "float32", threads: int | None = None) -> bool:
    """True where eager runs this CPU convolution in its native kernel (SLOW_CONV_CLASS)."""
    return conv_backend(tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape),
                        tuple(int(v) for v in stride), tuple(int(v) for v in padding),
                        tuple(int(v) for v in dilation), bool(transposed),
                        tuple(int(v) for v in output_padding), int(groups), dtype, threads) in NATIVE_BACKENDS
