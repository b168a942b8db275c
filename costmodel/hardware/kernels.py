"""Kernel classes: which measured table prices an op, and the tables `hardware calibrate` writes.

A rule names its op's kernel class (`OpCost.kernel`: "matmul", "conv.depthwise", "pointwise.tanh")
from the op and its arguments (a conv's groups against its channels, a product's m, n, k), never
from the model, with the shape features the class's table reads. A calibrated device file holds
one table per class it measured; the roofline prices an op with the most specific one it has
("conv.depthwise.backward", then "conv.depthwise", then "conv"), else with the generic ramps.

A table says how long one call of the class takes on the device, as measured:
    time_s = overhead_s + work / (rate(size) * prod(efficiency_f(feature_f)))
`work` is the op's FLOPs (products, convolutions, attention) or its bytes (everything else), as
the rules count them; `size` is the work itself, or the feature the table is indexed `by` (a
convolution's output positions, attention's query length); rate() interpolates the measured rates
log-log between the measured sizes (constant past either end); each efficiency_f is a measured
curve of one shape feature (a product's m: one row of output per call is a matrix-vector
product), about 1 at the reference shape the rates were measured at.
On a CPU a table also says what a call costs more when other ops ran since the same call last ran
(`evicted`, seconds by size): a kernel's own working state (a BLAS's packed panels, oneDNN's
reordered weights and scratchpad, its dispatch path's code) is then out of the core's caches, as in
a model, where the ops between two calls of one kernel evict it; measured after a copy that
overflows the core caches and ten other eager ops. Of those seconds, `refill` is the part that is
the call's operands coming back (the evicted seconds less those measured with the operands read just
before the call): paid in the share of an op's reads the core caches no longer hold, so an op
reading what the op before it just wrote pays its state's part only. `evicted_llc` is the same after
a flush of the last-level cache, the call's operands read back just before it (their reads from
memory are priced apart): a training step's traffic, which its activations, gradients and
optimizer state keep past that cache, takes oneDNN's and a BLAS's state from the LLC as well. The
probe's own work displaced a share of that cache too (`evicted_share`): a call is priced on the line
through the two measurements at the share its model's traffic displaced. `interleaved` is what a
call costs more after ten other ops on tiny tensors, which move next to no data: their code takes the
core's instruction cache and branch predictors (a oneDNN convolution or a BLAS product 10-15 us, a
batch norm 3, an add under 1). A model pays it on every call whose class did not run just before,
and it is the evicted line's low end (a call evicted by traffic that displaced little of the
last-level cache).
Allocation is the CPU's price for fresh pages (glibc maps large blocks anew each time; the first
touch of each page faults): seconds per byte of an op's largest new output, by its size.
No torch here.
"""

from __future__ import annotations

import bisect
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

from costmodel.errors import UsageError

FLOPS, BYTES = "flops", "bytes"

