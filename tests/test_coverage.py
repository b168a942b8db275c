"""Coverage: a true formula for every architecture (mixture of experts, ALiBi, recurrent nets,
windowed attention, U-Nets), checked against FlopCounterMode at the captured size and, through the
formula, at two other sizes per dimension, in both modes.

FlopCounterMode is run where it counts what runs: on the meta device (conftest.flop_counter_total)
for models that run there, and on the CPU with eager attention for mixture-of-experts loops, whose
routing needs real values (nonzero). It does not count grouped_mm at all: the grouped variant must
give the count of the eager loop of the same model.
"""

from __future__ import annotations

import pytest
import sympy
import torch

import costmodel
from costmodel.validate import meters as memtrack
from costmodel.capture.moe import expert_rows
from fractions import Fraction

from . import models as M
from .conftest import count_step, flop_counter_total

TEXT = ["input_ids:int64[batch,seq]"]


def cpu_count(factory, shapes: dict, mode: str, high: int = 64) -> int:
    """FlopCounterMode on a real CPU run (eager attention: the CPU's SDPA counts 0)."""
    torch.manual_seed(0)
    model = factory()
    model.train(mode == "train")
    values = {n: (torch.randint(0, high, shape) if dt == torch.int64 else torch.randn(shape))
              for n, (shape, dt) in shapes.items()}
    return count_step(model, values, mode)


def formula_at(report, **dims) -> int:
    return int(report.symbolic.matmul_flops.xreplace({sympy.Symbol(d, integer=True, positive=True): v
                                                     for d, v in dims.items()}))


def check(report, count, points: list[dict], shape_of):
    """matmul_flops at each point (formula and evaluation) == the reference count there."""
    for dims in points:
        expected = count(shape_of(dims))
        assert formula_at(report, **dims) == expected, dims
        assert report.evaluate(**dims).totals["matmul_flops"] == expected, dims


TEXT_POINTS = [{"batch": 2, "seq": 16}, {"batch": 3, "seq": 16}, {"batch": 1, "seq": 16},
               {"batch": 2, "seq": 9}, {"batch": 2, "seq": 40}]


def text_shapes(dims):
    return {"input_ids": ((dims["batch"], dims["seq"]), torch.int64)}


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("factory", [M.mixtral_eager, M.qwen_moe_eager], ids=["mixtral", "qwen2-moe-shared-expert"])
def test_mixture_of_experts_eager_loop(factory, mode):
    r = costmodel.analyze(factory, inputs=TEXT, mode=mode, dims={"batch": 2, "seq": 16}, attention="math")
    assert r.fixed == {} and r.unsupported == {}
    assert r.complexity["seq"]["matmul_flops"] == 2 and r.complexity["batch"]["matmul_flops"] == 1
    check(r, lambda shapes: cpu_count(factory, shapes, mode), TEXT_POINTS, text_shapes)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_mixture_of_experts_grouped_mm_counts_as_the_loop(mode):
    grouped = costmodel.analyze(M.mixtral_grouped, inputs=TEXT, mode=mode, attention="math")
    loop = costmodel.analyze(M.mixtral_eager, inputs=TEXT, mode=mode, attention="math")
    assert grouped.unsupported == {}
    assert sympy.expand(grouped.symbolic.matmul_flops - loop.symbolic.matmul_flops) == 0
    targets = {op["target"] for op in grouped.by_op()}
    assert "costmodel.grouped_mm.default" in targets
    if mode == "train":
        assert "costmodel.grouped_mm_backward.default" in targets


def test_expert_rows_add_up_and_the_busiest_takes_its_share():
    assert expert_rows(10, 4, Fraction(1)) == [2, 2, 2, 4]          # 10 // 4 = 2, the last takes the rest
    assert expert_rows(16, 4, Fraction(2)) == [8, 2, 2, 4]          # 2 * 16 / 4 = 8; (16 - 8) // 3 = 2
    assert sum(expert_rows(1000, 8, Fraction(3, 2))) == 1000


def test_moe_imbalance_moves_memory_not_flops():
    dims = {"batch": 2, "seq": 64}
    wide = M._hf("MixtralForCausalLM", "MixtralConfig", experts_implementation="eager", num_local_experts=4,
                 num_experts_per_tok=2, **{**M._MOE, "intermediate_size": 1024})   # the experts hold the peak
    even = costmodel.analyze(wide, inputs=TEXT, dims=dims, device="cpu")
    skewed = costmodel.analyze(wide, inputs=TEXT, dims=dims, device="cpu", moe_imbalance=2)
    assert sympy.expand(even.symbolic.matmul_flops - skewed.symbolic.matmul_flops) == 0
    assert skewed.memory_at(dims).peak_bytes > even.memory_at(dims).peak_bytes
    with pytest.raises(costmodel.UsageError, match="moe-imbalance must be >= 1"):
        costmodel.analyze(M.mixtral_eager, inputs=TEXT, moe_imbalance=0.5)


