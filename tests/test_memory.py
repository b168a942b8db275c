"""Peak memory: the liveness model against real runs measured by costmodel.memtrack (CPU, float32).

Every architecture runs in both modes: one no-grad forward, and one steady-state AdamW step.
The contract's targets: within 10% on average and 25% at worst.
"""

import time

import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import costmodel
from costmodel.memory import timeline as memory
from costmodel.validate import meters as memtrack
from costmodel.errors import UsageError
from costmodel.memory.timeline import CATEGORIES, optimizer_temporary_bytes
from costmodel.rules.attention import choose_kernel
from costmodel.symbols import parse_formula

from . import models as M

TEXT = ["input_ids:int64[batch,seq]"]
CASES = {
    "gpt2": (M.tiny_gpt2, TEXT, {"batch": 2, "seq": 128}),
    "llama-gqa": (M.tiny_llama_gqa, TEXT, {"batch": 2, "seq": 128}),
    "bert": (M.tiny_bert, TEXT, {"batch": 2, "seq": 128}),
    "t5": (M.tiny_t5, TEXT + ["decoder_input_ids:int64[batch,seq]"], {"batch": 2, "seq": 64}),
    "vit": (M.tiny_vit, ["pixel_values:float32[batch,3,32,32]"], {"batch": 8}),
    "resnet": (M.tiny_resnet, ["pixel_values:float32[batch,3,height,width]"], {"batch": 2, "height": 32, "width": 32}),
    "sdpa-block": (M.sdpa_block, ["x:float32[batch,seq,32]"], {"batch": 2, "seq": 128}),
    "conv-net": (M.conv_net, ["x:float32[batch,3,height,width]"], {"batch": 2, "height": 32, "width": 32}),
}
MODES = ("inference", "train")
_REPORTS: dict = {}
_RESULTS: dict = {}


def report(name: str, mode: str, **kw):
    key = (name, mode, tuple(sorted(kw.items())))
    if key not in _REPORTS:
        factory, inputs, dims = CASES[name]
        _REPORTS[key] = costmodel.analyze(factory, inputs=inputs, mode=mode, dims=dims, device="cpu", **kw)
    return _REPORTS[key]


def measured(name: str, mode: str, **kw) -> int:
    factory, inputs, dims = CASES[name]
    torch.manual_seed(0)
    real = factory()
    if mode == "train":
        return memtrack.measure_train_step(real, inputs, dims, **kw).peak_bytes
    return memtrack.measure_inference(real, inputs, dims, **kw).peak_bytes


