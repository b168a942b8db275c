"""Model + input specs -> an fx graph of aten ops with symbolic shapes; the one place make_fx runs.

Weights are never allocated: the factory runs under `torch.device("meta")`, and tracing runs on
fake tensors. Parameters and buffers keep their concrete shapes; each named dimension of the
inputs becomes one shape-environment symbol, renamed to the user's name when costs are computed.

Inference: one forward in eval mode under no_grad. Train: a joint graph of forward, loss and
`torch.autograd.grad` (the backward is traced op by op, not estimated). Every call node carries
`node.meta["costmodel_module"]` (the module path; backward nodes get the forward module they
differentiate) and `node.meta["costmodel_phase"]` ("forward", "loss" or "backward").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import linecache
import logging
import os
import re
import sys
import traceback
import weakref
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from costmodel import _torch
from costmodel.capture import zoo
from costmodel.errors import AnalysisError, CostModelError, UsageError
from costmodel.capture.blocks import COPY, RepeatedBlocks, Unrepeatable
from costmodel.capture.checkpointing import checkpointed
from costmodel.capture.eager_paths import eager_decisions
from costmodel.capture import generate as gen
from costmodel.capture.loss import compute_loss, first_output, tensors_of as _tensors
from costmodel.capture.moe import balanced_experts
from costmodel.capture.sdpa import route_sdpa
from costmodel.capture.specs import InputSpec, parse_input
from costmodel.symbols import dim_symbol

ROOT = "(root)"   # how the root module is named in module paths; others are named_modules() names


@dataclass
class Guard:
    """A condition on the dimensions under which a captured graph is valid (e.g. seq <= 4096)."""

    expr: sympy.Basic       # in the user's dimension symbols
    where: str              # source location that introduced it, when known

    def holds(self, values: dict[sympy.Symbol, int]) -> bool:
        """Whether the condition holds at `values` (a guard that cannot be evaluated there, e.g. a
        modulo by a size that is 0 at that point, does not hold: the model cannot run there)."""
        try:
            result = self.expr.xreplace({s: sympy.Integer(v) for s, v in values.items()})
        except (ZeroDivisionError, ValueError, TypeError):
            return False
        if result in (sympy.true, sympy.false) or isinstance(result, bool):
            return bool(result)
        if result.free_symbols:       # a dimension without a value: cannot say it fails
            return True
        return False                  # a number where a condition was expected (nan, zoo): no

    def __str__(self) -> str:
        return f"{self.expr}" + (f" (from {self.where})" if self.where else "")


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    inputs: list[InputSpec]
    no_inputs: str = ""     # why a model that usually brings default inputs has none
    default_dims: dict = field(default_factory=dict)   # sizes for dimensions the user gives none


@dataclass
class Captured:
    graph: fx.GraphModule
    mode: str
    dims: list[str]                          # the symbolic dimensions, user names
    fixed: dict[str, int]                    # dimensions captured at one concrete value
    guards: list[Guard]
    symbol_map: dict[sympy.Symbol, sympy.Expr]   # shape-env symbol -> expression in user symbols
    shape_env: object                          # torch's ShapeEnv
    roles: dict[str, tuple[str, str]] = field(default_factory=dict)  # placeholder -> (param|buffer|input, name)
    trainable: set[str] = field(default_factory=set)                # names of parameters that get grads
    hints: dict[str, int] = field(default_factory=dict)
    limits: list = field(default_factory=list)   # limits.Limit found in the graph (tables indexed by positions)
    module_calls: int = 0    # nn.Module forward calls in one forward: each costs its eager dispatch
    grad_params: list[str] = field(default_factory=list)   # train: the parameter of each returned gradient
    notes: list[str] = field(default_factory=list)         # assumptions the capture made, for the report
    copied: dict[str, str] = field(default_factory=dict)   # block path -> the block whose trace it copies
    inline_blocks: dict[str, str] = field(default_factory=dict)   # repeated block traced each time -> why
    step: object = None                          # generate mode: capture.generate.Step (prefill or decode)
    cache_layers: tuple = ()                     # generate mode: the cache after the step, gen.LayerShape per layer
    cache_bytes: sympy.Expr | None = None        # generate mode: bytes of the cache's keys and values after the step

    def to_user(self, value) -> sympy.Expr:
        """A SymInt / int / sympy expression of the shape env -> sympy in the user's dimension names."""
        if isinstance(value, torch.SymInt):
            value = value.node.expr
        elif isinstance(value, (int, bool)):
            return sympy.Integer(int(value))
        elif isinstance(value, (torch.SymFloat, torch.SymBool, float)):
            return value
        expr = self.shape_env.replace(value)
        return expr.xreplace(self.symbol_map)


