"""Calibration writes a device file that loads back, with measured figures and their sources."""

import dataclasses
import math

import pytest
import torch
from torch.utils import benchmark

from costmodel.hardware.calibrate import calibrate
from costmodel.errors import UsageError
from costmodel.hardware.catalog import load_hardware
from costmodel.hardware.kernels import KernelTable
from costmodel.hardware.roofline import op_time


@pytest.fixture
def one_thread():
    """One CPU thread: its timings are taken on the thread's own clock, which other processes on a
    shared test machine do not inflate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_cpu(tmp_path_factory):
    """One quick calibration of this CPU, at one thread, for the module: (the file, the device)."""
    out = tmp_path_factory.mktemp("calibration") / "cpu.toml"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, calibrate("cpu", out, quick=True)
    finally:
        torch.set_num_threads(threads)


def test_cpu_calibration_round_trips(quick_cpu):
    out, measured = quick_cpu
    loaded = load_hardware(str(out))
    assert loaded == measured
    assert loaded.name == "calibrated-cpu" and loaded.calibrated
    assert set(loaded.peak_flops_per_s) == {"float32", "bfloat16"}
    # Sanity ranges for any CPU that runs the tests: 1e8..1e14 FLOP/s, 1e8..1e13 B/s, 0..1 ms per op.
    assert all(1e8 < p < 1e14 for p in loaded.peak_flops_per_s.values())
    assert 1e8 < loaded.bandwidth_bytes_per_s < 1e13
    assert 0 < loaded.kernel_overhead_s < 1e-3
    assert loaded.memory_bytes > 2**28
    for figure in ("memory_bytes", "bandwidth_bytes_per_s", "kernel_overhead_s",
                   "peak_flops_per_s.float32", "peak_flops_per_s.bfloat16"):
        assert torch.__version__ in loaded.sources[figure] or figure == "memory_bytes"
    assert "measured by costmodel hardware calibrate" in loaded.sources["peak_flops_per_s.float32"]
    assert loaded.threads == 1
    # the autograd engine's cost per node: more than nothing, less than a tenth of a millisecond
    assert 0 < loaded.autograd_node_s < 1e-4 and "adds of tiny tensors" in loaded.sources["autograd_node_s"]


def test_quick_calibration_measures_each_kernel_class(quick_cpu):
    hw = quick_cpu[1]
    for key in ("matmul:float32", "bmm:float32", "conv.dense:float32", "conv.dense.backward:float32",
                "conv.dense.backward.weight:float32", "conv.dense.slow:float32", "conv.dense.slow.backward:float32",
                "conv.dense.slow.backward.weight:float32", "conv.depthwise:float32",
                "attention.flash:float32",
                "attention.math.backward:float32", "pointwise.tanh", "pointwise", "norm.layer", "softmax",
                "reduction", "copy", "copy.pad", "embedding", "random.dropout", "optimizer.adamw", "pool.upsample",
                "pool.upsample.backward", "conv.dense.channels_last:float32", "conv.dense.backward.channels_last:float32",
                "conv.depthwise.channels_last:float32", "conv.depthwise.backward.channels_last:float32", "view"):
        table = hw.kernels[key]
        assert 0 <= table.overhead_s < 1e-2, key
        assert all(r > 0 for r in table.rates), key
        assert key == "view" or "fastest of" in table.how, key       # each says how it was measured
    # a oneDNN LSTM layer (forward, backward) by the batch, where this torch has oneDNN
    if torch.backends.mkldnn.is_available():
        for key in ("matmul.lstm:float32", "matmul.lstm.backward:float32"):
            table = hw.kernels[key]
            assert table.by == "batch" and table.sizes and set(table.sizes) <= {1.0, 2.0}, key
            assert all(r > 0 for r in table.rates), key
            assert "mkldnn_rnn_layer" in table.how and "fastest of" in table.how, key
    # products carry their shape curves, convolutions theirs
    assert set(hw.kernels["matmul:float32"].efficiency) == {"m", "n", "k"}
    # products of few rows with their weight streamed from memory: by m, with curves of n and k
    streamed = hw.kernels["matmul.streamed:float32"]
    assert streamed.by == "m" and streamed.sizes == (1.0, 2.0, 8.0) and all(r > 0 for r in streamed.rates)
    assert set(streamed.efficiency) == {"n", "k"} and "rotating" in streamed.how
    assert {"m", "k"} <= set(hw.kernels["conv.dense:float32"].efficiency)
    # poolings: curves of the window and stride areas, 1 at the base call's (max 3x3, average 2x2, stride 2)
    for key, window in (("pool.max", 9.0), ("pool.max.backward", 9.0), ("pool.avg", 4.0), ("pool.avg.backward", 4.0)):
        curves = {f: dict(c) for f, c in hw.kernels[key].efficiency.items()}
        assert set(curves) == {"window", "stride"}, key
        assert curves["window"][window] == pytest.approx(1.0) and curves["stride"][4.0] == pytest.approx(1.0), key
    # nearest upsampling: rates on rows of 16, a curve of the row length that is 1 there
    widths = dict(hw.kernels["pool.upsample"].efficiency["in_width"])
    assert {8.0, 16.0, 32.0} <= set(widths) and widths[16.0] == pytest.approx(1.0)
    for key in ("conv.dense.slow:float32", "conv.dense.slow.backward:float32", "conv.dense.slow.backward.weight:float32"):
        assert "Slow2d" in hw.kernels[key].how    # each call checked to run native
    assert "channels-last" in hw.kernels["conv.depthwise.backward.channels_last:float32"].how
    # rated by work, like the others (a grouped backward's work is the kernel's, not FlopCounterMode's)
    assert hw.kernels["conv.depthwise:float32"].by == "work"
    assert hw.kernels["conv.depthwise.backward:float32"].by == "work"
    assert hw.allocation is not None and len(hw.allocation.sizes) == 2
    # where sysfs tells the core's own cache: what each call costs more after other work evicted
    # its state, by size (none for the streamed product, whose operands come from memory anyway)
    from costmodel.hardware.calibrate_kernels import core_cache_bytes
    assert hw.core_cache_bytes == core_cache_bytes("cpu")
    if hw.core_cache_bytes:
        assert "largest level below the last" in hw.sources["core_cache_bytes"]
        for key in ("matmul:float32", "conv.dense:float32", "pointwise.add", "norm.layer"):
            evicted = hw.kernels[key].evicted
            assert evicted and all(0 <= s < 1e-2 for _, s in evicted), key
            # and after ops that move next to no data (their code only), where it measured more than 0
            assert all(0 <= s < 1e-2 for _, s in hw.kernels[key].interleaved), key
        assert not streamed.evicted
    # the quick plan times no call after a flush of the last-level cache: no share to place it by
    assert all(t.evicted_share is None for t in hw.kernels.values())


def test_tables_with_both_evicted_measurements_carry_the_share_of_the_cache_the_probe_displaced():
    from costmodel.hardware.calibrate_kernels import with_evicted_share
    both = KernelTable("conv.dense", "float32", 1e-6, (1.0,), (1e9,), evicted=((1e3, 50e-6),),
                       evicted_llc=((1e3, 100e-6),))
    core_only = dataclasses.replace(both, kernel="matmul", evicted_llc=())
    tables = with_evicted_share({"conv.dense:float32": both, "matmul:float32": core_only}, 16 << 20, 32 << 20)
    assert tables["conv.dense:float32"].evicted_share == 0.5
    assert tables["matmul:float32"].evicted_share is None
    assert with_evicted_share({"c": both}, 64 << 20, 32 << 20)["c"].evicted_share == 1.0
    assert with_evicted_share({"c": both}, 16 << 20, None)["c"].evicted_share is None


def test_the_work_between_two_calls_of_an_evicted_probe_is_a_copy_past_the_core_caches_and_other_ops(one_thread):
    """What runs between two calls of a probe, as other ops run between two calls of a kernel in a
    model: a copy of 4x the core caches of the threads (the kernel's data out of them) and ten
    different ops, each on 64K elements (their code in the instruction cache of every thread)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from costmodel.hardware.calibrate_kernels import _other_ops

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append((func, args))
            return func(*args, **(kwargs or {}))

    core = 1 << 20
    run, footprint = _other_ops(core)
    with Record():
        run()
    copy, copy_args = calls[0]
    assert copy is torch.ops.aten.copy_.default and copy_args[0].nbytes == 4 * core
    # its footprint: the copy's two buffers and the ops' tensors, what it displaces of the last-level cache
    assert 8 * core < footprint < 8 * core + (8 << 20)
    others = {func.overloadpacket for func, _ in calls[1:]} - {torch.ops.aten.t, torch.ops.aten.slice}
    assert len(others) >= 10
    assert all(a.numel() >= 1 << 14 for _, args in calls[1:] for a in args if isinstance(a, torch.Tensor)
               and a.is_floating_point())


def test_evicted_seconds_are_measured_for_the_instances_a_table_takes_them_from(one_thread):
    """A table's evicted seconds come from its tiny and base instances: those are measured, the
    curves' are not (their time goes to nothing), and no instance keeps its call (and its tensors)
    past its class."""
    from costmodel.hardware.calibrate_kernels import Prober, core_cache_bytes, kernel_plan
    prober = Prober("cpu", kernel_plan("cpu", quick=True), "test")
    timed = []
    evicted = prober.time.evicted
    prober.time.evicted = lambda call, alone_s, core, inputs: timed.append(inputs) or evicted(call, alone_s, core, inputs)
    measured = prober.matmul("float32")
    instances = [measured.tiny, *measured.base]
    curves = [i for c in measured.curves.values() for i in c]
    assert curves and len(timed) == len(instances)
    assert all(i.measure_evicted is None for i in instances + curves)
    assert all(i.evicted_s is None for i in curves)
    # with the call's operands (bias, x, w.t()), read again just before it in the variant whose
    # difference is the part of the evicted seconds that is them coming back
    assert all(len(inputs) == 3 and all(isinstance(t, torch.Tensor) for t in inputs) for inputs in timed)
    if core_cache_bytes("cpu"):
        assert all(i.evicted_s is not None and 0 <= i.refill_s <= i.evicted_s for i in instances)


def test_llc_evicted_seconds_time_the_call_after_a_flush_with_its_inputs_read_back(one_thread):
    """Timer.evicted_llc_samples: each call timed alone after writing twice the last-level cache and reading
    its inputs back, less its time in a loop; not measured by the quick plan, on calls over
    EVICTED_MAX_S, or without a cache size. fit takes the table's `evicted_llc` from the tiny and
    base instances, never decreasing with size."""
    import dataclasses as dc

    from costmodel.hardware.calibrate_kernels import (EVICTED_MAX_S, Cost, Instance, Measured, Timer, _mean, fit,
                                                      kernel_plan)
    plan = dc.replace(kernel_plan("cpu", quick=True), llc_samples=3)
    timer = Timer("cpu", plan)
    x, w = torch.randn(64, 64), torch.randn(64, 64)

    def call():
        return x @ w
    alone = timer(call)
    llc = timer.evicted_llc_samples(call, alone, 1 << 20, (x, w))
    assert llc is not None and len(llc) == 3 and timer._flush.numel() == 2 << 20
    assert timer.evicted_llc_samples(call, EVICTED_MAX_S * 2, 1 << 20, (x, w)) is None
    assert timer.evicted_llc_samples(call, alone, None, (x, w)) is None
    assert Timer("cpu", kernel_plan("cpu", quick=True)).evicted_llc_samples(call, alone, 1 << 20, (x, w)) is None
    full = kernel_plan("cpu", quick=False)
    assert full.llc_samples > 0 and full.passes > 1
    # the samples are the plan's over all passes: each pass takes its share, and _mean pools them
    assert Timer("cpu", full).llc_per_pass == math.ceil(full.llc_samples / full.passes)
    passes = [Measured("matmul", "float32", Instance(Cost(8, 0.0, "matmul", {}, 0.0), 1e-6, 1e-6, 0.0, max(0.0, sorted(s)[1]),
                                                     llc_samples=s), [])
              for s in ((1e-6, 2e-6, 9e-6), (3e-6, 4e-6, 5e-6), (-1e-6, 6e-6, 7e-6))]
    merged, _ = _mean(passes)
    assert merged.tiny.llc_s == pytest.approx(4e-6) and len(merged.tiny.llc_samples) == 9

    def inst(flops, llc_s):
        return Instance(Cost(flops, 0.0, "matmul", {}, 0.0), 1e-6 + flops / 1e11, 1e-6, 0.0, llc_s)
    m = Measured("matmul", "float32", inst(8, 5e-6), [inst(1e6, 40e-6), inst(1e8, 30e-6), inst(1e9, None)])
    table = fit(m, None)
    assert [size for size, _ in table.evicted_llc] == [8, 1e6, 1e8]
    assert [s for _, s in table.evicted_llc] == pytest.approx([5e-6, 35e-6, 35e-6])


def test_interleaved_seconds_time_the_call_after_ops_that_move_next_to_no_data(one_thread):
    """Timer.interleaved: the call after ten ops on tiny tensors (their code, not their data, takes
    the core's caches) less its time in a loop, on calls up to INTERLEAVED_MAX_S (past it the
    difference of two blocks is noise); fit takes the table's from the tiny and base instances,
    never decreasing with size, and Prober.finish measures them with the evicted seconds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from costmodel.hardware.calibrate_kernels import (INTERLEAVED_MAX_S, Cost, Instance, Measured, Prober, Timer,
                                                      _interleaved_ops, core_cache_bytes, fit, kernel_plan)
    timer = Timer("cpu", kernel_plan("cpu", quick=True))
    x, w = torch.randn(64, 64), torch.randn(64, 64)

    def call():
        return x @ w
    alone = timer(call)
    interleaved = timer.interleaved(call, alone)
    assert interleaved is not None and 0 <= interleaved < 1e-3
    assert timer.interleaved(call, INTERLEAVED_MAX_S * 2) is None
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            out = func(*args, **(kwargs or {}))
            assert all(t.numel() <= 512 for t in (out if isinstance(out, tuple) else (out,))
                       if isinstance(t, torch.Tensor))
            return out
    with Record():
        _interleaved_ops()()
    assert len({f.overloadpacket for f in calls}) >= 10        # ten different ops' code

    def inst(flops, seconds):
        return Instance(Cost(flops, 0.0, "matmul", {}, 0.0), 1e-6 + flops / 1e11, 1e-6, 0.0, None, seconds)
    table = fit(Measured("matmul", "float32", inst(8, 5e-6), [inst(1e6, 12e-6), inst(1e8, 10e-6), inst(1e9, None)]),
                None)
    assert [size for size, _ in table.interleaved] == [8, 1e6, 1e8]
    assert [s for _, s in table.interleaved] == pytest.approx([5e-6, 11e-6, 11e-6])
    if not core_cache_bytes("cpu"):     # measured with the evicted seconds, where the core's cache is known
        return
    prober = Prober("cpu", kernel_plan("cpu", quick=True), "test")
    measured = prober.matmul("float32")
    assert all(i.interleaved_s is not None and i.interleaved_s >= 0 for i in [measured.tiny, *measured.base]
               if i.time_s <= INTERLEAVED_MAX_S)


def test_a_curve_that_moved_with_the_machine_is_read_against_its_own_call_at_the_reference():
    """A curve whose call at the reference shape is a base call measured again: what the two
    measurements differ by is the machine (a neighbour's load began after the base was timed), so
    the curve's efficiencies are read against its own call there, which is 1."""
    from costmodel.hardware.calibrate_kernels import Cost, Instance, Measured, fit

    def call(m, n, k, slow=1.0):
        flops = 2.0 * m * n * k
        cost = Cost(flops, 4.0 * (m * k + k * n + m * n), "matmul", {"m": m, "n": n, "k": k}, 0.0)
        return Instance(cost, 1e-6 + slow * flops / 1e11)       # 100 GFLOP/s, 1 us overhead

    base = [call(64, 64, 64), call(128, 128, 128)]
    # the curves timed 1.7x slower throughout, their true shape effect: m = 16 at 0.8
    curves = {"m": [call(16, 64, 64, 1.7 / 0.8), call(64, 64, 64, 1.7)],
              "n": [call(64, 16, 64, 1.7), call(64, 64, 64, 1.7)]}
    table = fit(Measured("matmul", "float32", call(1, 1, 1), base, curves), None)
    assert dict(table.efficiency["m"]) == pytest.approx({16: 0.8, 64: 1.0}, rel=1e-4)
    assert dict(table.efficiency["n"]) == pytest.approx({16: 1.0, 64: 1.0}, rel=1e-4)
    # a curve without the reference call keeps its efficiencies against the base
    table = fit(Measured("matmul", "float32", call(1, 1, 1), base, {"m": [call(16, 64, 64, 1.25)]}), None)
    assert dict(table.efficiency["m"]) == pytest.approx({16: 0.8}, rel=1e-4)


def test_a_slow_shape_measured_past_the_reference_size_is_priced_as_measured():
    """A depthwise backward's k curve: the 3x3 reference call at 1e6 FLOPs, a 7x7 one at 5e6, where
    the base rate has fallen from 40 to 20 GFLOP/s; the 7x7 ran at 2 GFLOP/s. Its efficiency read
    against the rate at its own size (0.1) was applied past the reference to the reference's rate
    (the two limits of kernel_time_s), pricing its own call at 4 GFLOP/s, twice as fast as it ran:
    past the reference a slow shape's efficiency is read against the faster of the two rates."""
    from costmodel.hardware.calibrate_kernels import Cost, Instance, Measured, fit

    def call(flops, k, rate):
        return Instance(Cost(flops, 0.0, "conv.depthwise.backward", {"k": k}, 0.0), 1e-6 + flops / rate)
    base = [call(1e6, 9, 4e10), call(1e7, 9, 2e10), call(1e8, 9, 2e10)]
    table = fit(Measured("conv.depthwise.backward", "float32", call(8, 9, 1e9), base,
                         {"k": [call(1e6, 9, 4e10), call(5e6, 49, 2e9), call(2e6, 25, 2e10)]}), None)
    assert table.reference == 2e6
    assert table.kernel_time_s(5e6, {"k": 49}) == pytest.approx(5e6 / 2e9, rel=1e-3)
    # below the reference, as before: against the rate at its own size
    assert table.kernel_time_s(1e6, {"k": 9}) == pytest.approx(1e6 / 4e10, rel=1e-3)


def test_a_curve_measured_on_another_shape_is_1_at_the_value_every_base_call_has():
    """The dense convolution's `skipped` curve runs 1x1 kernels at strides 1 and 2; the base calls
    are 3x3 and skip nothing. Read against the 3x3 base rate, its stride-1 point is the 1x1 kernel's
    own slowness (0.64 on one machine), which the k curve already prices; left as it was, every
    3x3 convolution (skipped = 1) ran at 0.64 of its measured rate, and a 1x1 at 0.64 twice. The
    curve is 1 at the value all the base calls share: it says what skipping does, relative."""
    from costmodel.hardware.calibrate_kernels import Cost, Instance, Measured, fit

    def conv(cin, side, kernel, stride=1, speed=1.0):      # 100 GFLOP/s at speed 1, 1 us overhead
        m, n, k = 4 * (side // stride) ** 2, cin, cin * kernel * kernel
        flops = 2.0 * m * n * k
        features = {"m": m, "n": n, "k": k, "groups": 1, "skipped": stride * stride if kernel == 1 else 1}
        return Instance(Cost(flops, 4.0 * (m * n + m * k), "conv.dense", features, 0.0), 1e-6 + flops / (1e11 * speed))

    base = [conv(32, 8, 3), conv(64, 16, 3), conv(128, 16, 3)]
    curves = {"skipped": [conv(128, 16, 1, speed=0.64), conv(128, 16, 1, stride=2, speed=0.93)],
              "k": [conv(128, 16, 1, speed=0.64), conv(128, 16, 3)]}
    table = fit(Measured("conv.dense", "float32", conv(4, 4, 1), base, curves), None)
    assert dict(table.efficiency["skipped"]) == pytest.approx({1: 1.0, 4: 0.93 / 0.64}, rel=1e-3)
    reference = conv(128, 16, 3).cost
    assert table.time_s(reference.flops, reference.features) == pytest.approx(1e-6 + reference.flops / 1e11, rel=0.02)
    one_by_one = conv(128, 16, 1).cost
    assert table.time_s(one_by_one.flops, one_by_one.features) == \
        pytest.approx(1e-6 + one_by_one.flops / (1e11 * 0.64), rel=0.05)


def test_a_convolution_class_s_tiny_call_runs_in_the_kernel_of_its_base_calls(one_thread):
    """A class's overhead is its tiny call's time: a dense or transposed convolution's at batch 1 ran
    in eager's native kernel (3 us), where the class's base calls run in oneDNN (~30 us a call
    more). The tiny call is the smallest batch at which eager picks the base calls' kernel."""
    from costmodel.hardware.calibrate_kernels import Prober, kernel_plan
    from costmodel.hardware.eager_backend import conv_backend
    if conv_backend((1, 4, 4, 4), (4, 4, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 1, "float32", 1) is None:
        pytest.skip("this PyTorch has no torch._C._select_conv_backend")
    plan = kernel_plan("cpu", quick=False)
    prober = Prober("cpu", plan, "test")
    prober.time = lambda call, *a, **k: 1e-3          # the calls are what this checks, not the times
    prober.time.evicted = lambda call, alone_s, core, inputs: None
    prober.time.interleaved = lambda call, alone_s: None
    seen = []
    real = prober.instance

    def instance(make, kernel, *a, **k):
        call, op, args, kwargs = make()
        x, w, transposed, groups = args[0], args[1], args[6], args[8]
        seen.append(conv_backend(tuple(x.shape), tuple(w.shape), tuple(args[3]), tuple(args[4]), tuple(args[5]),
                                 transposed, tuple(args[7]), groups, "float32", 1))
        return real(make, kernel, *a, **k)
    prober.instance = instance
    for kind in ("dense", "transposed", "depthwise", "dense.slow"):
        seen.clear()
        prober.conv(kind, None, "float32")
        tiny, base = seen[0], seen[1]
        assert tiny == base, (kind, tiny, base)
        assert (tiny == "Slow2d") == (kind == "dense.slow"), (kind, tiny)


def test_depthwise_channels_are_measured_at_the_work_of_a_base_call_that_the_curve_includes(one_thread):
    """The depthwise channels curve runs at one work (the side shrinking as the channels grow), that
    of a base call it includes: its points are read against a measured base rate and against its
    own call of the base shape, not against rates interpolated between small calls that are mostly
    a backward's setup (which read a 64-channel backward 2.6x faster than the base shape)."""
    from costmodel.hardware.calibrate_kernels import Prober, kernel_plan
    plan = kernel_plan("cpu", quick=True)
    prober = Prober("cpu", plan, "test")
    prober.time = lambda call, *a, **k: 1e-3          # the shapes are what this checks, not the times
    prober.time.evicted = lambda call, alone_s, core, inputs: (0.0, 0.0)
    prober.time.evicted_llc_samples = lambda call, alone_s, cache, inputs: None
    prober.time.interleaved = lambda call, alone_s: None
    for backward in (None, "input"):
        measured = prober.conv("depthwise", backward, "float32")
        groups = measured.curves["groups"]
        assert sorted(i.cost.features["groups"] for i in groups) == sorted(set(plan.conv_groups) | {plan.conv_ref})
        assert any(i.cost == b.cost for i in groups for b in measured.base)
        ref = next(i for i in groups if i.cost.features["groups"] == plan.conv_ref).cost.flops
        assert all(i.cost.flops == pytest.approx(ref, rel=0.35) for i in groups)
        assert "the same work" in measured.how


def test_each_class_keeps_the_passes_the_machine_disturbed_least():
    """A neighbour's load through one class's probe in one pass (its small calls and curve 2.5x
    slower, its largest call as fast; or every call 1.3x): that pass is left out of the class. The
    passes within 10% on average are averaged call by call (choosing the faster would bias the
    tables low), evicted seconds by their median, less a call's time over 1.25x its fastest (the host slowing
    small calls for seconds, which the class's average barely sees). The CPU plan measures three
    times; the quick one once."""
    from costmodel.hardware.calibrate_kernels import Cost, Instance, Measured, kernel_plan, least_disturbed

    def call(flops, slow=1.0):
        return Instance(Cost(flops, 0.0, "matmul", {"m": flops}, 0.0), 1e-6 + slow * flops / 1e11)

    def probe(kernel, slow_small=1.0, slow_all=1.0, slow_curve=1.0, evicted=0.0):
        m = Measured(kernel, "float32", call(1, slow_small * slow_all),
                     [call(1e5, slow_small * slow_all), call(1e9, slow_all)],
                     {"m": [call(1e6, slow_small * slow_all * slow_curve)]}, how=f"{kernel} probe")
        m.tiny.evicted_s = evicted
        m.curves["m"][0].evicted_s = evicted
        return m
    first = [probe("matmul", slow_small=2.5, evicted=3e-4), probe("conv.dense", evicted=1e-5),
             probe("norm.layer", slow_all=1.05, evicted=2e-5)]
    second = [probe("matmul", evicted=4e-5), probe("conv.dense", slow_all=1.3, evicted=9e-5),
              probe("norm.layer", evicted=4e-5)]
    third = [probe("matmul", evicted=6e-5), probe("conv.dense", evicted=3e-5),
             probe("norm.layer", slow_curve=1.3, evicted=9e-5)]
    kept = least_disturbed([first, second, third])
    assert [m.kernel for m in kept] == ["matmul", "conv.dense", "norm.layer"]
    assert kept[0].tiny.evicted_s == pytest.approx(5e-5)
    assert kept[0].curves["m"][0].time_s == pytest.approx(second[0].curves["m"][0].time_s)
    assert kept[0].how == "matmul probe; the mean of 2 of 3 passes (the others over 1.1x slower on average)"
    assert kept[1].base[1].time_s == pytest.approx(first[1].base[1].time_s) and kept[1].tiny.evicted_s == 2e-5
    norm = kept[2]
    assert norm.base[1].time_s == pytest.approx(
        (first[2].base[1].time_s * second[2].base[1].time_s * third[2].base[1].time_s) ** (1 / 3))
    assert norm.tiny.evicted_s == pytest.approx(4e-5)       # the median of three: 9e-5 does not move it
    # the third pass's curve call, 1.27x its fastest, is left out of that call, evicted seconds too
    assert norm.curves["m"][0].time_s == pytest.approx(
        (first[2].curves["m"][0].time_s * second[2].curves["m"][0].time_s) ** 0.5)
    assert norm.curves["m"][0].evicted_s == pytest.approx(3e-5)
    assert norm.how == "norm.layer probe; the mean of 3 passes, 1 call without its times over 1.25x its fastest"
    alone = least_disturbed([first, second])[1]
    assert alone.base[1].time_s == first[1].base[1].time_s and alone.tiny.evicted_s == 1e-5
    assert alone.how == "conv.dense probe; pass 1 of 2 kept (the other 1.17x slower on average)"
    assert least_disturbed([first]) == first
    assert kernel_plan("cpu", quick=False).passes == 3 and kernel_plan("cpu", quick=True).passes == 1


def test_calibrated_cpu_predicts_a_matmul_it_did_not_measure(quick_cpu, one_thread):
    hw = quick_cpu[1]
    n = 384  # the quick run times 64^3 and 128^3 products and m, n, k curves up to 64: not this one
    a, b = torch.randn(n, n), torch.randn(n, n)
    measured_s = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}) \
        .blocked_autorange(min_run_time=0.1).median
    predicted = op_time(2 * n**3, 3 * n * n * 4, "matmul", "float32", hw, features={"m": n, "n": n, "k": n})
    assert predicted.bound == "compute"
    assert predicted.kernel == "matmul"          # priced from the measured matmul table
    # A noisy shared CPU still lands within a factor of 3 of its own measured rate.
    assert measured_s / 3 < predicted.time_s < measured_s * 3


def test_unknown_device_and_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="--device got 'tpu'; accepted: cpu, cuda"):
        calibrate("tpu", tmp_path / "x.toml")
    with pytest.raises(UsageError, match="directory .* does not exist"):
        calibrate("cpu", tmp_path / "missing" / "x.toml", quick=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calibration_round_trips(tmp_path):
    out = tmp_path / "gpu.toml"
    measured = calibrate("cuda", out, quick=True)
    assert load_hardware(str(out)) == measured
    assert {"float32", "bfloat16", "float16"} <= set(measured.peak_flops_per_s)
    assert {"matmul:bfloat16", "attention.flash:bfloat16", "conv.dense:float32"} <= set(measured.kernels)
    assert measured.allocation is None          # the caching allocator: no fresh pages per op
    assert measured.memory_bytes == torch.cuda.get_device_properties(0).total_memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="sees no CUDA device"):
        calibrate("cuda", tmp_path / "gpu.toml")


def test_calibrate_command_writes_a_named_device(tmp_path, one_thread, capsys):
    from costmodel.cli import main
    out = tmp_path / "mine.toml"
    assert main(["hardware", "calibrate", "--device", "cpu", "--out", str(out), "--quick", "--name", "my-cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: my-cpu, ") and f"--hw {out}" in printed
    hw = load_hardware(str(out))
    assert hw.name == "my-cpu" and hw.kernels and hw.threads == 1


def test_a_calibration_apart_runs_in_its_own_process_at_this_thread_count(tmp_path, one_thread, monkeypatch):
    """calibrate_apart (what validate without --hw and the time benchmark use, since a process that
    calibrated times models slower afterwards): a child process writes the file, with this process's
    thread count, and it loads here; a failure says what was run and why it stopped."""
    import subprocess

    from costmodel.errors import CostModelError
    from costmodel.hardware.calibrate import calibrate_apart
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: runs.append(command) or real_run(command, **kw))
    out = tmp_path / "apart.toml"
    hw = calibrate_apart("cpu", out, quick=True)
    assert out.is_file() and hw.kernels and hw.threads == 1 and hw.path == str(out)
    assert len(runs) == 1 and runs[0][1:5] == ["-m", "costmodel", "hardware", "calibrate"]
    with pytest.raises(CostModelError, match=r"in a separate process .*does not exist"):
        calibrate_apart("cpu", tmp_path / "no-such-dir" / "x.toml", quick=True)
    with pytest.raises(UsageError, match="accepted: cpu, cuda"):
        calibrate_apart("tpu", out)


def test_a_busy_machine_is_said():
    from costmodel.hardware.calibrate import busy_cpu_note
    assert busy_cpu_note(1, load=1.2, cores=2) is None                  # our own thread, a little more
    one = busy_cpu_note(1, load=5.0, cores=2)
    assert "5.0 on 2 CPUs" in one and "OMP_NUM_THREADS" not in one
    assert "OMP_NUM_THREADS=1" in busy_cpu_note(2, load=3.0, cores=2)   # threads waiting on busy cores