def test_moe_peak_with_the_measured_routing():
    # the real router decides: measure how unevenly it routes and give that as --moe-imbalance
    dims = {"batch": 2, "seq": 128}
    torch.manual_seed(0)
    model = M.mixtral_eager()
    loads = []
    for m in model.modules():
        if type(m).__name__ == "MixtralExperts":
            m.register_forward_hook(lambda mod, args, out: loads.append(
                torch.bincount(args[1].flatten(), minlength=mod.num_experts).tolist()))
    torch.manual_seed(0)
    measured = memtrack.measure_inference(model, TEXT, dims).peak_bytes
    imbalance = max(max(c) * len(c) / sum(c) for c in loads)
    predicted = costmodel.analyze(M.mixtral_eager, inputs=TEXT, dims=dims, device="cpu",
                                  moe_imbalance=imbalance).memory_at(dims).peak_bytes
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured, imbalance)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_bloom_alibi(mode):
    r = costmodel.analyze(M.bloom, inputs=TEXT, mode=mode, dims={"batch": 2, "seq": 16})
    assert r.fixed == {} and r.unsupported == {} and r.complexity["seq"]["matmul_flops"] == 2
    check(r, lambda shapes: cpu_count(M.bloom, shapes, mode), TEXT_POINTS, text_shapes)


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("factory, width", [(M.GRUTagger, None), (M.LSTM, 16)], ids=["gru", "lstm"])
def test_recurrent_nets_are_interpolated_in_seq_and_symbolic_in_batch(factory, width, mode):
    inputs = ["ids:int64[batch,seq]"] if width is None else [f"x:float32[batch,seq,{width}]"]
    r = costmodel.analyze(factory, inputs=inputs, mode=mode, dims={"batch": 2, "seq": 6})
    assert set(r.fixed) == {"seq"} and "batch" not in r.fixed          # unrolled: seq, and only seq
    method = r.symbolic_method["matmul_flops"]
    assert method["method"] == "interpolated" and method["degree"] == 1 and method["verified_at"]["seq"] not in \
        method["points"]
    assert r.complexity["seq"]["matmul_flops"] == 1 and r.interpolation.modules
    name = inputs[0].split(":")[0]

    def shapes(dims):
        shape = (dims["batch"], dims["seq"]) + (() if width is None else (width,))
        return {name: (shape, torch.int64 if width is None else torch.float32)}
    for dims in ({"batch": 2, "seq": 6}, {"batch": 3, "seq": 6}, {"batch": 1, "seq": 6}, {"batch": 2, "seq": 9},
                 {"batch": 2, "seq": 14}):
        assert formula_at(r, **dims) == flop_counter_total(factory, shapes(dims), mode), dims


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_swin_windows_keep_batch_symbolic(mode):
    r = costmodel.analyze(M.swin, inputs=["pixel_values:float32[batch,3,32,32]"], mode=mode, dims={"batch": 2},
                          attention="math")   # as FlopCounterMode counts it on meta
    assert r.fixed == {} and r.unsupported == {} and r.complexity["batch"]["matmul_flops"] == 1
    for b in (2, 1, 3):
        assert formula_at(r, batch=b) == flop_counter_total(
            M.swin, {"pixel_values": ((b, 3, 32, 32), torch.float32)}, mode), b


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_unet_interpolate_and_skip_concatenation(mode):
    inputs = ["x:float32[batch,3,height,width]"]
    r = costmodel.analyze(M.UNet, inputs=inputs, mode=mode, dims={"batch": 2, "height": 32, "width": 40})
    assert r.fixed == {} and r.unsupported == {}
    assert r.complexity["height"]["matmul_flops"] == 1 and r.complexity["width"]["matmul_flops"] == 1
    for b, h, w in ((2, 32, 40), (1, 32, 40), (3, 32, 40), (2, 16, 40), (2, 48, 40), (2, 32, 24), (2, 32, 64)):
        expected = flop_counter_total(M.UNet, {"x": ((b, 3, h, w), torch.float32)}, mode)
        assert formula_at(r, batch=b, height=h, width=w) == expected, (b, h, w)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_nearest_upsampling_is_captured_as_the_op_eager_runs(mode):
    """F.interpolate(scale_factor=2) is one aten.upsample_nearest2d per call (and its backward),
    as eager runs it, not the Python decomposition's index ops; the sizes stay symbolic, and the
    class reads the input's row length"""
    r = costmodel.analyze(M.UNet, inputs=["x:float32[batch,3,height,width]"], mode=mode,
                          dims={"batch": 2, "height": 32, "width": 40})
    ops = {row["target"]: row for row in r.by_op()}
    assert ops["aten.upsample_nearest2d.default"]["count"] == 2
    assert ops.get("aten.upsample_nearest2d_backward.default", {}).get("count") == (2 if mode == "train" else None)
    assert not [t for t in ops if "index" in t or "arange" in t]
    pt = r.evaluate(batch=2, height=32, width=40)
    up = [(op, f) for op, f in zip(pt.ops, pt.features) if op["target"] == "aten.upsample_nearest2d.default"]
    # 8 channels of 8x10, then 4 of 16x20, batch 2: each read once, written 4x
    assert [float(op["bytes"]) for op, _ in up] == [5 * 4 * 2 * 8 * 8 * 10, 5 * 4 * 2 * 4 * 16 * 20]
    assert [f["in_width"] for _, f in up] == [10, 20]


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_causal_padding_before_a_dilated_convolution_keeps_seq_symbolic(mode):
    """A WaveNet-style net: causal F.pad before dilated 1-D convolutions keeps seq symbolic, FLOPs
    formula == FlopCounterMode, in training too (the pad's gradient, a C++ composite that reads
    sizes as integers, runs as its Python decomposition: capture.sdpa._ConstantPad)."""
    r = costmodel.analyze(M.CausalTCN, inputs=["x:float32[batch,1,seq]"], mode=mode, dims={"batch": 2, "seq": 64})
    assert r.fixed == {} and r.unsupported == {}
    assert r.complexity["seq"]["matmul_flops"] == 1
    for b, n in ((2, 64), (1, 64), (3, 100), (2, 17)):
        assert formula_at(r, batch=b, seq=n) == flop_counter_total(M.CausalTCN, {"x": ((b, 1, n), torch.float32)}, mode)
