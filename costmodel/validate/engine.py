"""Validation: run the real model at several sizes, measure time and peak memory, set them against
the prediction, and fit how each grows (the doubling experiment, see `costmodel.complexity`).

    >>> r = validate("gpt2", device="cuda", dtype="bfloat16", mode="train", dims={"batch": [8], "seq": [256, 512, 1024]})
    >>> r.exponents["seq"]["measured"], r.classes["seq"]["measured"], r.errors["time_mape"]   # doctest: +SKIP
    (1.21, 'O(seq)', 14.2)

Per point: the measured step time (warm-up, then the median of `repeats`; CUDA events on a GPU) and
peak memory (`torch.cuda.max_memory_allocated` after a reset on CUDA; on the CPU, memtrack's count
of live tensor storage), next to the predicted time (roofline on `hardware`, by default this machine
calibrated once per session), peak and FLOPs. An out-of-memory is caught and kept as a measured
OOM beside the peak the memory model predicted for that point. On the CPU the measured peak is also
checked against an independent figure: the CPU allocator's own allocation events, from the profiler.
Errors are signed percentages, (predicted - measured) / measured * 100.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from costmodel.validate.meters import measure
from costmodel.validate.runner import Runner, build_real
from costmodel.validate.stats import complexity_class, fit_exponent, minor_faults, settle_heap, time_call
from costmodel.errors import AnalysisError, CostModelError, UsageError

DEVICES = ("cpu", "cuda")
FORMATS = ("table", "json", "markdown", "csv")
# exponent key -> (section of a point, figure); "measured"/"predicted" are times, as in the contract
SERIES = {"measured": ("measured", "time_s"), "predicted": ("predicted", "time_s"), "flops": ("predicted", "flops"),
          "memory": ("measured", "peak_memory_bytes"), "predicted_memory": ("predicted", "peak_memory_bytes")}
SERIES_LABELS = {"measured": "measured time", "predicted": "predicted time", "flops": "FLOPs",
                 "memory": "measured peak", "predicted_memory": "predicted peak"}
# generate mode adds the time to first token and the mean time of a decode step
GENERATE_SERIES = {"measured_ttft": ("measured", "time_to_first_token_s"),
                   "predicted_ttft": ("predicted", "time_to_first_token_s"),
                   "measured_token": ("measured", "token_time_s"), "predicted_token": ("predicted", "token_time_s")}
GENERATE_LABELS = {"measured_ttft": "measured time to 1st token", "predicted_ttft": "predicted time to 1st token",
                   "measured_token": "measured time per token", "predicted_token": "predicted time per token"}


def series_of(mode: str) -> dict:
    """The series whose exponents are fitted: SERIES, and in generate mode GENERATE_SERIES too."""
    return {**SERIES, **GENERATE_SERIES} if mode == "generate" else dict(SERIES)


def labels_of(mode: str) -> dict:
    return {**SERIES_LABELS, **GENERATE_LABELS} if mode == "generate" else dict(SERIES_LABELS)
CALIBRATION_MAX_AGE_S = 12 * 3600
CPU_MEMORY_MARGIN = 0.9      # do not run a CPU point predicted to need more than this share of free RAM


@dataclass
class PointResult:
    dims: dict[str, int]
    measured: dict            # {"time_s", "peak_memory_bytes", ...} or {"oom": True, "error"} or {"skipped"}
    predicted: dict           # {"time_s", "peak_memory_bytes", "flops"}
    errors: dict = field(default_factory=dict)   # signed percentages

    @property
    def ok(self) -> bool:
        return "time_s" in self.measured

    def to_dict(self) -> dict:
        return {"dims": dict(self.dims), "measured": dict(self.measured), "predicted": dict(self.predicted),
                "errors": dict(self.errors)}


@dataclass
class ValidationResult:
    model: str
    mode: str
    dtype: str
    device: str
    hardware: str | None
    repeats: int
    swept: list[str]
    points: list[PointResult]
    exponents: dict[str, dict[str, float | None]]
    doubling_ratios: dict[str, list[dict]]
    classes: dict[str, dict[str, str | None]]
    errors: dict[str, float | int | None]
    capacity_bytes: int | None = None
    device_name: str = ""
    environment: dict = field(default_factory=dict)   # threads, load average: what the times were taken under
    rounds: int = 1                                   # timing passes over the sweep

    def to_dict(self) -> dict:
        """The contract's JSON of `validate`."""
        return {"model": self.model, "mode": self.mode, "dtype": self.dtype, "device": self.device,
                "device_name": self.device_name, "hardware": self.hardware, "repeats": self.repeats,
                "rounds": self.rounds,
                "capacity_bytes": self.capacity_bytes, "environment": dict(self.environment),
                "swept": list(self.swept),
                "points": [p.to_dict() for p in self.points], "exponents": self.exponents,
                "doubling_ratios": self.doubling_ratios, "classes": self.classes, "errors": self.errors}

    def to_json(self) -> str:
        from costmodel.render.json import validation_json
        return validation_json(self)

    def to_table(self, style: str = "simple") -> str:
        from costmodel.render.text import validation_table
        return validation_table(self, style)

    def to_csv(self) -> str:
        from costmodel.render.csv import validation_csv
        return validation_csv(self)