# --- loading ------------------------------------------------------------------------------------

def resolve_source(source: str, trust_remote_code: bool = False) -> tuple[str, object, list[InputSpec], str, dict]:
    """A MODEL string -> (name, factory, default inputs, why there are none, default sizes).
    Hugging Face configs (hf:ORG/NAME, a config.json or a directory holding one) are recognised
    first, then zoo names, then FILE.py:FUNC and package.module:FUNC."""
    from costmodel.capture import hf
    if hf.is_hf_source(source):
        model = hf.resolve(source, trust_remote_code)
        return source, model.build, [parse_input(s) for s in model.inputs], model.no_inputs, model.default_dims
    if ":" not in source:
        if os.path.isdir(source) and source not in zoo.ZOO:
            hf.local_config_path(source)   # raises: the directory holds no config.json
        entry = zoo.get(source)
        return entry.name, entry.build, [parse_input(s) for s in entry.inputs], "", entry.default_dims
    return source, _import_factory(source), [], "", {}


def load_model(source: str | nn.Module, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    """A zoo name, hf:ORG/NAME, a config.json (or its directory), `file.py:FUNC`, `package.module:FUNC`,
    a callable or a module -> the model on meta. `trust_remote_code`: a Hugging Face config's
    auto_map code may run (off by default)."""
    default_inputs: list[InputSpec] = []
    no_inputs, default_dims = "", {}
    if isinstance(source, nn.Module):
        name, factory = type(source).__name__, (lambda: source)
    elif callable(source):
        name, factory = getattr(source, "__name__", "model"), source
    elif isinstance(source, str):
        name, factory, default_inputs, no_inputs, default_dims = resolve_source(source, trust_remote_code)
    else:
        raise UsageError(f"model {source!r} is not a zoo name, hf:ORG/NAME, config.json, FILE.py:FUNC, "
                         "package.module:FUNC or nn.Module")
    try:
        with torch.device("meta"):
            module = factory()
    except CostModelError:
        raise
    except Exception as e:
        raise AnalysisError(f"the factory of {name} raised {type(e).__name__}: {e}{_user_frame(e)}") from e
    if not isinstance(module, nn.Module):
        raise AnalysisError(f"the factory of {name} returned {type(module).__name__}, not a torch.nn.Module")
    if dtype != torch.float32:
        module = module.to(dtype)
    return LoadedModel(name, module, default_inputs, no_inputs, default_dims)


def _import_factory(source: str):
    path, _, func = source.rpartition(":")
    if not path or not func.isidentifier():
        raise UsageError(f"model {source!r}: expected FILE.py:FUNC or package.module:FUNC with FUNC a name")
    try:
        if path.endswith(".py") or os.sep in path:
            if not os.path.isfile(path):
                raise UsageError(f"model file {path!r} does not exist (from {source!r})")
            mod_name = f"costmodel_user_{abs(hash(os.path.abspath(path)))}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(path)
    except UsageError:
        raise
    except ModuleNotFoundError as e:
        raise UsageError(f"model {source!r}: cannot import {path!r} ({e})") from e
    except Exception as e:
        raise AnalysisError(f"model {source!r}: importing {path} raised {type(e).__name__}: {e}"
                            f"{_user_frame(e)}") from e
    if not hasattr(module, func):
        public = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise UsageError(f"model {source!r}: {path} has no {func!r}; callables there: {', '.join(public[:12])}")
    return getattr(module, func)


# --- capture ------------------------------------------------------------------------------------

def capture(model: nn.Module, inputs: list[InputSpec], options=None, hints: dict[str, int] | None = None,
            fixed: dict[str, int] | None = None, step=None) -> Captured:
    """Trace `model` on fake inputs whose named dimensions are symbols (or, for `fixed`, integers),
    as `options` (costmodel.options.Options) say: inference, or a training step (forward, loss
    against `options.targets`, backward); with `options.amp`, the forward and loss under autocast
    to bfloat16, emulated by capture.amp since autocast does nothing to meta tensors.

    C++ composite kernels that read sizes as plain integers pin the dimensions they touch; the
    common ones (RNNs, upsampling, padding) are routed to their Python decompositions (see
    capture.sdpa.route_sdpa). If a dimension is still pinned by such a read, the model is traced
    again with PyTorch's Python dispatcher on for every op, and that trace is kept if it pins fewer
    dimensions.

    Repeated blocks are traced once and copied (capture.blocks), unless `options.repeated_blocks`
    is False; a trace that finds a copy could not be exact is made again with every block traced.

    Generate mode (`step`, a capture.generate.Step): the prefill, or the decode step on a cache of
    `ctx` tokens (see capture/generate.py)."""
    from costmodel.options import Options
    options = options or Options()
    first = _capture_blocks(model, inputs, options, hints, fixed, python_dispatcher=False, step=step)
    if not _pinned_by_size_reads(first):
        return first
    try:
        second = _capture_blocks(model, inputs, options, hints, fixed, python_dispatcher=True, step=step)
    except CostModelError:
        return first
    return second if len(pinned_dims(second)) < len(pinned_dims(first)) else first


# what earlier captures of a model learned: the blocks to trace inline (and why), per mode, so that
# the captures of a limit search or a sweep do not each find it out again
_INLINE_LEARNED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _capture_blocks(model, inputs, options, hints, fixed, python_dispatcher: bool, step=None) -> "Captured":
    kind = step.kind if step is not None else None        # generate mode: the prefill and the decode step apart
    learned = _INLINE_LEARNED.setdefault(model, {}).setdefault((options.mode, options.amp, kind), {})
    reasons: dict[str, str] = dict(learned)
    if "(every block)" in reasons:
        c = _capture(model, inputs, options, hints, fixed, python_dispatcher, repeated=False, step=step)
        c.inline_blocks.update(reasons)
        return c
    exclude: frozenset = frozenset(reasons)
    while True:
        try:
            c = _capture(model, inputs, options, hints, fixed, python_dispatcher, exclude=exclude, step=step)
            break
        except Unrepeatable as e:
            if e.paths is None or e.paths <= exclude:
                c = _capture(model, inputs, options, hints, fixed, python_dispatcher, repeated=False, step=step)
                reasons["(every block)"] = str(e)
                break
            reasons.update(dict.fromkeys(e.paths, str(e)))
            exclude |= e.paths
    learned.update(reasons)
    c.inline_blocks.update(reasons)
    return c


def _pinned_by_size_reads(c: "Captured") -> bool:
    env = c.shape_env
    for sym in c.symbol_map:
        rep = env.replacements.get(sym)
        if rep is not None and rep.is_number and _torch.replacement_framework_loc(env, sym) == CONCRETE_SIZE_READ:
            return True
    return False


def pinned_dims(c: "Captured") -> set[str]:
    """The symbolic dimensions the trace specialised to one value."""
    return {str(u) for sym, u in c.symbol_map.items()
            if (rep := c.shape_env.replacements.get(sym)) is not None and rep.is_number}


def _capture(model: nn.Module, inputs: list[InputSpec], options, hints, fixed, python_dispatcher: bool,
             repeated: bool = True, exclude: frozenset = frozenset(), step=None) -> Captured:
    mode, amp = options.mode, options.amp
    targets = list(options.targets) if mode == "train" else []
    hints, fixed = dict(hints or {}), dict(fixed or {})
    dims = list(dict.fromkeys([d for spec in inputs + targets for d in spec.dim_names]
                              + (step.extra_dims if step is not None else [])))
    shape_env = _torch.new_shape_env()
    _torch.on_guard_location(shape_env, _guard_location)
    fake_mode = _torch.fake_mode(shape_env)

    sizes: dict[str, int | torch.SymInt] = {}
    symbol_map: dict[sympy.Symbol, sympy.Expr] = {}
    for i, name in enumerate(dims):
        if name in fixed:
            sizes[name] = fixed[name]
            continue
        sym, sizes[name] = _torch.symbolic_size(shape_env, name, hints.get(name, default_hint(name, i)))
        symbol_map[sym] = dim_symbol(name)

    model.train(mode == "train")
    param_items = list(model.named_parameters())
    buffer_items = list(model.named_buffers())
    with fake_mode:
        params = [fake_mode.from_tensor(p, static_shapes=True).requires_grad_(p.requires_grad and mode == "train")
                  for _, p in param_items]
        buffers = [fake_mode.from_tensor(b, static_shapes=True) for _, b in buffer_items]
        values = [torch.empty([sizes[d] if isinstance(d, str) else d for d in spec.dims], dtype=spec.dtype,
                              device="meta") for spec in inputs + targets]
        decode_cache, extra_roles = None, []
        if step is not None and step.kind == "decode":
            decode_cache = gen.DecodeCache(model, step, sizes.get("batch"), sizes[gen.CTX], sizes)
            values += decode_cache.placeholders()
            extra_roles = [(gen.CACHE_ROLE, n) for n in decode_cache.names()]
            if isinstance(sizes[gen.CTX], torch.SymInt):
                values.append(sizes[gen.CTX])
                extra_roles.append((gen.SIZE_ROLE, gen.CTX))
    call = call_plan(model, inputs)
    filled: dict = {}

    def describe(shape) -> str:
        """A traced shape in the user's dimension names, for errors."""
        return "[" + ", ".join(str(s.node.expr.xreplace(symbol_map)) if isinstance(s, torch.SymInt) else str(s)
                               for s in shape) + "]"
    trainable = [i for i, (_, p) in enumerate(param_items) if p.requires_grad]

    def traced_state(params, buffers):
        """The model with the traced tensors in place of its meta parameters and buffers."""
        state = {n: t for (n, _), t in zip(param_items, params)} | {n: t for (n, _), t in zip(buffer_items, buffers)}
        return _torch.reparametrize(model, state)

    def inference(params, buffers, values):
        args, kwargs = call(values)
        with torch.no_grad(), traced_state(params, buffers):
            return _tensors(model(*args, **kwargs))

    def train_step(params, buffers, values):
        args, kwargs = call(values)
        # The whole step, backward included, runs with the traced tensors in place: activation
        # checkpointing re-runs parts of the forward during the backward.
        with traced_state(params, buffers):
            loss_value = compute_loss(model(*args, **kwargs), options.loss, values[:len(inputs)], inputs,
                                      values[len(inputs):], targets, describe)
            wrt = [params[i] for i in trainable]
            with _torch.backward_meta([loss_value]):
                grads = torch.autograd.grad(loss_value, wrt, allow_unused=True)
        grad_params[:] = [param_items[i][0] for i, g in zip(trainable, grads) if g is not None]
        return [loss_value] + [g for g in grads if g is not None]

    def generation_step(params, buffers, values):
        """The prefill (an empty cache) or the decode step (a cache of ctx tokens), as generate calls it."""
        n = len(inputs)
        if decode_cache is None:
            cache = gen.new_cache(model, step.kv_dtype)
        else:
            k = len(decode_cache.stored) * 2
            cache = decode_cache.install(values[n:n + k], values[n + k] if len(values) > n + k else sizes[gen.CTX])
        args, kwargs = call(values[:n])
        kwargs = kwargs | gen.call_kwargs(model, cache)
        with torch.no_grad(), traced_state(params, buffers):
            out = model(*args, **kwargs)
        filled["cache"] = gen.returned_cache(model, out, cache)
        return [first_output(out)] + gen.cache_tensors(filled["cache"])

    grad_params: list[str] = []
    fn = generation_step if step is not None else train_step if mode == "train" else inference
    if amp:
        from costmodel.capture.amp import emulate_autocast
        fn = emulate_autocast(fn, amp)
    if mode == "train" and not trainable:
        raise UsageError("--mode train needs parameters that require grad; this model has none")
    fake_log = logging.getLogger(_torch.FAKE_TENSOR_LOGGER)
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)   # it logs every failing meta kernel; our error says it once
    n_state = len(params) + len(buffers)

    def is_input(node: fx.Node) -> bool:
        """A placeholder of the inputs (they follow the parameters and buffers)."""
        placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
        return placeholders.index(node) >= n_state

    paths = ModulePaths(model)
    blocks = RepeatedBlocks(model, paths, train=mode == "train", enabled=options.repeated_blocks and repeated,
                            exclude=exclude)
    checkpointing = options.checkpointing if mode == "train" else "none"
    try:
        with _torch.symbolic_kernels(), _torch.eager_conv_layouts(), _torch.backward_meta_fields(), fake_mode, paths, \
                fx_traceback.preserve_node_meta(), route_sdpa(options.device), _torch.copied_meta_field(PYTHON_CALL), \
                _PythonCalls(), eager_decisions(is_input), \
                balanced_experts(model, options.moe_imbalance), _torch.python_dispatcher(python_dispatcher), \
                contextlib.ExitStack() as stack:
            # --checkpointing blocks/selective: the stand-in of a repeated block wraps its checkpointed
            # forward, so one block's trace (recomputation included) is copied to the others. ops: the
            # selective-checkpoint policy keeps outputs a copy does not place alike (a few bytes off),
            # so the checkpoint wraps the stand-in, which then runs inline under saved-tensor hooks.
            if checkpointing == "ops":
                stack.enter_context(blocks)
            ckpt = stack.enter_context(checkpointed(model, checkpointing))
            if checkpointing != "ops":
                stack.enter_context(blocks)
            gm = _torch.trace(fn, params, buffers, values)
        blocks.splice(gm)
    except (CostModelError, Unrepeatable):
        raise
    except Exception as e:
        raise AnalysisError(_capture_failure(e, symbol_map)) from e
    finally:
        fake_log.setLevel(level)
        blocks.close()

    roles = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = ([("param", n) for n, _ in param_items] + [("buffer", n) for n, _ in buffer_items]
             + [("input", s.name) for s in inputs + targets] + extra_roles)
    for node, role in zip(placeholders, names):
        roles[node.name] = role
    attribute_modules(gm.graph)
    used_hints = {d: int(sizes[d]) if not isinstance(sizes[d], torch.SymInt) else sizes[d].node.hint
                  for d in dims if d not in fixed}
    captured = Captured(gm, mode, [d for d in dims if d not in fixed], fixed, [], symbol_map, shape_env, roles,
                        {param_items[i][0] for i in trainable}, used_hints, step=step, module_calls=paths.count,
                        grad_params=grad_params)
    captured.copied = blocks.copied()
    captured.inline_blocks = dict(blocks.reasons)
    if step is not None:
        from costmodel.formulas import plain
        captured.cache_layers = gen.layer_shapes(filled["cache"], lambda s: sympy.expand(plain(captured.to_user(s))))
        captured.cache_bytes = sympy.expand(plain(captured.to_user(
            gen.tensor_bytes(gen.cache_tensors(filled["cache"])))))
    captured.guards = _guards(captured)
    if ckpt is not None and ckpt.mode == "selective" and not ckpt.recomputed_attention:
        captured.notes.append(f"--checkpointing selective recomputes the scaled_dot_product_attention calls in "
                              f"the repeated blocks ({ckpt.blocks.parent}.*), but they make none (attention "
                              "written out as matmuls and softmax?): nothing is recomputed")
    from costmodel.capture.limits import index_limits
    captured.limits = index_limits(captured)
    return captured


