"""The limits of a model: searches stay inside what the model accepts, and say why they stop.

Each "largest value that fits" search starts where the model runs and is bounded by the model's own
limits (a guard such as seq <= 256, a position table found in the graph, a config's context), by
values it cannot be captured at, and by the lower and divisibility constraints of conv stacks and
patch views; a search that cannot finish is reported in its entry, never as the exit status.
"""

import json
import os
import shutil

import pytest
import torch

import costmodel
from costmodel.cli import main
from costmodel.errors import AnalysisError, OutsideLimits, UsageError
from costmodel.memory.fit import fit, largest_fitting
from costmodel.validate.meters import measure_train_step

from . import models as M

HERE = os.path.dirname(__file__)
MODELS = os.path.join(HERE, "models.py")
MIB = 1 << 20


def test_position_table_found_in_the_graph_bounds_seq():
    # GPT-2 looks arange(seq) up in its 512-row position table: the real model raises IndexError at
    # seq = 513, the fake-tensor capture does not; the graph says where the table ends.
    r = costmodel.analyze(M.tiny_gpt2, inputs=["input_ids:int64[batch,seq]"], dims={"batch": 2, "seq": 64})
    hard = [l for l in r.limits if l.hard]
    assert [str(l.expr) for l in hard] == ["seq <= 512"] and hard[0].where == "transformer.wpe"
    best = largest_fitting(r, "a100-80gb", {"batch": 2, "seq": 64})
    assert best["seq"].value == 512 and best["seq"].stop.kind == "model"
    assert "seq <= 512" in best["seq"].describe()
    with pytest.raises(OutsideLimits, match="seq <= 512"):
        r.evaluate(batch=2, seq=513)
    model = M.tiny_gpt2()
    with pytest.raises(IndexError):            # the real model agrees
        model(input_ids=torch.zeros(1, 513, dtype=torch.long))


def test_guard_bound_confirmed_by_a_failing_capture_names_the_model_line():
    r = costmodel.analyze(M.SlicedPositions, inputs=["ids:int64[batch,seq]"], dims={"batch": 2, "seq": 100})
    (guard,) = [g for g in r.guards if str(g.expr) == "seq <= 256"]
    assert guard.where.startswith(MODELS) and guard.where.endswith("in forward")
    best = largest_fitting(r, "a100-80gb", {"batch": 2, "seq": 100})
    assert best["seq"].value == 256 and best["seq"].stop.kind == "model"
    assert f"seq <= 256, from {MODELS}" in best["seq"].stop.reason
    assert best["batch"].stop.kind == "capacity"


def test_config_context_is_a_soft_limit_and_memory_alone_is_reported():
    r = costmodel.analyze(M.tiny_llama_gqa, inputs=["input_ids:int64[batch,seq]"], dims={"batch": 1, "seq": 64})
    (soft,) = r.limits
    assert not soft.hard and str(soft.expr) == "seq <= 512" and "max_position_embeddings" in soft.reason
    result = fit(r, "a100-80gb", "seq", {"batch": 1})
    assert result["max"]["seq"] == 512 and result["limit"]["kind"] == "model"
    assert result["memory_only_value"] > 512
    with pytest.warns(UserWarning, match="beyond seq <= 512"):
        r.evaluate(batch=1, seq=600)            # rotary positions run past it: a warning, not an error


def test_too_short_conv_input_is_never_probed():
    r = costmodel.analyze(M.AudioConv, inputs=["x:float32[batch,1,samples]"], dims={"batch": 4, "samples": 16000})
    best = largest_fitting(r, "a100-80gb", {"batch": 4, "samples": 16000}, capacity_bytes=2000)
    assert best["samples"].value is None and best["samples"].stop.kind == "none"
    assert "the smallest samples the model runs at, 104" in best["samples"].stop.reason
    assert best["batch"].value is None and "even batch=1 does not fit" in best["batch"].stop.reason
    # between: the search comes down from 16000 and stops where memory does
    mid = largest_fitting(r, "a100-80gb", {"batch": 4, "samples": 16000}, capacity_bytes=100_000)["samples"]
    assert mid.stop.kind == "capacity" and 104 <= mid.value
    assert r.memory_at({"batch": 4, "samples": mid.value}).peak_bytes <= 100_000 < \
        r.memory_at({"batch": 4, "samples": mid.value + 1}).peak_bytes


def test_conv_stack_without_values_is_captured_at_a_size_it_accepts():
    r = costmodel.analyze(M.AudioConv, inputs=["x:float32[batch,1,samples]"])     # default size 72 < 80
    assert r.complexity["samples"]["flops"] == 1


