"""Kernel classes: decided from the op and its arguments, carried to the roofline with their shape
features; measured tables in device files (schema, interpolation) and how the roofline uses them."""

import dataclasses
import math

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from costmodel.api import _code_shares, analyze
from costmodel.errors import UsageError
from costmodel.hardware.calibrate import _to_toml, _toml_key
from costmodel.hardware.catalog import Hardware, load_hardware
from costmodel.hardware.kernels import (PROBE_CLASSES, AllocationTable, KernelTable, chain, check_kernel, find_table,
                                        interpolate)
from costmodel.hardware.roofline import op_time


def classes(report, point: dict) -> list[tuple[str, str, dict]]:
    """(target, kernel class, features) of every op that does work, at `point`."""
    pt = report.evaluate(**point)
    return [(op["target"], pt.kernel_class(i), pt.features[i]) for i, op in enumerate(pt.ops)
            if op["flops"] or op["bytes"]]


class Convs(nn.Module):
    """Named to mislead: the class must come from groups and channels, not from names."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1)               # groups=1: dense
        self.dense = nn.Conv2d(8, 8, 7, padding=3, groups=8)         # one input channel per group
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)

    def forward(self, x):
        return self.up(self.grouped(self.dense(self.depthwise(x))))


def test_conv_classes_come_from_groups_against_channels():
    r = analyze(Convs, inputs=["x:float32[batch,8,h,h]"], dims={"batch": [2], "h": [16]})
    convs = [(k, f) for t, k, f in classes(r, {"batch": 2, "h": 16}) if "convolution" in t]
    assert [k for k, _ in convs] == ["conv.dense", "conv.depthwise", "conv.grouped", "conv.transposed"]
    # As the GEMM it lowers to: m = batch * 16 * 16 = 512 positions, n = output channels per group,
    # k = input channels per group * kernel area.
    def gemm(f):
        return {k: f[k] for k in ("m", "n", "k", "groups")}
    assert gemm(convs[0][1]) == {"m": 512, "n": 8, "k": 8 * 9, "groups": 1}
    assert gemm(convs[1][1]) == {"m": 512, "n": 1, "k": 49, "groups": 8}
    assert gemm(convs[2][1]) == {"m": 512, "n": 8, "k": 4 * 9, "groups": 2}
    # its output is newly allocated: 2 * 8 * 16 * 16 floats
    assert convs[0][1]["alloc_bytes"] == 2 * 8 * 16 * 16 * 4


def test_a_cpu_lstm_layer_is_its_own_class_priced_as_a_product_where_a_device_has_no_table_of_it():
    from .models import LSTM
    r = analyze(LSTM, inputs=["x:float32[batch,seq,16]"], mode="train", dims={"batch": [4], "seq": [8]}, device="cpu")
    layers = [(k, f) for t, k, f in classes(r, {"batch": 4, "seq": 8}) if "onednn_lstm" in t]
    # two layers of hidden 32, forward and backward: oneDNN's kernels, not the BLAS's products
    assert [k for k, _ in layers] == ["matmul.lstm"] * 2 + ["matmul.lstm.backward"] * 2
    assert all(f["batch"] == 4 and f["hidden"] == 32 for _, f in layers)
    assert find_table({"matmul:float32": MATMUL}, "matmul.lstm.backward", "float32") is MATMUL
    # with its own table (by the batch, as a calibration writes it), at that table's rate
    lstm = KernelTable("matmul.lstm", "float32", 4e-5, (1.0, 8.0), (5e9, 2e10), by="batch",
                       efficiency={"hidden": ((64.0, 0.5), (256.0, 1.0))})
    assert find_table({"matmul:float32": MATMUL, "matmul.lstm:float32": lstm}, "matmul.lstm.backward",
                      "float32") is lstm
    assert lstm.time_s(1e8, {"batch": 8, "hidden": 64}) == pytest.approx(4e-5 + 1e8 / (2e10 * 0.5))


def test_a_stride_past_the_kernel_skips_input_positions():
    class Shortcuts(nn.Module):
        def __init__(self):
            super().__init__()
            self.shortcut = nn.Conv2d(8, 16, 1, stride=2)              # reads 4 positions, uses 1
            self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)       # its 3x3 window covers the stride
            self.patch = nn.Conv2d(8, 16, 4, stride=4)

        def forward(self, x):
            return self.shortcut(x).sum() + self.down(x).sum() + self.patch(x).sum()
    r = analyze(Shortcuts, inputs=["x:float32[batch,8,h,h]"], dims={"batch": [2], "h": [16]}, mode="train")
    pt = r.evaluate(batch=2, h=32)
    skipped = [(pt.kernel_class(i), pt.features[i]["skipped"]) for i, op in enumerate(pt.ops) if "convolution" in op["target"]]
    assert [s for k, s in skipped if k == "conv.dense"] == [4, 1, 1]
    assert sorted(s for k, s in skipped if k.startswith("conv.dense.backward")) == [1, 1, 4]


def test_grouped_conv_backward_work_is_the_kernels_and_its_count_the_flop_counters():
    from torch.utils.flop_counter import FlopCounterMode
    r = analyze(Convs, inputs=["x:float32[batch,8,h,h]"], mode="train", dims={"batch": [2], "h": [16]})
    pt = r.evaluate(batch=2, h=16)
    forward = {op["module"]: op for op in pt.ops if op["target"] == "aten.convolution.default"}
    backward = {op["module"]: op for op in pt.ops if op["target"] == "aten.convolution_backward.default"}
    for name in ("grouped", "dense", "up"):       # input and weight gradients: the forward's work twice
        assert backward[name]["flops"] == 2 * forward[name]["flops"], name
    # FlopCounterMode counts the weight gradient of the 8-group layer 8 times, of the 2-group one twice
    assert backward["dense"]["matmul_flops"] == forward["dense"]["flops"] * (1 + 8)
    assert backward["grouped"]["matmul_flops"] == forward["grouped"]["flops"] * (1 + 2)
    model, x = Convs(), torch.randn(2, 8, 16, 16)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert pt.totals["matmul_flops"] == counter.get_total_flops()


def test_conv_backward_of_a_first_layer_computes_no_input_gradient():
    r = analyze(Convs, inputs=["x:float32[batch,8,h,h]"], mode="train", dims={"batch": [2], "h": [16]})
    backward = [k for t, k, _ in classes(r, {"batch": 2, "h": 16}) if "convolution_backward" in t]
    # backwards run last layer first; the first conv's input is the model's input: no gradient
    assert backward == ["conv.transposed.backward", "conv.grouped.backward", "conv.depthwise.backward",
                        "conv.dense.backward.weight"]


class Block(nn.Module):
    def __init__(self, d=32, heads=4, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = (t.reshape(B, S, self.heads, D // self.heads).transpose(1, 2) for t in self.qkv(x).split(D, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return F.gelu(self.out(a.transpose(1, 2).reshape(B, S, D)), approximate="tanh")


def test_products_carry_m_n_k():
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]})
    mm = [(k, f) for t, k, f in classes(r, {"batch": 2, "seq": 64}) if "mm" in t]
    # qkv: [2 * 64, 32] @ [32, 96]; out: [128, 32] @ [32, 32]
    assert [(k, f["m"], f["n"], f["k"]) for k, f in mm] == [("matmul", 128, 96, 32), ("matmul", 128, 32, 32)]


def test_attention_class_is_the_kernel_each_device_runs():
    point = {"batch": 2, "seq": 64}

    def sdpa_classes(device):
        r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]}, device=device)
        return [(k, f) for t, k, f in classes(r, point) if "sdpa" in t]
    cpu, cuda = sdpa_classes("cpu"), sdpa_classes("cuda")
    assert [k for k, _ in cpu] == ["attention.flash.causal"]        # PyTorch's CPU flash kernel takes this call
    assert [k for k, _ in cuda] == ["attention.efficient.causal"]   # float32 on CUDA: the memory-efficient kernel
    features = cpu[0][1]
    assert {k: features[k] for k in ("batch_heads", "L", "S", "E")} == {"batch_heads": 8, "L": 64, "S": 64, "E": 8}
    # With dropout in training the CPU runs the math kernel; the backward is its own class.
    t = analyze(lambda: Block(dropout=0.1), inputs=["x:float32[batch,seq,32]"], mode="train",
                dims={"batch": [2], "seq": [64]}, device="cpu")
    train = [k for tg, k, _ in classes(t, point) if "sdpa" in tg]
    assert train == ["attention.math.causal.dropout", "attention.math.backward.causal"]


def test_forced_attention_kernel_names_the_class():
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], attention="math", dims={"batch": [2], "seq": [64]},
                device="cuda")
    assert [k for t, k, _ in classes(r, {"batch": 2, "seq": 64}) if "sdpa" in t] == ["attention.math.causal"]


def test_pointwise_class_is_the_op_and_its_approximation():
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]})
    assert "pointwise.gelu_tanh" in [k for _, k, _ in classes(r, {"batch": 2, "seq": 64})]


class Padded(nn.Module):
    """TF-style "same" padding before a convolution (HF MobileNetV2, EfficientNet): F.pad, then a clone."""

    def forward(self, x):
        return F.pad(x, (0, 1, 0, 1)).clone()


def test_constant_padding_is_its_own_copy_class_with_the_plain_copy_behind_it():
    r = analyze(Padded, inputs=["x:float32[batch,8,16,16]"], dims={"batch": [2]})
    by_target = {t: k for t, k, _ in classes(r, {"batch": 2})}
    assert by_target["aten.constant_pad_nd.default"] == "copy.pad"
    assert by_target["aten.clone.default"] == "copy"
    assert chain("copy.pad") == ["copy.pad", "copy"]     # a file without its table prices it as a copy


def test_class_names_and_chain():
    assert chain("conv.depthwise.backward") == ["conv.depthwise.backward", "conv.depthwise", "conv"]
    assert check_kernel("pointwise.tanh") == "pointwise.tanh"
    with pytest.raises(UsageError, match="'convolution' is not a kernel class \\(did you mean conv\\?\\)"):
        check_kernel("convolution")
    with pytest.raises(UsageError, match="conv classes are dense, depthwise, grouped, transposed; got 'deep'"):
        check_kernel("conv.deep")


# --- tables --------------------------------------------------------------------------------------------

MATMUL = KernelTable("matmul", "float32", overhead_s=2e-6, sizes=(1e6, 1e8), rates=(1e10, 1e11),
                     efficiency={"m": ((1.0, 0.25), (64.0, 1.0))})


def test_rates_interpolate_log_log_and_hold_past_the_ends():
    assert MATMUL.rate(1e6) == 1e10 and MATMUL.rate(1e8) == 1e11
    assert MATMUL.rate(1e7) == pytest.approx(math.sqrt(1e10 * 1e11))   # halfway in log size: geometric mean
    assert MATMUL.rate(1e3) == 1e10 and MATMUL.rate(1e12) == 1e11
    assert interpolate([1.0, 4.0], [1.0, 16.0], 2.0) == pytest.approx(4.0)


def test_time_is_overhead_plus_work_at_the_rate_and_shape_efficiency():
    # m = 8 is a third of the way from 1 to 64 in log: 0.25 * 4^(1/2) = 0.5
    assert MATMUL.shape_efficiency({"m": 8, "n": 512}) == pytest.approx(0.5)
    # 1e8 FLOPs at 1e11 FLOP/s and efficiency 0.5: 2 ms, plus 2 us
    assert MATMUL.time_s(1e8, {"m": 8}) == pytest.approx(2e-6 + 1e8 / (1e11 * 0.5))
    assert MATMUL.time_s(1e8) == pytest.approx(2e-6 + 1e-3)


def test_table_indexed_by_a_feature():
    conv = KernelTable("conv.depthwise", "float32", 5e-5, (16.0, 1024.0), (1e9, 1e10), by="m")
    assert conv.time_s(1e7, {"m": 1024}) == pytest.approx(5e-5 + 1e-3)
    assert conv.time_s(1e7, {"m": 16}) == pytest.approx(5e-5 + 1e-2)


def test_allocation_is_a_step_in_the_block_size():
    alloc = AllocationTable((1 << 20, 32 << 20), (0.0, 4e-10))
    assert alloc.penalty_s(16 << 20) == 0.0           # between the sizes: the smaller one's figure
    assert alloc.penalty_s(64 << 20) == pytest.approx((64 << 20) * 4e-10)
    assert alloc.penalty_s(1000) == 0.0


def test_find_table_walks_the_chain_and_keys_flops_classes_by_dtype():
    tables = {"conv:float32": KernelTable("conv", "float32", 1e-6, (1.0,), (1.0,)),
              "pointwise": KernelTable("pointwise", None, 1e-6, (1.0,), (1.0,))}
    assert find_table(tables, "conv.depthwise.backward", "float32").kernel == "conv"
    assert find_table(tables, "conv.dense", "bfloat16") is None
    assert find_table(tables, "pointwise.tanh", "bfloat16").kernel == "pointwise"   # bytes: any dtype


CPU = """
name = "my-cpu"
calibrated = true
memory_bytes = 17_179_869_184
bandwidth_bytes_per_s = 2e10
threads = 1
[peak_flops_per_s]
float32 = 1e11
"""


def device_file(tmp_path, kernels: dict, allocation: dict | None = None):
    tables = {f"kernels.{_toml_key(k)}": v for k, v in kernels.items()}
    if allocation is not None:
        tables["allocation"] = allocation
    path = tmp_path / "cpu.toml"
    path.write_text(CPU + _to_toml("test", {}, tables).split("\n", 1)[1])
    return path


def test_tables_round_trip_through_the_file(tmp_path):
    path = device_file(tmp_path, {"matmul:float32": MATMUL.to_dict(),
                                  "pointwise.tanh": {"overhead_s": 1e-6, "sizes": [1e3, 1e6], "rates": [1e9, 3e9],
                                                     "how": "torch.tanh(x)"},
                                  "view": {"overhead_s": 1e-6}},
                       {"sizes": [1048576.0, 33554432.0], "seconds_per_byte": [0.0, 4e-10]})
    hw = load_hardware(str(path))
    assert hw.kernels["matmul:float32"] == MATMUL
    assert hw.kernels["pointwise.tanh"].how == "torch.tanh(x)"
    assert hw.allocation == AllocationTable((1048576.0, 33554432.0), (0.0, 4e-10))
    assert hw.threads == 1
    assert load_hardware(str(path)) == hw


@pytest.mark.parametrize("key, table, message", [
    ("convolution:float32", {"overhead_s": 0.0}, "'convolution' is not a kernel class"),
    ("matmul", {"overhead_s": 0.0}, "a matmul table is per dtype; name it 'matmul:DTYPE'"),
    ("matmul:fp32", {"overhead_s": 0.0}, "unknown dtype 'fp32'"),
    ("pointwise:float32", {"overhead_s": 0.0}, "priced by bytes, whatever the dtype; name the table 'pointwise'"),
    ("pointwise", {"overhead_s": 0.0, "sizes": [1.0, 2.0], "rates": [1.0]}, "same length"),
    ("pointwise", {"overhead_s": 0.0, "sizes": [2.0, 1.0], "rates": [1.0, 1.0]}, "strictly ascending"),
    ("pointwise", {"overhead_s": 0.0, "sizes": [1.0]}, "'sizes' and 'rates' go together"),
    ("pointwise", {"overhead_s": -1.0}, "'overhead_s' must be seconds"),
    ("pointwise", {"overhead": 0.0}, "unknown field 'overhead' \\(did you mean overhead_s\\?\\)"),
    ("matmul:float32", {"overhead_s": 0.0, "sizes": [1.0], "rates": [1.0], "efficiency": {"q": [[1.0, 1.0]]}},
     "unknown feature 'efficiency.q'; matmul classes have m, n, k"),
    ("matmul:float32", {"overhead_s": 0.0, "sizes": [1.0], "rates": [1.0], "efficiency": {"m": [[1.0]]}},
     "must be a list of \\[value, factor\\] pairs"),
    ("matmul:float32", {"overhead_s": 0.0, "work": "bytes"}, "priced by flops, but the table says work = 'bytes'"),
    ("conv.dense:float32", {"overhead_s": 0.0, "by": "h"}, "'by' must be work or a feature of conv classes"),
    ("pointwise", {"overhead_s": 0.0, "reference": -1.0}, "'reference' must be a positive size"),
    ("pointwise", {"overhead_s": 0.0, "evicted": [[1.0]]}, "'evicted' must be a list of \\[size, seconds\\] pairs"),
    ("pointwise", {"overhead_s": 0.0, "evicted": [[1.0, -1.0]]}, "'evicted' seconds must be numbers, 0 <= value < 1"),
    ("pointwise", {"overhead_s": 0.0, "evicted": [[2.0, 0.0], [1.0, 0.0]]}, "'evicted' sizes must be strictly ascending"),
    ("pointwise", {"overhead_s": 0.0, "refill": [[1.0, 2.0]]}, "'refill' seconds must be numbers, 0 <= value < 1"),
])
def test_table_errors_say_what_is_wrong(tmp_path, key, table, message):
    with pytest.raises(UsageError, match=message):
        load_hardware(str(device_file(tmp_path, {key: table})))


def test_allocation_errors(tmp_path):
    with pytest.raises(UsageError, match="seconds_per_byte must be 2 numbers >= 0"):
        load_hardware(str(device_file(tmp_path, {}, {"sizes": [1.0, 2.0], "seconds_per_byte": [0.0]})))


# --- the roofline with tables ---------------------------------------------------------------------

def calibrated(tmp_path, **extra) -> Hardware:
    return load_hardware(str(device_file(tmp_path, {"matmul:float32": MATMUL.to_dict(),
                                                    "conv:float32": {"overhead_s": 4e-6, "sizes": [1.0],
                                                                     "rates": [5e10]},
                                                    "view": {"overhead_s": 1e-6}, **extra},
                                         {"sizes": [33554432.0], "seconds_per_byte": [5e-10]})))


def test_roofline_prices_from_the_most_specific_table(tmp_path):
    hw = calibrated(tmp_path)
    t = op_time(1e8, 1e6, "matmul", "float32", hw, kernel="matmul", features={"m": 8})
    assert t.kernel == "matmul"
    assert t.time_s == pytest.approx(2e-6 + 1e8 / (1e11 * 0.5))
    assert t.overhead_s == 2e-6
    # conv.depthwise has no table of its own: the conv table prices it
    d = op_time(1e8, 1e6, "conv", "float32", hw, kernel="conv.depthwise")
    assert (d.kernel, d.time_s) == ("conv", pytest.approx(4e-6 + 1e8 / 5e10))
    # a fresh 64 MiB output on this CPU: 2^26 * 5e-10 s of page faults on top
    big = op_time(1e8, 1e6, "matmul", "float32", hw, kernel="matmul", features={"alloc_bytes": 1 << 26})
    assert big.allocation_s == pytest.approx((1 << 26) * 5e-10)
    assert big.time_s == pytest.approx(2e-6 + 1e-3 + big.allocation_s)


def test_views_cost_their_eager_dispatch_on_a_calibrated_device(tmp_path):
    assert op_time(0, 0, "view", "float32", calibrated(tmp_path), kernel="view").time_s == 1e-6
    assert op_time(0, 0, "view", "float32", load_hardware("a100-80gb")).time_s == 0.0


def test_without_a_table_the_generic_ramps_price_it(tmp_path):
    hw = calibrated(tmp_path)
    generic = Hardware("plain", hw.memory_bytes, hw.bandwidth_bytes_per_s, hw.peak_flops_per_s,
                       hw.kernel_overhead_s, calibrated=True)
    for args in [(1e9, 1e7, "norm", "float32"), (1e9, 1e7, "attention", "float32")]:
        t = op_time(*args, hw)
        assert t.kernel is None
        assert t.time_s == pytest.approx(op_time(*args, generic).time_s)
    # a dtype without its own table is not priced by another dtype's
    hw_bf16 = Hardware("bf16", hw.memory_bytes, hw.bandwidth_bytes_per_s, {"float32": 1e11, "bfloat16": 2e11},
                       kernels=hw.kernels)
    assert op_time(1e8, 1e6, "matmul", "bfloat16", hw_bf16, kernel="matmul").kernel is None


def test_old_calibration_files_load_and_price_as_before(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(CPU.replace("threads = 1\n", "kernel_overhead_s = 3e-6\n"))
    hw = load_hardware(str(path))
    assert (hw.kernels, hw.allocation, hw.threads) == ({}, None, None)
    t = op_time(2 * 2048**3, 3 * 2048**2 * 4, "matmul", "float32", hw, kernel="matmul", features={"m": 1})
    assert t.time_s == pytest.approx(2 * 2048**3 / 1e11 + 2e-6 + 3e-6)    # the calibrated ramp, as before


def test_a_model_is_priced_op_by_op_from_the_tables(tmp_path):
    hw = calibrated(tmp_path)
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]}, hardware=hw)
    pt = r.evaluate(batch=2, seq=64)
    times = pt.timing(hw)["op_times"]
    mm = [t for op, t in zip(pt.ops, times) if op["target"] == "aten.addmm.default"]
    assert [t.kernel for t in mm] == ["matmul", "matmul"]
    # qkv: 2 * 128 * 96 * 32 FLOPs at the rate of its work, m = 128 past the curve's end (1.0)
    flops = 2 * 128 * 96 * 32
    assert mm[0].time_s == pytest.approx(2e-6 + flops / MATMUL.rate(flops))
    # the views the model's code calls cost a view's dispatch; size reads of the trace cost nothing
    views = [(op["target"], t.time_s) for i, (op, t) in enumerate(zip(pt.ops, times))
             if op["category"] == "view" and not pt.features[i].get("internal")]
    assert views and all(t == (0.0 if "sym_size" in target else 1e-6) for target, t in views)
    assert pt.totals["time_s"] == pytest.approx(sum(t.time_s for t in times))


# --- eager's own costs and the cache ------------------------------------------------------------------

class Head(nn.Module):
    """nn.Linear on a permuted 3-D input: tracing keeps a bmm against the broadcast weight, eager
    folds the batch into the rows and runs one product."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x):
        return self.lin(x.transpose(0, 1))


