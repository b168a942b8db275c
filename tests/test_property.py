"""Property: any small model made of linear, conv, norm, attention, activation and residual blocks,
with random shapes, analyses in both modes with --hw (exit 0, a verdict and limits for every
dimension), its matmul FLOPs equal FlopCounterMode's count (on meta), and its peak (the CPU's
kernels, --device cpu) agrees with the real run's meter on the CPU."""

from __future__ import annotations

import json
import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import costmodel
from costmodel.cli import main
from costmodel.validate.meters import measure_inference, measure_train_step

from .conftest import flop_counter_total
from .random_nets import IMAGE_KINDS, TOKEN_KINDS, RandomNet, inputs_of, module_source

PEAK_TOLERANCE = 0.20     # scripts/memory_benchmark.py: worst case 18.6% over 14 architectures


@st.composite
def specs(draw):
    family = draw(st.sampled_from(["tokens", "images"]))
    if family == "tokens":
        heads = draw(st.sampled_from([1, 2, 4]))
        width = heads * draw(st.sampled_from([4, 8, 16]))
        blocks = draw(st.lists(st.tuples(st.sampled_from(TOKEN_KINDS), st.just(heads)), min_size=1, max_size=4))
        blocks = [[k, heads if "attention" in k else draw(st.integers(1, 4))] for k, _ in blocks]
        dims = {"batch": draw(st.integers(1, 4)), "seq": draw(st.integers(2, 48))}
    else:
        width = draw(st.sampled_from([4, 8, 16]))
        blocks = [[k, draw(st.integers(1, 2))] for k in draw(st.lists(st.sampled_from(IMAGE_KINDS), min_size=1,
                                                                       max_size=4))]
        pools = sum(k == "pool" for k, _ in blocks)
        dims = {"batch": draw(st.integers(1, 4)), "size": draw(st.integers(2, 6)) * 2 ** pools}
    return {"family": family, "width": width, "blocks": blocks}, dims


def _analyze(capsys, path: str, spec: dict, dims: dict, mode: str) -> dict:
    argv = ["analyze", f"{path}:build", "--mode", mode, "--hw", "a100-80gb", "--device", "cpu",
            "--format", "json"] + [a for s in inputs_of(spec) for a in ("--input", s)] \
        + [a for d, v in dims.items() for a in ("--dim", f"{d}={v}")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{spec} at {dims} ({mode}): exit {code}: {err}"
    return json.loads(out)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs())
def test_random_models(capsys, case):
    spec, dims = case
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.py")
        with open(path, "w") as f:
            f.write(module_source(spec))
        for mode in ("inference", "train"):
            data = _analyze(capsys, path, spec, dims, mode)
            assert data["oom"]["fits"] and data["oom"]["largest_fitting"]
            assert all(e["limit"]["kind"] != "error" for e in data["oom"]["largest_fitting"].values())
            # FlopCounterMode on meta counts attention as the math kernel runs it: compare that count
            shapes = {"x": ([dims[d] if isinstance(d, str) else d for d in _dims(spec)], torch.float32)}
            counted = flop_counter_total(lambda: RandomNet(spec), shapes, mode)
            math = costmodel.analyze(lambda: RandomNet(spec), inputs=inputs_of(spec), mode=mode, attention="math",
                                     dims=dims).evaluate(**dims)
            assert math.totals["matmul_flops"] == counted, f"{spec} at {dims} ({mode})"
            torch.manual_seed(0)
            measure = measure_train_step if mode == "train" else measure_inference
            measured = measure(RandomNet(spec), inputs_of(spec), dims).peak_bytes
            predicted = data["totals"]["peak_memory_bytes"]
            assert abs(predicted / measured - 1) <= PEAK_TOLERANCE, f"{spec} at {dims} ({mode}): {predicted} vs {measured}"


def _dims(spec: dict) -> list:
    return ["batch", "seq", spec["width"]] if spec["family"] == "tokens" else ["batch", 3, "size", "size"]
