"""Everything that is not a product or a normalisation: pointwise ops, reductions, softmax,
embedding, indexing, copies, factories, dropout, pooling, losses, and the metadata-only ops.

Conventions (fvcore's, made explicit): a pointwise op does FLOPS_PER_ELEMENT[op] (default 1)
FLOPs per output element, reads each input once at its own (un-broadcast) size and writes its
output once. A reduction does one FLOP per input element. Copies, factories and indexing move
bytes and do no FLOPs.

Kernel classes: an elementwise op is "pointwise.<op>" (its aten name, in-place or not:
pointwise.add, pointwise.tanh; gelu with approximate="tanh" is pointwise.gelu_tanh), so a device
that measured the op prices it as measured and one that did not falls back to "pointwise". Random
fills are "random", dropout "random.dropout"; the other factories "fill".
"""

from __future__ import annotations

import torch

from costmodel.hardware.kernels import POOL_STRIDE_FEATURE, POOL_WINDOW_FEATURE, UPSAMPLE_WIDTH_FEATURE
from costmodel.rules.cost import COPY, EMBEDDING, FACTORY, INDEX, LOSS, POINTWISE, POOL, REDUCTION, SOFTMAX, OpCost
from costmodel.rules.registry import TensorSpec, nbytes_of, prod, register, tensors_in, view_rule

aten = torch.ops.aten

# FLOPs per output element where one is clearly wrong; everything else pointwise counts 1.
FLOPS_PER_ELEMENT = {
    aten.addcmul: 2, aten.addcdiv: 2, aten.lerp: 2, aten.gelu: 8, aten.gelu_backward: 12,
    aten.silu: 4, aten.silu_backward: 6, aten.sigmoid: 4, aten.sigmoid_backward: 2, aten.tanh_backward: 2,
    aten.native_dropout_backward: 2, aten.softplus: 3, aten.mish: 6, aten.hardswish: 3,
    aten.elu: 3, aten.leaky_relu: 2, aten.where: 1, aten.erf: 8,
}

# Pointwise ops PyTorch does not tag `pointwise` (or only in some overloads).
_UNTAGGED_POINTWISE = [
    aten.masked_fill, aten.masked_fill_, aten.where, aten.rsub, aten.hardswish, aten.hardswish_backward,
    aten.tril, aten.triu, aten.tril_, aten.triu_, aten.threshold_backward, aten.gelu_backward,
    aten.hardtanh_backward, aten.leaky_relu_backward, aten.elu_backward, aten.softplus_backward,
    aten.log_sigmoid_backward, aten.mish_backward, aten.hardsigmoid_backward, aten.relu_,
    aten.add_, aten.sub_, aten.mul_, aten.div_, aten.addcmul_, aten.addcdiv_, aten.lerp_, aten.sqrt_,
    aten.clamp_, aten.clamp_min_, aten.clamp_max_, aten.neg_, aten.exp_, aten.pow_, aten.sigmoid_,
    aten.tanh_, aten.gelu_, aten.silu_, aten.hardtanh_, aten.leaky_relu_, aten.maximum, aten.minimum,
    aten.isin, aten.isnan, aten.isinf, aten.logical_not, aten.bitwise_not, aten.sgn, aten.erfinv,
    aten.nan_to_num, aten.clamp, aten.clamp_min, aten.clamp_max, aten.log_sigmoid_forward,
    aten.floor_divide, aten.floor_divide_,
]


def pointwise_rule(*args, out, op=None, **kwargs) -> OpCost:
    """out[i] = f(inputs[i]) with broadcasting."""
    outs = tensors_in(out)
    flops_per_elem = FLOPS_PER_ELEMENT.get(getattr(op, "overloadpacket", op), 1)
    return OpCost(flops_per_elem * outs[0].numel if outs else 0, nbytes_of([args, kwargs]),
                  nbytes_of(outs), POINTWISE, kernel=pointwise_class(op, args, kwargs))