def test_divisibility_only_multiples_are_probed():
    r = costmodel.analyze(M.Patches, inputs=["x:float32[batch,3,height,width]"],
                          dims={"batch": 2, "height": 64, "width": 64})
    best = largest_fitting(r, "a100-80gb", {"batch": 2, "height": 64, "width": 64}, capacity_bytes=50_000_000)
    h = best["height"]
    assert h.value % 16 == 0 and h.stop.kind == "capacity" and h.stop.next_value == h.value + 16
    assert r.memory_at({"batch": 2, "height": h.value, "width": 64}).peak_bytes <= 50_000_000 < h.stop.next_peak_bytes


def test_a_probe_that_cannot_be_captured_bounds_the_search():
    r = costmodel.analyze(M.TokenBudget, inputs=["x:float32[batch,seq,16]"], dims={"batch": 2, "seq": 64})
    best = largest_fitting(r, "a100-80gb", {"batch": 2, "seq": 64})
    seq = best["seq"]
    assert seq.value == 2048 and seq.stop.kind == "capture" and "at most 4096 tokens" in seq.stop.reason
    assert "above 2048 the model could not be captured" in seq.describe()


def test_convnext_verdicts_in_both_modes(capsys):
    # the search used to probe height=1, where a guard divides by floor(height/32): ZeroDivisionError
    for mode in ("inference", "train"):
        code = main(["analyze", f"{MODELS}:ConvNeXt", "--input", "x:float32[batch,3,height,width]", "--dim",
                     "batch=4", "--dim", "height=128", "--dim", "width=128", "--hw", "a100-80gb", "--mode", mode,
                     "--format", "json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        oom = json.loads(out)["oom"]
        assert oom["fits"] and {d["limit"]["kind"] for d in oom["largest_fitting"].values()} == {"capacity"}


def test_fit_reports_a_search_that_cannot_finish():
    r = costmodel.analyze(M.sdpa_block, inputs=["x:float32[batch,seq,32]"], dims={"batch": 2, "seq": 64})
    with pytest.raises(AnalysisError, match="grows too slowly"):
        fit(r, "a100-80gb", "batch", {"seq": 64}, capacity_bytes=10**40)
    best = largest_fitting(r, "a100-80gb", {"batch": 2, "seq": 64}, capacity_bytes=10**40)
    assert best["batch"].value is None and best["batch"].stop.kind == "error"
    assert best["batch"].describe().startswith("not found (the search failed")
    with pytest.raises(UsageError, match="even seq=1 does not fit"):     # nothing fits: said, not "none"
        fit(r, "a100-80gb", "seq", {"batch": 2}, capacity_bytes=1024)


def test_device_cpu_models_the_cpu_attention_kernel_with_dropout():
    # CPU SDPA with dropout runs the math kernel and keeps [B, H, S, S] tensors; CUDA's fused kernels do not
    dims = {"batch": 5, "seq": 120}
    cpu = costmodel.analyze(M.tiny_distilbert_classifier, inputs=["input_ids:int64[batch,seq]"], mode="train",
                            dims=dims, device="cpu").evaluate(**dims)
    cuda = costmodel.analyze(M.tiny_distilbert_classifier, inputs=["input_ids:int64[batch,seq]"], mode="train",
                             dims=dims, device="cuda").evaluate(**dims)
    assert cpu.extra["memory"]["attention"] == {"math": 2} and "math" not in cuda.extra["memory"]["attention"]
    torch.manual_seed(0)
    measured = measure_train_step(M.tiny_distilbert_classifier(), ["input_ids:int64[batch,seq]"], dims).peak_bytes
    assert abs(cpu.totals["peak_memory_bytes"] / measured - 1) < 0.05
    assert cuda.totals["peak_memory_bytes"] < 0.9 * measured


def test_device_flag_on_the_cli(capsys):
    argv = ["analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dim", "batch=2",
            "--dim", "seq=64", "--mode", "train", "--format", "json"]
    peaks = {}
    for device in ("cpu", "cuda"):
        assert main(argv + ["--device", device]) == 0
        peaks[device] = json.loads(capsys.readouterr().out)["totals"]["peak_memory_bytes"]
    assert peaks["cpu"] != peaks["cuda"]
    assert main(argv + ["--device", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_user_code_in_a_folder_named_costmodel_is_still_the_users(tmp_path, capsys):
    # "ours" is decided by module identity: a user's folder called costmodel keeps its (at file:line)
    folder = tmp_path / "costmodel"
    folder.mkdir()
    shutil.copy(os.path.join(HERE, "bad_models.py"), folder / "bad_models.py")
    code = main(["analyze", f"{folder / 'bad_models.py'}:data_dependent", "--input", "x:float32[batch,8]"])
    err = capsys.readouterr().err
    assert code == 1 and f"(at {folder / 'bad_models.py'}:" in err and "y.sum() > 0" in err
