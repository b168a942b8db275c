"""The zoo: exact published parameter counts, built on the meta device (no weights allocated)."""

import pytest
import torch

import costmodel
from costmodel.zoo import ZOO, get
from costmodel.errors import UsageError


@pytest.mark.parametrize("name", list(ZOO))
def test_parameter_counts_are_exact(name):
    with torch.device("meta"):
        model = ZOO[name].build()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == ZOO[name].params


def test_published_counts():
    assert ZOO["llama-2-7b"].params == 6_738_415_616
    assert ZOO["gpt2"].params == 124_439_808


def test_unknown_name_suggests_nearest():
    with pytest.raises(UsageError, match="Did you mean llama-2-7b"):
        get("llama2-7b")


def test_zoo_model_analyzes_with_default_inputs():
    report = costmodel.analyze("bert-base")
    assert report.params == 109_482_240
    assert report.complexity["seq"]["matmul_flops"] == 2 and report.unsupported == {}