def test_broadcast_weight_bmm_is_priced_as_the_folded_product():
    r = analyze(Head, inputs=["x:float32[seq,batch,16]"], dims={"batch": [4], "seq": [8]})
    products = [(k, f) for t, k, f in classes(r, {"batch": 4, "seq": 8}) if "mm" in t]
    assert [(k, f["m"], f["n"], f["k"]) for k, f in products] == [("matmul", 4 * 8, 32, 16)]


def test_ops_after_the_first_of_a_python_call_are_internal():
    # F.linear on [batch, seq, 32] is one Python call: eager's view, t, addmm and view run from C++
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]})
    pt = r.evaluate(batch=2, seq=64)
    linear = [(op["target"], pt.features[i].get("internal", 0)) for i, op in enumerate(pt.ops)
              if op["module"] == "qkv" and "sym_size" not in op["target"]]
    assert linear == [("aten.view.default", 0), ("aten.t.default", 1), ("aten.addmm.default", 1),
                      ("aten.view.default", 1)]
    assert r.primary.captured.module_calls == 3        # the block, qkv, out


def test_permuted_inputs_name_strided_classes():
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            y = self.norm(x.permute(0, 2, 3, 1))       # the norm copies its permuted input first
            return x + y.permute(0, 3, 1, 2)           # strided loads of y
    r = analyze(ChannelsLast, inputs=["x:float32[batch,8,h,h]"], dims={"batch": [2], "h": [4]})
    ops = {t: (k, f) for t, k, f in classes(r, {"batch": 2, "h": 4})}
    assert ops["aten.native_layer_norm.default"][0] == "norm.layer"
    assert ops["aten.native_layer_norm.default"][1]["strided_bytes"] == 2 * 8 * 4 * 4 * 4
    assert ops["aten.add.Tensor"][0] == "pointwise.strided"
    # x first: the loop runs along x's rows and steps y's 8 channels (32 bytes) at a time
    assert ops["aten.add.Tensor"][1]["inner_stride_bytes"] == 8 * 4