def pointwise_class(op, args=(), kwargs=None) -> str:
    """"pointwise.<aten name>" (in-place ops share their out-of-place class); gelu and its backward
    with approximate="tanh" are "pointwise.gelu_tanh" and "pointwise.gelu_backward_tanh"."""
    name = getattr(getattr(op, "overloadpacket", op), "__name__", "") if op is not None else ""
    name = name.rstrip("_").lstrip("_")
    if not name or not name.replace("_", "").isalnum() or not name.islower():
        return "pointwise"
    if name in ("gelu", "gelu_backward"):
        approximate = (kwargs or {}).get("approximate", next((a for a in args if isinstance(a, str)), "none"))
        if approximate == "tanh":
            name += "_tanh"
    return f"pointwise.{name}"


register(*_UNTAGGED_POINTWISE)(pointwise_rule)


# --- metadata only: no data touched ------------------------------------------------------------

register(aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.size, aten.stride,
         aten.numel, aten.dim, aten.is_contiguous, aten.is_same_size, aten.storage_offset,
         aten.unsafe_split, aten.unsafe_split_with_sizes, aten.unsafe_chunk, aten._unsafe_view,
         aten.view, aten._reshape_alias, aten.reshape, aten.detach, aten.detach_, aten.alias, aten.lift_fresh,
         aten.t, aten.transpose, aten.permute, aten.expand, aten.slice, aten.select, aten.unsqueeze,
         aten.squeeze, aten.split, aten.split_with_sizes, aten.unbind, aten.chunk, aten.as_strided,
         aten.unfold, aten.diagonal, aten.view_as_real, aten.view_as_complex, aten.narrow, aten.expand_as,
         aten.as_strided_,
         aten.view_as, aten.unflatten, aten.flatten, aten.movedim, aten.squeeze_, aten.unsqueeze_,
         aten.t_, aten.transpose_, aten.resize_, aten.set_, aten._assert_async, aten._assert_scalar,
         aten._functional_assert_async, aten._assert_tensor_metadata, aten.empty, aten.empty_like,
         aten.empty_strided, aten.new_empty, aten.new_empty_strided)(view_rule)


# --- reductions ---------------------------------------------------------------------------------

def _reduction(x: TensorSpec, out, flops_per_elem: int = 1) -> OpCost:
    return OpCost(flops_per_elem * x.numel, x.nbytes, nbytes_of(tensors_in(out)), REDUCTION)


@register(aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.prod, aten.argmax, aten.argmin,
          aten.any, aten.all, aten.cumsum, aten.cumprod, aten.count_nonzero, aten.nansum, aten.aminmax,
          aten.cummax, aten.cummin, aten.logcumsumexp, aten.sort, aten.topk, aten.median, aten.mode,
          aten.nanmedian, aten.kthvalue, aten.unique_consecutive, aten._unique2, aten.histc, aten.bincount)
def reduction(x: TensorSpec, *args, out, **_) -> OpCost:
    """one FLOP (add, compare) per input element"""
    return _reduction(x, out)


@register(aten.var, aten.std, aten.var_mean, aten.std_mean, aten.linalg_vector_norm, aten.norm,
          aten.logsumexp)
def reduction3(x: TensorSpec, *args, out, **_) -> OpCost:
    """two passes: mean, then squared deviations (3 FLOPs per element)"""
    return _reduction(x, out, 3)


# --- softmax ------------------------------------------------------------------------------------

@register(aten._softmax, aten._log_softmax, aten._safe_softmax, aten.softmax, aten.log_softmax)
def softmax(x: TensorSpec, *args, out, **_) -> OpCost:
    """max, subtract, exp, sum, divide: 5 FLOPs per element"""
    return OpCost(5 * x.numel, x.nbytes, out.nbytes, SOFTMAX, kernel="softmax")


@register(aten._softmax_backward_data, aten._log_softmax_backward_data)
def softmax_backward(grad_out: TensorSpec, output: TensorSpec, *args, out, **_) -> OpCost:
    """grad_in = y * (g - sum(g * y)): 4 FLOPs per element"""
    return OpCost(4 * grad_out.numel, grad_out.nbytes + output.nbytes, out.nbytes, SOFTMAX, kernel="softmax.backward")


# --- embedding and indexing ---------------------------------------------------------------------

@register(aten.embedding)
def embedding(weight: TensorSpec, indices: TensorSpec, *args, out, **_) -> OpCost:
    """out[..., :] = weight[indices[...], :]: reads the gathered rows, not the whole table"""
    return OpCost(0, indices.nbytes + out.numel * weight.itemsize, out.nbytes, EMBEDDING)


