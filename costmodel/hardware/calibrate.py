"""Measure this machine as a device file: peaks, bandwidth and per-op overhead, then one measured
table per kernel class (costmodel/hardware/calibrate_kernels.py), so the roofline prices each op as that
kind of kernel runs here.

`calibrate("cpu", "my-cpu.toml")` times large matmuls, a large tensor copy and a tiny op with
torch.utils.benchmark (warm-up, then the median of blocks), then the kernel classes (products by
shape, convolutions dense/depthwise/grouped/transposed, each SDPA kernel, norms, softmax,
reductions, each common elementwise op, copies, embedding, optimizers, eager views), and writes a
TOML that `load_hardware("my-cpu.toml")` reads. The file says `calibrated = true`: its peaks are
achievable rates already, so the generic roofline measures its efficiencies relative to them; ops
whose class has a table are priced from it. Bytes are counted as the cost model counts them: a copy
reads n bytes and writes n bytes, whatever the cache does on top. The CPU threads are torch's at the
time (`torch.set_num_threads`); a calibration holds for that thread count.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

from costmodel.errors import CostModelError, UsageError
from costmodel.hardware.catalog import Hardware, hardware_from_dict

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class _Plan:
    """How hard to measure: full runs take ~10 s on a 2-core CPU; quick ones are for tests."""
    max_matmul_n: int
    target_call_s: float      # grow the matmul until one call takes this long
    min_run_time_s: float     # per measurement, after warm-up
    copy_bytes: int


def _plan(device: str, quick: bool) -> _Plan:
    if quick:
        return _Plan(max_matmul_n=512, target_call_s=0.002, min_run_time_s=0.05, copy_bytes=16 << 20)
    if device == "cpu":
        # 256 MiB is 8x this machine's 32 MiB L3 and still small for any host.
        return _Plan(max_matmul_n=4096, target_call_s=0.1, min_run_time_s=1.0, copy_bytes=256 << 20)
    # 1 GiB: 20x an H100's 50 MB L2. 8192^3 bf16 GEMMs reach cuBLAS' large-shape rate.
    return _Plan(max_matmul_n=8192, target_call_s=0.002, min_run_time_s=0.5, copy_bytes=1 << 30)


def calibrate(device: str = "cpu", out_path: str | os.PathLike | None = None, *, quick: bool = False,
              name: str | None = None, kernels: bool = True, progress=None) -> Hardware:
    """Measure `device` ("cpu" or "cuda"), write the TOML to `out_path` (if given), return it loaded.
    `kernels=False` measures the peaks only (the file format of earlier versions); `progress` is
    called with the name of each kernel class as its measurement starts."""
    import torch

    from costmodel.hardware.calibrate_kernels import AUTOGRAD_CHAIN, kernel_plan, measure_kernels

    if device not in DEVICES:
        raise UsageError(f"--device got '{device}'; accepted: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda, but torch {torch.__version__} sees no CUDA device; "
                         f"use --device cpu")
    out = Path(out_path) if out_path is not None else None
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--out '{out}': directory '{out.parent}' does not exist")
    if device == "cpu":
        from costmodel.validate.stats import settle_heap
        settle_heap()    # glibc's heap as `validate` times models in, whatever this process ran before
    plan = _plan(device, quick)
    machine = _machine(device)
    stamp = f"measured by costmodel hardware calibrate on {datetime.date.today().isoformat()}, " \
            f"torch {torch.__version__}, {machine}"

    peaks, sources = {}, {}
    for dtype in _dtypes(device):
        measured = _matmul_flops_per_s(device, dtype, plan)
        if measured is None:
            continue
        peaks[dtype], detail = measured
        sources[f"peak_flops_per_s.{dtype}"] = f"{stamp}: {detail}"
    bandwidth, detail = _copy_bandwidth(device, plan)
    sources["bandwidth_bytes_per_s"] = f"{stamp}: {detail}"
    overhead_s, detail = _op_overhead_s(device, plan)
    sources["kernel_overhead_s"] = f"{stamp}: {detail}"
    memory_bytes, detail = _memory_bytes(device)
    sources["memory_bytes"] = f"{detail} (on {machine})"
    measured = measure_kernels(device, kernel_plan(device, quick), stamp, progress) if kernels else None

    fields = {"name": name or f"calibrated-{device}", "vendor": _vendor(device),
              "description": f"{machine}, measured", "calibrated": True, "memory_bytes": memory_bytes,
              "bandwidth_bytes_per_s": bandwidth, "kernel_overhead_s": overhead_s}
    if device == "cpu":
        fields["threads"] = torch.get_num_threads()
    sections = {"peak_flops_per_s": peaks, "sources": sources}
    if measured is not None:
        fields["cache_bytes"] = measured.cache_bytes
        sources["cache_bytes"] = "sysfs /sys/devices/system/cpu/cpu0/cache (the largest level)" if device == "cpu" \
            else "torch.cuda.get_device_properties().L2_cache_size"
        if measured.core_cache_bytes is not None:
            fields["core_cache_bytes"] = measured.core_cache_bytes
            sources["core_cache_bytes"] = "sysfs /sys/devices/system/cpu/cpu0/cache (the largest level below the last)"
        if measured.python_call_s is not None:
            fields["python_call_s"] = measured.python_call_s
            sources["python_call_s"] = f"{stamp}: a Python loop of tiny in-place adds less the same adds made by " \
                                       f"torch._foreach_add_'s C++ loop, per op, {_threads(device)}"
        if measured.autograd_node_s is not None:
            fields["autograd_node_s"] = measured.autograd_node_s
            sources["autograd_node_s"] = f"{stamp}: a chain of {AUTOGRAD_CHAIN} adds of tiny tensors, forward " \
                                         f"and backward less the forward without grad, per add, {_threads(device)}"
        if measured.allocation is not None:
            sections["allocation"] = measured.allocation.to_dict()
        sections.update({f"kernels.{_toml_key(key)}": table.to_dict() for key, table in measured.tables.items()})
    if device == "cpu":
        note = busy_cpu_note(torch.get_num_threads())
        if note:
            warnings.warn(note, stacklevel=2)
    text = _to_toml(
        header=f"Written by `costmodel hardware calibrate --device {device}`: measured achievable rates.",
        fields=fields, tables=sections)
    if out is not None:
        out.write_text(text, encoding="utf-8")
    return hardware_from_dict(tomllib.loads(text), origin=f"calibration of {device}",
                              path=str(out) if out is not None else None)


def calibrate_apart(device: str = "cpu", out_path: str | os.PathLike | None = None, *, quick: bool = False) -> Hardware:
    """`calibrate` run in a process of its own (`python -m costmodel hardware calibrate`, at this
    process's thread count on a CPU), its file loaded here: for a process that times models next
    (`validate` without --hw, the time benchmark). A process that has calibrated runs models
    slower afterwards than a fresh one, and not by the heap alone (`settle_heap` is done either
    way): ConvNeXt at batch 8, one thread, 25.1-25.6 ms a step after an in-process calibration
    against 22.9-23.6 in a fresh process timed right after each (22.3-23.0 before it), while the
    quick probes of `machine_speed` read the machine as calibrated in both."""
    import subprocess
    import sys
    import tempfile

    import torch

    from costmodel.hardware.catalog import load_hardware

    if device not in DEVICES:
        raise UsageError(f"--device got '{device}'; accepted: {', '.join(DEVICES)}")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(out_path) if out_path is not None else Path(scratch) / f"calibrated-{device}.toml"
        env = dict(os.environ)
        if device == "cpu":
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        command = [sys.executable, "-m", "costmodel", "hardware", "calibrate", "--device", device, "--out", str(path)]
        done = subprocess.run(command + (["--quick"] if quick else []), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.stderr.strip():
            sys.stderr.write(done.stderr)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise CostModelError(f"calibrating {device} in a separate process ({' '.join(command[1:])}) failed: {tail}")
        return load_hardware(str(path))


def busy_cpu_note(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """What to say when other work shared this CPU's cores during a calibration (the 1-minute load
    average, ours included, above the cores): its tables then hold that slowdown; and at more than
    one thread, each parallel op also waits for a thread on a busy core, so on a shared machine only
    a one-thread calibration means much. None on a free machine or where the load is not known."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            return None
    cores = cores or os.cpu_count() or 1
    if load <= cores + 0.5:
        return None
    note = (f"the load average was {load:.1f} on {cores} CPUs during the calibration: other work shared the "
            f"cores, and the measured rates include its slowdown")
    if threads > 1:
        note += (f"; at {threads} threads each parallel op also waits for a thread whose core is busy: "
                 f"calibrate at one thread (OMP_NUM_THREADS=1) on a shared machine")
    return note