# Kernel classes, by root: what the root's work is, and the classes under it. A class may add
# ".backward" (the gradient kernel of the same op; a convolution's without the input's gradient is
# ".backward.weight"); attention classes add ".causal", then ".dropout".
FAMILIES: dict[str, str] = {
    "matmul": FLOPS,        # one product: mm, addmm, linear, 2-D matmul; features m, n, k; .streamed:
                            # measured with its weight read from memory (by m), for products bound by that;
                            # .lstm: a CPU's oneDNN LSTM layer over a whole sequence (capture/rnn.py), its own
                            # GEMMs at its own rate (1.9x addmm's on this project's CPU at one thread),
                            # features batch, hidden; priced as a product where a device has no table of it
    "bmm": FLOPS,           # batched products: bmm, baddbmm, batched matmul; features batch, m, n, k
    "conv": FLOPS,          # .dense, .depthwise, .grouped, .transposed; features below; .dense.slow:
                            # a CPU's native kernel (im2col and a GEMM per sample, its m one sample's),
                            # where eager runs it at the point's sizes (hardware/eager_backend.py),
                            # .dense.slow.backward(.weight) its gradients
    "attention": FLOPS,     # .math, .flash, .efficient, .cudnn: the SDPA kernel the device runs
    "pointwise": BYTES,     # elementwise; .<aten op> per op (pointwise.tanh, pointwise.gelu_tanh);
                            # .strided: any elementwise op with a permuted input
    "random": BYTES,        # random fills (bernoulli_, rand, normal_); .dropout (mask and scale)
    "reduction": BYTES,     # sum, mean, amax, var, ...
    "norm": BYTES,          # .layer, .rms, .batch, .batch.eval, .group
    "softmax": BYTES,       # softmax and log_softmax
    "embedding": BYTES,
    "index": BYTES,         # gather, index_select; .scatter: index_put, scatter, slice_backward
    "copy": BYTES,          # clone, cat, _to_copy, contiguous, pad; .strided: from a permuted input;
                            # .pad: eager's constant padding (an empty output, the border filled, a copy)
    "fill": BYTES,          # zeros, ones, full, arange: written, not read
    "pool": BYTES,          # .max, .avg, .adaptive, .upsample
    "loss": BYTES,
    "optimizer": BYTES,     # .adamw, .adam, .sgd, ...: one parameter tensor's update
    "view": BYTES,          # metadata only: an eager call still costs its dispatch
    "module": BYTES,        # an nn.Module call in eager (its hooks and dispatch), per forward call
}
_SUBCLASSES = {
    "conv": ("dense", "depthwise", "grouped", "transposed"),
    "attention": ("math", "flash", "efficient", "cudnn"),
    "norm": ("layer", "rms", "batch", "group"),
    "pool": ("max", "avg", "adaptive", "upsample"),
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
CHANNELS_LAST = ".channels_last"     # the class suffix of a convolution eager runs on channels-last operands
UPSAMPLE_WIDTH_FEATURE = "in_width"  # an upsampling's input row length (pool.upsample's curve)
POOL_WINDOW_FEATURE = "window"       # a pooling's window area (kh * kw)
POOL_STRIDE_FEATURE = "stride"       # a pooling's stride area (sh * sw): input positions per output
FEATURES = {
    "matmul": ("m", "n", "k", "batch", "hidden"),     # batch, hidden: matmul.lstm's
    "bmm": ("batch", "m", "n", "k"),
    # as the GEMM it lowers to, per group: m output positions (times batch), n output channels,
    # k input channels times kernel area; the groups; and the input positions per output position
    # the kernel does not cover (a 1x1 stride-2 convolution's 4: its input is still read and
    # reordered whole)
    "conv": ("m", "n", "k", "groups", "skipped"),
    "attention": ("batch_heads", "L", "S", "E"),
    # pointwise.strided: the bytes between consecutive loads of the input read against the loop
    "pointwise": ("inner_stride_bytes",),
    # pool.max, pool.avg: the window and stride areas; pool.upsample: the input's row length (a
    # channels-first CPU kernel runs short rows slowly)
    "pool": (POOL_WINDOW_FEATURE, POOL_STRIDE_FEATURE, UPSAMPLE_WIDTH_FEATURE),
}
ALLOC_FEATURE = "alloc_bytes"   # every op: bytes of its largest freshly allocated output
INTERNAL_FEATURE = "internal"   # 1: eager runs it inside another op's call (no Python binding of its own)
# 1: a training step's forward op that made an autograd node, which the engine runs in the backward
# (Hardware.autograd_node_s); and the first op of a backward node, which the engine calls from C++
AUTOGRAD_NODE_FEATURE = "autograd_node"
ENGINE_CALL_FEATURE = "engine_call"
SHAPE_ONLY_FEATURE = "shape_only"  # 1: a size read of the trace (sym_size): eager dispatches nothing
COLD_FEATURE = "cold_bytes"     # bytes it reads that the cache no longer holds (set per point)
STRIDED_FEATURE = "strided_bytes"  # permuted inputs a norm, softmax or convolution copies contiguous first
# bytes between consecutive loads of the input an elementwise op reads against its loop's order (the
# loop runs along its first input's densest dimension: a channels-last view read along a
# channels-first tensor's rows jumps a channel's width, the other way round a whole plane)
INNER_STRIDE_FEATURE = "inner_stride_bytes"
EVICTED_FEATURE = "evicted"        # 1: the traffic since this call last ran (same class and size) filled the core's cache
LLC_EVICTED_FEATURE = "llc_evicted"  # of an evicted call: the share of the last-level cache that traffic displaced
INPUTS_OUT_FEATURE = "inputs_out"  # the share of the bytes it reads that the core caches no longer hold
# of a call, the share of the probe's code (PROBE_CLASSES different ops: Timer.interleaved and
# Timer.evicted run them between two calls) that ran since this class's last call: the distinct other
# classes in between over PROBE_CLASSES, at most 1 (0: the class ran last, its code is at hand)
INTERLEAVED_FEATURE = "interleaved"
PROBE_CLASSES = 10


def _code_share(features: Mapping[str, float] | None) -> float:
    """INTERLEAVED_FEATURE of a call, within [0, 1]; 1 (the probe's) where not given."""
    share = (features or {}).get(INTERLEAVED_FEATURE)
    return 1.0 if share is None else min(1.0, max(0.0, float(share)))


def root(kernel: str) -> str:
    return kernel.split(".", 1)[0]


def work_of(kernel: str) -> str:
    """"flops" or "bytes": what a class's rate counts."""
    return FAMILIES[root(kernel)]


def check_kernel(kernel: str, where: str = "kernel class") -> str:
    """A well-formed class name under a known root; the error names the accepted roots."""
    if not isinstance(kernel, str) or not _NAME.match(kernel) or root(kernel) not in FAMILIES:
        word = str(kernel).split(".", 1)[0]
        near = [f for f in FAMILIES if word.startswith(f) or f.startswith(word)] or \
            difflib.get_close_matches(word, list(FAMILIES), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UsageError(f"{where} '{kernel}' is not a kernel class{hint}; a class is one of "
                         f"{', '.join(FAMILIES)}, optionally with .subclass parts (conv.depthwise.backward)")
    parts = kernel.split(".")
    subs = _SUBCLASSES.get(parts[0])
    if subs and len(parts) > 1 and parts[1] not in subs and parts[1] != "backward":
        raise UsageError(f"{where} '{kernel}': {parts[0]} classes are {', '.join(subs)}; got '{parts[1]}'")
    return kernel


def chain(kernel: str) -> list[str]:
    """The classes that may price `kernel`, most specific first:
    chain("conv.depthwise.backward") == ["conv.depthwise.backward", "conv.depthwise", "conv"]."""
    parts = kernel.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def table_key(kernel: str, dtype: str | None) -> str:
    """Tables of FLOP-priced classes are per dtype ("matmul:bfloat16"); byte-priced ones are not."""
    return f"{kernel}:{dtype}" if work_of(kernel) == FLOPS and dtype else kernel


# --- tables ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelTable:
    """One measured kernel class on one device (and dtype, for FLOP-priced classes)."""

    kernel: str
    dtype: str | None
    overhead_s: float                      # one call of a tiny instance: dispatch and launch
    sizes: tuple[float, ...] = ()          # work per call of the measured reference shapes
    rates: tuple[float, ...] = ()          # work per second at those sizes, overhead excluded
    efficiency: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict, hash=False)
    how: str = ""                          # what was run, how it was timed
    by: str = "work"                       # what `sizes` measure: the work, or a feature's value
    # [(size, seconds)]: what a call costs more after other ops filled the core's cache (see above)
    evicted: tuple[tuple[float, float], ...] = field(default=(), hash=False)
    # the size the efficiency curves were measured around (their instances' median size); None: not known
    reference: float | None = None
    # [(size, seconds)]: of the evicted seconds, the part that is the call's inputs coming back into
    # the core caches (a call whose inputs the op before it just wrote does not pay it)
    refill: tuple[tuple[float, float], ...] = field(default=(), hash=False)
    # [(size, seconds)]: what a call costs more when the traffic since its last call overflowed the
    # last-level cache as well, its operands aside (Timer.evicted_llc_samples); with `evicted`, two points of a
    # line in the share of that cache the traffic displaced (LLC_EVICTED_FEATURE; see evicted_s)
    evicted_llc: tuple[tuple[float, float], ...] = field(default=(), hash=False)
    # the share of the last-level cache the work before the `evicted` calls displaced (their probe's
    # copy and ops are part of it, 0..1); None: not known (the evicted seconds are taken as its core part)
    evicted_share: float | None = None
    # [(size, seconds)]: what a call costs more after other ops that moved next to no data ran
    # since its last call (Timer.interleaved): their code displaced its own
    interleaved: tuple[tuple[float, float], ...] = field(default=(), hash=False)

    @property
    def work(self) -> str:
        return work_of(self.kernel)

    def rate(self, size: float | None) -> float:
        """Work per second at `size`: log-log between the measured sizes, constant past the ends
        (None: the rate at the largest size)."""
        if size is None or size <= 0:
            return self.rates[-1]
        return interpolate(self.sizes, self.rates, size)

    def size_of(self, work: float, features: Mapping[str, float] | None) -> float | None:
        return work if self.by == "work" else (features or {}).get(self.by)

    def shape_efficiency(self, features: Mapping[str, float] | None) -> float:
        """Product of the measured efficiency curves at the op's features (missing ones count 1)."""
        eff = 1.0
        for name, curve in self.efficiency.items():
            value = (features or {}).get(name)
            if value is not None and value > 0:
                eff *= interpolate([v for v, _ in curve], [f for _, f in curve], float(value))
        return eff

    def kernel_time_s(self, work: float, features: Mapping[str, float] | None = None) -> float:
        """Seconds of the kernel itself, overhead excluded: at rate(size) * shape efficiency, where
        the shape is faster than the reference, its size is at most the curves' reference size (a
        curve's efficiency is its rate over the base rate at its own work: a dense convolution
        backward at 16 positions, 40% of the rate of the same work in the base calls, runs at 40%
        of it), or its size is not slower than the reference size; else, past the reference at a
        slower rate, at the lower of rate(size) and rate(reference) * efficiency. Two slowdowns, a
        size's (caches spilled) and a shape's (a 7x7 depthwise backward), are two limits on one
        kernel, not one on top of the other."""
        if work <= 0 or not self.sizes:
            return 0.0
        size = self.size_of(work, features)
        rate, eff = self.rate(size), self.shape_efficiency(features)
        if eff >= 1 or self.reference is None or (size is not None and size <= self.reference):
            return work / (rate * eff)
        return work / min(rate, max(rate, self.rate(self.reference)) * eff)

    def time_s(self, work: float, features: Mapping[str, float] | None = None) -> float:
        return self.overhead_s + self.kernel_time_s(work, features)

    def interleaved_s(self, work: float, features: Mapping[str, float] | None = None) -> float:
        """Seconds a call costs more when other classes ran since its last call: linear in log size
        between the measured sizes, constant past the ends, in the share of the probe's code that
        ran in between (INTERLEAVED_FEATURE; all of it where not given); 0 without a measurement."""
        if not self.interleaved:
            return 0.0
        return self._by_size(self.interleaved, work, features) * _code_share(features)

    def _by_size(self, table, work: float, features: Mapping[str, float] | None) -> float:
        size = self.size_of(work, features) if work > 0 else None
        xs, ys = [x for x, _ in table], [y for _, y in table]
        return interpolate(xs, ys, size, log_y=False) if size else ys[0]

    def evicted_s(self, work: float, features: Mapping[str, float] | None = None) -> float:
        """Seconds a call costs more with its working state evicted: linear in log size between the
        measured sizes (seconds, which may be 0), constant past the ends; 0 without a measurement.
        Less the `refill` part in the share of the op's reads the core caches still hold
        (INPUTS_OUT_FEATURE; all of it paid where the feature or the table's refill is missing).
        Where the traffic displaced a share of the last-level cache too (LLC_EVICTED_FEATURE): on
        the line through the two measurements in that share, `evicted` at the share its probe's work
        displaced (`evicted_share`; 0 where not known) and `evicted_llc` at all of it. Below the
        probe's share, less than `evicted` (an inference step of a small net, its weights and
        activations held in that cache: 3x3 convolutions at two threads paid 10-40 us more in the
        model than in a loop, where the probe, 58% of the cache displaced, read 80): where the
        table has `interleaved` seconds, on the line from those at no share to `evicted` at the
        probe's (the line through the flush's point, carried down there, fell below 0 at two
        threads and moved by 30 us a call with the noise of its two points); never less than them."""
        if not self.evicted:
            return self.interleaved_s(work, features)

        def at(table):
            return self._by_size(table, work, features)
        evicted = at(self.evicted)
        out = (features or {}).get(INPUTS_OUT_FEATURE)
        if self.refill and out is not None:
            evicted -= min(at(self.refill), evicted) * (1.0 - min(1.0, max(0.0, float(out))))
        share = (features or {}).get(LLC_EVICTED_FEATURE)
        if self.evicted_llc and share is not None:
            # linear in the share of the last-level cache displaced, through the two measurements:
            # `evicted` at the share its probe's work displaced, `evicted_llc` at all of it
            probed = min(max(self.evicted_share or 0.0, 0.0), 0.99)
            share = min(1.0, max(0.0, float(share)))
            if self.interleaved and share < probed:
                low = min(at(self.interleaved), evicted)
                evicted = low + (evicted - low) * share / probed
            else:
                per_share = max(0.0, at(self.evicted_llc) - evicted) / (1.0 - probed)
                evicted = max(0.0, evicted + (share - probed) * per_share)
        if self.interleaved:
            evicted -= at(self.interleaved) * (1.0 - _code_share(features))
        return max(evicted, self.interleaved_s(work, features))

    def to_dict(self) -> dict:
        out = {"work": self.work, "overhead_s": self.overhead_s}
        if self.sizes:
            out.update(sizes=list(self.sizes), rates=list(self.rates))
        if self.dtype:
            out["dtype"] = self.dtype
        if self.by != "work":
            out["by"] = self.by
        if self.efficiency:
            out["efficiency"] = {k: [list(p) for p in v] for k, v in self.efficiency.items()}
        if self.evicted:
            out["evicted"] = [list(p) for p in self.evicted]
        if self.reference is not None:
            out["reference"] = self.reference
        if self.refill:
            out["refill"] = [list(p) for p in self.refill]
        if self.evicted_llc:
            out["evicted_llc"] = [list(p) for p in self.evicted_llc]
        if self.evicted_share is not None:
            out["evicted_share"] = self.evicted_share
        if self.interleaved:
            out["interleaved"] = [list(p) for p in self.interleaved]
        if self.how:
            out["how"] = self.how
        return out


@dataclass(frozen=True)
class AllocationTable:
    """Seconds per byte that a fresh allocation of a size costs on first touch (page faults), as a
    step in the size: the figure of the largest measured size at or below the block's."""

    sizes: tuple[float, ...]               # bytes, ascending
    seconds_per_byte: tuple[float, ...]
    how: str = ""

    def penalty_s(self, nbytes: float) -> float:
        if nbytes <= 0 or not self.sizes:
            return 0.0
        i = bisect.bisect_right(self.sizes, nbytes) - 1
        return nbytes * self.seconds_per_byte[i] if i >= 0 else 0.0

    def to_dict(self) -> dict:
        out = {"sizes": list(self.sizes), "seconds_per_byte": list(self.seconds_per_byte)}
        if self.how:
            out["how"] = self.how
        return out


def interpolate(xs, ys, x: float, log_y: bool = True) -> float:
    """Piecewise-linear in log x and log y through (xs, ys) (xs ascending), constant past the ends;
    linear in y with `log_y=False` (values that may be 0)."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    if not log_y:
        return y0 + t * (y1 - y0)
    return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def find_table(tables: Mapping[str, KernelTable], kernel: str | None, dtype: str | None) -> KernelTable | None:
    """The most specific table of `tables` that prices `kernel` in `dtype`, or None."""
    if not kernel or not tables:
        return None
    for name in chain(kernel):
        table = tables.get(table_key(name, dtype))
        if table is not None:
            return table
    return None


# --- the TOML schema --------------------------------------------------------------------------------

_TABLE_FIELDS = ("work", "dtype", "overhead_s", "by", "sizes", "rates", "efficiency", "evicted", "refill",
                 "evicted_llc", "evicted_share", "interleaved", "reference", "how")
_ALLOC_FIELDS = ("sizes", "seconds_per_byte", "how")


def tables_from_dict(data, origin: str, dtypes) -> dict[str, KernelTable]:
    """Validate a file's [kernels] table: {"matmul:float32": {...}, "pointwise": {...}}."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: 'kernels' must be a table of kernel classes, got {data!r}")
    return {key: _table(key, value, f"{origin}: kernels.\"{key}\"", dtypes) for key, value in data.items()}


def _table(key: str, data, where: str, dtypes) -> KernelTable:
    kernel, _, dtype = key.partition(":")
    check_kernel(kernel, f"{where}: the key")
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a table with {', '.join(_TABLE_FIELDS)}, got {data!r}")
    for name in data:
        if name not in _TABLE_FIELDS:
            near = difflib.get_close_matches(name, _TABLE_FIELDS, n=1)
            raise UsageError(f"{where}: unknown field '{name}'{f' (did you mean {near[0]}?)' if near else ''}; "
                             f"accepted: {', '.join(_TABLE_FIELDS)}")
    if "overhead_s" not in data:
        raise UsageError(f"{where}: missing field 'overhead_s'")
    if ("sizes" in data) != ("rates" in data):
        raise UsageError(f"{where}: 'sizes' and 'rates' go together (a table of overhead only has neither)")
    work = work_of(kernel)
    if data.get("work", work) != work:
        raise UsageError(f"{where}: {root(kernel)} classes are priced by {work}, but the table says "
                         f"work = {data['work']!r}")
    if work == FLOPS:
        if not dtype:
            raise UsageError(f"{where}: a {root(kernel)} table is per dtype; name it '{kernel}:DTYPE' "
                             f"(DTYPE one of {', '.join(dtypes)})")
        if dtype not in dtypes:
            raise UsageError(f"{where}: unknown dtype '{dtype}'; accepted: {', '.join(dtypes)}")
    elif dtype:
        raise UsageError(f"{where}: {root(kernel)} classes are priced by bytes, whatever the dtype; "
                         f"name the table '{kernel}'")
    if data.get("dtype", dtype or None) != (dtype or None):
        raise UsageError(f"{where}: field dtype = {data['dtype']!r} disagrees with the key")
    overhead = data["overhead_s"]
    if not _number(overhead) or not 0 <= overhead < 1:
        raise UsageError(f"{where}: 'overhead_s' must be seconds, 0 <= value < 1, got {overhead!r}")
    sizes = _positive_list(data["sizes"], f"{where}: 'sizes'") if "sizes" in data else []
    rates = _positive_list(data["rates"], f"{where}: 'rates'") if "rates" in data else []
    if len(sizes) != len(rates):
        raise UsageError(f"{where}: 'sizes' and 'rates' must have the same length, got {len(sizes)} and {len(rates)}")
    _ascending(sizes, f"{where}: 'sizes'")
    eff = data.get("efficiency", {})
    if not isinstance(eff, dict):
        raise UsageError(f"{where}: 'efficiency' must be a table of curves (feature = [[value, factor], ...])")
    known = FEATURES.get(root(kernel), ())
    curves = {}
    for feature, curve in eff.items():
        if feature not in known:
            raise UsageError(f"{where}: unknown feature 'efficiency.{feature}'; {root(kernel)} classes have "
                             f"{', '.join(known) or 'none'}")
        if not isinstance(curve, list) or not curve or not all(isinstance(p, list) and len(p) == 2 for p in curve):
            raise UsageError(f"{where}: 'efficiency.{feature}' must be a list of [value, factor] pairs, got {curve!r}")
        values = _positive_list([p[0] for p in curve], f"{where}: 'efficiency.{feature}' values")
        factors = _positive_list([p[1] for p in curve], f"{where}: 'efficiency.{feature}' factors")
        _ascending(values, f"{where}: 'efficiency.{feature}' values")
        curves[feature] = tuple(zip(values, factors))
    evicted, refill = _seconds_by_size(data, "evicted", where), _seconds_by_size(data, "refill", where)
    evicted_llc = _seconds_by_size(data, "evicted_llc", where)
    interleaved = _seconds_by_size(data, "interleaved", where)
    evicted_share = data.get("evicted_share")
    if evicted_share is not None and not (_number(evicted_share) and 0 <= evicted_share <= 1):
        raise UsageError(f"{where}: 'evicted_share' must be a share of the last-level cache, 0..1, "
                         f"got {evicted_share!r}")
    reference = data.get("reference")
    if reference is not None and not (_number(reference) and reference > 0):
        raise UsageError(f"{where}: 'reference' must be a positive size, got {reference!r}")
    how = data.get("how", "")
    if not isinstance(how, str):
        raise UsageError(f"{where}: 'how' must be a string, got {how!r}")
    by = data.get("by", "work")
    if by != "work" and by not in known:
        raise UsageError(f"{where}: 'by' must be work or a feature of {root(kernel)} classes "
                         f"({', '.join(known) or 'none'}), got {by!r}")
    return KernelTable(kernel=kernel, dtype=dtype or None, overhead_s=float(overhead), sizes=tuple(sizes),
                       rates=tuple(rates), efficiency=curves, how=how, by=by,
                       evicted=evicted, refill=refill, evicted_llc=evicted_llc, interleaved=interleaved,
                       evicted_share=float(evicted_share) if evicted_share is not None else None,
                       reference=float(reference) if reference is not None else None)


def _seconds_by_size(data, key: str, where: str) -> tuple[tuple[float, float], ...]:
    """A table's [[size, seconds], ...] list under `key` (sizes ascending), checked."""
    pairs = data.get(key, [])
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise UsageError(f"{where}: '{key}' must be a list of [size, seconds] pairs, got {pairs!r}")
    if not pairs:
        return ()
    sizes = _positive_list([p[0] for p in pairs], f"{where}: '{key}' sizes")
    _ascending(sizes, f"{where}: '{key}' sizes")
    seconds = [p[1] for p in pairs]
    if not all(_number(v) and 0 <= v < 1 for v in seconds):
        raise UsageError(f"{where}: '{key}' seconds must be numbers, 0 <= value < 1, got {seconds!r}")
    return tuple(zip(sizes, (float(v) for v in seconds)))


def allocation_from_dict(data, origin: str) -> AllocationTable:
    where = f"{origin}: 'allocation'"
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a table with {', '.join(_ALLOC_FIELDS)}, got {data!r}")
    for name in data:
        if name not in _ALLOC_FIELDS:
            raise UsageError(f"{where}: unknown field '{name}'; accepted: {', '.join(_ALLOC_FIELDS)}")
    for name in ("sizes", "seconds_per_byte"):
        if name not in data:
            raise UsageError(f"{where}: missing field '{name}'")
    sizes = _positive_list(data["sizes"], f"{where}.sizes")
    per_byte = data["seconds_per_byte"]
    if not isinstance(per_byte, list) or len(per_byte) != len(sizes) or \
            not all(_number(v) and 0 <= v < 1 and math.isfinite(v) for v in per_byte):
        raise UsageError(f"{where}.seconds_per_byte must be {len(sizes)} numbers >= 0 (one per size), got {per_byte!r}")
    _ascending(sizes, f"{where}.sizes")
    how = data.get("how", "")
    if not isinstance(how, str):
        raise UsageError(f"{where}.how must be a string, got {how!r}")
    return AllocationTable(tuple(sizes), tuple(float(v) for v in per_byte), how)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_list(values, where: str) -> list[float]:
    if not isinstance(values, list) or not values or not all(_number(v) and v > 0 for v in values):
        raise UsageError(f"{where} must be a non-empty list of positive numbers, got {values!r}")
    return [float(v) for v in values]


def _ascending(values: list[float], where: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"{where} must be strictly ascending, got {values!r}")