def result(name: str, mode: str) -> tuple[int, int]:
    if (name, mode) not in _RESULTS:
        predicted = report(name, mode).evaluate(**CASES[name][2]).totals["peak_memory_bytes"]
        _RESULTS[(name, mode)] = (predicted, measured(name, mode))
    return _RESULTS[(name, mode)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_peak_within_25_percent_of_measured(name, mode):
    predicted, real = result(name, mode)
    assert abs(predicted / real - 1) <= 0.25, f"{name} {mode}: predicted {predicted}, measured {real}"


def test_mean_error_within_10_percent():
    errors = [abs(p / m - 1) for p, m in (result(n, mode) for n in CASES for mode in MODES)]
    assert sum(errors) / len(errors) <= 0.10, errors


@pytest.mark.parametrize("mode", MODES)
def test_hand_written_models_are_exact(mode):
    # No Python locals outlive their last use in these: liveness is the whole story.
    for name in ("sdpa-block", "conv-net"):
        predicted, real = result(name, mode)
        assert abs(predicted - real) <= 8, (name, predicted, real)     # 8: float32 step scalars' rounding


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adam", "adafactor"])
def test_optimizers(optimizer):
    dims = CASES["sdpa-block"][2]
    c = report("sdpa-block", "train").primary.captured
    predicted = memory.build(c, optimizer=optimizer, device="cpu").peak_bytes(dims)
    assert abs(predicted / measured("sdpa-block", "train", optimizer=optimizer) - 1) <= 0.02


@pytest.mark.parametrize("name", ["sdpa-block", "conv-net"])
def test_amp_against_cpu_autocast(name):
    # amp="cpu" applies the CPU autocast policy, so the real torch.autocast("cpu") run checks it
    for mode in MODES:
        predicted = report(name, mode, amp="cpu").evaluate(**CASES[name][2]).totals["peak_memory_bytes"]
        real = measured(name, mode, amp=True)
        assert abs(predicted / real - 1) <= 0.05, (mode, predicted, real)


def test_amp_counts_half_copies():
    full = result("sdpa-block", "train")[0]
    amp = report("sdpa-block", "train", amp=True).evaluate(**CASES["sdpa-block"][2]).totals
    assert amp["peak_memory_bytes"] < full       # bfloat16 activations, float32 weights and state
    assert amp["memory"]["optimizer_state"] == report("sdpa-block", "train").evaluate(
        **CASES["sdpa-block"][2]).totals["memory"]["optimizer_state"]


def test_amp_needs_float32_weights():
    with pytest.raises(UsageError, match="float32"):
        costmodel.analyze(M.sdpa_block, inputs=CASES["sdpa-block"][1], dtype="bfloat16", amp=True)


def test_math_attention_materialises_scores():
    r = report("sdpa-block", "inference")
    c = r.primary.captured
    math, flash = (memory.build(c, device="cpu", attention=k) for k in ("math", "flash"))
    seq = sympy.Symbol("seq", integer=True, positive=True)
    assert costmodel.api.degree(math.peak, seq) == 2 and costmodel.api.degree(flash.peak, seq) == 1
    dims = {"batch": 2, "seq": 1024}
    # at least the float32 scores [2, 4, 1024, 1024]: 2 * 4 * 1024 * 1024 * 4 = 33554432 bytes more
    assert math.peak_bytes(dims) - flash.peak_bytes(dims) >= 2 * 4 * 1024 * 1024 * 4
    # and the math kernel's memory is what PyTorch's math kernel uses
    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):
        real = memtrack.measure_inference(M.sdpa_block(), CASES["sdpa-block"][1], dims).peak_bytes
    assert abs(math.peak_bytes(dims) / real - 1) <= 0.05


def test_kernel_choice_per_device():
    q32 = torch.empty(2, 4, 64, 16, device="meta")
    q16 = q32.to(torch.bfloat16)
    mask = torch.empty(2, 1, 64, 64, dtype=torch.bool, device="meta")
    assert choose_kernel("auto", "cuda", q16, q16, q16, None, 0.0, True, None, False) == "flash"
    assert choose_kernel("auto", "cuda", q16, q16, q16, mask, 0.0, False, None, False) == "efficient"
    assert choose_kernel("auto", "cuda", q32, q32, q32, None, 0.1, False, None, False) == "efficient"
    assert choose_kernel("auto", "cpu", q32, q32, q32, mask, 0.0, False, None, False) == "flash"
    assert choose_kernel("auto", "cpu", q32, q32, q32, None, 0.1, False, None, False) == "math"   # dropout: math on CPU


def test_optimizer_temporaries_by_device():
    groups = {"torch.float32": 1000}
    # CUDA runs foreach: _foreach_sqrt allocates one tensor per parameter at once: 1000 bytes
    assert optimizer_temporary_bytes("adamw", "cuda", 400, groups) == 1000
    # the CPU loops: sqrt and its quotient of the largest parameter: 2 * 400
    assert optimizer_temporary_bytes("adamw", "cpu", 400, groups) == 800
    assert optimizer_temporary_bytes("sgd-momentum", "cuda", 400, groups) == 0


def test_cuda_dropout_masks_are_one_byte():
    c = report("gpt2", "train").primary.captured
    cpu = memory.build(c, device="cpu", attention="flash")
    cuda = memory.build(c, device="cuda", attention="flash")
    masks = lambda m: [b for b in m.buffers if "empty_like" in b.node and b.dtype == "float32"]
    assert masks(cpu) and len(masks(cpu)) == len(masks(cuda))
    dims = {"batch": 2, "seq": 128}
    for a, b in zip(masks(cpu), masks(cuda)):
        assert a.size.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}) == \
            4 * b.size.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()})