def default_hint(name: str, index: int) -> int:
    """The size a dimension takes while tracing when the user gave none: distinct per dimension, so
    that no accidental equality between two dimensions is baked into the graph, and >= 2, since
    PyTorch specialises sizes 0 and 1."""
    return 2 if "batch" in name.lower() else 64 + 8 * index


def call_plan(model: nn.Module, inputs: list[InputSpec]):
    """values -> (args, kwargs) for forward(): by keyword when an input's name is a parameter of it,
    else positionally; decoders get use_cache=False, Hugging Face models return_dict=True."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    by_kw = [s.name in params for s in inputs]
    extra = {"use_cache": False} if "use_cache" in params else {}
    if "return_dict" in params:
        extra["return_dict"] = True

    def call(values):
        args = [v for v, kw in zip(values, by_kw) if not kw]
        kwargs = {s.name: v for s, v, kw in zip(inputs, values, by_kw) if kw} | extra
        return args, kwargs
    return call


class ModulePaths:
    """While tracing, the stack of module paths in fx's current node meta, which tensors each
    module's forward still holds in its local variables when it returns (see `_FrameLocals`), and
    `count`, the nn.Module calls made (eager pays a dispatch for each).
    `paused`: the hooks do nothing (capture.blocks replays a block outside the trace)."""

    def __init__(self, model: nn.Module):
        self.paths = {m: (n or ROOT) for n, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[str] = []
        self.frames = _FrameLocals(model)
        self.paused = False
        self.count = 0
        self._hooks = []

    def __enter__(self) -> "ModulePaths":
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                       nn.modules.module.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.frames.close()

    def _pre(self, module, args):
        if self.paused:
            return
        self.count += 1
        self.stack.append(self.paths.get(module, type(module).__name__))
        fx_traceback.get_current_meta()["nn_module_stack"] = tuple(self.stack)
        self.frames.enter(module)

    def _post(self, module, args, output):
        if self.paused:
            return
        if self.stack:
            self.stack.pop()
        fx_traceback.get_current_meta()["nn_module_stack"] = tuple(self.stack)
        self.frames.leave(module)


PYTHON_CALL = "costmodel_call"


class _PythonCalls(TorchFunctionMode):
    """Number each torch call the model's Python makes, in fx's current node meta (PYTHON_CALL):
    the aten ops one call produces (F.linear's t and addmm; nn.GRU's whole loop) share the number,
    and eager pays the Python binding once for them, the first. A mode does not see the calls made
    inside its own handler, so a Python-implemented function's inner calls keep the outer number.
    Copies of a repeated block (capture.blocks) keep their block's numbers: a call is told apart by
    the number and the copy (`node.meta[COPY]`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        fx_traceback.get_current_meta()[PYTHON_CALL] = self.count
        return func(*args, **(kwargs or {}))


LIVE_UNTIL = "costmodel_live_until"     # node.meta key: the name of the last node its tensor lives to


class _FrameLocals:
    """Eager Python keeps a tensor alive while a local variable names it: `inputs_embeds` in a
    decoder's forward lives until that forward returns though no op reads it after the first layer;
    `h` in `h = self.dense(x); h = self.norm(h + x)` lives through the norm. The graph does not say
    which values are bound to names, so the frames are read. The frame of each model-code forward is
    found when its first child module is called (it is the caller on the stack then); each time it
    calls a child module, the tensors its locals hold then live at least until that call returns,
    and those it still holds when it returns live until then. Each such tensor's node gets
    `node.meta[LIVE_UNTIL]` = the last node traced before the call (or the forward) returned.
    A forward that calls no child module is not read (its locals are temporaries of a few ops)."""

    def __init__(self, model: nn.Module):
        self.codes: dict[int, object] = {}
        for m in model.modules():
            forward = inspect.unwrap(type(m).forward)
            code = getattr(forward, "__code__", None)
            if code is not None and is_model_code(getattr(forward, "__module__", "") or ""):
                self.codes[id(m)] = code
        self.pending: dict[int, nn.Module] = {}      # entered, frame not found yet
        self.found: dict[int, object] = {}           # id(module) -> its forward's frame
        self.calls: list[tuple[int, list]] = []      # open module calls: (id, the caller's locals then)

    def enter(self, module: nn.Module) -> None:
        if self.pending:
            self._find_frames()
        caller = self.found.get(self.calls[-1][0]) if self.calls else None
        self.calls.append((id(module), _frame_tensors(caller) if caller is not None else []))
        if id(module) in self.codes:
            self.pending[id(module)] = module

    def _find_frames(self) -> None:
        codes = {self.codes[i] for i in self.pending}
        frame = sys._getframe(2)
        while frame is not None and self.pending:
            owner = frame.f_locals.get("self") if frame.f_code in codes else None
            if owner is not None and id(owner) in self.pending:
                self.found[id(owner)] = frame
                del self.pending[id(owner)]
            frame = frame.f_back

    def leave(self, module: nn.Module) -> None:
        held = []
        if self.calls and self.calls[-1][0] == id(module):
            held = self.calls.pop()[1]
        held = held + self._own_locals(module)
        if held:
            live_until_now(held)

    def returned(self, module: nn.Module) -> None:
        """`module`'s forward has returned inside a nested trace (capture.blocks): the tensors its
        locals still hold live until now, in that trace."""
        held = self._own_locals(module)
        if held:
            live_until_now(held)

    def _own_locals(self, module: nn.Module) -> list:
        self.pending.pop(id(module), None)
        frame = self.found.pop(id(module), None)
        return _frame_tensors(frame) if frame is not None else []

    def close(self) -> None:
        self.pending.clear()
        self.found.clear()
        self.calls.clear()


def _frame_tensors(frame) -> list[torch.Tensor]:
    return [t for v in frame.f_locals.values() for t in _tensors_shallow(v)]


def live_until_now(tensors: list[torch.Tensor]) -> None:
    """Within a trace: these tensors live at least until the last node traced so far."""
    from costmodel._torch import last_traced_node, traced_node
    last = last_traced_node()
    if last is None:
        return
    for t in tensors:
        node = traced_node(t)
        if node is not None and node is not last and node.op == "call_function":
            node.meta[LIVE_UNTIL] = last.name


def _tensors_shallow(value, depth: int = 2) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth and isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_shallow(v, depth - 1)]
    if depth and isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_shallow(v, depth - 1)]
    return []