@register(aten.embedding_dense_backward)
def embedding_backward(grad_out: TensorSpec, indices: TensorSpec, *args, out, **_) -> OpCost:
    """grad_weight = zeros([V, D]).index_add_(0, indices, grad_out): one add per gradient element"""
    return OpCost(grad_out.numel, grad_out.nbytes + indices.nbytes, out.nbytes + grad_out.nbytes, EMBEDDING,
                  kernel="embedding.backward")


def _gather_like(index_tensors, out, elem_size: int) -> OpCost:
    """reads the indices and the gathered elements, writes the output"""
    outs = tensors_in(out)
    return OpCost(0, nbytes_of(index_tensors) + outs[0].numel * elem_size, nbytes_of(outs), INDEX)


@register(aten.index, aten._unsafe_index)
def index(x: TensorSpec, indices, *, out, **_) -> OpCost:
    return _gather_like(indices, out, x.itemsize)


@register(aten.gather, aten.index_select, aten.take_along_dim)
def gather(x: TensorSpec, dim, index, *args, out, **_) -> OpCost:
    return _gather_like([index], out, x.itemsize)


@register(aten.index_put, aten._unsafe_index_put, aten.index_put_, aten._index_put_impl_)
def index_put(x: TensorSpec, indices, values: TensorSpec, accumulate=False, *args, out, **kwargs) -> OpCost:
    """out = x.clone(); out[indices] (+)= values: the clone is skipped when in place"""
    in_place = kwargs.get("op") in (aten.index_put_.default, aten._index_put_impl_.default)
    copy = 0 if in_place else x.nbytes
    flops = values.numel if accumulate else 0
    return OpCost(flops, copy + nbytes_of([indices, values]), copy + values.nbytes, INDEX, kernel="index.scatter")


@register(aten.scatter, aten.scatter_add, aten.scatter_reduce, aten.index_add, aten.index_copy,
          aten.index_fill, aten.masked_scatter, aten.scatter_, aten.scatter_add_, aten.index_add_,
          aten.index_copy_, aten.index_fill_, aten.masked_scatter_, aten.masked_select)
def scatter(x: TensorSpec, *args, out, **_) -> OpCost:
    """out = x with some elements replaced or accumulated (one add per source element at most)"""
    src = tensors_in(args)
    return OpCost(src[-1].numel if src else 0, x.nbytes + nbytes_of(src), nbytes_of(tensors_in(out)), INDEX,
                  kernel="index.scatter")


@register(aten.slice_backward, aten.select_backward, aten.diagonal_backward, aten.as_strided_scatter,
          aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.unfold_backward)
def scatter_into_zeros(*args, out, **_) -> OpCost:
    """grad_input = zeros(input_sizes); grad_input[region] = grad"""
    return OpCost(0, nbytes_of(tensors_in(args)), nbytes_of(tensors_in(out)), INDEX, kernel="index.scatter")


# --- copies and factories -----------------------------------------------------------------------

@register(aten.clone, aten._to_copy, aten.copy, aten.copy_, aten.contiguous, aten.cat, aten.stack,
          aten.constant_pad_nd, aten.repeat, aten.repeat_interleave, aten.flip, aten.roll, aten.expand_copy,
          aten.permute_copy, aten.view_copy, aten.t_copy, aten.transpose_copy, aten.unsqueeze_copy, aten.alias_copy,
          aten.reflection_pad1d, aten.reflection_pad2d, aten.replication_pad1d, aten.replication_pad2d,
          aten.pad, aten.lift_fresh_copy, aten.split_with_sizes_copy, aten.split_copy, aten.unbind_copy,
          aten.slice_copy, aten.select_copy, aten.detach_copy, aten.hstack, aten.vstack)
def copy(*args, out, op=None, **_) -> OpCost:
    """reads every input tensor once, writes the output once; eager's constant padding is its own
    class (copy.pad: a composite of an empty output, a fill of the border and a copy into its middle,
    several dispatches where a clone is one)"""
    packet = getattr(op, "overloadpacket", op)
    return OpCost(0, nbytes_of(tensors_in(args)), nbytes_of(tensors_in(out)), COPY,
                  kernel="copy.pad" if packet is aten.constant_pad_nd else None)