class ChannelsLastConvs(nn.Module):
    """A dense convolution of a channels-last view, then a depthwise one of its output"""

    def __init__(self):
        super().__init__()
        self.dense, self.dw = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 7, padding=3, groups=8)

    def forward(self, x):
        return self.dw(self.dense(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)))


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_convolutions_of_channels_last_inputs_have_their_own_classes(mode):
    # eager on a CPU gives a convolution of a channels-last input a channels-last output, and so
    # the depthwise convolution after it a channels-last input; the capture (on the meta device)
    # lays them out the same
    x = torch.randn(2, 8, 6, 6)
    m = ChannelsLastConvs()
    assert m.dense(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)).is_contiguous(memory_format=torch.channels_last)
    r = analyze(ChannelsLastConvs, inputs=["x:float32[batch,8,h,h]"], mode=mode, dims={"batch": [2], "h": [6]})
    convs = [k for t, k, _ in classes(r, {"batch": 2, "h": 6}) if k.startswith("conv")]
    expected = ["conv.dense.channels_last", "conv.depthwise.channels_last"]
    if mode == "train":   # the backward's data input is the forward's: channels-last too (the
        # first one's input needs no gradient: its weight's only)
        expected += ["conv.depthwise.backward.channels_last", "conv.dense.backward.weight.channels_last"]
    assert convs == expected