def attribute_modules(graph: fx.Graph) -> None:
    """Set costmodel_module / costmodel_phase on every call node; backward nodes take the module of
    the forward op they differentiate (matched by autograd sequence number). The engine's gradient
    accumulations (a tensor used twice: the sum of its two gradients) take the module whose backward
    delivered the last of the gradients summed, when the sum runs. Nodes of repeated blocks
    (capture.blocks) keep what their block's own trace gave them."""
    forward_module: dict[int, str] = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or COPY in node.meta:
            continue
        stack = node.meta.get("nn_module_stack", ())
        backward = _torch.is_backward(node)
        if not backward:
            module = stack[-1] if stack else "(loss)"
            node.meta["costmodel_phase"] = "forward" if stack else "loss"
            if "seq_nr" in node.meta:   # the first node of a number made the autograd node; the
                forward_module.setdefault(node.meta["seq_nr"], module)   # rest share it, made none
        else:
            node.meta["costmodel_phase"] = "backward"
            sources = [a for a in node.all_input_nodes if "costmodel_module" in a.meta] \
                if node.meta.get("is_gradient_acc") else []
            if sources:
                module = max(sources, key=order.__getitem__).meta["costmodel_module"]
            else:
                module = forward_module.get(node.meta.get("seq_nr"), "(loss)")
        node.meta["costmodel_module"] = module


