"""The device catalog: capacity, bandwidth and peak FLOP/s of the accelerators costmodel knows.

One TOML file per device in `hardware_specs/`, each figure with its source. Peaks are dense (no 2:4
sparsity), keyed by the dtype the math runs in; `float32` is the CUDA-core (non-tensor) rate, which
is also the vector peak that elementwise, norm and reduction ops run on. Capacity: a datasheet's
"N GB" of device memory is read as N GiB (N * 1024**3), the physical DRAM; torch.cuda reports a
little less. Bandwidth is decimal, as datasheets print it (1 GB/s = 1e9 B/s). The interconnect
(`gpus_per_node`, intra- and inter-node bus bandwidth and per-step latency) is what
`costmodel.comm` times collectives with; a file without it gets `comm.DEFAULT_INTERCONNECT`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from costmodel.hardware.comm import DEFAULT_INTERCONNECT, DEFAULT_INTERCONNECT_SOURCES, INTERCONNECT_FIELDS, Interconnect
from costmodel.errors import UsageError
from costmodel.hardware.kernels import AllocationTable, KernelTable, allocation_from_dict, find_table, tables_from_dict
from costmodel.hardware.roofline import DEFAULT_EFFICIENCY

DTYPES = ("float32", "tf32", "bfloat16", "float16", "float8")
DEFAULT_KERNEL_OVERHEAD_S = 5e-6
VECTOR_DTYPE = "float32"  # the peak elementwise ops run on, whatever their storage dtype

# Spellings users and torch use for the dtypes above.
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "f16": "float16",
    "fp8": "float8", "float8_e4m3fn": "float8", "float8_e5m2": "float8",
    "float8_e4m3fnuz": "float8", "float8_e5m2fnuz": "float8",
}
_REQUIRED = ("memory_bytes", "bandwidth_bytes_per_s", "peak_flops_per_s")
_OPTIONAL = ("name", "vendor", "description", "kernel_overhead_s", "calibrated", "efficiency", "sources",
             "compute_capability", "threads", "kernels", "allocation", "cache_bytes", "core_cache_bytes",
             "python_call_s", "autograd_node_s",
             *INTERCONNECT_FIELDS)


def canonical_dtype(dtype: str) -> str:
    """'torch.bfloat16' -> 'bfloat16', 'bf16' -> 'bfloat16', 'float8_e4m3fn' -> 'float8'."""
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(name, name)


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    peak_flops_per_s: dict[str, float] = field(hash=False)
    kernel_overhead_s: float = DEFAULT_KERNEL_OVERHEAD_S
    vendor: str = ""
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    path: str | None = field(default=None, compare=False)
    description: str = ""
    # True when the peaks are measured achievable rates (`costmodel hardware calibrate`), not
    # datasheet peaks: the roofline then scales its efficiencies so they are not applied twice.
    calibrated: bool = False
    # NVIDIA's compute capability ("8.0" for an A100), where it decides which kernels run (flash
    # attention needs 8.0 or newer); "" when unknown or not NVIDIA.
    compute_capability: str = ""
    # Per-device overrides of roofline.DEFAULT_EFFICIENCY (the [efficiency] table of the file).
    efficiency: dict[str, float] = field(default_factory=dict, hash=False)
    # Measured kernel classes (`costmodel hardware calibrate`): "matmul:float32" -> KernelTable.
    # Where an op's class has one, the roofline prices it from the table instead of the ramps.
    kernels: dict[str, KernelTable] = field(default_factory=dict, hash=False)
    # The CPU's price of fresh pages for large new outputs (None: not measured, or not paid).
    allocation: AllocationTable | None = None
    threads: int | None = None       # CPU threads the calibration ran with
    # Last-level cache (CPU) or L2 (GPU): a parameter read again after more traffic than this comes
    # from memory again. None: not known, no such term.
    cache_bytes: int | None = None
    # A CPU core's own cache (the level below the shared one): when more traffic than this (times
    # the threads) ran since a kernel's last call, its working state is evicted, and the tables'
    # `evicted` seconds apply. None: not known.
    core_cache_bytes: int | None = None
    # What the Python binding adds to an eager op over the same op called from C++ (the 2nd..nth op
    # of F.linear, of nn.GRU's loop; backward nodes but their first op). None: not measured.
    python_call_s: float | None = None
    # What the autograd engine costs per node of the backward graph, on the CPU that runs it: the
    # node recorded in the forward and run in the backward, beyond the ops it calls (which it calls
    # from C++). None: not measured; a backward node's first op then pays the Python binding instead.
    autograd_node_s: float | None = None
    # The interconnect (costmodel.comm): a file without these fields gets DEFAULT_INTERCONNECT,
    # and its sources say so.
    gpus_per_node: int = DEFAULT_INTERCONNECT.gpus_per_node
    intra_node_bandwidth_bytes_per_s: float = DEFAULT_INTERCONNECT.intra_node_bandwidth_bytes_per_s
    inter_node_bandwidth_bytes_per_s: float = DEFAULT_INTERCONNECT.inter_node_bandwidth_bytes_per_s
    intra_node_latency_s: float = DEFAULT_INTERCONNECT.intra_node_latency_s
    inter_node_latency_s: float = DEFAULT_INTERCONNECT.inter_node_latency_s

    def __post_init__(self):
        # Own copies: the caller's dicts stay theirs. (Plain dicts, so copy/pickle/asdict work;
        # catalog entries are shared, so treat the tables as read-only.)
        for name in ("peak_flops_per_s", "sources", "efficiency", "kernels"):
            object.__setattr__(self, name, dict(getattr(self, name)))

    def kernel_table(self, kernel: str | None, dtype: str | None) -> KernelTable | None:
        """The most specific measured table for an op of class `kernel` in `dtype`, or None."""
        return find_table(self.kernels, kernel, dtype)

    @property
    def interconnect(self) -> Interconnect:
        """The figures costmodel.comm times collectives with.

        >>> load_hardware("h100-sxm").interconnect.intra_node_bandwidth_bytes_per_s
        370000000000.0
        """
        return Interconnect(**{name: getattr(self, name) for name in INTERCONNECT_FIELDS})

    @property
    def vector_flops_per_s(self) -> float:
        """Peak of non-tensor-core math (elementwise, norms, reductions): the float32 figure."""
        return self.peak_flops_per_s[VECTOR_DTYPE]

    def peak_for(self, dtype: str, tf32: bool = False) -> float:
        """Dense matmul peak for `dtype`; float32 with `tf32=True` runs at the tf32 peak if any.

        >>> load_hardware("a100-80gb").peak_for("float32", tf32=True)
        156000000000000.0
        """
        key = canonical_dtype(dtype)
        if key == "float32" and tf32 and "tf32" in self.peak_flops_per_s:
            key = "tf32"
        if key not in self.peak_flops_per_s:
            raise UsageError(f"{self.name} has no {key} peak; it has "
                             f"{', '.join(self.peak_flops_per_s)}")
        return self.peak_flops_per_s[key]

    def ridge_point(self, dtype: str, tf32: bool = False) -> float:
        """FLOP/byte above which a `dtype` op is compute-bound: peak / bandwidth.

        >>> round(load_hardware("a100-80gb").ridge_point("bfloat16"), 1)  # 312e12 / 2.039e12
        153.0
        """
        return self.peak_for(dtype, tf32) / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict:
        """The JSON of `costmodel hardware show`."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "description": self.description,
            "memory_bytes": self.memory_bytes,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "peak_flops_per_s": dict(self.peak_flops_per_s),
            "ridge_point": {d: p / self.bandwidth_bytes_per_s for d, p in self.peak_flops_per_s.items()},
            "kernel_overhead_s": self.kernel_overhead_s,
            "calibrated": self.calibrated,
            "compute_capability": self.compute_capability,
            "efficiency": dict(self.efficiency),
            **{name: getattr(self, name) for name in INTERCONNECT_FIELDS},
            "sources": dict(self.sources),
            "path": self.path,
            "threads": self.threads,
            "cache_bytes": self.cache_bytes,
            "core_cache_bytes": self.core_cache_bytes,
            "python_call_s": self.python_call_s,
            "autograd_node_s": self.autograd_node_s,
            "kernels": {k: t.to_dict() for k, t in self.kernels.items()},
            "allocation": self.allocation.to_dict() if self.allocation else None,
        }


