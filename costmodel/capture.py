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
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.nn.utils.stateless import _reparametrize_module

from . import _torch, zoo
from .errors import AnalysisError, CostModelError, UsageError
from .sdpa_op import route_sdpa
from .specs import InputSpec, parse_input
from .symbols import dim_symbol

LOSSES = ("sum", "cross-entropy")
MODES = ("inference", "train")
ROOT = "(root)"   # how the root module is named in module paths; others are named_modules() names


@dataclass
class Guard:
    """A condition on the dimensions under which a captured graph is valid (e.g. seq <= 4096)."""

    expr: sympy.Basic       # in the user's dimension symbols
    where: str              # source location that introduced it, when known

    def holds(self, values: dict[sympy.Symbol, int]) -> bool:
        result = self.expr.xreplace({s: sympy.Integer(v) for s, v in values.items()})
        return bool(result) if result in (sympy.true, sympy.false) or isinstance(result, bool) else True

    def __str__(self) -> str:
        return f"{self.expr}" + (f" (from {self.where})" if self.where else "")


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    inputs: list[InputSpec]


@dataclass
class Captured:
    graph: fx.GraphModule
    mode: str
    dims: list[str]                          # the symbolic dimensions, user names
    fixed: dict[str, int]                    # dimensions captured at one concrete value
    guards: list[Guard]
    symbol_map: dict[sympy.Symbol, sympy.Expr]   # shape-env symbol -> expression in user symbols
    shape_env: ShapeEnv
    roles: dict[str, tuple[str, str]] = field(default_factory=dict)  # placeholder -> (param|buffer|input, name)
    trainable: set[str] = field(default_factory=set)                # names of parameters that get grads
    hints: dict[str, int] = field(default_factory=dict)

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

