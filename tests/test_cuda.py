"""On a CUDA GPU (skipped without one; scripts/gpu_check.sh runs them first): the kernels PyTorch
picks there are the ones costed, FLOPs as FlopCounterMode counts them on the device, and peaks as
torch.cuda.max_memory_allocated reports them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import costmodel
from costmodel.capture.loss import first_output
from costmodel.validate.meters import measure_inference, measure_train_step

from . import models as M

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TEXT = ["input_ids:int64[batch,seq]"]


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_fused_attention_flops_as_flop_counter_counts_them_on_the_gpu(mode):
    dims = {"batch": 2, "seq": 512}
    r = costmodel.analyze(M.long_llama, inputs=TEXT, mode=mode, dtype="bfloat16", device="cuda", dims=dims)
    assert set(r.primary.kernels.values()) == {"flash"}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = M.long_llama().to(torch.bfloat16).train(mode == "train")
    ids = torch.randint(0, 128, (2, 512), device="cuda")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            first_output(model(input_ids=ids)).float().sum().backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)
    assert r.evaluate(**dims).totals["matmul_flops"] == counter.get_total_flops()


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_long_context_peak_against_max_memory_allocated(mode):
    dims = {"batch": 1, "seq": 4096}
    r = costmodel.analyze(M.long_llama, inputs=TEXT, mode=mode, dtype="bfloat16", device="cuda", dims=dims)
    assert r.complexity["seq"]["peak_memory_bytes"] == 1
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = M.long_llama().to(torch.bfloat16)
    measure = measure_train_step if mode == "train" else measure_inference
    measured = measure(model, TEXT, dims, device="cuda").peak_bytes
    assert r.memory_at(dims).peak_bytes == pytest.approx(measured, rel=0.10)