@register(aten.zeros, aten.ones, aten.full, aten.arange, aten.scalar_tensor, aten.zeros_like, aten.ones_like,
          aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full, aten.rand, aten.randn, aten.rand_like,
          aten.randn_like, aten.randint, aten.randint_like, aten.randperm, aten.linspace, aten.logspace,
          aten.fill, aten.fill_, aten.zero_, aten.zero, aten.eye, aten.tensor, aten.normal, aten.uniform,
          aten.uniform_, aten.normal_, aten.bernoulli_, aten.bernoulli, aten.random_, aten.exponential_)
def factory(*args, out, op=None, **_) -> OpCost:
    """writes its output; reads nothing but a fill value"""
    packet = getattr(op, "overloadpacket", op)
    return OpCost(0, 0, nbytes_of(tensors_in(out)), FACTORY, kernel="random" if packet in _RANDOM else "fill")


_RANDOM = {aten.rand, aten.randn, aten.rand_like, aten.randn_like, aten.randint, aten.randint_like, aten.randperm,
           aten.normal, aten.uniform, aten.uniform_, aten.normal_, aten.bernoulli_, aten.bernoulli, aten.random_,
           aten.exponential_}


@register(aten.native_dropout)
def dropout(x: TensorSpec, p, train, *, out, **_) -> OpCost:
    """mask = rand < 1-p; out = x * mask / (1-p): 2 FLOPs per element"""
    return OpCost(2 * x.numel, x.nbytes, nbytes_of(tensors_in(out)), POINTWISE, kernel="random.dropout")


@register(aten._local_scalar_dense, aten.item)
def item(x: TensorSpec, *args, out=None, **_) -> OpCost:
    return OpCost(0, x.itemsize, 0, COPY)


# --- pooling and resampling ---------------------------------------------------------------------