def load_model(source: str | nn.Module, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A zoo name, `file.py:FUNC`, `package.module:FUNC`, a callable or a module -> the model on meta."""
    default_inputs: list[InputSpec] = []
    if isinstance(source, nn.Module):
        name, factory = type(source).__name__, (lambda: source)
    elif callable(source):
        name, factory = getattr(source, "__name__", "model"), source
    elif isinstance(source, str) and ":" not in source:
        entry = zoo.get(source)
        name, factory = entry.name, entry.build
        default_inputs = [parse_input(s) for s in entry.inputs]
    elif isinstance(source, str):
        name, factory = source, _import_factory(source)
    else:
        raise UsageError(f"model {source!r} is not a zoo name, FILE.py:FUNC, package.module:FUNC or nn.Module")
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
    return LoadedModel(name, module, default_inputs)


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

def capture(model: nn.Module, inputs: list[InputSpec], mode: str = "inference", hints: dict[str, int] | None = None,
            fixed: dict[str, int] | None = None, loss: str = "sum", amp: bool | str = False) -> Captured:
    """Trace `model` on fake inputs whose named dimensions are symbols (or, for `fixed`, integers).
    `amp`: trace the forward and loss under autocast to bfloat16 (True: CUDA's op policy; "cpu": the
    CPU's), emulated by `costmodel.amp` since autocast does nothing to meta tensors."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    if loss not in LOSSES:
        raise UsageError(f"unknown loss {loss!r}; accepted: {', '.join(LOSSES)}")
    hints, fixed = dict(hints or {}), dict(fixed or {})
    dims = list(dict.fromkeys(d for spec in inputs for d in spec.dim_names))
    shape_env = ShapeEnv(duck_shape=False)
    fake_mode = FakeTensorMode(shape_env=shape_env)
    from torch._dynamo.source import ConstantSource

    sizes: dict[str, int | torch.SymInt] = {}
    symbol_map: dict[sympy.Symbol, sympy.Expr] = {}
    for i, name in enumerate(dims):
        if name in fixed:
            sizes[name] = fixed[name]
            continue
        hint = hints.get(name, default_hint(name, i))
        source = ConstantSource(f"dim_{name}")
        sym = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
        sizes[name] = shape_env.create_symintnode(sym, hint=hint, source=source)
        symbol_map[sym] = dim_symbol(name)

    model.train(mode == "train")
    param_items = list(model.named_parameters())
    buffer_items = list(model.named_buffers())
    with fake_mode:
        params = [fake_mode.from_tensor(p, static_shapes=True).requires_grad_(p.requires_grad and mode == "train")
                  for _, p in param_items]
        buffers = [fake_mode.from_tensor(b, static_shapes=True) for _, b in buffer_items]
        values = [torch.empty([sizes[d] if isinstance(d, str) else d for d in spec.dims], dtype=spec.dtype,
                              device="meta") for spec in inputs]
    call = _call_plan(model, inputs)
    trainable = [i for i, (_, p) in enumerate(param_items) if p.requires_grad]

    def traced_state(params, buffers):
        """The model with the traced tensors in place of its meta parameters and buffers."""
        state = {n: t for (n, _), t in zip(param_items, params)} | {n: t for (n, _), t in zip(buffer_items, buffers)}
        return _reparametrize_module(model, state, tie_weights=True)

    def inference(params, buffers, values):
        args, kwargs = call(values)
        with torch.no_grad(), traced_state(params, buffers):
            return _tensors(model(*args, **kwargs))

    def train_step(params, buffers, values):
        args, kwargs = call(values)
        # The whole step, backward included, runs with the traced tensors in place: activation
        # checkpointing re-runs parts of the forward during the backward.
        with traced_state(params, buffers):
            loss_value = _loss(model(*args, **kwargs), values, inputs, loss)
            _torch.preserve_backward_meta(loss_value)
            wrt = [params[i] for i in trainable]
            grads = torch.autograd.grad(loss_value, wrt, allow_unused=True)
        return [loss_value] + [g for g in grads if g is not None]

    fn = train_step if mode == "train" else inference
    if amp:
        from .amp import emulate_autocast
        fn = emulate_autocast(fn, amp if isinstance(amp, str) else "cuda")
    if mode == "train" and not trainable:
        raise UsageError("--mode train needs parameters that require grad; this model has none")
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)   # it logs every failing meta kernel; our error says it once
    try:
        with _torch.symbolic_kernels(), _torch.backward_meta_fields(), fake_mode, _module_paths(model), \
                fx_traceback.preserve_node_meta(), route_sdpa():
            gm = make_fx(fn, tracing_mode="real", _disable_torch_fn_metadata_mode=True)(params, buffers, values)
    except CostModelError:
        raise
    except Exception as e:
        raise AnalysisError(_capture_failure(e, symbol_map)) from e
    finally:
        fake_log.setLevel(level)

    roles = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = ([("param", n) for n, _ in param_items] + [("buffer", n) for n, _ in buffer_items]
             + [("input", s.name) for s in inputs])
    for node, role in zip(placeholders, names):
        roles[node.name] = role
    _attribute_modules(gm.graph)
    used_hints = {d: int(sizes[d]) if not isinstance(sizes[d], torch.SymInt) else sizes[d].node.hint
                  for d in dims if d not in fixed}
    captured = Captured(gm, mode, [d for d in dims if d not in fixed], fixed, [], symbol_map, shape_env, roles,
                        {param_items[i][0] for i in trainable}, used_hints)
    captured.guards = _guards(captured)
    return captured


def default_hint(name: str, index: int) -> int:
    """The size a dimension takes while tracing when the user gave none: distinct per dimension, so
    that no accidental equality between two dimensions is baked into the graph, and >= 2, since
    PyTorch specialises sizes 0 and 1."""
    return 2 if "batch" in name.lower() else 64 + 8 * index


def _call_plan(model: nn.Module, inputs: list[InputSpec]):
    """Inputs go to forward() by keyword when their name is a parameter of it, else positionally."""
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


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


def first_output(out) -> torch.Tensor:
    """`logits`, `last_hidden_state` or the first tensor of a model's output."""
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    tensors = _tensors(out)
    if not tensors:
        raise AnalysisError(f"the model returned {type(out).__name__} with no tensor in it; nothing to train")
    return tensors[0]


def _loss(out, values, inputs: list[InputSpec], loss: str) -> torch.Tensor:
    y = first_output(out)
    if loss == "sum":
        return y.sum()
    targets = [(v, s) for v, s in zip(values, inputs) if not s.dtype.is_floating_point]
    if not targets or tuple(targets[0][0].shape) != tuple(y.shape[:-1]):
        raise UsageError("--loss cross-entropy needs an integer input shaped like the output without its last "
                         f"dimension (class ids); got output {tuple(y.shape)} and inputs "
                         f"{', '.join(str(s) for s in inputs)}")
    return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]).float(), targets[0][0].reshape(-1))