SPEED_PROBE_ELEMENTS = {"add": 262144, "small": 65536}
SPEED_PROBE_MATMUL = 256


def machine_speed(hw: Hardware) -> dict[str, float] | None:
    """How fast this CPU runs now against the calibration `hw`: a product and an elementwise add in
    cache, a clone of the largest tensor the calibration cloned (past the core caches, through the
    last-level cache and memory that other tenants of a host share), and a small add (64K elements,
    a few microseconds: at more than one thread mostly the threads' fork and join), each timed as
    the calibration times them (the thread's clock at one thread; the fastest of 7 blocks) and given
    as predicted / measured time (each priced as a model's op is, its rule's features and fresh
    output included): 1.0 as calibrated, 0.8 20% slower (other work sharing the core's
    caches, the memory or the package's power, or a different machine), 1.2 faster. About a quarter
    of a second. None where `hw` has no kernel tables for them (not a calibration of a CPU)."""
    import torch
    from costmodel.hardware.calibrate_kernels import rule_cost
    from costmodel.hardware.kernels import ALLOC_FEATURE
    from costmodel.hardware.roofline import op_time

    copy = hw.kernel_table("copy", None)
    if copy is None or not copy.sizes:
        return None
    clock = _clock("cpu")
    n, elements, few = SPEED_PROBE_MATMUL, SPEED_PROBE_ELEMENTS["add"], SPEED_PROBE_ELEMENTS["small"]
    x, w, b = torch.randn(n, n), torch.randn(n, n), torch.randn(n)
    u, v = torch.randn(elements), torch.randn(elements)
    s, t = torch.randn(few), torch.randn(few)
    copied = int(copy.sizes[-1] // 8)   # elements of the largest clone: its bytes are read and written
    src = torch.randn(copied)
    aten = torch.ops.aten
    # name: (call, the aten op and arguments it runs, category); its FLOPs, bytes, kernel class and
    # features (the fresh output's bytes among them) come from the op's rule, as in a model
    probes = {"matmul": (lambda: torch.addmm(b, x, w.t()), (aten.addmm.default, b, x, w.t()), "matmul"),
              "add": (lambda: torch.add(u, v), (aten.add.Tensor, u, v), "pointwise"),
              "copy": (lambda: src.clone(), (aten.clone.default, src), "copy"),
              "small": (lambda: torch.add(s, t), (aten.add.Tensor, s, t), "pointwise")}
    out = {}
    with torch.no_grad():
        for name, (fn, (op, *args), category) in probes.items():
            cost = rule_cost(op, *args)
            if hw.kernel_table(cost.kernel, "float32") is None:
                return None
            features = {**cost.features, ALLOC_FEATURE: cost.alloc_bytes}
            predicted = op_time(cost.flops, cost.bytes, category, "float32", hw, kernel=cost.kernel,
                                features=features).time_s
            for _ in range(3):
                fn()
            number = max(1, int(0.02 / max(predicted, 1e-7)))
            times = []
            for _ in range(7):
                t0 = clock()
                for _ in range(number):
                    fn()
                times.append((clock() - t0) / number)
            out[name] = predicted / max(min(times), 1e-9)
    return out


def _vendor(device: str) -> str:
    """Who made the measured device: attention="auto" models a GPU's fused kernels by vendor."""
    if device == "cuda":
        import torch
        return "amd" if getattr(torch.version, "hip", None) else "nvidia"
    return "cpu"


def _dtypes(device: str) -> list[str]:
    if device == "cpu":
        return ["float32", "bfloat16"]
    return ["float32", "tf32", "bfloat16", "float16", "float8"]


def _matmul_flops_per_s(device: str, dtype: str, plan: _Plan) -> tuple[float, str] | None:
    """Median rate of an n x n x n matmul, n grown until one call is long enough to time well."""
    import torch

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        n = 256
        while True:
            call = _matmul_call(device, dtype, n)
            if call is None:
                return None
            seconds = _time_once(call, device)
            if seconds >= plan.target_call_s or n * 2 > plan.max_matmul_n:
                break
            n *= 2
        median_s, runs = _median_s(call, device, plan.min_run_time_s)
    finally:
        torch.set_float32_matmul_precision(precision)
    flops = 2 * n**3  # one multiply-add per (i, j, k) is 2 FLOPs
    return flops / median_s, f"{n}x{n}x{n} {dtype} matmul, 2*n^3 FLOPs / median of {runs} runs " \
                             f"({median_s * 1e3:.3g} ms), {_threads(device)}"


def _matmul_call(device: str, dtype: str, n: int):
    """A zero-argument function doing one n x n x n matmul in `dtype`, or None if unsupported."""
    import torch

    if dtype == "float8":
        # Hopper/Ada only; torch._scaled_mm wants the second operand column-major.
        if device != "cuda" or torch.cuda.get_device_capability() < (8, 9):
            return None
        try:
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            from costmodel._torch import scaled_mm
            call = lambda: scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731
            call()
            return call
        except (RuntimeError, TypeError, AttributeError):
            return None
    torch_dtype = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    c = torch.empty(n, n, device=device, dtype=torch_dtype)
    return lambda: torch.mm(a, b, out=c)


def _copy_bandwidth(device: str, plan: _Plan) -> tuple[float, str]:
    """Copy into a preallocated tensor: the memory system's rate. Also timed, for the record: a
    clone, which allocates; on a CPU, fresh pages over glibc's mmap threshold fault on first touch,
    which eager ops with large outputs pay and the roofline does not model."""
    import torch

    numel = plan.copy_bytes // 4
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    moved = 2 * src.nbytes  # read src + write dst, as the cost model counts a copy
    median_s, runs = _median_s(lambda: dst.copy_(src), device, plan.min_run_time_s)
    clone_s, _ = _median_s(lambda: src.clone(), device, plan.min_run_time_s)
    return moved / median_s, f"copy of a {src.nbytes >> 20} MiB float32 tensor into a preallocated " \
                             f"one, bytes read + written / median of {runs} runs ({median_s * 1e3:.3g} ms), " \
                             f"{_threads(device)}; clone() of it, which also allocates, " \
                             f"ran at {moved / clone_s / 1e9:.3g} GB/s"


def _op_overhead_s(device: str, plan: _Plan) -> tuple[float, str]:
    import torch

    x = torch.zeros(1, device=device)
    median_s, runs = _median_s(lambda: x.add_(1), device, plan.min_run_time_s)
    return median_s, f"median time of an in-place add on a 1-element tensor, back to back " \
                     f"({runs} runs): dispatch + launch cost of one eager op"


def _memory_bytes(device: str) -> tuple[int, str]:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), "torch.cuda.get_device_properties().total_memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), \
        "physical RAM: sysconf(SC_PAGE_SIZE) * sysconf(SC_PHYS_PAGES)"