def test_a_channels_last_class_prices_without_the_copy_its_fallback_adds(tmp_path):
    base = KernelTable("conv.depthwise", "float32", 1e-6, (1.0, 1e12), (1e10, 1e10))
    fast = dataclasses.replace(base, kernel="conv.depthwise.channels_last", rates=(2e10, 2e10))
    copy = KernelTable("copy.strided", None, 1e-6, (1.0, 1e12), (1e9, 1e9))
    tables = {"kernels.\"conv.depthwise:float32\"": base.to_dict(), "kernels.\"copy.strided\"": copy.to_dict()}
    path = tmp_path / "a.toml"
    path.write_text(CPU + _to_toml("t", {}, tables).split("\n", 1)[1])
    without = load_hardware(str(path))
    tables["kernels.\"conv.depthwise.channels_last:float32\""] = fast.to_dict()
    path.write_text(CPU + _to_toml("t", {}, tables).split("\n", 1)[1])
    with_cl = load_hardware(str(path))
    f = {"strided_bytes": 1e6}
    t_without = op_time(1e8, 1e6, "conv", "float32", without, kernel="conv.depthwise.channels_last", features=f)
    t_with = op_time(1e8, 1e6, "conv", "float32", with_cl, kernel="conv.depthwise.channels_last", features=f)
    # the fallback: the channels-first rate plus the contiguous copy (2x the strided bytes at 1 GB/s)
    assert t_without.time_s == pytest.approx(1e-6 + 1e8 / 1e10 + 2e6 / 1e9)
    assert t_with.time_s == pytest.approx(1e-6 + 1e8 / 2e10)


def test_the_order_of_the_operands_sets_the_inner_stride_of_a_strided_add():
    class Across(nn.Module):
        def forward(self, x):
            y = x.permute(0, 2, 3, 1).contiguous()     # channels-last memory
            return y.permute(0, 3, 1, 2) + x           # y's layout leads: x is read a plane apart
    r = analyze(Across, inputs=["x:float32[batch,8,h,h]"], dims={"batch": [2], "h": [4, 8]})
    for h in (4, 8):
        ops = {t: (k, f) for t, k, f in classes(r, {"batch": 2, "h": h})}
        assert ops["aten.add.Tensor"] == ("pointwise.strided", {**ops["aten.add.Tensor"][1],
                                                                "inner_stride_bytes": h * h * 4})


def test_a_strided_add_is_priced_by_its_inner_stride_curve(tmp_path):
    rate = 1e10
    table = KernelTable("pointwise.strided", None, 1e-6, (1.0, 1e9), (rate, rate),
                        {"inner_stride_bytes": ((64.0, 2.0), (256.0, 1.0), (4096.0, 0.25))})
    nbytes = 1e6
    assert table.kernel_time_s(nbytes, {"inner_stride_bytes": 256}) == pytest.approx(nbytes / rate)
    assert table.kernel_time_s(nbytes, {"inner_stride_bytes": 4096}) == pytest.approx(4 * nbytes / rate)
    assert table.kernel_time_s(nbytes, {"inner_stride_bytes": 64}) == pytest.approx(nbytes / rate / 2)
    assert table.kernel_time_s(nbytes, {}) == pytest.approx(nbytes / rate)   # no feature: the base


def with_cache(tmp_path, cache_bytes: int, **fields) -> Hardware:
    text = CPU.replace("threads = 1\n", f"threads = 1\ncache_bytes = {cache_bytes}\n" +
                       "".join(f"{k} = {v}\n" for k, v in fields.items()))
    path = tmp_path / "cache.toml"
    path.write_text(text + _to_toml("t", {}, {
        "kernels.\"matmul:float32\"": MATMUL.to_dict(), "kernels.pointwise": {"overhead_s": 3e-6, "sizes": [1.0],
                                                                                "rates": [1e10]},
        "kernels.view": {"overhead_s": 1e-6}}).split("\n", 1)[1])
    return load_hardware(str(path))