@contextlib.contextmanager
def _module_paths(model: nn.Module):
    """Record, while tracing, the stack of module paths in fx's current node meta."""
    paths = {m: (n or ROOT) for n, m in model.named_modules(remove_duplicate=False)}
    stack: list[str] = []

    def pre(module, args):
        stack.append(paths.get(module, type(module).__name__))
        fx_traceback.get_current_meta()["nn_module_stack"] = tuple(stack)

    def post(module, args, output):
        if stack:
            stack.pop()
        fx_traceback.get_current_meta()["nn_module_stack"] = tuple(stack)

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _attribute_modules(graph: fx.Graph) -> None:
    """Set costmodel_module / costmodel_phase on every call node; backward nodes take the module of
    the forward op they differentiate (matched by autograd sequence number)."""
    forward_module: dict[int, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack", ())
        backward = _torch.is_backward(node)
        if not backward:
            module = stack[-1] if stack else "(loss)"
            node.meta["costmodel_phase"] = "forward" if stack else "loss"
            if "seq_nr" in node.meta:
                forward_module[node.meta["seq_nr"]] = module
        else:
            module = forward_module.get(node.meta.get("seq_nr"), "(loss)")
            node.meta["costmodel_phase"] = "backward"
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
        if vr is not None:
            if isinstance(vr.upper, sympy.Integer):
                out.append(Guard(sympy.Le(u, int(vr.upper)), ""))
            if isinstance(vr.lower, sympy.Integer) and vr.lower > 2:
                out.append(Guard(sympy.Ge(u, int(vr.lower)), ""))
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
    """'file.py:LINE in func' of the code that made a guard (the user's line when known)."""
    if sloc is None:
        return ""
    if getattr(sloc, "maybe_user_loc", None):
        return sloc.maybe_user_loc
    frame = getattr(sloc, "framework_loc", None)
    if isinstance(frame, traceback.FrameSummary):
        return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return str(frame or "")


def specialized(c: Captured) -> dict[str, tuple[int, str]]:
    """Dimensions the model pinned to one value while tracing: name -> (value, where)."""
    result = {}
    for g in c.guards:
        if isinstance(g.expr, sympy.Eq) and g.expr.rhs.is_Integer and g.expr.lhs.is_Symbol:
            result[str(g.expr.lhs)] = (int(g.expr.rhs), g.where)
    return result


# --- errors -------------------------------------------------------------------------------------

def _user_frame(e: BaseException) -> str:
    """' at FILE:LINE: code' for the deepest frame outside torch, transformers' utils and costmodel."""
    frames = traceback.extract_tb(e.__traceback__)
    skip = (os.sep + "torch" + os.sep, os.sep + "costmodel" + os.sep, "contextlib.py", os.sep + "_pytest")
    user = [f for f in frames if not any(s in f.filename for s in skip)]
    if not user:
        return ""
    f = user[-1]
    return f" (at {f.filename}:{f.lineno}: {(f.line or '').strip()})"


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