def test_report_memory_contract():
    r = report("gpt2", "train")
    point = r.evaluate(batch=2, seq=128)
    totals = point.totals
    assert isinstance(totals["peak_memory_bytes"], int)
    assert list(totals["memory"]) == list(CATEGORIES)
    assert sum(totals["memory"].values()) == totals["peak_memory_bytes"]
    extra = point.extra["memory"]
    assert set(extra) == {"device", "attention", "at", "largest", "amp"}
    assert extra["device"] == "cpu" and set(extra["at"]) == {"node", "target", "module", "phase"}
    assert extra["largest"] and all(set(t) == {"bytes", "category", "node", "dtype", "shape"} for t in extra["largest"])
    text = str(r.symbolic.peak_memory_bytes)
    formula = parse_formula(text, ["batch", "seq"])
    for b, s in ((1, 64), (4, 256), (16, 512)):       # the tiny GPT-2 has 512 positions
        assert formula.subs({sympy.Symbol("batch", integer=True, positive=True): b,
                             sympy.Symbol("seq", integer=True, positive=True): s}) == \
            r.evaluate(batch=b, seq=s).totals["peak_memory_bytes"]
    assert r.complexity["seq"]["peak_memory_bytes"] == 2       # dropout: the CPU runs math attention


def test_evaluation_is_fast():
    r = report("gpt2", "train")
    r.evaluate(batch=2, seq=128)
    start = time.perf_counter()
    for s in range(100, 120):
        r.memory_at({"batch": 2, "seq": s})
    assert (time.perf_counter() - start) / 20 < 0.01


def test_peak_location_and_largest_tensors():
    p = report("gpt2", "train").memory_at({"batch": 2, "seq": 512})
    assert p.at["phase"] in ("forward", "loss", "backward", "optimizer")
    sizes = [t["bytes"] for t in p.largest]
    assert sizes == sorted(sizes, reverse=True)
    # the math kernel's probabilities [2, 4, 512, 512] float32 (8 MiB each) lead the list
    assert sizes[0] == 2 * 4 * 512 * 512 * 4


def test_activation_checkpointing_shows_recomputation():
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class Stack(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.blocks, self.ckpt = nn.ModuleList([M.SDPABlock() for _ in range(3)]), ckpt

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
            return x

    inputs, dims = ["x:float32[batch,seq,32]"], {"batch": 2, "seq": 128}
    peaks = {}
    for ckpt in (True, False):
        r = costmodel.analyze(lambda ckpt=ckpt: Stack(ckpt), inputs=inputs, mode="train", dims=dims, device="cpu")
        peaks[ckpt] = r.evaluate(**dims).totals["peak_memory_bytes"]
        torch.manual_seed(0)
        real = memtrack.measure_train_step(Stack(ckpt), inputs, dims).peak_bytes
        assert abs(peaks[ckpt] / real - 1) <= 0.05
    assert peaks[True] < peaks[False]


def test_bad_choices():
    c = report("sdpa-block", "inference").primary.captured
    with pytest.raises(UsageError, match="attention"):
        memory.build(c, attention="paged")
    with pytest.raises(UsageError, match="device"):
        memory.build(c, device="tpu")


@pytest.mark.parametrize("device, dtype, kernel", [("cuda", "float32", "math"), ("cuda", "bfloat16", "flash"),
                                                   ("cpu", "float32", "flash")])
def test_costs_and_memory_use_one_kernel_choice(device, dtype, kernel):
    # GQA in float32 on CUDA: the efficient kernel has no enable_gqa, so PyTorch runs math; costs and
    # memory must both say so (they once disagreed: costs "efficient", memory "math")
    r = costmodel.analyze(M.tiny_llama_gqa, inputs=["input_ids:int64[batch,seq]"], mode="train", dtype=dtype,
                          device=device)
    costs = r.primary.kernels
    memory_kernels = r.memory_model().kernels
    assert costs and set(costs.values()) == {kernel}
    assert memory_kernels == {kernel: sum("backward" not in n for n in costs)}
    assert {op.target for op in r.primary.ops if op.category == "attention"} == {
        "costmodel.sdpa.default", "costmodel.sdpa_backward.default"}
