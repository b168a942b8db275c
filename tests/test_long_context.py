"""Long sequences: the peak is what eager allocates, mask for mask (see costmodel/capture/eager_paths.py).

Hugging Face decoders with SDPA and no padding build no attention mask in eager (is_causal=True):
their peak is seq^1. Where eager does build an S x S tensor (a sliding window shorter than the
sequence, GPT-2's eager attention, an attention_mask input, i.e. padding), the peak is seq^2 and
the mask is counted. Each family is checked against the real run on the CPU.
"""

import pytest
import torch

import costmodel
from costmodel.validate import meters as memtrack

from . import models as M

TEXT = ["input_ids:int64[batch,seq]"]
SEQ = 1024     # a [1, 1, 1024, 1024] bool mask is 1 MiB: four times a [1, 1024, 64] float activation


def _check(factory, mode, inputs=TEXT, degree=None, tolerance=0.05):
    dims = {"batch": 1, "seq": SEQ}
    report = costmodel.analyze(factory, inputs=inputs, mode=mode, dims=dims, device="cpu")
    predicted = report.memory_at(dims).peak_bytes
    torch.manual_seed(0)
    measure = memtrack.measure_train_step if mode == "train" else memtrack.measure_inference
    measured = measure(factory(), inputs, dims).peak_bytes
    assert abs(predicted / measured - 1) <= tolerance, (predicted, measured)
    if degree is not None:
        assert report.complexity["seq"]["peak_memory_bytes"] == degree
    return report


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_sdpa_decoder_without_padding_allocates_no_mask(mode):
    report = _check(M.long_llama, mode, degree=1)
    largest = report.memory_at({"batch": 1, "seq": SEQ}).largest
    assert not any(t["dtype"] == "bool" for t in largest)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_sliding_window_shorter_than_the_sequence_builds_its_mask(mode):
    report = _check(M.long_mistral_window, mode, degree=2)
    # the fused kernel receives the window mask as an additive float [1, 1, S, S]: 4 MiB at 1024
    largest = report.memory_at({"batch": 1, "seq": SEQ}).largest
    assert any(t["node"].endswith("float_mask") and t["bytes"] == 4 * SEQ * SEQ for t in largest)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_gpt2_eager_attention_builds_its_mask_and_scores(mode):
    _check(M.long_gpt2_eager, mode, degree=2)


def test_an_attention_mask_input_is_padding_and_its_mask_is_counted():
    # with an attention_mask input (memtrack draws 0/1 values: padded rows) eager builds the mask
    inputs = TEXT + ["attention_mask:int64[batch,seq]"]
    _check(M.long_llama, "inference", inputs=inputs, degree=2)


def test_positions_given_as_an_input_keep_the_traced_answer():
    # values the model did not make itself are unknown: the capture builds the mask (and says seq^2)
    report = costmodel.analyze(M.long_llama, inputs=TEXT + ["position_ids:int64[batch,seq]"], device="cpu")
    assert report.complexity["seq"]["peak_memory_bytes"] == 2
    own = costmodel.analyze(M.long_llama, inputs=TEXT, device="cpu")
    assert own.complexity["seq"]["peak_memory_bytes"] == 1