# --- the engine ------------------------------------------------------------------------------------

def validate(model, inputs: list[str] | None = None, *, dims: dict[str, list[int] | int], device: str = "cpu",
             mode: str = "inference", dtype: str | torch.dtype = "float32", optimizer: str = "adamw",
             attention: str = "auto", loss: str = "sum", amp: bool = False, hardware=None, repeats: int = 5,
             warmup: int = 1, min_time_s: float = 0.5, rounds: int = 3, progress: bool = True,
             cross_check: bool | None = None, trust_remote_code: bool = False,
             targets: list[str] | None = None, kv_dtype: str | None = None) -> ValidationResult:
    """Measure `model` at every point of `dims` (a cartesian product of value lists) on `device`
    and compare with the prediction. `hardware` (a name, .toml path or Hardware) prices the predicted
    time; by default this machine is calibrated (once per shell session, cached in the temp dir).
    Each time is the median of at least `repeats` steps, more while under `min_time_s` of timing,
    taken in `rounds` passes over the sweep (each with its share of both; at most `repeats` passes):
    a machine slowed for a few seconds by other work then disturbs one pass of a point, not all its
    samples, and the median stays with the others. The first pass also measures the peak memory.
    `cross_check` (default: on the CPU) adds the profiler's allocator-level peak to each point.
    `trust_remote_code`: a Hugging Face config's auto_map code may run (as in analyze).
    `mode="generate"`: each point is a greedy generation of `gen` new tokens after a prompt of `prompt`
    (no early stop), measured whole (peak, time) and step by step: the time to first token (the
    prefill) and every decode step's time, against the roofline of each step; each point also gets
    the straight line a + b * ctx fitted to its per-token times, measured and predicted (a decode
    step reads the whole cache, so its time grows linearly with the context)."""
    from costmodel.api import analyze
    from costmodel.capture.specs import dtype_name, parse_dtype

    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}; accepted: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda, but torch {torch.__version__} sees no CUDA device; use --device cpu")
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1; got {repeats}")
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1; got {rounds}")
    sweep = {d: (list(v) if isinstance(v, (list, tuple)) else [v]) for d, v in (dims or {}).items()}
    empty = [d for d, v in sweep.items() if not v]
    if empty:
        raise UsageError(f"validate runs the model, so every dimension needs values; --dim {empty[0]} has none "
                         f"(e.g. --dim {empty[0]}=128,256,512)")
    sweep = {d: list(dict.fromkeys(v)) for d, v in sweep.items()}
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    hw = _hardware(hardware, device)
    cross_check = (device == "cpu") if cross_check is None else cross_check
    if cross_check and device != "cpu":
        raise UsageError("cross_check compares with the CPU allocator's events; it needs device='cpu' "
                         "(on CUDA the measured peak is already the allocator's)")

    # the analysis models the kernels and autocast policy of the device that runs
    report = analyze(model, inputs=inputs, mode=mode, dtype=torch_dtype, optimizer=optimizer, attention=attention,
                     loss=loss, dims=sweep, hardware=hw, complete=True, trust_remote_code=trust_remote_code,
                     amp=device if amp else False, device=device, targets=targets, kv_dtype=kv_dtype)
    missing = [d for d in report.dims if d not in sweep]
    if missing:
        raise UsageError(f"dimension {missing[0]!r} has no value; validate runs the model, give it one, "
                         f"e.g. --dim {missing[0]}=N")
    names = list(sweep)
    combos = [dict(zip(names, c)) for c in itertools.product(*(sweep[n] for n in names))]
    swept = [d for d in names if len(sweep[d]) > 1]

    environment = _environment(device)
    calibration = _calibration_check(hw, device)
    if calibration:
        environment["calibration"] = calibration
    runner = _Runner(model, report, device, torch_dtype, mode, optimizer, loss, amp, trust_remote_code,
                     report.options.kv_dtype)
    capacity = _capacity_bytes(device, hw)
    passes = min(rounds, repeats)
    per_pass = {"repeats": math.ceil(repeats / passes), "warmup": warmup, "min_time_s": min_time_s / passes}
    points: list[tuple[dict, dict, dict, list | None]] = []    # dims, predicted, measured, timed samples
    bar = _progress(len(combos) * passes, f"validate {report.model}", progress)
    try:
        for point_dims in combos:
            if bar is not None:
                bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in point_dims.items()))
            point = report.evaluate(**point_dims)
            predicted = {"time_s": point.totals.get("time_s"),
                         "peak_memory_bytes": int(point.totals["peak_memory_bytes"]),
                         "flops": int(point.totals["flops"])}
            if mode == "generate":
                predicted.update(_predicted_generation(point, hw, report.tf32))
            measured, samples = runner.measure(point_dims, predicted["peak_memory_bytes"], cross_check=cross_check,
                                               **per_pass)
            points.append((point_dims, predicted, measured, samples))
            if bar is not None:
                bar.update(1)
        for _ in range(passes - 1):
            for point_dims, _predicted, measured, samples in points:
                if samples is not None and "oom" not in measured:
                    runner.time_again(point_dims, samples, measured=measured, **per_pass)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        runner.close()
    results = [PointResult(d, m, p, _point_errors(m, p, capacity)) for d, p, m, _ in points]

    exponents, classes = _exponents(results, swept, series_of(mode))
    return ValidationResult(
        model=report.model, mode=mode, dtype=dtype_name(torch_dtype), device=device,
        hardware=hw.name if hw is not None else None, repeats=repeats, rounds=passes, swept=swept, points=results,
        exponents=exponents, doubling_ratios=_doubling(results, swept, names, series_of(mode)), classes=classes,
        errors=_summary(results), capacity_bytes=capacity, device_name=_device_name(device),
        environment=environment)