def _guards(c: Captured) -> list[Guard]:
    """What the trace assumed about the dimensions, in the user's names."""
    env = c.shape_env
    out: list[Guard] = []
    user = {s: u for s, u in c.symbol_map.items()}
    for sym, u in user.items():
        rep = env.replacements.get(sym)
        if rep is not None and rep != sym:
            out.append(Guard(sympy.Eq(u, rep.xreplace(user)), _where(env.replacements_slocs.get(sym))))
        vr = env.var_to_range.get(sym)
        slocs = env.var_to_range_sloc.get(sym)
        if vr is not None:
            if isinstance(vr.upper, sympy.Integer):
                out.append(Guard(sympy.Le(u, int(vr.upper)), _where(slocs.upper if slocs else None)))
            if isinstance(vr.lower, sympy.Integer) and vr.lower > 2:
                out.append(Guard(sympy.Ge(u, int(vr.lower)), _where(slocs.lower if slocs else None)))
    for g in env.guards:
        expr = env.simplify(g.expr).xreplace(user)
        if expr in (sympy.true, True) or not expr.free_symbols:
            continue
        out.append(Guard(expr, _where(getattr(g, "sloc", None))))
    unique: dict[str, Guard] = {}
    for g in out:   # a bound appears as a guard and as a symbol range: keep the one that says where
        if str(g.expr) not in unique or (g.where and not unique[str(g.expr)].where):
            unique[str(g.expr)] = g
    return list(unique.values())


