"""matmul_flops equals torch.utils.flop_counter.FlopCounterMode's total exactly, on six
architectures, in both modes, at the captured size and, through the formula, at other sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

import costmodel
from tests import models
from tests.conftest import flop_counter_total

TEXT = ["input_ids:int64[batch,seq]"]
CASES = {
    # name: (factory, input specs, the dims' captured values, other points to check through the formula)
    "llama-gqa (decoder)": (models.tiny_llama_gqa, TEXT, {"batch": 2, "seq": 24}, [{"batch": 3, "seq": 40},
                                                                                      {"batch": 1, "seq": 100}]),
    "bert (encoder)": (models.tiny_bert, TEXT, {"batch": 2, "seq": 24}, [{"batch": 5, "seq": 33}]),
    "t5 (encoder-decoder)": (models.tiny_t5, ["input_ids:int64[batch,seq]", "decoder_input_ids:int64[batch,tgt]"],
                             {"batch": 2, "seq": 24, "tgt": 12}, [{"batch": 3, "seq": 17, "tgt": 30}]),
    "vit (vision transformer)": (models.tiny_vit, ["pixel_values:float32[batch,3,32,32]"], {"batch": 2},
                                 [{"batch": 7}]),
    "resnet (conv net)": (models.tiny_resnet, ["pixel_values:float32[batch,3,height,width]"],
                          {"batch": 2, "height": 64, "width": 48}, [{"batch": 3, "height": 97, "width": 45}]),
    "sdpa block (hand-written)": (models.sdpa_block, ["x:float32[batch,seq,32]"], {"batch": 2, "seq": 24},
                                  [{"batch": 4, "seq": 77}]),
}


def _shapes(specs: list[str], point: dict[str, int]) -> dict:
    from costmodel.capture.specs import parse_input
    out = {}
    for s in specs:
        spec = parse_input(s)
        out[spec.name] = (tuple(point[d] if isinstance(d, str) else d for d in spec.dims), spec.dtype)
    return out


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_matmul_flops_equal_flop_counter(case, mode):
    factory, specs, captured, others = CASES[case]
    # FlopCounterMode on meta counts attention as the math kernel runs it
    report = costmodel.analyze(factory, inputs=specs, mode=mode, dims=captured, attention="math")
    assert report.unsupported == {}, report.unsupported_where
    for point in [captured, *others]:
        ours = report.evaluate(**point).totals["matmul_flops"]
        reference = flop_counter_total(factory, _shapes(specs, point), mode)
        assert ours == reference, (case, mode, point, ours, reference)
    # a single capture served every point: the formula, not a recapture, gave the figures
    assert len(report.analyses) == 1


def test_symbolic_formula_is_exact_for_attention():
    """The tiny GQA Llama: per layer, q@k^T and P@v cost 2*2*b*h*s*s*d with h=4 query heads, d=16."""
    report = costmodel.analyze(models.tiny_llama_gqa, inputs=TEXT)
    b, s = (costmodel.symbols_for("batch", "seq"))
    attention = sum(r["matmul_flops"] for r in report.by_op() if r["category"] == "attention")
    assert sympyfy(attention - 2 * (4 * b * 4 * s * s * 16)) == 0   # 2 layers * 4*b*h*s^2*d
    assert report.complexity["seq"]["matmul_flops"] == 2
    assert report.complexity["batch"]["matmul_flops"] == 1


def sympyfy(x):
    import sympy
    return sympy.simplify(x)


def test_train_counts_backward_not_guessed():
    """Train matmul FLOPs come from the traced backward: for linear layers exactly 3x forward."""
    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    inf = costmodel.analyze(mlp, inputs=["x:float32[batch,16]"]).evaluate(batch=4).totals["matmul_flops"]
    train = costmodel.analyze(mlp, inputs=["x:float32[batch,16]"], mode="train").evaluate(batch=4)
    assert inf == 2 * 4 * (16 * 32 + 32 * 8)                 # 2*b*(16*32 + 32*8) = 6144
    # backward: grad_input of the first layer is not needed (x does not require grad): 3x - 1 product
    assert train.totals["matmul_flops"] == inf + 2 * 4 * (16 * 32 + 32 * 8) + 2 * 4 * 32 * 8
    phases = {op["phase"] for op in train.ops}
    assert {"forward", "backward", "optimizer"} <= phases


MORE = {
    "nn.MultiheadAttention": (models.MHA, ["x:float32[batch,seq,32]"]),
    "nn.LSTM (unrolled: recaptured per point)": (models.LSTM, ["x:float32[batch,seq,16]"]),
    "einsum": (models.EinsumHead, ["x:float32[batch,seq,16]"]),
    "conv transpose + grouped conv1d": (models.ConvTranspose, ["x:float32[batch,4,seq,seq]"]),
    "nn.TransformerEncoder": (models.torch_encoder, ["src:float32[batch,seq,32]"]),
}


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("case", list(MORE))
def test_more_architectures(case, mode):
    factory, specs = MORE[case]
    report = costmodel.analyze(factory, inputs=specs, mode=mode, dims={"batch": 3, "seq": 10}, attention="math")
    assert report.unsupported == {}, report.unsupported_where
    for point in ({"batch": 3, "seq": 10}, {"batch": 2, "seq": 7}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = report.evaluate(**point).totals["matmul_flops"]
        assert ours == flop_counter_total(factory, _shapes(specs, point), mode), (case, mode, point)