def list_hardware() -> list[Hardware]:
    """Every device in the catalog, sorted by name."""
    return list(_catalog().values())


def load_hardware(name_or_path: str) -> Hardware:
    """A catalog device by name (case-insensitive), or a user's TOML file by path.

    >>> load_hardware("A100-80GB").bandwidth_bytes_per_s
    2039000000000.0
    """
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    catalog = _catalog()
    key = text.lower()
    looks_like_path = text.endswith(".toml") or "/" in text or os.sep in text
    if key in catalog and not looks_like_path:
        return catalog[key]
    if looks_like_path or path.is_file():
        if not path.is_file():
            raise UsageError(f"hardware file '{text}' does not exist; pass a catalog name "
                             f"({', '.join(catalog)}) or a path to a .toml file")
        return _load_file(path)
    raise UsageError(f"unknown hardware '{text}'{_suggest(key, list(catalog))}; known: "
                     f"{', '.join(catalog)}; or give the path of a .toml file")


def parse_hardware_list(text: str) -> list[Hardware]:
    """'a100-80gb,h100-sxm' -> two devices, in the order given, duplicates dropped."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise UsageError(f"--hw got '{text}'; expected one or more devices separated by commas "
                         f"(known: {', '.join(_catalog())})")
    devices = [load_hardware(n) for n in dict.fromkeys(names)]
    return list({d.name: d for d in devices}.values())


def hardware_from_dict(data: dict, *, origin: str, path: str | None = None) -> Hardware:
    """Validate a parsed TOML table and build a Hardware; `origin` names it in errors."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: expected a table of fields, got {type(data).__name__}")
    known = _REQUIRED + _OPTIONAL
    for key in data:
        if key not in known:
            raise UsageError(f"{origin}: unknown field '{key}'{_suggest(key, known)}; "
                             f"accepted: {', '.join(known)}")
    for key in _REQUIRED:
        if key not in data:
            raise UsageError(f"{origin}: missing field '{key}'; required: {', '.join(_REQUIRED)}")
    name = data.get("name", Path(path).stem if path else "")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{origin}: 'name' must be a non-empty string, got {name!r}")
    memory_bytes = _positive(data["memory_bytes"], "memory_bytes", origin)
    if not isinstance(data["memory_bytes"], int):
        raise UsageError(f"{origin}: 'memory_bytes' must be an integer number of bytes, "
                         f"got {data['memory_bytes']!r}")
    peaks = data["peak_flops_per_s"]
    if not isinstance(peaks, dict) or not peaks:
        raise UsageError(f"{origin}: 'peak_flops_per_s' must be a table keyed by dtype "
                         f"({', '.join(DTYPES)}), got {peaks!r}")
    peak_flops_per_s = {}
    for dtype, value in peaks.items():
        if dtype not in DTYPES:
            raise UsageError(f"{origin}: unknown dtype 'peak_flops_per_s.{dtype}'"
                             f"{_suggest(dtype, DTYPES)}; accepted: {', '.join(DTYPES)}")
        peak_flops_per_s[dtype] = _positive(value, f"peak_flops_per_s.{dtype}", origin)
    if VECTOR_DTYPE not in peak_flops_per_s:
        raise UsageError(f"{origin}: missing field 'peak_flops_per_s.float32' (the non-tensor-core "
                         f"peak, also used for elementwise ops)")
    # Keep dtype order stable (DTYPES order) whatever order the file uses.
    peak_flops_per_s = {d: peak_flops_per_s[d] for d in DTYPES if d in peak_flops_per_s}
    overhead = data.get("kernel_overhead_s", DEFAULT_KERNEL_OVERHEAD_S)
    if not _is_number(overhead) or overhead < 0 or not math.isfinite(overhead):
        raise UsageError(f"{origin}: 'kernel_overhead_s' must be a number >= 0, got {overhead!r}")
    calibrated = data.get("calibrated", False)
    if not isinstance(calibrated, bool):
        raise UsageError(f"{origin}: 'calibrated' must be true or false, got {calibrated!r}")
    for key in ("vendor", "description"):
        if not isinstance(data.get(key, ""), str):
            raise UsageError(f"{origin}: '{key}' must be a string, got {data[key]!r}")
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise UsageError(f"{origin}: 'sources' must be a table of strings (field = \"where it is "
                         f"from\"), got {sources!r}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UsageError(f"{origin}: 'threads' must be a positive integer (the CPU threads of the "
                         f"calibration), got {threads!r}")
    for key in ("cache_bytes", "core_cache_bytes"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{origin}: '{key}' must be a positive integer number of bytes, got {value!r}")
    cache_bytes = data.get("cache_bytes")
    python_call_s, autograd_node_s = data.get("python_call_s"), data.get("autograd_node_s")
    for key, value in (("python_call_s", python_call_s), ("autograd_node_s", autograd_node_s)):
        if value is not None and (not _is_number(value) or not 0 <= value < 1):
            raise UsageError(f"{origin}: '{key}' must be seconds, 0 <= value < 1, got {value!r}")
    interconnect, sources = _interconnect(data, sources, origin)
    return Hardware(
        name=name.strip(), memory_bytes=memory_bytes,
        bandwidth_bytes_per_s=float(_positive(data["bandwidth_bytes_per_s"], "bandwidth_bytes_per_s", origin)),
        peak_flops_per_s={d: float(p) for d, p in peak_flops_per_s.items()},
        kernel_overhead_s=float(overhead), vendor=data.get("vendor", ""), sources=sources,
        path=path, description=data.get("description", ""), calibrated=calibrated,
        compute_capability=_capability(data.get("compute_capability", ""), origin),
        efficiency=_efficiency(data.get("efficiency", {}), origin), **interconnect,
        kernels=tables_from_dict(data.get("kernels", {}), origin, DTYPES),
        allocation=allocation_from_dict(data["allocation"], origin) if "allocation" in data else None,
        threads=threads, cache_bytes=cache_bytes, core_cache_bytes=data.get("core_cache_bytes"),
        python_call_s=float(python_call_s) if python_call_s is not None else None,
        autograd_node_s=float(autograd_node_s) if autograd_node_s is not None else None,
    )


def _capability(value, origin: str) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+", value):
        raise UsageError(f"{origin}: 'compute_capability' must be a string such as \"8.0\", got {value!r}")
    return value


def _interconnect(data: dict, sources: dict, origin: str) -> tuple[dict, dict]:
    """The interconnect fields of a file, validated; a missing one takes costmodel.comm's default
    and a source saying it is one (so `hardware show` never passes a default off as a figure)."""
    values, sources = {}, dict(sources)
    for key in INTERCONNECT_FIELDS:
        if key not in data:
            values[key] = getattr(DEFAULT_INTERCONNECT, key)
            sources.setdefault(key, DEFAULT_INTERCONNECT_SOURCES[key])
            continue
        value = data[key]
        if key == "gpus_per_node":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{origin}: 'gpus_per_node' must be an integer >= 1 (GPUs in one "
                                 f"node), got {value!r}")
        elif key.endswith("_bytes_per_s"):
            value = float(_positive(value, key, origin))
        elif not _is_number(value) or not math.isfinite(value) or not 0 <= value < 1:
            raise UsageError(f"{origin}: '{key}' must be seconds per step, >= 0 and below 1 "
                             f"(NCCL's are microseconds: 3.4e-6), got {value!r}")
        values[key] = value if key == "gpus_per_node" else float(value)
    return values, sources


def _efficiency(table, origin: str) -> dict[str, float]:
    if not isinstance(table, dict):
        raise UsageError(f"{origin}: 'efficiency' must be a table, got {table!r}")
    out = {}
    for key, value in table.items():
        if key not in DEFAULT_EFFICIENCY:
            raise UsageError(f"{origin}: unknown field 'efficiency.{key}'"
                             f"{_suggest(key, list(DEFAULT_EFFICIENCY))}; accepted: "
                             f"{', '.join(DEFAULT_EFFICIENCY)}")
        if key.endswith("_s"):  # a ramp, in seconds
            if not _is_number(value) or not 0 <= value < math.inf:
                raise UsageError(f"{origin}: 'efficiency.{key}' must be seconds >= 0, got {value!r}")
        elif not _is_number(value) or not 0 < value <= 1:
            raise UsageError(f"{origin}: 'efficiency.{key}' is a fraction of the peak, "
                             f"expected 0 < value <= 1, got {value!r}")
        out[key] = float(value)
    return out


def _positive(value, key: str, origin: str):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{origin}: '{key}' must be a positive number, got {value!r}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suggest(word: str, choices) -> str:
    """' (did you mean a100-40gb or a100-80gb?)': names that start with `word`, then close ones."""
    close = [c for c in choices if c.startswith(word)]
    # Close spellings, only those about as close as the closest: a typo of bandwidth_bytes_per_s
    # is not also offered intra_node_bandwidth_bytes_per_s.
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in choices), reverse=True)
    close += [c for score, c in scored[:3] if score >= max(0.6, scored[0][0] - 0.1) and c not in close]
    if not close:
        return ""
    close = close[:3]
    spelled = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {spelled}?)"