class _Runner:
    """The real model on the device (validate/runner.Runner), measured point by point."""

    def __init__(self, source, report, device: str, dtype: torch.dtype, mode: str, optimizer: str, loss: str,
                 amp: bool, trust_remote_code: bool = False, kv_dtype: torch.dtype | None = None):
        self.report, self.device, self.mode = report, device, mode
        torch.manual_seed(0)
        model = build_real(source, report.model, device, trust_remote_code)
        if not amp and dtype != torch.float32:
            model = model.to(dtype)
        self.runner = Runner(model, list(report.inputs), mode=mode, targets=report.targets, optimizer=optimizer,
                             loss=loss, amp=amp, device=device, kv_dtype=kv_dtype)

    def measure(self, dims: dict[str, int], predicted_peak: int | None, repeats: int, warmup: int,
                min_time_s: float, cross_check: bool) -> tuple[dict, list | None]:
        """The first pass at a point: its peak memory and a first timing. The measured dict (its time
        from this pass alone) and the timed samples, for `time_again` to add to (None when not run)."""
        if self.device == "cpu" and predicted_peak is not None:
            free = _available_cpu_bytes()
            if free is not None and predicted_peak > CPU_MEMORY_MARGIN * free:
                return {"skipped": f"the predicted peak ({predicted_peak} bytes) exceeds {CPU_MEMORY_MARGIN:.0%} "
                                   f"of the {free} bytes of RAM available; not run"}, None
        values = run = None
        try:
            if self.device == "cpu":
                settle_heap()    # glibc's heap as the costs model it, whatever ran in this process before
            values = self.runner.values(dims)
            run = self.runner.step(values, dims.get("gen")) if self.mode == "generate" else self.runner.step(values)
            run()    # warm-up: kernels chosen, lazy buffers made; in train, the optimizer state allocated
            resident = self.runner.resident(values)
            meter = measure(run, resident=resident, device=self.device)
            out = {"peak_memory_bytes": int(meter.peak_bytes)}
            if cross_check:
                out["independent_peak_memory_bytes"] = profiler_peak_bytes(run, resident)
            faults = minor_faults() if self.device == "cpu" else None
            # the step ran twice already (warm-up, meter): a generation counts them, a step warms up again
            again = max(warmup - 1, 0) if self.mode == "generate" else max(warmup, 0)
            samples, steps = self._time(values, run, dims, repeats, again, min_time_s)
            out = {**_timing_summary(samples, self.mode, values, dims), **out}
            out["pass_times_s"] = [out["time_s"]]
            if faults is not None:
                # what the step's memory cost in page faults besides (outputs of 32 MiB or more
                # fault each step, as modelled; many more point at heap trimming, not modelled)
                out["page_faults_per_step"] = round((minor_faults() - faults) / max(steps, 1), 1)
            if meter.op and not meter.op.startswith("("):
                out["peak_at"] = meter.op
            return out, samples
        except Exception as e:
            self._reraise(e, dims)
            return {"oom": True, "error": _first_line(e)}, None
        finally:
            del values, run
            self._clean()

    def time_again(self, dims: dict[str, int], samples: list, repeats: int, warmup: int, min_time_s: float,
                   measured: dict) -> None:
        """One more timing pass at a point measured before: its samples join `samples` and the
        time fields of `measured` are those of all passes so far."""
        values = run = None
        try:
            if self.device == "cpu":
                settle_heap()
            values = self.runner.values(dims)
            run = self.runner.step(values, dims.get("gen")) if self.mode == "generate" else self.runner.step(values)
            more, _ = self._time(values, run, dims, repeats, max(warmup, 1), min_time_s)
            samples.extend(more)
            passes = measured.get("pass_times_s", []) + [_timing_summary(more, self.mode, values, dims)["time_s"]]
            measured.update(_timing_summary(samples, self.mode, values, dims), pass_times_s=passes)
        except Exception as e:
            self._reraise(e, dims)
            # it ran in the first pass: that pass's samples stand, and the point says why no more came
            measured["pass_error"] = f"{'out of memory' if is_oom(e) else type(e).__name__}: {_first_line(e)}"
        finally:
            del values, run
            self._clean()

    def _time(self, values, run, dims: dict[str, int], repeats: int, warmup: int, min_time_s: float):
        """Timed samples of one pass (per-call block times; in generate, each generation's step times)
        and how many steps ran for them, warm-up included."""
        if self.mode == "generate":
            times = _time_generation(self.runner, values, dims["gen"], repeats, warmup, min_time_s)
            return times, len(times) + warmup
        timing = time_call(run, repeats=repeats, warmup=warmup, device=self.device, min_time_s=min_time_s)
        return list(timing.times_s), warmup + 1 + len(timing.times_s) * timing.number

    def _reraise(self, e: BaseException, dims: dict[str, int]) -> None:
        if not is_oom(e):
            raise AnalysisError(f"running {self.report.model} ({self.mode}) at "
                                f"{', '.join(f'{k}={v}' for k, v in dims.items())} on {self.device} failed: "
                                f"{type(e).__name__}: {_first_line(e)}") from e

    def _clean(self) -> None:
        if self.runner.optimizer is not None:
            self.runner.optimizer.zero_grad(set_to_none=True)   # an OOM mid-backward leaves gradients behind
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.runner = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    """An allocation failure, on CUDA (torch.OutOfMemoryError) or the CPU (the allocator's RuntimeError)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(e, MemoryError))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _time_generation(runner: Runner, values, gen: int, repeats: int, warmup: int,
                     min_time_s: float) -> list[list[float]]:
    """Whole generations (at least `repeats`, more while under `min_time_s`) after `warmup` untimed
    ones, timed step by step: each generation's list of step times (the prefill first)."""
    times: list[list[float]] = []
    run = runner.step(values, gen, times)
    for _ in range(warmup):
        run()
    times.clear()
    spent = 0.0
    while len(times) < repeats or (spent < min_time_s and len(times) < 200):
        run()
        spent += sum(times[-1])
    return list(times)


