"""Private PyTorch APIs and the differences between the torch versions costmodel supports.

costmodel is tested on torch 2.11 (the oldest supported: the GPU machines' version) through 2.13
(see `scripts/test_torch_range.sh`). Where those versions differ, the difference is handled here,
in one small named function each, with a note on what it wraps and why; the rest of the package
calls these and does not look at `torch.__version__`. (Other private APIs are still imported
where they are used; they are to move here too.)
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.fx as fx
import torch.fx.proxy as fx_proxy
import torch.fx.traceback as fx_traceback


@contextlib.contextmanager
def _probe_env():
    """A throwaway shape environment with two symbolic sizes (hints 2 and 3) under fake tensors,
    to test whether a kernel keeps sizes symbolic: yields (env, [d0, d1])."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv(duck_shape=False)
    dims = []
    for i, hint in enumerate((2, 3)):
        source = ConstantSource(f"costmodel_probe_{i}")
        sym = env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
        dims.append(env.create_symintnode(sym, hint=hint, source=source))
    with FakeTensorMode(shape_env=env):
        yield env, dims


@functools.cache
def _cpp_matmul_is_symbolic() -> bool:
    """Whether the C++ kernel of aten.matmul (CompositeImplicitAutograd) keeps symbolic sizes.

    torch 2.11's does not: a [b, s, k] @ [k, n] product (nn.Linear without bias on a 3-D input)
    raises "Cannot call numel() on tensor with symbolic sizes/strides", and a batched
    [b, s, k] @ [b, k, n] product silently specialises b and s to their hints. torch 2.13's keeps
    the symbols. Probed once (a few milliseconds)."""
    try:
        with _probe_env() as (env, (b, s)):
            a = torch.empty(b, s, 4, device="meta")
            torch.matmul(a, torch.empty(4, 5, device="meta"))
            torch.matmul(a, torch.empty(b, 4, 5, device="meta"))
    except Exception:   # noqa: BLE001  (2.11: RuntimeError "Cannot call numel()")
        return False
    return not env.guards and not env.replacements


def _subclass_like(t: torch.Tensor) -> bool:
    """C++ isTensorSubclassLike, for the tensors a capture sees (fake, functional, vmapped)."""
    keys = torch._C._dispatch_keys(t)
    return any(keys.has(getattr(torch._C.DispatchKey, k)) for k in ("Python", "Functionalize", "FuncTorchBatched")
               if hasattr(torch._C.DispatchKey, k))


def _should_fold(tensor1: torch.Tensor, tensor2: torch.Tensor) -> bool:
    """C++ should_fold (aten/src/ATen/native/LinearAlgebra.cpp), without `out=`: fold the batch of
    the larger operand into a matrix (mm/mv instead of bmm) when the smaller one needs a gradient
    or the fold is a view."""
    larger = tensor1.dim() >= tensor2.dim()
    t1 = tensor1 if larger else tensor2.mT         # the C++ kernel takes this transpose here too
    dim_t1, dim_t2 = t1.dim(), (tensor2.dim() if larger else tensor1.dim())
    if not (dim_t1 >= 3 and dim_t2 <= 2):
        return False
    if (tensor2 if larger else tensor1).requires_grad:
        return True
    if tensor1.dim() == 2:
        return False
    if t1.numel() == 0:
        return True
    shape, strides = t1.shape, t1.stride()
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(dim_t1 - 2))