def _load_file(path: Path) -> Hardware:
    origin = f"hardware file '{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {origin}: {e.strerror}") from e
    return _load_text(text, origin, str(path))


def _load_text(text: str, origin: str, path: str | None) -> Hardware:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{origin} is not valid TOML: {e}") from e
    return hardware_from_dict(data, origin=origin, path=path)


_CATALOG: dict[str, Hardware] | None = None


def _catalog() -> dict[str, Hardware]:
    global _CATALOG
    if _CATALOG is None:
        devices = [_load_text(text, f"catalog file '{where}'", where) for where, text in _catalog_texts()]
        by_name = {d.name.lower(): d for d in sorted(devices, key=lambda d: d.name)}
        if len(by_name) != len(devices):
            raise RuntimeError(f"duplicate names in the device catalog: {sorted(d.name for d in devices)}")
        _CATALOG = by_name
    return _CATALOG


def _catalog_texts() -> list[tuple[str, str]]:
    """(where, text) of each device file: the top-level `hardware_specs/` of the source tree this
    module runs from, else the installed package `costmodel.hardware_specs`. The checkout comes
    first so that a second checkout on PYTHONPATH (a git worktree) reads its own catalog, not the
    one an editable install maps `costmodel.hardware_specs` to."""
    entries = list((Path(__file__).resolve().parents[2] / "hardware_specs").glob("*.toml"))
    if not entries:
        try:
            entries = [f for f in resources.files("costmodel.hardware_specs").iterdir() if f.name.endswith(".toml")]
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            entries = []
    if not entries:
        raise RuntimeError("no hardware_specs/*.toml in the installed package or next to costmodel/: "
                           "the package is installed without its device catalog")
    return sorted((str(f), f.read_text(encoding="utf-8")) for f in entries)