def _where(sloc) -> str:
    """'file.py:LINE in func' of the model code that made a guard (see `_guard_location`)."""
    if sloc is None:
        return ""
    if getattr(sloc, "maybe_user_loc", None):
        return sloc.maybe_user_loc
    frame = getattr(sloc, "framework_loc", None)
    if isinstance(frame, traceback.FrameSummary):
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return str(frame or "")


# Frames of these modules are never "the model's line": PyTorch, costmodel itself, and the
# decorators and context managers that wrap a model's forward.
_NOT_MODEL_CODE = ("torch", "costmodel", "contextlib", "functools", "sympy", "transformers.utils",
                   "transformers.modeling_utils", "transformers.integrations.accelerate")


def is_model_code(module_name: str) -> bool:
    """True for a frame whose module (its `__name__`, not its file path: a user's folder may be called
    `costmodel` or `torch`) is not PyTorch, costmodel or a wrapper around the model's code."""
    return not any(module_name == m or module_name.startswith(m + ".") for m in _NOT_MODEL_CODE)


def _frame_module(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def model_location(frame=None) -> str:
    """'FILE:LINE in FUNC' of the innermost frame of model code on the current stack (or from
    `frame` outwards), '' if there is none."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        if is_model_code(_frame_module(frame)):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


def _guard_location(frame) -> tuple[str, str]:
    """(the model's own line, the framework label) for a guard made with `frame` on the stack."""
    return model_location(frame), CONCRETE_SIZE_READ if _reads_concrete_size(frame) else ""


CONCRETE_SIZE_READ = "a C++ kernel read a size as an integer"


def _reads_concrete_size(frame) -> bool:
    """Whether the guard being made comes from a C++ kernel asking for sizes as plain integers
    (aten.size.default under fake tensors), which the Python decompositions avoid."""
    while frame is not None:
        if frame.f_code.co_name == "<genexpr>" and _frame_module(frame) == _torch.FAKE_TENSOR_MODULE:
            return True
        frame = frame.f_back
    return False


def specialized(c: Captured) -> dict[str, tuple[int, str]]:
    """Dimensions the model pinned to one value while tracing: name -> (value, where)."""
    result = {}
    for g in c.guards:
        if isinstance(g.expr, sympy.Eq) and g.expr.rhs.is_Integer and g.expr.lhs.is_Symbol:
            result[str(g.expr.lhs)] = (int(g.expr.rhs), g.where)
    return result


# --- errors -------------------------------------------------------------------------------------

def _user_frame(e: BaseException) -> str:
    """' (at FILE:LINE: code)' for the deepest frame of the traceback that is model code."""
    tb, frames = e.__traceback__, []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    user = [t for t in frames if is_model_code(_frame_module(t.tb_frame))]
    if not user:
        return ""
    t = user[-1]
    filename, lineno = t.tb_frame.f_code.co_filename, t.tb_lineno
    line = linecache.getline(filename, lineno).strip()
    return f" (at {filename}:{lineno}: {line})"


def _capture_failure(e: BaseException, symbol_map: dict) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    names = {str(k): str(v) for k, v in symbol_map.items()}
    text = re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), text)
    kind = type(e).__name__
    cause = ""
    if "DataDependent" in kind or "data-dependent" in str(e) or "data dependent" in str(e):
        cause = (" Likely cause: data-dependent control flow or output sizes (an `if` on tensor values, "
                 "`.item()`, `.tolist()`, `nonzero`), which a symbolic capture cannot follow.")
    elif "meta" in str(e).lower():
        cause = " Likely cause: the model needs real data (an op without a meta/fake implementation)."
    return f"capture failed with {kind}: {text}{_user_frame(e)}.{cause}"