def _timing_summary(samples: list, mode: str, values, dims: dict[str, int]) -> dict:
    """The measured time fields of a point from all its timed samples: step times, or in generate
    the medians of the whole generation, of the prefill (time to first token) and of each decode
    step, and the line a + b * ctx fitted to the per-step medians."""
    if mode != "generate":
        return {"time_s": statistics.median(samples), "time_min_s": min(samples), "samples": len(samples)}
    whole = [sum(t) for t in samples]
    steps = [statistics.median(t[i] for t in samples) for i in range(1, dims["gen"] + 1)]
    prompt = values[0].shape[-1]
    return {"time_s": statistics.median(whole), "time_min_s": min(whole), "samples": len(samples),
            "time_to_first_token_s": statistics.median(t[0] for t in samples),
            "token_time_s": statistics.fmean(steps), "token_times_s": steps,
            **_line("token_time", list(range(prompt, prompt + dims["gen"])), steps)}


def _predicted_generation(point, hw, tf32: bool) -> dict:
    """The prediction of one generation: time to first token, each decode step's time, their line."""
    d = point.decode_timing(hw, tf32)
    steps = [float(t) for t in d.step_time_s]
    g = point.extra["generate"]
    return {"time_to_first_token_s": g["time_to_first_token_s"], "token_time_s": statistics.fmean(steps),
            "token_times_s": steps, **_line("token_time", [int(c) for c in d.ctx], steps)}