def test_inputs_the_cache_no_longer_holds_are_read_from_memory(tmp_path):
    big = with_cache(tmp_path, cache_bytes=1 << 30)
    small = with_cache(tmp_path, cache_bytes=1)
    r = analyze(Block, inputs=["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64]})
    pt = r.evaluate(batch=2, seq=64)
    cold = pt._with_cold_inputs(pt.features, big.cache_bytes)
    qkv = next(i for i, op in enumerate(pt.ops) if op["target"] == "aten.addmm.default")
    # with a cache that holds everything, only first reads are cold: the input and qkv's
    # weight (32 * 96 floats) and bias (96 floats)
    assert cold[qkv]["cold_bytes"] == 2 * 64 * 32 * 4 + (32 * 96 + 96) * 4
    gelu = next(i for i, op in enumerate(pt.ops) if op["target"] == "aten.gelu.default")
    assert "cold_bytes" not in cold[gelu]                 # its input was just written
    # with a 1-byte cache, all but a byte of gelu's 2 * 64 * 32 * 4 = 16384-byte input is gone
    assert pt._with_cold_inputs(pt.features, small.cache_bytes)[gelu]["cold_bytes"] == 16384 - 1
    t_big = r.evaluate(batch=2, seq=64).timing(big)["op_times"][qkv]
    t_small = r.evaluate(batch=2, seq=64).timing(small)["op_times"][qkv]
    assert t_big.time_s == pytest.approx(t_small.time_s)     # first reads: cold either way
    assert t_big.time_s > MATMUL.time_s(2 * 128 * 96 * 32, {"m": 128})



class NormAct(nn.Module):
    """GroupNorm then SiLU: the SiLU reads one output (a getitem) of native_group_norm's three"""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 16)

    def forward(self, x):
        return F.silu(self.norm(x))


def test_an_output_of_an_op_of_several_was_written_by_that_op(tmp_path):
    big = with_cache(tmp_path, cache_bytes=1 << 30)
    r = analyze(NormAct, inputs=["x:float32[batch,16,8,8]"], dims={"batch": [2]})
    pt = r.evaluate(batch=2)
    cold = pt._with_cold_inputs(pt.features, big.cache_bytes)
    silu = next(i for i, op in enumerate(pt.ops) if op["target"] == "aten.silu.default")
    assert "cold_bytes" not in cold[silu]     # native_group_norm just wrote it

class BroadcastWeight(nn.Module):
    """x[b, m, k] @ W[k, n]: tracing expands W over the batch (stride 0) and runs a bmm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16))

    def forward(self, x):
        return x @ self.w


def test_a_broadcast_read_takes_its_storages_bytes_once(tmp_path):
    """A weight expanded over a batch of 64 is read from 32 * 16 floats of memory, not 64 times
    them: its first read in the step is that cold, not the expanded view's size (a GRU's input
    weight was charged 50 MB cold, 1.3 ms at two threads, for 786 KB)."""
    r = analyze(BroadcastWeight, inputs=["x:float32[batch,8,32]"], dims={"batch": [64]})
    pt = r.evaluate(batch=64)
    i = next(i for i, op in enumerate(pt.ops) if op["target"] in ("aten.bmm.default", "aten.mm.default"))
    reads = dict(pt.analysis.ops[i].reads)
    weight = next(name for name in reads if name.startswith("params") or name.startswith("w"))
    assert int(sympy.sympify(reads[weight])) == 32 * 16 * 4
    # first reads in the step: the input and the weight, each once
    assert pt._with_cold_inputs(pt.features, 1 << 30)[i]["cold_bytes"] == 64 * 8 * 32 * 4 + 32 * 16 * 4


def test_internal_ops_skip_the_python_binding(tmp_path):
    hw = with_cache(tmp_path, cache_bytes=1 << 30, python_call_s=2e-6)
    assert op_time(1e6, 1e6, "pointwise", "float32", hw, kernel="pointwise").overhead_s == 3e-6
    assert op_time(1e6, 1e6, "pointwise", "float32", hw, kernel="pointwise",
                   features={"internal": 1}).overhead_s == pytest.approx(1e-6)
    # never below a tenth of the measured overhead
    assert op_time(0, 0, "view", "float32", hw, kernel="view", features={"internal": 1}).time_s == pytest.approx(1e-7)


class Chain(nn.Module):
    """Three adds of a parameter (an add's backward node runs no op) and a product"""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        for _ in range(3):
            x = x + self.w
        return self.lin(x)


def test_each_autograd_node_is_priced_once_at_the_forward_op_that_made_it(tmp_path):
    r = analyze(Chain, inputs=["x:float32[batch,16]"], mode="train", dims={"batch": [4]})
    pt = r.evaluate(batch=4)
    marked = [(op["target"], op["phase"]) for i, op in enumerate(pt.ops) if pt.features[i].get("autograd_node")]
    # the adds, F.linear's t and addmm, and the loss's sum made one node each; the backward, none
    assert [t for t, _ in marked if t == "aten.add.Tensor"] == ["aten.add.Tensor"] * 3
    assert ("aten.addmm.default", "forward") in marked and ("aten.t.default", "forward") in marked
    assert all(phase != "backward" for _, phase in marked)
    graph = r.primary.captured.graph.graph
    forward_numbers = {n.meta["seq_nr"] for n in graph.nodes if n.op == "call_function" and "seq_nr" in n.meta
                       and n.meta.get("costmodel_phase") != "backward"}
    assert len(marked) == len(forward_numbers)
    # the engine calls each backward node's first op (marked), the node's later ops run inside it
    engine = [op["target"] for i, op in enumerate(pt.ops) if pt.features[i].get("engine_call")]
    assert engine and all(pt.ops[i]["phase"] == "backward" for i, op in enumerate(pt.ops)
                          if pt.features[i].get("engine_call"))
    assert not any(f.get("autograd_node") for f in analyze(Chain, inputs=["x:float32[batch,16]"],
                                                           dims={"batch": [4]}).evaluate(batch=4).features)
    # priced: each node its cost, each engine call without the binding
    with_nodes = with_cache(tmp_path, cache_bytes=1 << 30, python_call_s=2e-7, autograd_node_s=1.5e-6)
    without = with_cache(tmp_path, cache_bytes=1 << 30, python_call_s=2e-7)
    for table in ("add", "sum"):     # every op priced from a table: the nodes' ops cost overheads alike
        with_nodes.kernels[f"pointwise.{table}"] = without.kernels[f"pointwise.{table}"] = \
            without.kernels["pointwise"]
    extra = pt.timing(with_nodes)["summary"].time_s - pt.timing(without)["summary"].time_s
    priced = [i for i, t in enumerate(pt.timing(with_nodes)["op_times"]) if t.kernel is not None]
    nodes = sum(1 for i in priced if pt.features[i].get("autograd_node"))
    calls = sum(1 for i in priced if pt.features[i].get("engine_call"))
    assert nodes >= 5 and calls >= 2
    assert extra == pytest.approx(nodes * 1.5e-6 - calls * 2e-7)


def test_a_device_file_s_autograd_node_cost_is_seconds(tmp_path):
    assert with_cache(tmp_path, cache_bytes=1, autograd_node_s=1e-6).autograd_node_s == 1e-6
    assert with_cache(tmp_path, cache_bytes=1).autograd_node_s is None
    with pytest.raises(UsageError, match="'autograd_node_s' must be seconds"):
        with_cache(tmp_path, cache_bytes=1, autograd_node_s=-1)


STREAMED = KernelTable("matmul.streamed", "float32", 2e-6, sizes=(1.0, 2.0, 64.0), rates=(1e10, 5e9, 6e10),
                       efficiency={"k": ((256.0, 0.5), (4096.0, 1.0))}, by="m")


def test_products_bound_by_their_cold_read_take_the_streamed_table(tmp_path):
    hw = with_cache(tmp_path, cache_bytes=1 << 20)
    streamed = with_cache(tmp_path, cache_bytes=1 << 20)
    streamed.kernels["matmul.streamed:float32"] = STREAMED
    weight = 4096 * 4096 * 4

    def price(device, m, cold, k=4096):
        f = {"m": m, "n": 4096, "k": k, "cold_bytes": cold}
        return op_time(2 * m * 4096 * k, weight + 8 * m * 4096, "matmul", "float32", device, kernel="matmul",
                       features=f)
    # one row, its weight from memory: the streamed rate at m = 1, nothing added for the read
    t = price(streamed, 1, weight)
    assert t.kernel == "matmul.streamed"
    assert t.time_s == pytest.approx(2e-6 + 2 * 4096 * 4096 / 1e10)
    # two rows run slower than one where the table says so (m separate matrix-vector products)
    assert price(streamed, 2, weight).time_s == pytest.approx(2e-6 + 4 * 4096 * 4096 / 5e9)
    assert price(streamed, 1, weight, k=256).time_s == pytest.approx(2e-6 + 2 * 4096 * 256 / (1e10 * 0.5))
    # without the table: the in-cache table plus the read, as before
    plain = price(hw, 1, weight)
    assert plain.kernel == "matmul"
    assert plain.time_s == pytest.approx(MATMUL.time_s(2 * 4096 * 4096, {"m": 1}) + weight / hw.bandwidth_bytes_per_s)
    # a weight larger than the cache streams whatever the rows (as the table's did); the curves,
    # measured at one row, fade log-linearly to nothing at the table's most rows (64)
    many = price(streamed, 16, weight, k=256)
    assert many.kernel == "matmul.streamed"
    rate16 = STREAMED.rate(16)
    assert many.time_s == pytest.approx(2e-6 + 2 * 16 * 4096 * 256 / (rate16 * 0.5 ** (1 - math.log(16) / math.log(64))))
    # not bound by the read (weights in cache; many rows; past the table's largest m): the in-cache table
    assert price(streamed, 1, 0).kernel == "matmul"
    assert price(streamed, 2048, weight).kernel == "matmul"
    assert price(streamed, 100, weight).kernel == "matmul"
    # batched products have no streamed table
    assert op_time(2e6, 1e8, "matmul", "float32", streamed, kernel="bmm",
                   features={"m": 1, "n": 4096, "k": 256, "cold_bytes": 1e8}).kernel != "matmul.streamed"


def test_a_gather_misses_the_cache_on_what_it_reads_only(tmp_path):
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(50000, 64)

        def forward(self, ids):
            return self.table(ids)
    r = analyze(Lookup, inputs=["ids:int64[batch,seq]"], dims={"batch": [2], "seq": [8]})
    pt = r.evaluate(batch=2, seq=8)
    i = next(i for i, op in enumerate(pt.ops) if op["target"] == "aten.embedding.default")
    cold = pt._with_cold_inputs(pt.features, 1)[i]["cold_bytes"]
    assert cold == pt.ops[i]["bytes_read"] < 50000 * 64 * 4      # rows and indices, not the table



EVICTED = KernelTable("pointwise", None, 3e-6, sizes=(1.0,), rates=(1e10,),
                      evicted=((1e3, 1e-6), (1e6, 4e-6), (1e9, 0.0)))


def test_evicted_seconds_are_linear_in_log_size_and_hold_past_the_ends(tmp_path):
    assert EVICTED.evicted_s(1e3) == 1e-6 and EVICTED.evicted_s(10.0) == 1e-6
    assert EVICTED.evicted_s(math.sqrt(1e3 * 1e6)) == pytest.approx(2.5e-6)   # halfway in log size
    assert EVICTED.evicted_s(1e12) == 0.0
    assert KernelTable("pointwise", None, 3e-6).evicted_s(1e6) == 0.0         # not measured: nothing
    path = device_file(tmp_path, {"pointwise": EVICTED.to_dict()})
    assert load_hardware(str(path)).kernels["pointwise"] == EVICTED
    assert load_hardware(str(path)).kernels["pointwise"].evicted == EVICTED.evicted


def test_an_op_pays_its_evicted_seconds_only_when_flagged(tmp_path):
    hw = with_cache(tmp_path, cache_bytes=1 << 30)
    hw.kernels["pointwise"] = EVICTED
    warm = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise")
    evicted = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"evicted": 1})
    assert evicted.time_s == pytest.approx(warm.time_s + 4e-6)


