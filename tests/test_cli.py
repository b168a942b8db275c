"""The command line: outputs in every format, and a clear one-paragraph error for bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import sympy

from costmodel.cli import main
from costmodel.capture.zoo import ZOO

BAD = os.path.join(os.path.dirname(__file__), "bad_models.py")
LINEAR = f"{BAD}:tiny_linear"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_output_has_formulas_complexity_modules_and_coverage(capsys):
    code, out, err = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=4,8")
    assert code == 0, err
    assert "flops" in out and "batch^1" in out and "Coverage" in out and "every op has a rule" in out
    assert "matmul_flops" in out and "384*batch" in out     # 2*(8*16 + 16*4) = 384 per row


def test_json_single_point_matches_contract(capsys):
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=4",
                       "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["mode"] == "inference" and data["dims"] == {"batch": 4} and data["hardware"] is None
    t = data["totals"]
    assert t["matmul_flops"] == 384 * 4 and t["params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert t["bytes"] == t["bytes_read"] + t["bytes_written"]
    assert sympy.sympify(data["symbolic"]["matmul_flops"]) == 384 * sympy.Symbol("batch")
    assert data["complexity"] == {"batch": {"flops": 1, "matmul_flops": 1, "bytes": 1, "peak_memory_bytes": 1}}
    assert t["peak_memory_bytes"] > t["param_bytes"] and set(t["memory"]) == {"params", "grads", "optimizer_state",
                                                                                "activations", "temporaries"}
    assert {"name", "target", "module", "category", "flops", "bytes_read", "bytes_written", "intensity", "bound",
            "time_s"} <= set(data["ops"][0])
    assert data["modules"] and data["unsupported"] == {}


def test_json_sweep_and_hardware(capsys):
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=4,8",
                       "--format", "json", "--hw", "a100-80gb")
    data = json.loads(out)
    assert [p["dims"]["batch"] for p in data["points"]] == [4, 8]
    p = data["points"][0]
    assert p["hardware"]["name"] == "a100-80gb" and p["totals"]["time_s"] > 0
    timed = [op for op in p["ops"] if op["time_s"]]
    assert abs(sum(op["time_s"] for op in timed) - p["totals"]["time_s"]) < 1e-12


def test_csv_and_markdown(capsys):
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=2,3",
                       "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["batch"] for r in rows} == {"2", "3"} and "aten.addmm.default" in {r["target"] for r in rows}
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--format", "markdown")
    assert code == 0 and out.startswith("# ") and "| " in out


def test_symbolic_only_json(capsys):
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--format", "json")
    data = json.loads(out)
    assert data["totals"] is None and "batch" in data["symbolic"]["flops"]


def test_train_mode_and_zoo_listing(capsys):
    code, out, _ = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=2",
                       "--mode", "train", "--optimizer", "sgd", "--format", "json")
    data = json.loads(out)
    assert {op["phase"] for op in data["ops"]} >= {"forward", "backward", "optimizer"}
    code, out, _ = run(capsys, "zoo", "--format", "json")
    assert {"gpt2", "llama-2-7b", "resnet-50"} <= {m["name"] for m in json.loads(out)}


def test_zoo_table_lists_the_shipped_configs(capsys):
    code, out, err = run(capsys, "zoo")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows["mixtral-8x7b"] == "46,702,792,704" and rows["llama-3-8b"] == "8,030,261,248"
    assert rows["resnet-50"] == "25,557,032" and set(rows) == set(ZOO)


@pytest.mark.parametrize("argv,code,needles", [
    (["analyze", LINEAR, "--input", "x:float32(batch,8)"], 2, ["malformed --input", "NAME:DTYPE[D0,D1,...]"]),
    (["analyze", LINEAR, "--input", "x:float99[batch,8]"], 2, ["unknown dtype", "float32"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=four"], 2, ["'four'", "positive integer"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "=3"], 2, ["malformed --dim"]),
    (["analyze", "gtp2"], 2, ["unknown model 'gtp2'", "Did you mean gpt2"]),
    (["analyze", "no/such/config.json"], 2, ["model config 'no/such/config.json' does not exist", "hf:ORG/NAME"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,n]", "--dim", "batch=2"], 2,
     ["dimension 'n'", "has no value", "--dim n=N"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "seq=2"], 2, ["--dim seq is not a dimension"]),
    (["analyze", f"{BAD}:raising", "--input", "x:float32[batch,8]"], 1,
     ["factory", "ValueError", "config file missing", "bad_models.py"]),
    (["analyze", f"{BAD}:data_dependent", "--input", "x:float32[batch,8]"], 1,
     ["capture failed", "bad_models.py", "if y.sum() > 0", "data-dependent"]),
    (["analyze", f"{BAD}:not_a_module", "--input", "x:float32[batch,8]"], 1, ["not a torch.nn.Module"]),
    (["analyze", f"{BAD}:nope", "--input", "x:float32[batch,8]"], 2, ["has no 'nope'"]),
    (["analyze", "missing_file.py:build", "--input", "x:float32[batch,8]"], 2, ["does not exist"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--mode", "training"], 2, ["invalid choice: 'training'", "'train'"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--hw", "a100"], 2, ["unknown hardware 'a100'"]),
    (["analyze", LINEAR, "--input", "x:float32[batch,8]", "--format", "yaml"], 2, ["invalid choice: 'yaml'", "'json'"]),
])
def test_bad_input_one_paragraph_and_exit_code(capsys, argv, code, needles):
    got, out, err = run(capsys, *argv)
    assert got == code, err
    assert "Traceback" not in err and out == ""
    for n in needles:
        assert n in err, (n, err)


def test_pinned_dimension_is_reported_and_points_recaptured(capsys):
    code, out, err = run(capsys, "analyze", f"{BAD}:pins_length", "--input", "x:float32[batch,seq,4]",
                         "--dim", "batch=2", "--dim", "seq=16", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert any("seq" in g and "16" in g for g in data["guards"])
    assert "seq" not in data["complexity"]          # a pinned dimension has no degree
    code, out, err = run(capsys, "analyze", f"{BAD}:pins_length", "--input", "x:float32[batch,seq,4]",
                         "--dim", "batch=2", "--dim", "seq=16")
    assert "pinned by the capture: seq = 16" in out and "bad_models.py:43" in out
    assert "Formulas (at seq = 16" in out and "no formula in seq" in out


def test_guarded_formula_is_recaptured_beyond_its_range(capsys):
    code, out, err = run(capsys, "analyze", f"{BAD}:bounded", "--input", "x:float32[batch,seq,4]",
                         "--dim", "batch=1", "--dim", "seq=8,64", "--format", "json")
    assert code == 0, err
    short, long = json.loads(out)["points"]
    # seq=64 takes the two-layer branch: per row 2*4*4 FLOPs per layer
    assert short["totals"]["matmul_flops"] == 2 * 4 * 4 * 8
    assert long["totals"]["matmul_flops"] == 2 * (2 * 4 * 4 * 64)
    assert long.get("captured_separately") and "capturing that point separately" in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "costmodel.cli", "zoo"], capture_output=True, text=True)
    assert out.returncode == 0 and "llama-2-70b" in out.stdout


def test_oom_verdict_in_table_and_json(capsys):
    code, out, err = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=4",
                         "--mode", "train", "--hw", "a100-80gb")
    assert code == 0, err
    assert "fits a100-80gb" in out and "largest batch that fits" in out
    code, out, err = run(capsys, "analyze", LINEAR, "--input", "x:float32[batch,8]", "--dim", "batch=4",
                         "--mode", "train", "--hw", "a100-80gb", "--format", "json")
    oom = json.loads(out)["oom"]
    assert oom["fits"] and oom["margin_bytes"] == oom["capacity_bytes"] - oom["peak_memory_bytes"]
    batch = oom["largest_fitting"]["batch"]
    assert batch["value"] > 4 and batch["limit"]["kind"] == "capacity"
    assert batch["limit"]["next_value"] == batch["value"] + 1


def test_fit_solves_and_the_next_value_does_not_fit(capsys):
    code, out, err = run(capsys, "fit", LINEAR, "--input", "x:float32[batch,8]", "--hw", "a100-80gb",
                         "--max", "batch", "--capacity", "1000000", "--mode", "train", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    n = data["max"]["batch"]
    assert data["capacity_bytes"] == 1_000_000
    assert data["peak_memory_bytes"] <= 1_000_000 < data["next_peak_memory_bytes"]
    from costmodel import analyze
    report = analyze(LINEAR, inputs=["x:float32[batch,8]"], mode="train", hardware="a100-80gb")
    assert report.evaluate(batch=n).totals["peak_memory_bytes"] <= 1_000_000
    assert report.evaluate(batch=n + 1).totals["peak_memory_bytes"] > 1_000_000
    code, out, err = run(capsys, "fit", LINEAR, "--input", "x:float32[batch,8]", "--hw", "a100-80gb",
                         "--max", "batch", "--capacity", "1000000", "--mode", "train")
    assert code == 0 and f"largest batch that fits: {n}" in out


@pytest.mark.parametrize("argv,needle", [
    (["fit", LINEAR, "--input", "x:float32[batch,8]", "--hw", "a100-80gb", "--max", "seq"], "--max seq"),
    (["fit", LINEAR, "--input", "x:float32[batch,8]", "--hw", "b200", "--max", "batch"], "unknown hardware 'b200'"),
])
def test_fit_bad_input(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err, err
