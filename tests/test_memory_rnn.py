"""Peak memory of recurrent nets and windowed attention on the CPU against the live-storage meter:
the captures run the RNNs as RNN.cpp does (oneDNN layers for the LSTM, FullLayer for the GRU) and
choose the math attention kernel where Swin's mask requires grad."""

from __future__ import annotations

import pytest
import torch

import costmodel
from costmodel.capture.rnn import onednn_lstm_workspace_bytes
from costmodel.validate import meters

from . import models as M
from .conftest import flop_counter_total

CASES = {
    "gru": (M.GRUTagger, ["ids:int64[batch,seq]"], {"batch": 4, "seq": 8}),
    "lstm": (M.LSTM, ["x:float32[batch,seq,16]"], {"batch": 4, "seq": 16}),
    "swin": (M.swin, ["pixel_values:float32[batch,3,32,32]"], {"batch": 8}),
}


@pytest.mark.parametrize("name, mode", [("gru", "inference"), ("gru", "train"), ("lstm", "inference"),
                                        ("lstm", "train"), ("swin", "train")])
def test_peak_matches_the_meter_on_cpu(name, mode):
    factory, inputs, dims = CASES[name]
    report = costmodel.analyze(factory, inputs=inputs, mode=mode, dims=dims, device="cpu")
    predicted = report.evaluate(**dims).totals["peak_memory_bytes"]
    torch.manual_seed(0)
    measure = meters.measure_train_step if mode == "train" else meters.measure_inference
    measured = measure(factory(), inputs, dims).peak_bytes
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


@pytest.mark.parametrize("S, B, I, H", [(16, 4, 16, 32), (1, 4, 16, 32), (5, 3, 33, 17), (9, 2, 8, 64)])
def test_onednn_workspace_is_the_kernels(S, B, I, H):
    x, hx = torch.randn(S, B, I), torch.zeros(1, B, H)
    w_ih, w_hh, b = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.zeros(4 * H)
    ws = torch.ops.aten.mkldnn_rnn_layer(x, w_ih, w_hh, b, b, hx, hx, False, [], 2, H, 1, True, False, False, True)[3]
    assert onednn_lstm_workspace_bytes(S, B, I, H) == ws.numel()


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_cpu_lstm_keeps_seq_symbolic_and_counts_the_unrolled_flops(mode):
    r = costmodel.analyze(M.LSTM, inputs=["x:float32[batch,seq,16]"], mode=mode, dims={"batch": 2, "seq": 6},
                          device="cpu")
    assert r.fixed == {} and r.unsupported == {}       # one oneDNN op per layer: nothing unrolled
    for b, s in ((2, 6), (3, 9)):
        expected = flop_counter_total(M.LSTM, {"x": ((b, s, 16), torch.float32)}, mode)
        assert r.evaluate(batch=b, seq=s).totals["matmul_flops"] == expected, (b, s)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_cpu_gru_counts_what_flop_counter_counts(mode):
    r = costmodel.analyze(M.GRUTagger, inputs=["ids:int64[batch,seq]"], mode=mode, dims={"batch": 2, "seq": 6},
                          device="cpu")
    for b, s in ((2, 6), (3, 6), (2, 9)):
        expected = flop_counter_total(M.GRUTagger, {"ids": ((b, s), torch.int64)}, mode)
        assert r.evaluate(batch=b, seq=s).totals["matmul_flops"] == expected, (b, s)