def test_an_evicted_call_whose_inputs_are_at_hand_does_not_pay_their_refill(tmp_path):
    """Of the evicted seconds, the refill part is the call's inputs coming back into the core
    caches: paid in the share of its reads that are beyond them (a saved activation), not for
    those the op before it just wrote; a table without it, or an op without the share, pays all."""
    table = dataclasses.replace(EVICTED, refill=((1e3, 0.5e-6), (1e6, 3e-6)))
    assert table.evicted_s(1e6) == pytest.approx(4e-6)
    assert table.evicted_s(1e6, {"inputs_out": 1.0}) == pytest.approx(4e-6)
    assert table.evicted_s(1e6, {"inputs_out": 0.0}) == pytest.approx(1e-6)
    assert table.evicted_s(1e6, {"inputs_out": 0.5}) == pytest.approx(2.5e-6)
    assert EVICTED.evicted_s(1e6, {"inputs_out": 0.0}) == pytest.approx(4e-6)
    path = device_file(tmp_path, {"pointwise": table.to_dict()})
    assert load_hardware(str(path)).kernels["pointwise"].refill == table.refill


def test_the_share_of_reads_beyond_the_core_caches():
    """An op reading what the op before it wrote has it at hand; a first read in the step (the
    input, a weight) and a read after more traffic than the caches hold are beyond them."""
    r = analyze(Recurrent, inputs=["x:float32[batch,16]"], dims={"batch": [8]})
    pt = r.evaluate(batch=8)
    tanh = [i for i, op in enumerate(pt.ops) if op["target"] == "aten.tanh.default"]
    cell = [i for i, op in enumerate(pt.ops) if op["target"] == "aten.addmm.default"][:4]
    roomy = pt._with_inputs_out(pt.features, core_bytes=1 << 20)
    assert [roomy[i]["inputs_out"] for i in tanh] == [0.0] * 4
    assert roomy[cell[0]]["inputs_out"] == 1.0 and roomy[cell[1]]["inputs_out"] == 0.0
    tiny = pt._with_inputs_out(pt.features, core_bytes=64)
    assert all(tiny[i]["inputs_out"] > 0.5 for i in tanh + cell)


class Recurrent(nn.Module):
    """The same small cell over steps (an RNN's loop), then a large product once."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.Linear(16, 16), nn.Linear(16, 4096)

    def forward(self, x):
        h = x
        for _ in range(4):
            h = torch.tanh(self.cell(h))
        return self.head(h)


def test_evicted_when_first_run_or_after_more_traffic_than_the_core_cache():
    r = analyze(Recurrent, inputs=["x:float32[batch,16]"], dims={"batch": [8]})
    pt = r.evaluate(batch=8)
    tanh = [i for i, op in enumerate(pt.ops) if op["target"] == "aten.tanh.default"]
    cell = [i for i, op in enumerate(pt.ops) if op["target"] == "aten.addmm.default"][:4]
    roomy = pt._with_evicted(pt.features, core_bytes=1 << 20)
    # the loop's first call of each kernel finds its state gone; the next ones, a few KiB later, do not
    assert [bool(roomy[i].get("evicted")) for i in tanh] == [True, False, False, False]
    assert [bool(roomy[i].get("evicted")) for i in cell] == [True, False, False, False]
    # a core cache smaller than one step's traffic: every call finds it gone
    tiny = pt._with_evicted(pt.features, core_bytes=64)
    assert all(tiny[i].get("evicted") for i in tanh + cell)
    # views do no work: never flagged
    assert not any(f.get("evicted") for f, op in zip(tiny, pt.ops) if not (op["flops"] or op["bytes"]))


def test_llc_evicted_share_is_the_traffic_since_the_last_call_over_the_last_level_cache():
    """An evicted call's state is out of the last-level cache too in the share of that cache the
    traffic since its last call displaced: a first call's, the step's traffic from its last call a
    step before; counted up to the step's peak memory (an inference step's activations reuse a few
    freed blocks; a training step keeps its activations, gradients and optimizer state)."""
    r = analyze(Recurrent, inputs=["x:float32[batch,16]"], dims={"batch": [8]})
    pt = r.evaluate(batch=8)
    tanh = [i for i, op in enumerate(pt.ops) if op["target"] == "aten.tanh.default"]
    step = sum(float(op["bytes"]) for op in pt.ops)
    peak = float(pt.totals["peak_memory_bytes"])
    assert peak < step
    core = pt._with_evicted(pt.features, core_bytes=1 << 20)
    assert not any("llc_evicted" in f for f in core)          # no last-level cache known: as before
    big = pt._with_evicted(pt.features, core_bytes=1 << 20, cache_bytes=int(100 * step))
    small = pt._with_evicted(pt.features, core_bytes=1 << 20, cache_bytes=int(peak) // 2)
    # the same calls are evicted; only the evicted carry a share
    assert [bool(f.get("evicted")) for f in big] == [bool(f.get("evicted")) for f in core]
    assert all(("llc_evicted" in f) == bool(f.get("evicted")) for f in big)
    # the loop's first tanh: the step's traffic, at most its peak, over the cache
    assert 0 < big[tanh[0]]["llc_evicted"] <= peak / int(100 * step)
    assert small[tanh[0]]["llc_evicted"] == 1.0
    assert not any(small[i].get("llc_evicted") for i in tanh[1:])   # a few KiB since: not even evicted
    del pt.totals["peak_memory_bytes"]                               # costs only: the traffic counts
    share = pt._with_evicted(pt.features, core_bytes=1 << 20, cache_bytes=int(100 * step))[tanh[0]]["llc_evicted"]
    assert peak / int(100 * step) < share <= step / int(100 * step)


def test_an_llc_evicted_call_pays_its_share_of_the_larger_evicted_seconds(tmp_path):
    table = dataclasses.replace(EVICTED, refill=((1e3, 0.5e-6), (1e6, 3e-6)),
                                evicted_llc=((1e3, 2e-6), (1e6, 30e-6)))
    assert table.evicted_s(1e6, {"evicted": 1}) == pytest.approx(4e-6)
    assert table.evicted_s(1e6, {"evicted": 1, "llc_evicted": 1}) == pytest.approx(30e-6)
    assert table.evicted_s(1e6, {"evicted": 1, "llc_evicted": 0.5}) == pytest.approx(17e-6)   # half the cache
    # its operands aside (measured with them read back): an op whose inputs are at hand pays it whole
    assert table.evicted_s(1e6, {"evicted": 1, "llc_evicted": 1, "inputs_out": 0.0}) == pytest.approx(30e-6)
    assert table.evicted_s(1e3, {"evicted": 1, "llc_evicted": 1}) == pytest.approx(2e-6)
    assert EVICTED.evicted_s(1e6, {"evicted": 1, "llc_evicted": 1}) == pytest.approx(4e-6)   # not measured
    hw = with_cache(tmp_path, cache_bytes=1 << 30)
    hw.kernels["pointwise"] = table
    core = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"evicted": 1})
    llc = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise",
                  features={"evicted": 1, "llc_evicted": 1})
    assert llc.time_s == pytest.approx(core.time_s + 26e-6)
    # the parts of its time it was priced in, for a diagnosis (scripts/time_breakdown.py --ops)
    assert (core.evicted_s, llc.evicted_s) == (pytest.approx(4e-6), pytest.approx(30e-6))
    cold = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"cold_bytes": 1e5})
    assert cold.evicted_s == 0.0 and cold.cold_s == pytest.approx(1e5 / hw.bandwidth_bytes_per_s)
    assert cold.time_s == pytest.approx(core.time_s - core.evicted_s + cold.cold_s)
    path = device_file(tmp_path, {"pointwise": table.to_dict()})
    assert load_hardware(str(path)).kernels["pointwise"].evicted_llc == table.evicted_llc


def test_evicted_seconds_lie_on_the_line_through_the_probe_s_share_of_the_cache_and_a_flush_of_all_of_it(tmp_path):
    # measured 40 us after a probe that displaced 60% of the last-level cache, 100 us after a flush
    table = KernelTable("conv.dense", "float32", 1e-6, (1.0,), (1e9,), evicted=((1e3, 40e-6),),
                        evicted_llc=((1e3, 100e-6),), evicted_share=0.6)
    at = lambda share: table.evicted_s(1e3, {"evicted": 1, "llc_evicted": share})
    assert at(0.6) == pytest.approx(40e-6) and at(1.0) == pytest.approx(100e-6)
    assert at(0.8) == pytest.approx(70e-6)
    # a small net's inference step displaces less than the probe did: it pays less than the probe read
    assert at(0.4) == pytest.approx(10e-6)
    assert at(0.1) == 0.0                                   # never below nothing
    assert table.evicted_s(1e3, {"evicted": 1}) == pytest.approx(40e-6)   # no cache size known: as measured
    # a share not known (a file written before it was): the probe taken as displacing none of it
    old = dataclasses.replace(table, evicted_share=None)
    assert old.evicted_s(1e3, {"evicted": 1, "llc_evicted": 0.5}) == pytest.approx(70e-6)
    assert old.evicted_s(1e3, {"evicted": 1, "llc_evicted": 0.0}) == pytest.approx(40e-6)
    path = device_file(tmp_path, {"conv.dense:float32": table.to_dict()})
    assert load_hardware(str(path)).kernels["conv.dense:float32"].evicted_share == 0.6
    bad = {**table.to_dict(), "evicted_share": 1.5}
    with pytest.raises(UsageError, match=r"evicted_share.*0\.\.1, got 1\.5"):
        load_hardware(str(device_file(tmp_path, {"conv.dense:float32": bad})))


def test_below_the_probe_s_share_the_evicted_line_runs_from_the_interleaved_seconds(tmp_path):
    """With `interleaved` (a call after ops that moved next to no data), the line below the probe's
    share runs from those seconds at no share to the probe's at its own, not down the line through
    the flush's point (carried there it fell below 0 at two threads); never below them anywhere."""
    table = KernelTable("conv.dense", "float32", 1e-6, (1.0,), (1e9,), evicted=((1e3, 40e-6),),
                        evicted_llc=((1e3, 100e-6),), evicted_share=0.6, interleaved=((1e3, 10e-6),))
    at = lambda share: table.evicted_s(1e3, {"evicted": 1, "llc_evicted": share})
    assert at(0.0) == pytest.approx(10e-6) and at(0.6) == pytest.approx(40e-6)
    assert at(0.3) == pytest.approx(25e-6)
    assert at(0.8) == pytest.approx(70e-6) and at(1.0) == pytest.approx(100e-6)   # above it: as before
    # a refill part taken out (inputs at hand) leaves no less than the interleaved seconds
    refilled = dataclasses.replace(table, refill=((1e3, 38e-6),))
    assert refilled.evicted_s(1e3, {"evicted": 1, "inputs_out": 0.0}) == pytest.approx(10e-6)
    assert table.interleaved_s(1e3) == pytest.approx(10e-6)
    assert dataclasses.replace(table, interleaved=()).interleaved_s(1e3) == 0.0
    # only interleaved seconds measured: those
    assert KernelTable("pointwise", None, 1e-6, interleaved=((1e3, 2e-6),)).evicted_s(1e3) == pytest.approx(2e-6)
    path = device_file(tmp_path, {"conv.dense:float32": table.to_dict()})
    assert load_hardware(str(path)).kernels["conv.dense:float32"].interleaved == table.interleaved
    bad = {**table.to_dict(), "interleaved": [[1e3, -1.0]]}
    with pytest.raises(UsageError, match="interleaved"):
        load_hardware(str(device_file(tmp_path, {"conv.dense:float32": bad})))