def _broadcast_batch(a, b) -> list:
    """C++ infer_size: the broadcast of two batch shapes."""
    n = max(len(a), len(b))
    out = []
    for i in range(n):
        sa = a[len(a) - n + i] if len(a) - n + i >= 0 else 1
        sb = b[len(b) - n + i] if len(b) - n + i >= 0 else 1
        torch._check(sa == sb or sa == 1 or sb == 1,
                     lambda: f"matmul: the batch dimensions {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(sb if sa == 1 else sa)
    return out


def _matmul(tensor1: torch.Tensor, tensor2: torch.Tensor) -> torch.Tensor:
    """aten::matmul (no `out=`) as torch 2.13's C++ kernel (_matmul_impl) computes it, op for op,
    written on symbolic sizes. `tests/test_torch_compat.py` checks it traces the same ops as the
    C++ kernel wherever that one is symbolic."""
    dim1, dim2 = tensor1.dim(), tensor2.dim()
    torch._check(dim1 != 0 and dim2 != 0, lambda: "both arguments to matmul need to be at least 1D, but they are "
                 f"{dim1}D and {dim2}D")
    if dim1 == 1 and dim2 == 1:
        return tensor1.dot(tensor2)
    if dim1 == 2 and dim2 == 1:
        return tensor1.mv(tensor2)
    if dim1 == 1 and dim2 == 2:
        return tensor1.unsqueeze(0).mm(tensor2).squeeze_(0)
    if dim1 == 2 and dim2 == 2:
        return tensor1.mm(tensor2)
    if _should_fold(tensor1, tensor2):
        transpose = dim2 > dim1
        t1 = tensor2.mT if transpose else tensor1
        t2 = (tensor1.t() if dim1 == 2 else tensor1) if transpose else tensor2
        sizes1 = t1.shape
        output_shape = list(sizes1[:-1])
        folded = functools.reduce(lambda x, y: x * y, output_shape, 1)
        if t2.dim() == 2:
            output_shape.append(t2.shape[1])
        t1_folded = t1.reshape(folded, sizes1[-1])
        if t2.dim() == 2:
            output = torch.ops.aten._unsafe_view(t1_folded.mm(t2), output_shape)
            return output.mT.contiguous() if transpose else output
        return torch.ops.aten._unsafe_view(t1_folded.mv(t2), output_shape)
    # batched: dim1 >= 3 or dim2 >= 3
    n = tensor1.shape[-2] if dim1 > 1 else 1
    m1 = tensor1.shape[-1]
    batch1 = list(tensor1.shape[:max(dim1 - 2, 0)])
    m2 = tensor2.shape[-2] if dim2 > 1 else tensor2.shape[0]
    p = tensor2.shape[-1] if dim2 > 1 else 1
    batch2 = list(tensor2.shape[:max(dim2 - 2, 0)])
    if dim1 == 3 and dim2 == 3 and batch1[0] != batch2[0]:
        if batch1[0] == 1 and (tensor1.requires_grad or _subclass_like(tensor1)):
            return _matmul(tensor1.squeeze(0), tensor2)
        if batch2[0] == 1 and (tensor2.requires_grad or _subclass_like(tensor2)):
            return _matmul(tensor1, tensor2.squeeze(0))
    output_shape = _broadcast_batch(batch1, batch2)
    batch = functools.reduce(lambda x, y: x * y, output_shape, 1)
    tensor1_expanded = tensor1.expand(output_shape + [n, m1]).reshape(batch, n, m1)
    vector_rhs = dim2 == 1
    if vector_rhs:
        tensor2_expanded = tensor2.expand(output_shape + [m2]).reshape(batch, m2).unsqueeze(2)
    else:
        tensor2_expanded = tensor2.expand(output_shape + [m2, p]).reshape(batch, m2, p)
    if dim1 > 1:
        output_shape.append(n)
    if dim2 > 1:
        output_shape.append(p)
    product = tensor1_expanded.bmm(tensor2_expanded)
    return torch.ops.aten._unsafe_view(product.squeeze(-1) if vector_rhs else product, output_shape)


_matmul_override_depth = 0
_matmul_library = None


@contextlib.contextmanager
def symbolic_matmul(force: bool = False):
    """Around tracing on symbolic fake tensors: aten.matmul through `_matmul` where the C++ kernel
    would lose the symbols (torch 2.11; `force`: everywhere, for the tests); elsewhere nothing.

    Wraps `torch.library.Library("aten", "IMPL").impl("matmul", _matmul, "CompositeImplicitAutograd")`:
    every caller of aten::matmul, C++ composites included (linear without bias, the math SDPA
    kernel), reaches `_matmul` for the duration; the C++ kernel is restored on exit. Re-entrant.
    Not the Python dispatcher, which also fixes matmul (through torch._decomp's matmul) but swaps
    in other decompositions too (dropout into native_dropout, or a clone when inactive), and not
    torch._decomp's matmul alone, which differs from the C++ kernel in ops (a view where C++ makes
    a fresh tensor with _unsafe_view, which the memory model's lifetimes see; folding 1-D @ 3-D)."""
    global _matmul_override_depth, _matmul_library
    if _cpp_matmul_is_symbolic() and not force:
        yield
        return
    if _matmul_override_depth == 0:
        lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():   # "Overriding a previously registered kernel": intended
            warnings.simplefilter("ignore", UserWarning)
            lib.impl("matmul", _matmul, "CompositeImplicitAutograd")
        _matmul_library = lib
    _matmul_override_depth += 1
    try:
        yield
    finally:
        _matmul_override_depth -= 1
        if _matmul_override_depth == 0:
            _matmul_library._destroy()
            _matmul_library = None


def _floor_div(x, y):
    return x // y


@functools.cache
def _meta_div_rtn_guards() -> bool:
    """Whether `torch._meta_registrations.div_rtn` puts a guard on its operands.

    It computes the output size of pooling (max_pool2d's meta kernel, through
    pooling_output_shape_pad_lr). torch 2.11's is a port of the C++ one: `q = x // y`, then
    `if r != 0 and ...: q -= 1`; `r != 0` on a symbolic size guards on the parity of the size
    (a ResNet captured at height 64 holds only where (height - 1) // 2 is odd), and the
    adjustment never applies since Python's // already rounds toward negative infinity.
    torch 2.13's is `x // y`."""
    import torch._meta_registrations as meta
    div_rtn = getattr(meta, "div_rtn", None)
    if div_rtn is None:
        return False
    with _probe_env() as (env, (b, s)):
        div_rtn(b * s + 1, 2)
    return bool(env.guards)


@contextlib.contextmanager
def symbolic_pooling():
    """Around tracing: pooling's output size without a parity guard (torch 2.11); elsewhere
    nothing. Wraps `torch._meta_registrations.div_rtn`, replaced for the duration by `x // y`,
    which equals it on every integer (see `_meta_div_rtn_guards`), as torch 2.13 has it."""
    if not _meta_div_rtn_guards():
        yield
        return
    import torch._meta_registrations as meta
    previous = meta.div_rtn
    meta.div_rtn = _floor_div
    try:
        yield
    finally:
        meta.div_rtn = previous


# The .vec overloads F.interpolate calls (output_size or scale_factors), by the .default overload
# eager's C++ composite calls with the output size it computed, and whether that one takes
# align_corners after the size.
_UPSAMPLE_VEC = {
    "upsample_nearest1d": False, "upsample_nearest2d": False, "upsample_nearest3d": False,
    "_upsample_nearest_exact1d": False, "_upsample_nearest_exact2d": False, "_upsample_nearest_exact3d": False,
    "upsample_linear1d": True, "upsample_bilinear2d": True, "upsample_trilinear3d": True,
    "upsample_bicubic2d": True, "_upsample_bilinear2d_aa": True, "_upsample_bicubic2d_aa": True,
}


@contextlib.contextmanager
def eager_upsampling():
    """Under the Python dispatcher (`python_dispatcher`): F.interpolate traced as the one upsample
    op eager runs (aten.upsample_nearest2d.default and its backward), not as the Python
    decomposition's index and arithmetic ops, with the output size still symbolic.

    The .vec overloads' Python kernels (`torch._decomp.decompositions`, registered with `py_impl`
    for CompositeImplicitAutograd and Autograd) are replaced for the duration by one that computes
    the size as they do (`upsample_compute_output_size`) and calls the .default overload with the
    Python dispatcher off, which the C++ dispatcher records as one op. Only where that op and its
    backward have Python meta kernels (`torch._meta_registrations`: 2-D nearest, nearest-exact and
    antialiased bilinear on 2.11 and 2.13), which take symbolic sizes where the C++ ones pin them;
    the others keep the decomposition."""
    from torch._C import DispatchKey
    from torch._decomp import global_decomposition_table
    from torch._decomp.decompositions import upsample_compute_output_size
    from torch._dispatch.python import no_python_dispatcher

    metas = global_decomposition_table["meta"]

    def kernel(default, align):
        def run(input, output_size, *rest):
            corners, scale_factors = rest if align else (None, rest[0])
            osize = upsample_compute_output_size(input.size(), output_size, scale_factors)
            scales = list(scale_factors) if scale_factors else [None] * len(osize)
            with no_python_dispatcher():
                return default(input, osize, *([corners] if align else []), *scales)
        return run

    keys = (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)
    saved = []
    for name, align in _UPSAMPLE_VEC.items():
        packet = getattr(torch.ops.aten, name, None)
        vec, default = getattr(packet, "vec", None), getattr(packet, "default", None)
        backward = getattr(getattr(torch.ops.aten, f"{name}_backward", None), "default", None)
        if vec is None or default not in metas or backward not in metas:
            continue
        saved.append((vec, {k: vec.py_kernels.get(k) for k in keys}))
        for k in keys:
            vec.py_kernels[k] = kernel(default, align)
        vec._dispatch_cache.clear()
    try:
        yield
    finally:
        for vec, previous in saved:
            for k, fn in previous.items():
                if fn is None:
                    vec.py_kernels.pop(k, None)
                else:
                    vec.py_kernels[k] = fn
            vec._dispatch_cache.clear()


_CONV_OPS = ("convolution.default", "_convolution.default", "convolution_backward.default")


def _cpu_conv_format(input_, weight, kwargs: dict):
    """The memory format eager's CPU convolution gives its output (and a backward its input and
    weight gradients) for these operands: the backend torch picks for CPU tensors of their
    sizes and strides (at the trace's hints), and that backend's format. None where it cannot be
    told (sizes without a hint, or operands too large to stand in for: their memory is
    allocated, never touched)."""
    try:
        def hint(v):
            return int(v.node.hint) if isinstance(v, torch.SymInt) else int(v)

        def cpu(t):
            return torch.empty_strided([hint(v) for v in t.shape], [hint(v) for v in t.stride()], dtype=t.dtype)
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():
            x, w = cpu(input_), cpu(weight)
            select = {k: [hint(v) for v in kwargs[k]] for k in ("stride", "padding", "dilation", "output_padding")}
            select.update(transposed=bool(kwargs["transposed"]), groups=hint(kwargs["groups"]))
            bias = kwargs.get("bias")
            if bias is not None:    # a convolution's bias; a backward's bias_sizes
                select["bias"] = cpu(bias)
            else:
                sizes = kwargs.get("bias_sizes")
                select.update(bias=None, bias_sizes=[hint(v) for v in sizes] if sizes is not None else None)
            backend = torch._C._select_conv_backend(x, w, **select)
            return torch._C._conv_determine_backend_memory_format(x, w, backend)
    except (TypeError, RuntimeError, AttributeError, ValueError, MemoryError):
        return None


@contextlib.contextmanager
def eager_conv_layouts():
    """Around tracing on the meta device: a convolution's output (and a convolution backward's
    input and weight gradients) laid out as eager on a CPU lays it out, channels-last where the
    input or weight suggests it (oneDNN and the native kernel follow their operands). FakeTensor's
    convolution decides the layout from the backend of the fake device, and the meta device's
    (`Overrideable`) leaves every output contiguous: HF ConvNeXt, whose blocks permute around
    LayerNorm, would show 1 of its 9 convolutions on a channels-last input where eager has 8.
    Wraps the convolution entries of `torch._subclasses.fake_impls`'s registry."""
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import FakeTensor
    registry = fake_impls.op_implementations_dict
    ops = [getattr(torch.ops.aten, name.split(".")[0]).default for name in _CONV_OPS]
    saved = {op: registry[op] for op in ops if op in registry}

    def wrap(original):
        def conv(fake_mode, func, *args, **kwargs):
            out = original(fake_mode, func, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            if not isinstance(first, FakeTensor) or first.fake_device.type != "meta" or first.dim() != 4:
                return out
            _, named = fake_impls._normalize_function_or_error(func, args=args, kwargs=kwargs,
                                                                normalize_to_only_use_kwargs=True)
            fmt = _cpu_conv_format(named["input"], named["weight"], named)
            if fmt is None or fmt == torch.contiguous_format:
                return out

            def convert(t):
                if t is None or t.dim() != 4 or t.is_contiguous(memory_format=fmt):
                    return t
                with fake_impls.in_kernel_invocation_manager(fake_mode):
                    moved = t.to(memory_format=fmt)
                return FakeTensor(fake_mode, moved, t.fake_device)
            if isinstance(out, tuple):
                return (convert(out[0]), convert(out[1]), out[2])
            return convert(out)
        return conv

    # FakeTensorMode caches op results across modes (keyed on the operands, not on the registry):
    # none made with the other layouts may answer inside, nor these outside
    from torch._subclasses.fake_tensor import FakeTensorMode
    FakeTensorMode.cache_clear()
    for op, original in saved.items():
        registry[op] = wrap(original)
    try:
        yield
    finally:
        registry.update(saved)
        FakeTensorMode.cache_clear()


@contextlib.contextmanager
def symbolic_kernels():
    """Around make_fx on symbolic fake tensors: every kernel fix above (`symbolic_matmul`,
    `symbolic_pooling`); each is a no-op on the versions that do not need it."""
    with symbolic_matmul(), symbolic_pooling():
        yield


@contextlib.contextmanager
def backward_meta(outputs: list):
    """Around `torch.autograd.grad(outputs, ...)` in a trace: each backward node records the
    forward op it differentiates (node.meta["seq_nr"]) and that it belongs to the backward
    (marked differently by version; `is_backward` reads either), and the engine's gradient
    accumulations (the sum of a tensor's gradients) are marked node.meta["is_gradient_acc"].

    Wraps `torch._functorch._aot_autograd.logging_utils.setup_stacktrace_preservation_hooks` (hooks
    on the outputs' autograd graph, as AOTAutograd installs them). Its hook after each grad_fn sets
    a stack trace ending in GRADIENT_ACC_SPECIAL_STACK, which fx copies into `is_gradient_acc`; its
    hook before the next grad_fn sets that grad_fn's forward stack trace, empty unless anomaly mode
    recorded one. Two gaps are closed here, on every version:

    - torch 2.13's `set_stack_trace([])` clears the current trace; 2.11's keeps the old one, so
      from the first grad_fn on every backward node would be marked an accumulation (and
      `attribute_modules` would give it the module of its inputs). Each grad_fn also gets
      `_clear_stale_stack_trace` as a pre-hook after torch's: the 2.13 behaviour on both.
    - the trace is put back at the end by an engine callback that torch queues once per backward,
      guarded by the module global `logging_utils.callback_set`; a backward that raises (a failed
      capture) drops the callback and leaves the flag set for the rest of the process, after
      which every node made after a backward (the graph's output) would be marked an accumulation.
      Here the stack trace and the flag are put back as they were on the way out, whatever happens."""
    from torch._functorch._aot_autograd import logging_utils
    meta = fx_traceback.get_current_meta()
    trace_before = meta.get("stack_trace", _ABSENT)
    flag_before = getattr(logging_utils, "callback_set", _ABSENT)
    roots = [t.grad_fn for t in outputs if t.grad_fn is not None]
    logging_utils.setup_stacktrace_preservation_hooks(roots)
    seen, todo = set(), list(roots)
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if not fn.metadata.get("traceback_"):
            fn.register_prehook(_clear_stale_stack_trace)
        todo.extend(f for f, _ in fn.next_functions)
    try:
        yield
    finally:
        meta = fx_traceback.get_current_meta()
        if trace_before is _ABSENT:
            meta.pop("stack_trace", None)
        else:
            meta["stack_trace"] = trace_before
        if flag_before is not _ABSENT:
            logging_utils.callback_set = flag_before


_ABSENT = object()


def _clear_stale_stack_trace(grad_outputs) -> None:
    """Pre-hook of a grad_fn without a recorded forward stack: no stack trace while it runs (see
    `backward_meta`)."""
    fx_traceback.get_current_meta().pop("stack_trace", None)


@contextlib.contextmanager
def backward_meta_fields():
    """Around make_fx: make the marker of backward nodes reach node.meta on every version.

    torch 2.13's hooks set current_meta["autograd_backward"], which fx's create_node copies to
    node.meta. torch 2.11 has no such marker; its hooks keep current_meta["in_grad_fn"] (> 0
    while a grad_fn runs), which create_node does not copy. Here "in_grad_fn" is added to
    `torch.fx.proxy._COPY_META_FIELDS` (the fields copied to every new node) for the duration,
    on versions without `torch.fx.traceback._mark_autograd_backward` only."""
    fields = getattr(fx_proxy, "_COPY_META_FIELDS", None)
    add = (not hasattr(fx_traceback, "_mark_autograd_backward") and isinstance(fields, list)
           and "in_grad_fn" not in fields)
    if add:
        fields.append("in_grad_fn")
    _reset_stacktrace_hooks()
    try:
        yield
    finally:
        _reset_stacktrace_hooks()
        if add:
            fields.remove("in_grad_fn")


def _reset_stacktrace_hooks() -> None:
    """The stack-trace hooks of `preserve_backward_meta` queue, once per backward, an engine callback
    that puts the stack trace back when the backward ends, and remember in a module global that it is
    queued. A backward that raised (a capture that failed) never runs it, the global stays set, and
    every later backward in the process leaves its last stack trace, the one that marks gradient
    accumulations, on the nodes traced after it. Each capture starts and ends with it cleared."""
    from torch._functorch._aot_autograd import logging_utils
    if hasattr(logging_utils, "callback_set"):
        logging_utils.callback_set = False


@contextlib.contextmanager
def copied_meta_field(name: str):
    """Around make_fx: copy current_meta[name] to every node made (fx copies only the fields in
    `torch.fx.proxy._COPY_META_FIELDS`)."""
    fields = getattr(fx_proxy, "_COPY_META_FIELDS", None)
    add = isinstance(fields, list) and name not in fields
    if add:
        fields.append(name)
    try:
        yield
    finally:
        if add:
            fields.remove(name)


def is_backward(node: fx.Node) -> bool:
    """Whether a traced node was made by the backward: inside a grad_fn, or the engine's gradient
    accumulation between grad_fns ("is_gradient_acc", set by fx's create_node on both versions).
    torch 2.13: node.meta["autograd_backward"]; torch 2.11: node.meta["in_grad_fn"] (see
    `backward_meta_fields`)."""
    meta = node.meta
    return bool(meta.get("autograd_backward") or meta.get("in_grad_fn") or meta.get("is_gradient_acc"))


def python_dispatcher(enabled: bool = True):
    """Around make_fx: PyTorch's Python dispatcher (`torch._dispatch.python`), which runs the Python
    decompositions of C++ composite kernels, so that sizes those kernels read as plain integers
    stay symbolic. A no-op context when `enabled` is False."""
    if not enabled:
        return contextlib.nullcontext()
    from torch._dispatch.python import enable_python_dispatcher
    return enable_python_dispatcher()


# --- the private APIs the rest of the package uses, one small function each --------------------

def new_shape_env():
    """A symbolic shape environment that does not merge equal sizes into one symbol (duck shaping
    off): batch and seq stay two symbols even when their hints are equal."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    return ShapeEnv(duck_shape=False)


def fake_mode(shape_env):
    """A FakeTensorMode over `shape_env` (torch._subclasses.fake_tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(shape_env=shape_env)


FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"    # logs every failing meta kernel
FAKE_TENSOR_MODULE = "torch._subclasses.fake_tensor"    # where C++ kernels' concrete size reads land


def symbolic_size(shape_env, name: str, hint: int):
    """(sympy symbol, SymInt) of a new size named `name`, traced at `hint`, never specialised to it."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic
    source = ConstantSource(f"dim_{name}")
    sym = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
    return sym, shape_env.create_symintnode(sym, hint=hint, source=source)


def on_guard_location(shape_env, locate) -> None:
    """Make every guard and range `shape_env` records carry `locate(frame)` ("file:line in func") as
    its user location, and `framework(frame)`'s label, by replacing its stack summary (without
    dynamo, PyTorch only knows the torch frame that asked). `locate` returns (user_loc, framework_loc)."""
    from torch._guards import SLoc

    def stack_summary(is_debug: bool = False, framework_loc=None):
        import sys
        user, framework = locate(sys._getframe(1))
        return SLoc(framework_loc or framework, user or None), ""
    shape_env._get_stack_summary = stack_summary


def replacement_framework_loc(shape_env, sym) -> object:
    """The framework location recorded with the replacement (pin) of `sym`, or None."""
    sloc = shape_env.replacements_slocs.get(sym)
    return getattr(sloc, "framework_loc", None)


def trace(fn, *args):
    """make_fx of `fn` on `args` (fake tensors already), without fx's per-call torch-function
    metadata mode (the capture records module paths itself), with `data_constants_on_meta` on."""
    from torch.fx.experimental.proxy_tensor import make_fx
    with data_constants_on_meta():
        return make_fx(fn, tracing_mode="real", _disable_torch_fn_metadata_mode=True)(*args)


def _is_meta_device(device) -> bool:
    if device is None:
        return False
    try:
        return torch.device(device).type == "meta"
    except (RuntimeError, TypeError):
        return False


def _default_device():
    get = getattr(torch, "get_default_device", None)
    return get() if get is not None else None


class _DataConstantsOnMeta(torch.overrides.TorchFunctionMode):
    """See `data_constants_on_meta`."""

    _FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FROM_DATA and args and not isinstance(args[0], torch.Tensor):
            device = kwargs.get("device")           # keyword-only in all three
            if _is_meta_device(device if device is not None else _default_device()):
                kwargs["device"] = "cpu"
                requires_grad = kwargs.pop("requires_grad", False)
                kwargs.pop("pin_memory", None)
                out = func(*args, **kwargs).to("meta")
                return out.requires_grad_() if requires_grad else out
        elif func is torch.Tensor.new_tensor and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            self_, data = args[0], args[1]
            device = kwargs.get("device", self_.device)
            if _is_meta_device(device):
                out = torch.tensor(data, dtype=kwargs.get("dtype") or self_.dtype, device="cpu").to("meta")
                return out.requires_grad_() if kwargs.get("requires_grad") else out
        return func(*args, **kwargs)


@functools.cache
def _meta_data_escapes_fake() -> bool:
    """Whether `torch.tensor(data, device="meta")` under a FakeTensorMode gives a plain meta tensor
    (see `data_constants_on_meta`); True on torch 2.11 to 2.13. Probed once, with the modes of a
    capture that may be running set aside."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes(), torch._C.DisableTorchFunction(), FakeTensorMode():
        return not isinstance(torch.tensor(0.0, device="meta"), FakeTensor)


def data_constants_on_meta():
    """Around make_fx on fake meta tensors: a tensor made from Python data on the meta device
    (`torch.tensor(0.0, device=x.device)`, `torch.as_tensor`, `torch.asarray`, `x.new_tensor`)
    becomes a graph constant, as it would on any other device.

    On every supported torch version (2.11 to 2.13) the C++ constructor (internal_new_from_data in
    torch/csrc/utils/tensor_new.cpp) takes a shortcut for the meta device: it returns
    `at::empty(sizes, device=meta)` with the fake and proxy modes excluded and without the
    `lift_fresh` through which make_fx and FakeTensorMode see constants, so the result is a plain
    meta tensor, and the next op fails with "Please convert all Tensors to FakeTensors first".
    (transformers 5.17's sdpa mask does this, `torch.tensor(0.0, device=mask.device)`; 5.24 uses
    `torch.zeros((), device=...)`.) Here such a call is made on the CPU and moved to the meta device,
    which is what the constructor does for every other device: the graph gets
    `lift_fresh_copy(_tensor_constantN)` and `_to_copy(device=meta)`, with the data. Wraps a
    `torch.overrides.TorchFunctionMode`; data that is already a tensor is left alone. A no-op
    context on a torch whose constructor gives a fake tensor there (`_meta_data_escapes_fake`)."""
    return _DataConstantsOnMeta() if _meta_data_escapes_fake() else contextlib.nullcontext()


def trace_plain(fn, *args):
    """make_fx of `fn` as is (the math attention decomposition)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(fn, tracing_mode="real")(*args)


def reparametrize(module, state: dict):
    """Context: `module` with the tensors of `state` in place of its parameters and buffers
    (torch.nn.utils.stateless._reparametrize_module, tied weights kept tied)."""
    from torch.nn.utils.stateless import _reparametrize_module
    return _reparametrize_module(module, state, tie_weights=True)


def tree_leaves(tree) -> list:
    from torch.utils._pytree import tree_leaves as leaves
    return leaves(tree)


def tree_flatten(tree) -> tuple[list, object]:
    from torch.utils._pytree import tree_flatten as flatten
    leaves, spec = flatten(tree)
    return leaves, spec


def tree_unflatten(leaves: list, spec):
    from torch.utils._pytree import tree_unflatten as unflatten
    return unflatten(leaves, spec)


def tree_map(fn, tree):
    from torch.utils._pytree import tree_map as tmap
    return tmap(fn, tree)


def storage_key(t: torch.Tensor):
    """An identity of a tensor's storage, the same for every view of it (its C pointer)."""
    return t.untyped_storage()._cdata


def wrapped_tensors(t: torch.Tensor) -> list[torch.Tensor] | None:
    """The inner tensors of a traceable wrapper subclass (DTensor's local shard, ...), None for a
    plain tensor: a wrapper's own storage is empty, its inner tensors hold the bytes
    (torch.utils._python_dispatch.is_traceable_wrapper_subclass, __tensor_flatten__)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if not is_traceable_wrapper_subclass(t):
        return None
    names, _ = t.__tensor_flatten__()
    return [x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor)]


@contextlib.contextmanager
def eager_selective_checkpointing():
    """Selective activation checkpointing (torch.utils.checkpoint's policies) as eager runs it,
    while make_fx traces. Under a proxy mode `torch.utils.checkpoint._is_compiling` says True and
    SAC then keeps every op's output and only tags the graph for the compiler's partitioner to
    decide; eager PyTorch keeps what the policy saves and recomputes the rest in the backward,
    which is what the capture must see. Same function name in torch 2.11 to 2.13."""
    import torch.utils.checkpoint as ckpt
    original = ckpt._is_compiling
    ckpt._is_compiling = lambda func, args, kwargs: False
    try:
        yield
    finally:
        ckpt._is_compiling = original


def dispatch_mode_class():
    """torch.utils._python_dispatch.TorchDispatchMode: what the live-storage meter subclasses."""
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


def fused_sdp_choice(q, k, v, mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool) -> int:
    """torch._fused_sdp_choice: the SDPA backend PyTorch runs for these inputs on their device
    (1 is flash; on the CPU, 0 is math)."""
    return int(torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa))


def traced_node(t: torch.Tensor):
    """The graph node a tensor of the running make_fx trace is, or None outside a trace."""
    from torch.fx.experimental.proxy_tensor import get_innermost_proxy_mode, get_proxy_slot
    mode = get_innermost_proxy_mode()
    if mode is None:
        return None
    slot = get_proxy_slot(t, mode.tracer, None)
    proxy = getattr(slot, "proxy", None)
    return getattr(proxy, "node", None)


def in_trace() -> bool:
    """Whether a make_fx trace is running (its proxy mode is active)."""
    from torch.fx.experimental.proxy_tensor import get_innermost_proxy_mode
    return get_innermost_proxy_mode() is not None


def disable_proxy_tracing():
    """Context: ops run without being recorded by the running make_fx trace (its fake mode stays)."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
    return disable_proxy_modes_tracing()


def no_dispatch_modes():
    """Context: no TorchDispatchMode active (neither the trace's proxy mode nor its fake mode)."""
    from torch.utils._python_dispatch import _disable_current_modes
    return _disable_current_modes()


def current_node_meta() -> dict:
    """The meta dict fx copies into every node it creates now (torch.fx.traceback's current meta)."""
    return fx_traceback.get_current_meta()


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are installed (activation checkpointing runs under them)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def autocast_state() -> tuple:
    """Autocast on/off and dtype per device kind, as ops read it now."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))


def size_hint(s) -> int:
    """The concrete value a traced size stands for (its hint); an int as is."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise ValueError(f"size {s} has no hint (a data-dependent size)")
        return int(hint)
    return int(s)


def last_traced_node():
    """The node most recently added to the running make_fx trace, or None."""
    from torch.fx.experimental.proxy_tensor import get_innermost_proxy_mode
    mode = get_innermost_proxy_mode()
    if mode is None:
        return None
    last = next(iter(reversed(mode.tracer.graph.nodes)), None)
    return last if last is not None and last.op != "root" else None


def is_op_overload(target) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def is_higher_order_op(target) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator)


def rnn_functions() -> set:
    """The C++ composite RNN entry points nn.RNN/LSTM/GRU call (torch._VF)."""
    return {torch._VF.gru, torch._VF.lstm, torch._VF.rnn_tanh, torch._VF.rnn_relu}


def sympy_functions():
    """torch.utils._sympy.functions: the sympy functions shapes are written in (FloorDiv, ...)."""
    import torch.utils._sympy.functions as functions
    return functions


def profiler_allocations(prof) -> list[tuple[int, int]]:
    """(time ns, bytes) of every CPU allocation and free (negative) a torch.profiler run recorded."""
    from torch._C._profiler import _EventType
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    return sorted(events)


def scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm: the float8 matmul (Hopper, Ada)."""
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype)
