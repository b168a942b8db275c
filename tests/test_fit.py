"""`fit`: the largest value of a dimension whose peak fits, the OOM verdict, and the usage errors."""

import pytest

import costmodel
from costmodel.errors import UsageError
from costmodel.memory.fit import CONTEXT_RESERVE_BYTES, FRAGMENTATION_RESERVE, fit, largest_fitting, usable_bytes, verdict
from costmodel.hardware.catalog import load_hardware

from . import models as M

MIB = 1 << 20
_CACHE: dict = {}


def block_report():
    if "block" not in _CACHE:
        _CACHE["block"] = costmodel.analyze(M.sdpa_block, inputs=["x:float32[batch,seq,32]"], mode="train",
                                            dims={"batch": 2, "seq": 128})
    return _CACHE["block"]


def test_usable_capacity_reserves_context_and_fragmentation():
    v100 = load_hardware("v100-16gb")
    # (16 GiB - 1 GiB) * 0.95 = 15300820992
    assert usable_bytes(v100) == int((16 * 2**30 - 2**30) * 0.95) == 15300820992
    assert CONTEXT_RESERVE_BYTES == 2**30 and FRAGMENTATION_RESERVE == 0.05
    assert usable_bytes(v100, context_bytes=0, fragmentation=0) == v100.memory_bytes


@pytest.mark.parametrize("dim, fixed", [("seq", {"batch": 4}), ("batch", {"seq": 256})])
def test_fit_is_the_last_value_that_fits(dim, fixed):
    r = block_report()
    cap = 64 * MIB
    result = fit(r, "a100-80gb", dim, fixed, capacity_bytes=cap)
    n = result["max"][dim]
    assert result["capacity_bytes"] == cap
    at = r.memory_at({**fixed, dim: n}, device="cuda").peak_bytes
    after = r.memory_at({**fixed, dim: n + 1}, device="cuda").peak_bytes
    assert at == result["peak_memory_bytes"] <= cap < after == result["next_peak_memory_bytes"]
    assert result["dims"] == {**fixed, dim: n} and result["device"] == "a100-80gb"
    assert sum(result["memory"].values()) == result["peak_memory_bytes"]


def test_fit_with_the_device_capacity():
    r = block_report()
    result = fit(r, load_hardware("t4"), "batch", {"seq": 2048})
    assert result["capacity_bytes"] == usable_bytes(load_hardware("t4"))
    assert result["peak_memory_bytes"] <= result["capacity_bytes"] < result["next_peak_memory_bytes"]


def test_verdict_says_by_how_much():
    r = block_report()
    small = verdict(r, "a100-80gb", {"batch": 2, "seq": 128}, capacity_bytes=64 * MIB)
    assert small["fits"] and small["margin_bytes"] == 64 * MIB - small["peak_memory_bytes"] > 0
    big = verdict(r, "a100-80gb", {"batch": 64, "seq": 4096}, capacity_bytes=64 * MIB)
    assert not big["fits"] and big["margin_bytes"] < 0


def test_largest_fitting_per_dimension():
    r = block_report()
    best = largest_fitting(r, "a100-80gb", {"batch": 4, "seq": 256}, capacity_bytes=64 * MIB)
    assert set(best) == {"batch", "seq"}
    assert best["seq"].value == fit(r, "a100-80gb", "seq", {"batch": 4}, capacity_bytes=64 * MIB)["max"]["seq"]
    assert best["seq"].stop.kind == "capacity" and best["seq"].stop.next_value == best["seq"].value + 1


def test_unknown_dimension():
    with pytest.raises(UsageError, match="--max heads: not a dimension"):
        fit(block_report(), "a100-80gb", "heads", {"batch": 2})


def test_missing_and_doubled_dimensions():
    with pytest.raises(UsageError, match="--dim batch=N"):
        fit(block_report(), "a100-80gb", "seq", {})
    with pytest.raises(UsageError, match="solved for"):
        fit(block_report(), "a100-80gb", "seq", {"seq": 3, "batch": 2})


def test_unknown_device():
    with pytest.raises(UsageError, match="a100"):
        fit(block_report(), "a100", "seq", {"batch": 2})


def test_even_one_does_not_fit():
    with pytest.raises(UsageError, match="even seq=1 does not fit"):
        fit(block_report(), "a100-80gb", "seq", {"batch": 2}, capacity_bytes=1024)


def test_dimension_that_does_not_grow_memory():
    # ViT checks the image size against its config: height and width are pinned, memory cannot grow
    r = costmodel.analyze(M.tiny_vit, inputs=["pixel_values:float32[batch,3,height,width]"],
                          dims={"batch": 2, "height": 32, "width": 32})
    with pytest.raises(UsageError, match="does not grow"):
        fit(r, "a100-80gb", "height", {"batch": 2, "width": 32})