def test_a_call_after_other_classes_pays_their_share_of_the_probe_s_interleaved_seconds(tmp_path):
    """Every op with work is flagged with the distinct other classes since its class's last call
    (the step wraps round: a first call counts from the step before's last) over the probe's ten,
    at most 1; back to back calls of one class are not flagged; the roofline adds that share of the
    table's interleaved seconds, and takes the rest of them off an evicted call's seconds (its probe
    ran all ten classes' code too)."""
    r = analyze(Recurrent, inputs=["x:float32[batch,16]"], dims={"batch": [8]})
    pt = r.evaluate(batch=8)
    kernels = [pt.kernel_class(i) for i in range(len(pt.ops))]
    flags = pt._with_evicted(pt.features, core_bytes=1 << 20, kernels=kernels)
    worked = [i for i, op in enumerate(pt.ops) if op["flops"] or op["bytes"]]
    for n, i in enumerate(worked):   # the classes since its own's last call, counted back over the step
        since, k = set(), n - 1
        while kernels[worked[k % len(worked)]] != kernels[i]:
            since.add(kernels[worked[k % len(worked)]])
            k -= 1
        assert flags[i].get("interleaved", 0.0) == pytest.approx(min(1.0, len(since) / PROBE_CLASSES)), (i, kernels[i])
    # the cell's product and tanh alternate: one other class between two calls of each; the first
    # product comes right after the step before's last (the head's product): none
    tanh = [i for i in worked if pt.ops[i]["target"] == "aten.tanh.default"]
    assert [flags[i]["interleaved"] for i in tanh] == [pytest.approx(0.1)] * 4
    assert flags[worked[0]].get("interleaved", 0.0) == 0.0 and kernels[worked[0]] == kernels[worked[-1]]
    same = pt._with_evicted(pt.features, core_bytes=1 << 20, kernels=["pointwise.tanh"] * len(pt.ops))
    assert not any(f.get("interleaved") for f in same)      # one class throughout: never
    assert not any(f.get("interleaved") for f, op in zip(flags, pt.ops) if not (op["flops"] or op["bytes"]))
    # twelve classes in turn: each call after eleven others, the probe's ten and more
    assert _code_shares([f"c{i}" for i in range(12)] * 2 + [None]) == [1.0] * 24 + [0.0]
    assert _code_shares(["a", "b", "a", "c", "d", "a", None]) == pytest.approx([0.0, 0.3, 0.1, 0.3, 0.3, 0.2, 0.0])
    hw = with_cache(tmp_path, cache_bytes=1 << 30)
    hw.kernels["pointwise"] = dataclasses.replace(EVICTED, interleaved=((1e3, 0.5e-6),))
    warm = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise")
    after = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"interleaved": 1})
    assert after.time_s == pytest.approx(warm.time_s + 0.5e-6) and after.evicted_s == pytest.approx(0.5e-6)
    half = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"interleaved": 0.5})
    assert half.time_s == pytest.approx(warm.time_s + 0.25e-6)
    evicted = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"evicted": 1, "interleaved": 1})
    assert evicted.time_s == pytest.approx(warm.time_s + 4e-6)       # the evicted seconds, not both
    fewer = op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"evicted": 1, "interleaved": 0.2})
    assert fewer.time_s == pytest.approx(warm.time_s + 4e-6 - 0.8 * 0.5e-6)
    # a feature written without the share (1, or none at all): the probe's, all of them
    assert op_time(1e3, 1e6, "pointwise", "float32", hw, kernel="pointwise", features={"evicted": 1}).time_s == \
        pytest.approx(evicted.time_s)


def test_a_slow_shape_at_a_slow_size_is_two_limits_not_their_product():
    # rates fall past the reference size (caches spilled); a shape at a quarter of the reference's
    # efficiency (a 7x7 depthwise backward)
    table = KernelTable("conv.depthwise.backward", "float32", 0.0, sizes=(1e6, 1e8), rates=(4e10, 1e10),
                        efficiency={"k": ((9.0, 1.0), (49.0, 0.25))}, reference=1e6)
    slow = {"k": 49.0}
    # at the reference size: the curve as measured
    assert table.kernel_time_s(1e6, slow) == pytest.approx(1e6 / (4e10 * 0.25))
    # at the large size: the lower of the size's rate (1e10) and the shape's (4e10 * 0.25 = 1e10)
    assert table.kernel_time_s(1e8, slow) == pytest.approx(1e8 / 1e10)
    # a shape faster than the reference scales the size's rate, as does a table without a reference
    assert table.kernel_time_s(1e8, {"k": 9.0}) == pytest.approx(1e8 / 1e10)
    plain = KernelTable("conv.depthwise.backward", "float32", 0.0, sizes=(1e6, 1e8), rates=(4e10, 1e10),
                        efficiency={"k": ((9.0, 1.0), (49.0, 0.25))})
    assert plain.kernel_time_s(1e8, slow) == pytest.approx(1e8 / (1e10 * 0.25))
    assert KernelTable(**{**table.__dict__}).to_dict()["reference"] == 1e6