def _line(name: str, xs: list[int], ys: list[float]) -> dict:
    """Least squares y = a + b * x: {name_intercept_s, name_slope_s (per token of context), name_r2}."""
    if len(xs) < 2:
        return {}
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    fitted = a + b * np.asarray(xs, dtype=float)
    total = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    r2 = 1 - float(np.sum((np.asarray(ys) - fitted) ** 2)) / total if total > 0 else None
    return {f"{name}_intercept_s": float(a), f"{name}_slope_s": float(b), f"{name}_r2": r2}


# --- the independent peak (CPU) ------------------------------------------------------------------

def profiler_peak_bytes(fn, resident=()) -> int:
    """Peak of CPU allocator bytes while `fn()` runs, from the profiler's allocation events (each
    allocation and free as the c10 allocator reports it), plus the storages of `resident` tensors,
    which were allocated before. A different path from memtrack's dispatch-level count: it sees
    raw allocations, kernel scratch buffers included, and knows nothing of tensors or views."""
    from torch.profiler import ProfilerActivity, profile

    from costmodel._torch import profiler_allocations
    gc.collect()
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = profiler_allocations(prof)
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    storages = {}
    for t in resident:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) + peak


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto writes a line to fd 2 each time a profiler starts and stops; keep it off the user's stderr."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- prediction helpers ------------------------------------------------------------------------------

def _hardware(hardware, device: str):
    """The device that prices the predicted time: the user's, or this machine calibrated."""
    from costmodel.hardware.catalog import Hardware, parse_hardware_list
    if hardware is None:
        hw = calibrated_hardware(device)
    elif isinstance(hardware, Hardware):
        hw = hardware
    else:
        hw = parse_hardware_list(hardware)[0]
    if device == "cuda" and hw.vendor == "measured":
        # A calibrated GPU is still a GPU: attention="auto" and the memory model pick its fused kernels.
        hw = dataclasses.replace(hw, vendor="amd" if torch.version.hip else "nvidia")
    return hw


_CALIBRATED: dict[str, object] = {}