def _time_once(call, device: str) -> float:
    """One warm call's wall time (the first call may pay for allocation and kernel selection)."""
    call()
    _sync(device)
    clock = _clock(device)
    start = clock()
    call()
    _sync(device)
    return clock() - start


def _clock(device: str):
    """One CPU thread: the thread's own clock, as the kernel tables and `validate` time (other
    processes' time slices do not count); else the wall clock."""
    import torch

    return time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _median_s(call, device: str, min_run_time_s: float) -> tuple[float, int]:
    """Median seconds per call over blocks of calls (torch.utils.benchmark syncs CUDA per block)."""
    from torch.utils import benchmark

    call()
    _sync(device)
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, timer=_clock(device))
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    return measurement.median, measurement.number_per_run * len(measurement.times)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _threads(device: str) -> str:
    import torch

    return f"{torch.get_num_threads()} CPU threads" if device == "cpu" else "CUDA"


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def _to_toml(header: str, fields: dict, tables: dict[str, dict]) -> str:
    """Top-level fields, then one [table] each (its name already quoted where needed); a dict value
    inside a table is written as dotted keys (efficiency.m = [[1.0, 0.2], ...])."""
    lines = [f"# {header}"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    for table, values in tables.items():
        lines += ["", f"[{table}]"]
        for key, value in values.items():
            if isinstance(value, dict):
                lines += [f"{_toml_key(key)}.{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes
