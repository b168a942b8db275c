"""Generation with a KV cache: the prefill and the decode step, each captured once with the model's
own cache code (`transformers` DynamicCache, whose layers the config chooses: full attention,
sliding windows capped at their window, GQA's fewer key/value heads).

  prefill  forward(input_ids[batch, prompt], cache=DynamicCache(config), use_cache=True,
           logits_to_keep=1), as `model.generate` calls it; the graph's outputs are the logits and
           the cache it filled;
  decode   forward(input_ids[batch, 1]) on a cache that already holds `ctx` tokens, `ctx` a
           symbolic dimension. The cache is made by the cache's own `update` run on fake key/value
           states of [batch, kv_heads, ctx, head_dim] (the shape the prefill's cache has, read from
           its graph), outside the trace; what it stores becomes the graph's `cache` placeholders
           and every size it keeps (a sliding layer's `cumulative_length`) the traced `ctx`.

`new_cache` is also what the real generation loop (validate/runner.py) uses, so both run the same
cache code. With a KV dtype other than the model's (`--kv-dtype`), each layer stores its keys and
values in that dtype and returns them cast back (dequantised on read, as transformers' quantized
caches do): the casts are in the graph, costed and held in memory like any op.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import sympy
import torch
import torch.nn as nn

from costmodel.errors import AnalysisError, UsageError

GENERATE_DIMS = ("batch", "prompt", "gen")
CTX = "ctx"             # the decode step's context: tokens in the cache before the step
CACHE_ROLE = "cache"    # placeholders of the cache read by the decode step (Captured.roles)
SIZE_ROLE = "size"      # the traced ctx itself, a SymInt placeholder


@dataclass(frozen=True)
class LayerShape:
    """One cache layer after the prefill: its key and value shapes (user sympy; the token axis is -2,
    as the Cache API lays them out) and dtypes."""

    key: tuple
    value: tuple
    key_dtype: torch.dtype
    value_dtype: torch.dtype


@dataclass(frozen=True)
class Step:
    """Which forward of a generation a capture traces: "prefill", or "decode" with the layers'
    shapes after the prefill (None for a layer the cache leaves empty, e.g. KV sharing)."""

    kind: str
    layers: tuple = ()
    dtype: torch.dtype = torch.float32          # the model's: what its key/value states come in
    kv_dtype: torch.dtype | None = None         # the cache's, where it differs

    @property
    def extra_dims(self) -> list[str]:
        return [CTX] if self.kind == "decode" else []


def cache_argument(model: nn.Module) -> str:
    """The keyword forward() takes the cache by ("cache" in transformers 5, "past_key_values" before);
    a UsageError naming what is missing when the model has no cache support."""
    name = type(model).__name__
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"--mode generate: {name} is an encoder-decoder; generate mode captures decoder-only models "
                         "(a prefill and a decode step over one self-attention KV cache)")
    arg = next((a for a in ("cache", "past_key_values") if a in params), None)
    if arg is None:
        raise UsageError(f"--mode generate needs a KV cache, but {name}.forward() takes no `cache` or "
                         f"`past_key_values` argument (its parameters: {', '.join(p for p in params) or 'none'}); "
                         "a decoder with the transformers Cache API (LlamaForCausalLM, GPT2LMHeadModel, ...) has one")
    if "use_cache" not in params:
        raise UsageError(f"--mode generate needs a KV cache, but {name}.forward() takes no `use_cache` argument, so "
                         "it cannot be asked to fill one")
    if config is None:
        raise UsageError(f"--mode generate: {name} has no `config`, which the cache (transformers DynamicCache) "
                         "reads to lay out its layers")
    return arg


def new_cache(model: nn.Module, kv_dtype: torch.dtype | None = None):
    """The cache `model.generate` would make: DynamicCache(config), one layer per decoder layer (sliding
    layers where the config says so). Layers start empty with `new_empty` (fake-tensor friendly, the
    same empty tensor as the layer's own `torch.tensor([])`); with `kv_dtype`, they store that dtype."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        _empty_start(layer)
        if kv_dtype is not None:
            _store_as(layer, kv_dtype)
    return cache


def _empty_start(layer) -> None:
    original = layer.lazy_initialization

    def lazy_initialization(key_states, value_states, *args, **kwargs):
        original(key_states, value_states, *args, **kwargs)
        if hasattr(layer, "keys") and hasattr(layer, "values"):
            layer.keys = key_states.new_empty((0,))
            layer.values = value_states.new_empty((0,))
    layer.lazy_initialization = lazy_initialization


def _store_as(layer, kv_dtype: torch.dtype) -> None:
    update = layer.update

    def stored_update(key_states, value_states, *args, **kwargs):
        keys, values = update(key_states.to(kv_dtype), value_states.to(kv_dtype), *args, **kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)
    layer.update = stored_update


def kv_layers(cache) -> list:
    """The cache's layers, each checked to be a key/value layer (keys and values tensors)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise AnalysisError(f"--mode generate: the model returned a {type(cache).__name__} without `layers`; "
                            "generate mode reads transformers' Cache API (DynamicCache)")
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "keys") and hasattr(layer, "values")):
            raise UsageError(f"--mode generate: cache layer {i} is a {type(layer).__name__}, not a key/value cache "
                             "layer (no keys and values); generate mode models key/value caches only")
    return list(layers)


def call_kwargs(model: nn.Module, cache) -> dict:
    """The keyword arguments of a cached forward, as `model.generate` passes them."""
    params = inspect.signature(model.forward).parameters
    kwargs = {cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1      # generate asks for the last position's logits only
    if "return_dict" in params:
        kwargs["return_dict"] = True
    return kwargs


def returned_cache(model: nn.Module, output, cache):
    """The cache a cached forward filled (the one passed in, as the output names it). An output with
    a cache field left None declined to cache (BertModel with is_decoder=False still writes the cache
    it is given, but attends both ways and returns none): an AnalysisError."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    declared = [n for n in ("cache", "past_key_values") if n in fields]
    if declared:
        decoder = getattr(getattr(model, "config", None), "is_decoder", None)
        why = " (its config has is_decoder=False)" if decoder is False else ""
        raise AnalysisError(f"--mode generate: the prefill filled no key/value cache: {type(model).__name__} returned "
                            f"{declared[0]}=None for use_cache=True{why}; generate mode needs a decoder that caches "
                            "its keys and values")
    return cache


def cache_tensors(cache) -> list[torch.Tensor]:
    """keys and values of every layer that holds some, in layer order."""
    out = []
    for layer in kv_layers(cache):
        if getattr(layer, "is_initialized", True) and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4:
            out.extend([layer.keys, layer.values])
    return out


def tensor_bytes(tensors) -> int | torch.SymInt:
    """Bytes of the tensors themselves (numel x itemsize), views counted at their own size."""
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_shapes(cache, to_user) -> tuple:
    """The prefill's cache, layer by layer, as LayerShape (None for an empty layer)."""
    shapes = []
    for layer in kv_layers(cache):
        k, v = layer.keys, layer.values
        if not (getattr(layer, "is_initialized", True) and isinstance(k, torch.Tensor) and k.dim() == 4):
            shapes.append(None)
            continue
        shapes.append(LayerShape(tuple(to_user(s) for s in k.shape), tuple(to_user(s) for s in v.shape),
                                 k.dtype, v.dtype))
    if not any(shapes):
        raise AnalysisError("--mode generate: the prefill filled no key/value cache layer (the model ignored "
                            "use_cache=True); generate mode needs a decoder that caches its keys and values")
    return tuple(shapes)


class DecodeCache:
    """The decode step's cache holding `ctx` tokens: built by each layer's own `update` on fake key and
    value states outside the trace, then swapped for placeholders of what the layer stored."""

    def __init__(self, model: nn.Module, step: Step, batch, ctx: torch.SymInt, sizes: dict):
        self.cache = new_cache(model, step.kv_dtype)
        self.ctx = ctx
        self.stored: list[tuple[int, torch.Tensor, torch.Tensor]] = []     # (layer, keys, values)
        layers = kv_layers(self.cache)
        if len(layers) != len(step.layers):
            raise AnalysisError(f"--mode generate: the decode cache has {len(layers)} layers, the prefill's had "
                                f"{len(step.layers)}")
        for i, (layer, shape) in enumerate(zip(layers, step.layers)):
            if shape is None:
                continue
            # the states the model hands the cache come in its dtype (the layer casts them with kv_dtype)
            dtype = step.dtype if step.kv_dtype is not None else shape.key_dtype
            k = torch.empty(_decode_shape(shape.key, batch, ctx, sizes), dtype=dtype, device="meta")
            v = torch.empty(_decode_shape(shape.value, batch, ctx, sizes), dtype=dtype, device="meta")
            layer.update(k, v)
            self.stored.append((i, layer.keys, layer.values))
        self._sizes = {i: {a: val for a, val in vars(layer).items() if isinstance(val, torch.SymInt)}
                       for i, layer in enumerate(layers)}

    def placeholders(self) -> list[torch.Tensor]:
        """Fresh tensors of the stored shapes and dtypes: the graph's cache inputs."""
        return [torch.empty(t.shape, dtype=t.dtype, device="meta") for _, k, v in self.stored for t in (k, v)]

    def names(self) -> list[str]:
        return [f"cache.layers.{i}.{kind}" for i, _, _ in self.stored for kind in ("keys", "values")]

    def install(self, tensors: list[torch.Tensor], ctx: torch.SymInt):
        """Within the trace: the placeholders in the layers, and every size a layer keeps that is the
        context length (a sliding layer's cumulative_length) as the traced ctx. Returns the cache."""
        layers = self.cache.layers
        for j, (i, _, _) in enumerate(self.stored):
            layers[i].keys, layers[i].values = tensors[2 * j], tensors[2 * j + 1]
        for i, attrs in self._sizes.items():
            for attr, value in attrs.items():
                diff = sympy.simplify(value.node.expr - self.ctx.node.expr)
                if diff.is_number:
                    setattr(layers[i], attr, ctx + int(diff))
        return self.cache


def _decode_shape(shape: tuple, batch, ctx, sizes: dict) -> list:
    """A prefill cache shape [batch, heads, tokens, head_dim] in user sympy -> the decode's fake shape
    with `ctx` tokens: sizes named by a dimension become that dimension's traced size."""
    out = []
    for axis, s in enumerate(shape):
        if axis == len(shape) - 2:
            out.append(ctx)
        elif isinstance(s, sympy.Basic) and s.is_Integer:
            out.append(int(s))
        elif isinstance(s, sympy.Symbol) and str(s) in sizes:
            out.append(sizes[str(s)])
        else:
            raise AnalysisError(f"--mode generate: the prefill's cache has shape {list(shape)}; generate mode needs "
                                "[batch, heads, tokens, head_dim] with heads and head_dim fixed")
    return out
