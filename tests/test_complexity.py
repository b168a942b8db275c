"""The doubling experiment: the fit on exact data, the class names, and measured exponents of
functions whose order is known (pure-Python loops: no allocation, no cache effects)."""

from __future__ import annotations

import math
from itertools import repeat

import pytest
import torch

import costmodel
from costmodel.validate.stats import (ComplexityResult, complexity_class, doubling_ratios, fit_exponent,
                                  measure_complexity, time_call)
from costmodel.errors import UsageError


def test_fit_exponent_recovers_exact_powers():
    sizes = [16, 32, 64, 128, 256]
    assert fit_exponent(sizes, [3.0 * n**2 for n in sizes]) == pytest.approx(2.0)
    assert fit_exponent(sizes, [0.5 * n for n in sizes]) == pytest.approx(1.0)
    assert fit_exponent(sizes, [7.0 for _ in sizes]) == pytest.approx(0.0)
    assert fit_exponent(sizes, [n**1.5 for n in sizes]) == pytest.approx(1.5)
    # least squares, not the end points: log2 values 0, 1, 3 at log2 sizes 0, 1, 2 -> slope 1.5
    assert fit_exponent([1, 2, 4], [1, 2, 8]) == pytest.approx(1.5)


@pytest.mark.parametrize("sizes, values", [([1, 2], [1]), ([4, 4], [1, 2]), ([1, 2], [0, 1]), ([-1, 2], [1, 1])])
def test_fit_exponent_rejects_unfittable_data(sizes, values):
    with pytest.raises(UsageError):
        fit_exponent(sizes, values)


def test_complexity_class_rounds_to_the_nearest_order_within_tolerance():
    assert complexity_class(0.05) == "O(1)"
    assert complexity_class(0.93) == "O(n)"
    assert complexity_class(1.18, "seq") == "O(seq)"
    assert complexity_class(2.1, "seq") == "O(seq^2)"
    assert complexity_class(2.97) == "O(n^3)"
    assert complexity_class(1.5) == "O(n^1.5)"          # between orders: the exponent itself
    assert complexity_class(1.5, tolerance=0.5) == "O(n^2)"
    assert complexity_class(None) is None
    assert complexity_class(math.nan) is None


def test_doubling_ratios():
    assert doubling_ratios([1, 2, 4], [3, 12, 48]) == [4.0, 4.0]


def _linear(n: int) -> None:
    for _ in repeat(None, n):
        pass


def _quadratic(n: int) -> None:
    for _ in repeat(None, n):
        for _ in repeat(None, n):
            pass


def test_measure_complexity_recovers_linear_and_quadratic():
    lin = measure_complexity(_linear, [50_000 * 2**k for k in range(6)], lambda n: n, repeats=7)
    assert isinstance(lin, ComplexityResult)
    assert lin.sizes == [50_000 * 2**k for k in range(6)]
    assert len(lin.times_s) == 6 and all(t > 0 for t in lin.times_s)
    assert lin.exponent == pytest.approx(1.0, abs=0.25), lin
    assert lin.complexity == "O(n)", lin
    assert len(lin.doubling_ratios) == 5

    quad = measure_complexity(_quadratic, [150 * 2**k for k in range(5)], lambda n: n, repeats=7)
    assert quad.exponent == pytest.approx(2.0, abs=0.25), quad
    assert quad.complexity == "O(n^2)", quad
    assert quad.to_dict()["complexity"] == "O(n^2)"


def test_measure_complexity_is_exported_and_takes_any_input():
    calls = []

    def fn(xs):
        calls.append(len(xs))
        return sorted(xs)
    r = costmodel.measure_complexity(fn, [1000, 2000], lambda n: list(range(n, 0, -1)), repeats=2, warmup=0)
    assert r.sizes == [1000, 2000] and set(calls) == {1000, 2000}


def test_measure_complexity_rejects_one_size():
    with pytest.raises(UsageError, match="two distinct sizes"):
        measure_complexity(_linear, [10, 10], lambda n: n)


def test_time_call_blocks_short_calls_and_takes_the_median():
    count = [0]

    def tick():
        count[0] += 1
    t = time_call(tick, repeats=5, warmup=2, min_block_s=1e-3)
    assert t.number > 1                                   # a ~100 ns call is timed in blocks
    assert len(t.times_s) == 5 and t.median_s == sorted(t.times_s)[2]
    assert count[0] == 2 + 1 + 5 * t.number               # warm-up, the probe, the blocks
    with pytest.raises(UsageError):
        time_call(tick, repeats=0)


@pytest.mark.parametrize("threads,clock", [(1, "thread_time"), (2, "perf_counter")])
def test_time_call_on_one_cpu_thread_reads_the_threads_clock(monkeypatch, threads, clock):
    # One intra-op thread runs every op on the caller: its own CPU clock is the step's time and
    # leaves out waiting for a core on a busy machine. Each clock is faked to tell which one is read.
    from costmodel.validate import stats
    ticks = {"thread_time": 0.0, "perf_counter": 0.0}

    def fake(name, step):
        def read():
            ticks[name] += step
            return ticks[name]
        return read
    monkeypatch.setattr(stats.time, "thread_time", fake("thread_time", 1.0))
    monkeypatch.setattr(stats.time, "perf_counter", fake("perf_counter", 3.0))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time_call(lambda: None, repeats=3, warmup=0, min_block_s=0.0)
    finally:
        torch.set_num_threads(saved)
    assert t.median_s == {"thread_time": 1.0, "perf_counter": 3.0}[clock]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_complexity_on_cuda_matmul_is_cubic():
    # n x n x n matmul: 2 n^3 FLOPs; from 1024 up a GPU is compute-bound, so time ~ n^3
    r = measure_complexity(lambda ab: ab[0] @ ab[1], [1024, 2048, 4096, 8192],
                           lambda n: (torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")))
    assert r.exponent == pytest.approx(3.0, abs=0.35), r