@register(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.avg_pool2d, aten.avg_pool3d,
          aten.avg_pool1d, aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
def pool(x: TensorSpec, kernel_size, *args, out, op=None, **_) -> OpCost:
    """one compare/add per window element per output element"""
    outs = tensors_in(out)
    return OpCost(outs[0].numel * prod(kernel_size), x.nbytes, nbytes_of(outs), POOL, kernel=_pool_class(op),
                  features=_window(op, kernel_size, args[0] if args else None))


@register(aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward,
          aten.avg_pool2d_backward, aten.avg_pool3d_backward)
def pool_backward(grad_out: TensorSpec, x: TensorSpec, kernel_size, *args, out, op=None, **_) -> OpCost:
    """scatter each output gradient back over its window"""
    return OpCost(grad_out.numel * prod(kernel_size), grad_out.nbytes + nbytes_of(tensors_in(args)),
                  out.nbytes, POOL, kernel=_pool_class(op), features=_window(op, kernel_size, args[0] if args else None))


@register(aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_avg_pool1d,
          aten.adaptive_max_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool3d,
          aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
          aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward)
def adaptive_pool(x: TensorSpec, *args, out, op=None, **_) -> OpCost:
    """every input element is added (or compared) once"""
    return OpCost(x.numel, nbytes_of(tensors_in([x, args])), nbytes_of(tensors_in(out)), POOL,
                  kernel="pool.adaptive" + (".backward" if "backward" in str(op) else ""))


_NEAREST = (aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten._upsample_nearest_exact1d,
            aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d)
_NEAREST_BACKWARD = (aten.upsample_nearest1d_backward, aten.upsample_nearest2d_backward,
                     aten.upsample_nearest3d_backward, aten._upsample_nearest_exact1d_backward,
                     aten._upsample_nearest_exact2d_backward, aten._upsample_nearest_exact3d_backward)


@register(*_NEAREST, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_linear1d,
          aten.upsample_trilinear3d, aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa, aten.grid_sampler_2d)
def upsample(x: TensorSpec, *args, out, op=None, **_) -> OpCost:
    """interpolation: a few FLOPs per output element (4 for bilinear weights, 0 for nearest).
    Class pool.upsample (nearest: a copy of gathered elements), pool.upsample.linear (weighted);
    a channels-first CPU kernel's speed depends on the row length (UPSAMPLE_WIDTH_FEATURE)."""
    kind = "pool.upsample" + ("" if getattr(op, "overloadpacket", op) in _NEAREST else ".linear")
    return OpCost(4 * out.numel, x.nbytes, out.nbytes, POOL, kernel=kind, features={UPSAMPLE_WIDTH_FEATURE: x.shape[-1]})


@register(*_NEAREST_BACKWARD, aten.upsample_bilinear2d_backward, aten.upsample_bicubic2d_backward,
          aten.upsample_linear1d_backward, aten.upsample_trilinear3d_backward, aten._upsample_bilinear2d_aa_backward,
          aten._upsample_bicubic2d_aa_backward)
def upsample_backward(grad_out: TensorSpec, *args, out, op=None, **_) -> OpCost:
    """every output gradient added into the input's: pool.upsample.backward (nearest),
    pool.upsample.linear.backward"""
    kind = "pool.upsample" + ("" if getattr(op, "overloadpacket", op) in _NEAREST_BACKWARD else ".linear")
    return OpCost(4 * grad_out.numel, grad_out.nbytes, out.nbytes, POOL, kernel=kind + ".backward")


def _window(op, kernel_size, stride) -> dict:
    """A pooling's window and stride as areas (POOL_WINDOW_FEATURE, POOL_STRIDE_FEATURE): its time
    per output grows with the window, its bytes per output with the stride (each input read once),
    and neither is the other. A single size stands for every spatial dimension; no stride is the
    window's."""
    name = str(getattr(op, "overloadpacket", op) or "")
    dims = 3 if "3d" in name else 1 if "1d" in name else 2

    def area(sizes):
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        return prod(sizes * dims if len(sizes) == 1 else sizes)
    return {POOL_WINDOW_FEATURE: area(kernel_size), POOL_STRIDE_FEATURE: area(stride if stride else kernel_size)}


def _pool_class(op) -> str:
    name = str(getattr(op, "overloadpacket", op) or "")
    kind = "pool.max" if "max" in name else "pool.avg"
    return kind + (".backward" if "backward" in name else "")


# --- losses -------------------------------------------------------------------------------------

@register(aten.nll_loss_forward, aten.nll_loss2d_forward, aten.nll_loss, aten.nll_loss_nd)
def nll_loss(x: TensorSpec, target: TensorSpec, *args, out, **_) -> OpCost:
    """loss = -mean(x[i, target[i]]): one gathered element and one add per row"""
    rows = target.numel
    return OpCost(2 * rows, target.nbytes + rows * x.itemsize + nbytes_of(tensors_in(args)),
                  nbytes_of(tensors_in(out)), LOSS)


@register(aten.nll_loss_backward, aten.nll_loss2d_backward)
def nll_loss_backward(grad_out: TensorSpec, x: TensorSpec, target: TensorSpec, *args, out, **_) -> OpCost:
    """grad_input = zeros_like(x); grad_input[i, target[i]] = -grad / n"""
    return OpCost(target.numel, grad_out.nbytes + target.nbytes, out.nbytes, LOSS)


@register(aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss, aten.huber_loss, aten.binary_cross_entropy,
          aten.binary_cross_entropy_with_logits, aten.kl_div, aten.soft_margin_loss, aten.multilabel_margin_loss_forward)
def elementwise_loss(x: TensorSpec, target: TensorSpec, *args, out, **_) -> OpCost:
    """difference, square (or log), reduce: 3 FLOPs per element"""
    return OpCost(3 * x.numel, x.nbytes + target.nbytes + nbytes_of(tensors_in(args)),
                  nbytes_of(tensors_in(out)), LOSS)


@register(aten.mse_loss_backward, aten.smooth_l1_loss_backward, aten.huber_loss_backward,
          aten.binary_cross_entropy_backward, aten.soft_margin_loss_backward)
def elementwise_loss_backward(grad_out: TensorSpec, x: TensorSpec, target: TensorSpec, *args, out, **_) -> OpCost:
    return OpCost(3 * x.numel, grad_out.nbytes + x.nbytes + target.nbytes, out.nbytes, LOSS)