def calibrated_hardware(device: str):
    """This machine measured by `costmodel.hardware.calibrate` (about ten minutes on a 2-core CPU), once
    per shell session, in a process of its own (`calibrate_apart`: a process that calibrated times
    models slower afterwards): kept in memory and in a TOML in the temp dir keyed by session id,
    device, torch version and threads."""
    from costmodel.hardware.calibrate import calibrate_apart
    from costmodel.hardware.catalog import load_hardware
    key = f"{device}-{os.getsid(0)}-{torch.__version__}-{torch.get_num_threads()}"
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    folder = os.path.join(tempfile.gettempdir(), f"costmodel-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"calibrated-{key}.toml".replace("+", "_"))
    hw = None
    if os.path.isfile(path) and time.time() - os.path.getmtime(path) < CALIBRATION_MAX_AGE_S:
        with contextlib.suppress(CostModelError, OSError, ValueError):
            hw = load_hardware(path)
    if hw is not None and not hw.kernels:      # a calibration of an earlier version: peaks only
        hw = None
    if hw is None:
        warnings.warn(f"calibrating {device} for the predicted times, about ten minutes on a 2-core CPU (once per "
                      f"session; cached in {path}; --hw DEVICE or a file from `costmodel hardware calibrate` skips it)",
                      stacklevel=2)
        hw = calibrate_apart(device, path)
    _CALIBRATED[key] = hw
    return hw


def _environment(device: str) -> dict:
    """What the measured times depend on besides the model; warns when other work shares the CPU."""
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(OSError, AttributeError):
        env["load_average"] = round(os.getloadavg()[0], 2)
    cores = os.cpu_count() or 1
    if device == "cpu" and env.get("load_average", 0) > 0.5 * cores:
        warnings.warn(f"the CPU is busy (load average {env['load_average']:.1f} on {cores} logical CPUs): "
                      f"measured times will include waiting for it; the peaks are unaffected", stacklevel=3)
    return env


CALIBRATION_SPEED_TOLERANCE = 0.25    # a quick probe more than this off its calibration (either way): say so


def _calibration_check(hw, device: str) -> dict | None:
    """Whether the calibration that prices the times still describes this CPU: its thread count and
    machine against this run's, and a quarter second of quick probes (hardware.calibrate.machine_speed:
    a product, an add, a clone past the core caches, a small add) timed against it. Warns where they
    differ: the predicted times assume the machine as it was calibrated, and a shared host's speed
    moves by 10-25% within the hour. None where `hw` is not a calibration of a CPU."""
    from costmodel.hardware.calibrate import _machine, machine_speed
    if device != "cpu" or not getattr(hw, "calibrated", False) or not hw.kernels:
        return None
    where = hw.path or hw.name
    out: dict = {"hardware": hw.name, "path": hw.path, "threads": hw.threads, "machine": hw.description}
    threads = torch.get_num_threads()
    if hw.threads is not None and hw.threads != threads:
        warnings.warn(f"{where} was calibrated at {hw.threads} CPU thread{'s' if hw.threads > 1 else ''} and this run "
                      f"uses {threads}: its rates hold for {hw.threads}; calibrate at this count "
                      f"(OMP_NUM_THREADS={threads} costmodel hardware calibrate --device cpu --out FILE.toml)",
                      stacklevel=3)
    machine = _machine("cpu")
    measured_on = hw.description.removesuffix(", measured")
    if measured_on and measured_on != machine:
        warnings.warn(f"{where} was calibrated on {measured_on}; this machine is {machine}: the predicted times "
                      f"are that machine's", stacklevel=3)
    speed = machine_speed(hw)
    if speed is None:
        return out
    out["machine_vs_calibration"] = {k: round(v, 3) for k, v in speed.items()}
    off = {k: v for k, v in speed.items()
           if not 1 / (1 + CALIBRATION_SPEED_TOLERANCE) <= v <= 1 + CALIBRATION_SPEED_TOLERANCE}
    if off:
        said = ", ".join(f"{k} {v:.2f}x" for k, v in off.items())
        warnings.warn(f"this CPU now runs the calibration's quick probes at {said} the speed measured in {where} "
                      f"(1.0: as calibrated): the predicted times assume the machine as it was calibrated; other "
                      f"work on it, or a calibration made in another state of a shared host, moves the measured "
                      f"times by that much. Calibrate again if it lasts (costmodel hardware calibrate --device cpu "
                      f"--out FILE.toml)", stacklevel=3)
    return out


def _capacity_bytes(device: str, hw) -> int | None:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return _available_cpu_bytes()


def _available_cpu_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    from costmodel.hardware.calibrate import _machine
    return _machine("cpu")


# --- errors, exponents, doubling ratios -----------------------------------------------------------

def _pct(predicted, measured) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured * 100


def _point_errors(measured: dict, predicted: dict, capacity: int | None) -> dict:
    if measured.get("oom") or "skipped" in measured:
        out = {"predicted_oom": None}
        if capacity is not None and predicted.get("peak_memory_bytes") is not None:
            out["predicted_oom"] = predicted["peak_memory_bytes"] > capacity
        return out
    out = {"time_pct": _pct(predicted.get("time_s"), measured["time_s"]),
           "peak_memory_pct": _pct(predicted.get("peak_memory_bytes"), measured["peak_memory_bytes"])}
    if "time_to_first_token_s" in measured:
        out["time_to_first_token_pct"] = _pct(predicted.get("time_to_first_token_s"), measured["time_to_first_token_s"])
        out["token_time_pct"] = _pct(predicted.get("token_time_s"), measured["token_time_s"])
    if "independent_peak_memory_bytes" in measured:
        out["measured_vs_independent_pct"] = _pct(measured["peak_memory_bytes"],
                                                  measured["independent_peak_memory_bytes"])
    return out


def _summary(points: list[PointResult]) -> dict:
    def mape(key):
        values = [abs(p.errors[key]) for p in points if p.errors.get(key) is not None]
        return sum(values) / len(values) if values else None
    cross = [abs(p.errors["measured_vs_independent_pct"]) for p in points
             if p.errors.get("measured_vs_independent_pct") is not None]
    extra = {}
    if any("token_time_pct" in p.errors for p in points):
        extra = {"time_to_first_token_mape": mape("time_to_first_token_pct"), "token_time_mape": mape("token_time_pct")}
    return {"time_mape": mape("time_pct"), "peak_memory_mape": mape("peak_memory_pct"), **extra,
            "measured_vs_independent_max_pct": max(cross) if cross else None,
            "points": len(points), "oom_points": sum(1 for p in points if p.measured.get("oom")),
            "skipped_points": sum(1 for p in points if "skipped" in p.measured)}


def _value(p: PointResult, series: str):
    section, key = {**SERIES, **GENERATE_SERIES}[series]
    v = getattr(p, section).get(key)
    return v if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else None


def fit_exponents(points: list[PointResult], swept: list[str], series: str) -> dict[str, float | None]:
    """Exponent of each swept dimension: least squares of log value on the logs of all swept sizes
    (one dimension: the slope of the log-log line). Points without the value (OOM) are left out."""
    rows = [(p, _value(p, series)) for p in points]
    rows = [(p, v) for p, v in rows if v is not None]
    out: dict[str, float | None] = {d: None for d in swept}
    usable = [d for d in swept if len({p.dims[d] for p, _ in rows}) >= 2]
    if not usable:
        return out
    if len(usable) == 1:
        d = usable[0]
        out[d] = fit_exponent([p.dims[d] for p, _ in rows], [v for _, v in rows])
        return out
    X = np.array([[1.0] + [math.log(p.dims[d]) for d in usable] for p, _ in rows])
    y = np.array([math.log(v) for _, v in rows])
    if np.linalg.matrix_rank(X) < X.shape[1]:
        return out
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    out.update({d: float(c) for d, c in zip(usable, coef[1:])})
    return out


def _exponents(points: list[PointResult], swept: list[str], series_set: dict = SERIES):
    exponents: dict[str, dict] = {d: {} for d in swept}
    classes: dict[str, dict] = {d: {} for d in swept}
    for series in series_set:
        fitted = fit_exponents(points, swept, series)
        for d in swept:
            exponents[d][series] = fitted[d]
            classes[d][series] = complexity_class(fitted[d], d)
    return exponents, classes


def _doubling(points: list[PointResult], swept: list[str], names: list[str],
              series_set: dict = SERIES) -> dict[str, list[dict]]:
    """Ratios of every series between consecutive sizes of each swept dimension, the others fixed."""
    out: dict[str, list[dict]] = {}
    for d in swept:
        groups: dict[tuple, list[PointResult]] = {}
        for p in points:
            groups.setdefault(tuple((n, p.dims[n]) for n in names if n != d), []).append(p)
        rows = []
        for at, group in groups.items():
            group.sort(key=lambda p: p.dims[d])
            for a, b in itertools.pairwise(group):
                row = {"from": a.dims[d], "to": b.dims[d], "size_ratio": b.dims[d] / a.dims[d]}
                if at:
                    row["at"] = dict(at)
                for series in series_set:
                    va, vb = _value(a, series), _value(b, series)
                    row[series] = vb / va if va and vb else None
                rows.append(row)
        out[d] = rows
    return out


# --- output --------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, only when asked for and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="point")
