"""What a new user trips over in the first hour (issue 11): each item through the CLI where it is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sympy
import torch

import costmodel
from costmodel.cli import _Progress, main
from costmodel.render.units import duration, size
from costmodel.validate.meters import measure_train_step

from . import models as M

HERE = os.path.dirname(__file__)
MODELS = os.path.join(HERE, "models.py")
ROOT = os.path.dirname(HERE)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cross_entropy_against_a_target_input_for_a_classifier(capsys):
    argv = ["analyze", f"{MODELS}:CNNMLP", "--input", "x:float32[batch,3,16,16]", "--mode", "train",
            "--loss", "cross-entropy", "--target", "labels:int64[batch]", "--dim", "batch=8", "--device", "cpu",
            "--format", "json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    data = json.loads(out)
    assert any(op["target"].startswith("aten._log_softmax") for op in data["ops"])
    torch.manual_seed(0)
    measured = measure_train_step(M.CNNMLP(), ["x:float32[batch,3,16,16]"], {"batch": 8}, loss="cross-entropy",
                                  targets=["labels:int64[batch]"]).peak_bytes
    assert abs(data["totals"]["peak_memory_bytes"] / measured - 1) < 0.05


def test_cross_entropy_without_a_target_says_what_to_give(capsys):
    code, _, err = run(capsys, "analyze", f"{MODELS}:CNNMLP", "--input", "x:float32[batch,3,16,16]", "--mode",
                       "train", "--loss", "cross-entropy", "--dim", "batch=8")
    assert code == 2
    assert "the output is [batch, 10]" in err and "--target labels:int64[batch]" in err and "s3" not in err


def test_language_models_default_to_the_next_token():
    # logits[:, :-1] against input_ids[:, 1:]: (seq - 1) positions, as transformers' causal-LM loss
    r = costmodel.analyze(M.tiny_llama_gqa, inputs=["input_ids:int64[batch,seq]"], mode="train",
                          loss="cross-entropy", dims={"batch": 2, "seq": 16})
    nll = [op for op in r.primary.ops if op.target.startswith("aten.nll_loss_forward")]
    batch, seq = costmodel.symbols_for("batch", "seq")
    rows = nll[0].cost["bytes_read"] / 12          # log-probabilities (4 bytes) and targets (8) per row
    assert nll and sympy.expand(rows - batch * (seq - 1)) == 0


def test_targets_are_training_inputs_only():
    with pytest.raises(costmodel.UsageError, match="--target is a training target"):
        costmodel.analyze(M.CNNMLP, inputs=["x:float32[batch,3,16,16]"], targets=["labels:int64[batch]"])


def test_package_module_factory_from_the_project_folder(tmp_path):
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "__init__.py").write_text("")
    (tmp_path / "mymodels" / "nets.py").write_text(
        "import torch.nn as nn\n\ndef build():\n    return nn.Linear(4, 4)\n")
    # The child imports this checkout's costmodel (ROOT on PYTHONPATH: it is installed in no environment
    # the suite may run in, or installed from another checkout); nothing else is on PYTHONPATH, so
    # mymodels is found only because costmodel looks in the folder it runs from.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": ROOT}
    for cmd in ([sys.executable, "-m", "costmodel"], _console_script(tmp_path / "bin")):
        done = subprocess.run(cmd + ["analyze", "mymodels.nets:build", "--input", "x:float32[batch,4]"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert "32*batch" in done.stdout        # 2 * 4 * 4 FLOPs per row


def _console_script(folder) -> list[str]:
    """The `costmodel` command of the environment under test: the script installed next to its python,
    or, where costmodel is not installed there, the script pip writes for pyproject's entry point, in
    `folder` (its own folder is the script's sys.path[0], as for an installed one; not the cwd)."""
    installed = os.path.join(os.path.dirname(sys.executable), "costmodel")
    if os.path.isfile(installed):
        return [installed]
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, func = tomllib.load(f)["project"]["scripts"]["costmodel"].split(":")
    folder.mkdir()
    script = folder / "costmodel"
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                      f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({func}())\n")
    return [sys.executable, str(script)]


def test_help_shows_defaults_and_examples(capsys):
    assert main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    assert "default: inference" in out and "examples:" in out and "costmodel fit llama-2-7b" in out
    assert main(["validate", "--help"]) == 0
    assert "timed steps per point" in capsys.readouterr().out


def test_zoo_models_run_as_typed_with_their_default_sizes(capsys):
    code, out, err = run(capsys, "analyze", "resnet-50", "--dim", "batch=2")
    assert code == 0, err
    assert "default height=224" in err and "\n      2       224      224" in out


def test_conv_formulas_are_readable_and_json_exact(capsys):
    code, out, _ = run(capsys, "analyze", "resnet-50")
    assert code == 0
    formulas = out.split("complexity")[0]
    assert "height_32*width_32" in formulas and "where height_16 = ceiling(height/16)" in out
    assert "floor(" not in formulas and max(len(line) for line in formulas.splitlines()) < 1000
    code, out, _ = run(capsys, "analyze", "resnet-50", "--format", "json")
    assert "floor(height/32 - 1/32)" in json.loads(out)["symbolic"]["flops"]   # the exact form


def test_limit_searches_warn_about_nothing_the_user_did_not_ask(capsys):
    code, out, err = run(capsys, "analyze", f"{MODELS}:conv_net", "--input", "x:float32[batch,3,height,width]",
                         "--dim", "batch=4", "--dim", "height=64", "--dim", "width=64", "--hw", "a100-80gb")
    assert code == 0 and "largest height that fits" in out
    assert err == ""


def test_flash_for_float32_says_what_pytorch_would_run(capsys):
    code, _, err = run(capsys, "analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]",
                       "--attention", "flash", "--dim", "batch=2", "--dim", "seq=64", "--hw", "a100-80gb")
    assert code == 0
    assert "flash kernel takes float16 and bfloat16 only; for float32 it would run efficient" in err


def test_progress_on_a_terminal_only(monkeypatch, capsys):
    import time
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with _Progress("capturing x", after_s=0.0):
        time.sleep(1.2)
    assert "capturing x... 1 s" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with _Progress("capturing y", after_s=0.0):
        time.sleep(0.6)
    assert capsys.readouterr().err == ""


def test_small_things(capsys):
    assert size(1000 * 2**20) == "1000 MiB" and size(1023 * 2**20) == "1023 MiB" and duration(1.234) == "1.23 s"
    code, out, _ = run(capsys, "analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--amp",
                       "--mode", "train")
    assert out.splitlines()[0].endswith("sdpa_block: train, float32 weights with bfloat16 autocast")
    code, out, err = run(capsys, "fit", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--hw",
                         "a100-80gb", "--max", "seq", "--dim", "batch=2", "--capacity", "1GB", "--format", "json")
    assert code == 0, err and json.loads(out)["capacity_bytes"] == 10**9
    code, _, err = run(capsys, "fit", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--hw",
                       "a100-80gb", "--max", "seq", "--dim", "batch=2", "--capacity", "lots")
    assert code == 2 and "--capacity 'lots' is not a size" in err
    for dims in ([], ["--dim", "batch=2", "--dim", "seq=64"]):
        code, out, _ = run(capsys, "analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]",
                           "--format", "json", *dims)
        ops = json.loads(out)["ops"]
        assert ops and {"name", "target", "module", "category", "flops", "bytes_read"} <= set(ops[0])


def test_multihead_attention_with_a_key_padding_mask(capsys):
    code, out, err = run(capsys, "analyze", f"{MODELS}:MHAPadded", "--input", "x:float32[batch,seq,32]", "--input",
                         "pad:bool[batch,seq]", "--mode", "train", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["complexity"]["seq"]["matmul_flops"] == 2


def test_flash_on_a_gpu_older_than_ampere_is_said(capsys):
    code, _, err = run(capsys, "analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dtype",
                       "float16", "--attention", "flash", "--dim", "batch=2", "--dim", "seq=64", "--hw", "v100-16gb")
    assert code == 0 and "needs compute capability 8.0 or newer; this GPU has 7.0, where it would run efficient" in err
    code, out, err = run(capsys, "analyze", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dtype",
                         "float16", "--dim", "batch=2", "--dim", "seq=64", "--hw", "v100-16gb", "--format", "json")
    assert json.loads(out)["memory"]["attention"] == {"efficient": 1}     # auto: what PyTorch runs there