def test_a_slow_shape_below_the_reference_size_runs_at_its_share_of_the_rate_at_its_work():
    # rates rise with size (small calls are setup); the m curve's point at m=16 was measured at a
    # work of 1e6, at 0.4 of the base rate there (a dense convolution backward over a 2x2 image)
    table = KernelTable("conv.dense.backward", "float32", 0.0, sizes=(1e6, 1e8), rates=(5e10, 2e11),
                        efficiency={"m": ((16.0, 0.4), (1024.0, 1.0))}, reference=1e8)
    # its own call is priced as measured: 0.4 of 5e10, not the lower of 5e10 and 0.4 * 2e11
    assert table.kernel_time_s(1e6, {"m": 16.0}) == pytest.approx(1e6 / (0.4 * 5e10))
    # a larger call of that shape, still below the reference size: its share of the rate at its work
    assert table.kernel_time_s(1e7, {"m": 16.0}) == pytest.approx(1e7 / (0.4 * table.rate(1e7)))


def test_a_product_reading_mostly_what_the_cache_lost_takes_the_streamed_table(tmp_path):
    # a weight that fits the cache, read for the first time, by a product whose in-cache kernel is
    # longer than the read: the streamed table still prices it (it was measured with its weight
    # coming from memory), so the price does not jump as the read and the kernel trade places
    hw = with_cache(tmp_path, cache_bytes=1 << 30)
    hw.kernels["matmul.streamed:float32"] = STREAMED
    weight = 4096 * 4096 * 4
    f = {"m": 16, "n": 4096, "k": 4096, "cold_bytes": weight}
    t = op_time(2 * 16 * 4096 * 4096, weight + 8 * 16 * 4096, "matmul", "float32", hw, kernel="matmul", features=f)
    assert MATMUL.kernel_time_s(2 * 16 * 4096 * 4096, f) > weight / hw.bandwidth_bytes_per_s
    assert t.kernel == "matmul.streamed"
    # with a warm weight (a small part of what it reads is cold): the in-cache table
    warm = op_time(2 * 16 * 4096 * 4096, weight + 8 * 16 * 4096, "matmul", "float32", hw, kernel="matmul",
                   features={**f, "cold_bytes": 8 * 16 * 4096})
    assert warm.kernel == "matmul"


# --- eager's native convolution (conv.dense.slow) ---------------------------------------------------

def test_the_backend_eager_runs_is_asked_of_pytorch_at_the_sizes_and_threads():
    from costmodel.hardware.eager_backend import runs_native
    small = ((1, 64, 8, 8), (64, 64, 1, 1), (1, 1), (0, 0), (1, 1), False, (0, 0), 1)
    assert runs_native(*small, threads=1) and runs_native(*small, threads=2)
    big = ((16, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    assert not runs_native(*big, threads=1)
    # a 1x1 stride-1 convolution below batch 16: native at one thread only
    pointwise = ((4, 64, 32, 32), (128, 64, 1, 1), (1, 1), (0, 0), (1, 1), False, (0, 0), 1)
    assert runs_native(*pointwise, threads=1) and not runs_native(*pointwise, threads=2)
    before = torch.get_num_threads()
    runs_native(*pointwise[:-1], 1, threads=before + 1)
    assert torch.get_num_threads() == before             # the threads are put back


SLOW = KernelTable("conv.dense.slow", "float32", 1e-6, (1e3, 1e9), (1e10, 1e10),
                   efficiency={"m": ((4.0, 0.1), (64.0, 1.0))})
DENSE = KernelTable("conv.dense", "float32", 1e-6, (1e3, 1e9), (5e10, 5e10))


class OneByOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 1)

    def forward(self, x):
        return self.conv(x)


def test_a_point_prices_the_convolution_eager_runs_there(tmp_path):
    r = analyze(OneByOne, inputs=["x:float32[batch,64,h,h]"], dims={"batch": [1], "h": [8]})
    hw = load_hardware(str(device_file(tmp_path, {"conv.dense:float32": DENSE.to_dict(),
                                                  "conv.dense.slow:float32": SLOW.to_dict()})))
    conv = next(i for i, op in enumerate(r.evaluate(batch=1, h=8).analysis.ops) if op.kernel == "conv.dense")
    small, large = r.evaluate(batch=1, h=8), r.evaluate(batch=32, h=32)
    assert small.kernel_class(conv) == "conv.dense"                # without a device: the rule's class
    assert small.kernel_class(conv, hw) == "conv.dense.slow"       # batch 1, 4096 inputs: native
    assert large.kernel_class(conv, hw) == "conv.dense"            # batch 32: oneDNN
    t = small.timing(hw)["op_times"][conv]
    assert t.kernel == "conv.dense.slow"
    assert t.time_s == pytest.approx(SLOW.time_s(small.ops[conv]["flops"], {"m": 64}), rel=1e-6)
    # a file without the native table prices as before
    old = load_hardware(str(device_file(tmp_path, {"conv.dense:float32": DENSE.to_dict()})))
    assert small.kernel_class(conv, old) == "conv.dense"


def test_a_native_convolutions_gradients_are_priced_by_the_native_gradients_tables(tmp_path):
    """Eager computes the gradient of a convolution it ran natively natively too: the first layer's
    (weight and bias only) by conv.dense.slow.backward.weight, the next one's by .backward, where
    the file measured them; a file without them keeps oneDNN's backward classes."""
    r = analyze(lambda: nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)), inputs=["x:float32[batch,8,h,h]"],
                mode="train", dims={"batch": [1], "h": [8]})
    tables = {"conv.dense:float32": DENSE.to_dict(), "conv.dense.slow:float32": SLOW.to_dict()}
    for name in ("conv.dense.backward", "conv.dense.backward.weight"):
        tables[name + ":float32"] = dataclasses.replace(DENSE, kernel=name).to_dict()
    old = load_hardware(str(device_file(tmp_path, tables)))
    for name in ("conv.dense.slow.backward", "conv.dense.slow.backward.weight"):
        tables[name + ":float32"] = dataclasses.replace(SLOW, kernel=name).to_dict()
    hw = load_hardware(str(device_file(tmp_path, tables)))
    pt = r.evaluate(batch=1, h=8)
    grads = [(op.kernel, i) for i, op in enumerate(pt.analysis.ops) if op.kernel.startswith("conv.dense.backward")]
    assert sorted(k for k, _ in grads) == ["conv.dense.backward", "conv.dense.backward.weight"]
    for kernel, i in grads:
        assert pt.kernel_class(i, hw) == kernel.replace("conv.dense", "conv.dense.slow")
        assert pt.timing(hw)["op_times"][i].kernel == kernel.replace("conv.dense", "conv.dense.slow")
        assert pt.kernel_class(i, old) == kernel
    # at batch 32 eager runs them in oneDNN
    big = r.evaluate(batch=32, h=32)
    assert all(big.kernel_class(i, hw) == kernel for kernel, i in grads)


def test_the_native_table_reads_one_samples_positions(tmp_path):
    """The native kernel runs a GEMM per sample: 4 samples of a 2x2 image are 4 GEMMs of m = 4."""
    r = analyze(OneByOne, inputs=["x:float32[batch,64,h,h]"], dims={"batch": [4], "h": [2]})
    hw = load_hardware(str(device_file(tmp_path, {"conv.dense:float32": DENSE.to_dict(),
                                                  "conv.dense.slow:float32": SLOW.to_dict()})))
    pt = r.evaluate(batch=4, h=2)
    conv = next(i for i, op in enumerate(r.evaluate(batch=1, h=8).analysis.ops) if op.kernel == "conv.dense")
    assert pt.features[conv]["m"] == 16 and pt.kernel_class(conv, hw) == "conv.dense.slow"
    t = pt.timing(hw)["op_times"][conv]
    assert t.time_s == pytest.approx(SLOW.time_s(pt.ops[conv]["flops"], {"m": 4}), rel=1e-6)
    assert t.time_s > 3 * SLOW.time_s(pt.ops[conv]["flops"], {"m": 16}) - 3e-6    # 0.1 against 0.32
