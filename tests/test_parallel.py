"""Parallel training: per-GPU memory (memory/parallel.py), activation checkpointing
(capture/checkpointing.py), step time (hardware/parallel_step.py) and `plan`.

The memory figures are checked against a real 2-rank gloo run (the CI case), against Korthikanti
et al. 2022's activation formulas by hand on a Megatron-style GPT, and against the textbook bytes
per parameter and communication volumes. The larger checks (FSDP at 4 ranks, DDP, TP, PP on three
models, FSDPMemTracker at W = 8 and 64) are scripts/parallel_memory_benchmark.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import replace

import pytest

import costmodel
from costmodel.capture.checkpointing import find_blocks
from costmodel.errors import CostModelError
from costmodel.memory.parallel import in_flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from megatron_gpt import gpt  # noqa: E402

GPT2 = "tests/parallel_models.py:gpt2_style"
LLAMA = "tests/parallel_models.py:llama_style"
TOKENS = ["input_ids:int64[batch,seq]"]


def megatron(**kw):
    """A 2-layer Megatron GPT: h = 64, a = 4 heads, s = 128, vocabulary 256, float16, Megatron's
    mixed precision, the attention core as Megatron writes it."""
    model = functools.partial(gpt, hidden=64, layers=2, heads=4, vocab=256, context=128)
    return costmodel.analyze(model, inputs=TOKENS, mode="train", dtype="float16", attention="math", device="cuda",
                             master_weights=True, **kw)


# --- the real run: 2 gloo ranks ------------------------------------------------------------------

def test_two_gloo_ranks_fsdp_peak_within_5_percent():
    from costmodel.validate.distributed import compare
    dims = {"batch": 2, "seq": 64}
    os.chdir(ROOT)
    report = costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", parallel="fsdp=2")
    ranks = compare(report, dims, timeout_s=120)
    assert [r.rank for r in ranks] == [0, 1]
    for r in ranks:
        assert abs(r.error_pct) <= 5, r.to_dict()


# --- checkpointing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_checkpointing_captures_agree_with_every_block_traced(mode):
    # repeated blocks traced once and copied (capture.blocks) give the graph of a full trace
    for analyze in (lambda **kw: costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", **kw),
                    lambda **kw: megatron(**kw)):
        once, every = (analyze(checkpointing=mode, repeated_blocks=rb).evaluate(batch=2, seq=64).totals
                       for rb in (True, False))
        assert once["flops"] == every["flops"]
        assert once["peak_memory_bytes"] == every["peak_memory_bytes"]


def test_checkpointing_blocks_recomputes_the_forward():
    none, blocks = (costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", checkpointing=c)
                    .evaluate(batch=2, seq=64).totals for c in ("none", "blocks"))
    assert blocks["peak_memory_bytes"] < none["peak_memory_bytes"]
    assert blocks["flops"] > none["flops"]


def test_checkpointing_needs_repeated_blocks():
    with pytest.raises(costmodel.UsageError, match="repeated blocks"):
        costmodel.analyze("tests/models.py:sdpa_block", inputs=["x:float32[batch,seq,32]"], mode="train",
                          checkpointing="blocks")


# --- Korthikanti et al. 2022 (arXiv:2205.05198), section 4: activations per layer ------------------

# s = 128, b = 2, h = 64, a = 4, L = 2, t = 2; sbh = 128 * 2 * 64 = 16384, 5as^2b = 5 * 4 * 128^2 * 2 = 655360.
# Beside the paper's count the capture holds, per layer, each layer norm's float32 mean and rstd
# (2 norms * 2 * b * s * 4 bytes = 16bs = 4096) and the causal mask CoreAttention builds (s^2 bool = 16384).
S, B, H, A, L, T = 128, 2, 64, 4, 2, 2
SBH = S * B * H
EXTRA = 16 * B * S + S * S


@pytest.mark.parametrize("kw, expected", [
    ({}, L * (34 * SBH + 5 * A * S * S * B + EXTRA)),                                 # 2,465,792
    ({"parallel": "tp=2"}, L * (SBH * (10 + 24 // T) + 5 * A * S * S * B // T + EXTRA)),   # 1,417,216
    ({"parallel": "tp=2", "sequence_parallel": True}, L * (34 * SBH + 5 * A * S * S * B + EXTRA) // T),
    ({"parallel": "tp=2", "checkpointing": "selective"}, L * (SBH * (10 + 24 // T) + 16 * B * S)),
    ({"parallel": "tp=2", "sequence_parallel": True, "checkpointing": "selective"}, L * (34 * SBH + 16 * B * S) // T),
])
def test_activations_per_layer_are_korthikantis(kw, expected):
    par = megatron(**{"parallel": "dp=1", **kw}).parallel_memory()
    assert par.saved_activations({"batch": B, "seq": S})[0]["blocks_bytes"] == expected


def test_selective_recomputes_a_parameter_free_attention_core():
    report = megatron(checkpointing="selective", parallel="dp=1")
    assert "nothing is recomputed" not in " ".join(report.warnings)


def test_megatron_mixed_precision_is_18_bytes_per_parameter():
    # float16 weight 2 + float32 main_grad 4 + float32 master weight 4 + Adam's two float32 moments 8
    report = megatron(parallel="dp=1")
    states = report.parallel_memory().model_states({"batch": B, "seq": S})[0]
    params = sum(p.numel() for p in report._loaded.module.parameters())
    assert states["blocks_bytes"] + states["other_bytes"] == 18 * params


# --- pipeline schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("pp, v", [(2, 1), (4, 1), (8, 1), (4, 2), (8, 3)])
def test_first_stage_holds_korthikantis_microbatches(pp, v):
    # section 4.2.3: the first stage holds pp micro-batches (1F1B), pp * (1 + (pp - 1) / (pp * v)) interleaved
    from fractions import Fraction
    first, _ = in_flight(pp, 0, 64, v)
    assert 1 + first == (pp if v == 1 else pp * (1 + Fraction(pp - 1, pp * v)))


def test_last_stage_holds_one_microbatch():
    assert in_flight(4, 3, 8, 1) == (0, 0)


def test_tied_embedding_gradient_is_not_received():
    # the word embedding is used on the first stage (lookup) and the last (tied output layer):
    # each keeps its own gradient; nothing of the table's size arrives per micro-batch
    par = megatron(parallel="pp=2", microbatches=2).parallel_memory()
    received = [b for st in par.stages for b in st.model.buffers if "received gradient" in b.node]
    assert all("256, 64" not in b.shape for b in received), [(b.node, b.shape) for b in received]


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph, parameters aside."""
    import torch
    seen: dict = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_received_rotary_tables_save_what_autograd_saves():
    # torch.distributed.pipelining's traced stages make every float tensor they receive require a
    # gradient: on Llama's second stage the rotary cos/sin (no gradient in the model) do, and each
    # attention then saves q, k and their rotate_half. Measured: the bytes autograd saves in the
    # stage's two layers with cos/sin requiring a gradient, less without.
    import torch
    from tests.parallel_models import llama_style
    dims = {"batch": 2, "seq": 64}
    os.chdir(ROOT)
    report = costmodel.analyze(LLAMA, inputs=TOKENS, mode="train", device="cpu", parallel="pp=2", microbatches=4)
    par = report.parallel_memory()
    from costmodel.symbols import dim_symbol
    sub = {dim_symbol(d): v for d, v in dims.items()}
    stage = par.stages[1].model
    predicted = sum(int(b.size.xreplace(sub)) for b in stage.buffers
                    if "(saved: a received tensor" in b.node and "later micro-batch" not in b.node)
    torch.manual_seed(0)
    model = llama_style()
    h = torch.randn(dims["batch"], dims["seq"], 64, requires_grad=True)
    positions = torch.arange(dims["seq"]).unsqueeze(0)
    cos, sin = (t.detach() for t in model.model.rotary_emb(h, positions))

    def layers(grad: bool):
        c, s = cos.clone().requires_grad_(grad), sin.clone().requires_grad_(grad)
        def run():
            x = h
            for layer in model.model.layers[2:]:
                x = layer(x, position_embeddings=(c, s), position_ids=positions)
        return run
    measured = _saved_bytes(layers(True)) - _saved_bytes(layers(False))
    # per layer: q [2 * 64, 64] and rotate_half(q) [2, 4, 64, 16], k [2 * 64, 32] and rotate_half(k)
    # [2, 2, 64, 16], float32: 2 * (32768 + 32768 + 16384 + 16384) = 196608
    assert measured == predicted == 196608
    # and the first stage keeps one gradient receive buffer per micro-batch for each: 4 * 64 * 16 * 4 bytes
    first = par.stages[0].model
    made = [int(b.size.xreplace(sub)) for b in first.buffers if "received gradient, made for pipelining" in b.node]
    assert made == [16384, 16384]


def test_warmup_send_handle_holds_a_sent_output():
    # Schedule1F1B's `send_work` holds the first stage's first sent output until the 1B1F phase ends:
    # past the later micro-batch's backward with m = 4 (m > 2 w - 2, w = 2 warm-up forwards), not with m = 2
    def sent_end(m):
        stage = costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", parallel="pp=2",
                                  microbatches=m).parallel_memory().stages[0].model
        b = next(b for b in stage.buffers if b.node.endswith("(sent to the next stage)"))
        last_backward = max(i for i, st in enumerate(stage.steps) if st.phase == "backward")
        return b.end, last_backward
    end, last_backward = sent_end(4)
    assert end == last_backward
    end, last_backward = sent_end(2)
    assert end < last_backward


# --- tensor parallelism from the graph ------------------------------------------------------------

def test_tensor_parallel_plan_from_the_graph():
    par = costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", parallel="tp=2").parallel_memory()
    plan = par.tp.plan()
    assert plan["h.0.q"] == plan["h.0.fc"] == plan["lm_head"] == "colwise"
    assert plan["h.0.proj"] == plan["h.0.out"] == "rowwise"
    assert plan["wte"] == "rowwise" and "wpe" not in plan     # token ids are an input; positions are not


# --- step time ------------------------------------------------------------------------------------

def _point(report):
    return report.evaluate(batch=B, seq=S)


def test_tensor_parallel_collectives_per_region():
    # two column/row regions per block (attention, MLP): 2 * L collectives a micro-batch forward,
    # as many backward, twice as many with full recomputation (the forward's again)
    for ckpt, backward in (("selective", 2 * L), ("blocks", 4 * L)):
        comm = _point(megatron(parallel="tp=2", checkpointing=ckpt, hardware="a100-80gb")).extra["communication"]
        counts = sorted(c["count"] for c in comm if c["group"] == "tp")
        assert counts == sorted([2 * L, backward]), comm
        assert all(c["bytes"] == SBH * 2 for c in comm)          # [b, s, h] float16


def test_ddp_and_fsdp_volumes_from_the_graph():
    from costmodel.hardware import comm
    # DDP sends 2(n-1)/n of the gradient bytes per rank; FSDP (ZeRO-3) 3(n-1)/n: 1.5x
    n = 4
    volumes = {}
    for par in (f"dp={n}", f"fsdp={n}"):
        report = costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", parallel=par, hardware="a100-80gb")
        calls = [comm.Collective(c["collective"], c["group"], c["bytes"], c["count"])
                 for c in report.evaluate(batch=2, seq=64).extra["communication"]]
        volumes[par] = comm.volume_per_rank(calls, comm.mesh_placements({"dp": n, "fsdp": n}, 8))
    grad_bytes = report.param_bytes
    assert volumes[f"dp={n}"] == pytest.approx(2 * (n - 1) / n * grad_bytes, rel=1e-6)
    assert volumes[f"fsdp={n}"] == pytest.approx(1.5 * volumes[f"dp={n}"], rel=1e-3)   # shards padded to n rows


def test_more_bandwidth_is_never_slower():
    from costmodel.hardware.catalog import load_hardware
    from costmodel.hardware.parallel_step import parallel_step
    report = megatron(parallel="tp=2,pp=2,dp=2", microbatches=4, hardware="a100-80gb")
    point = _point(report)
    par = report.parallel_memory()
    hw = load_hardware("a100-80gb")
    times = []
    for scale in (0.25, 0.5, 1, 2, 4):
        faster = replace(hw, intra_node_bandwidth_bytes_per_s=hw.intra_node_bandwidth_bytes_per_s * scale,
                         inter_node_bandwidth_bytes_per_s=hw.inter_node_bandwidth_bytes_per_s * scale)
        times.append(parallel_step(point, par, faster)["step_time_s"])
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_step_time_parts():
    m = 4
    e = _point(megatron(parallel="pp=2", microbatches=m, hardware="a100-80gb")).extra
    assert e["step_time_s"] > 0 and 0 < e["mfu"] < 1
    # per micro-batch t = forward + backward + exposed communication; 1F1B takes m * max(t) + the
    # other stage's t (the bubble of the slower stage; (pp - 1) / m of the work for equal stages)
    t = [r["forward_time_s"] + r["backward_time_s"] + r["exposed_communication_time_s"] / m for r in e["ranks"]]
    slow = max(range(2), key=t.__getitem__)
    assert e["ranks"][slow]["bubble_time_s"] == pytest.approx(t[1 - slow], rel=1e-9)
    tail = max(r["optimizer_time_s"] for r in e["ranks"])
    assert e["step_time_s"] == pytest.approx(m * t[slow] + t[1 - slow] + tail, rel=1e-9)


# --- plan -----------------------------------------------------------------------------------------

def test_plan_ranks_what_fits_and_says_why_the_rest_does_not():
    from costmodel.plan import plan
    os.chdir(ROOT)
    capacity = 4 * 2 ** 20          # between the smallest peak (2.4 MiB: fsdp=4) and the largest (7.6 MiB: dp=4)
    result = plan(GPT2, inputs=TOKENS, hardware="a100-80gb", gpus=4, dims={"batch": 2, "seq": 64},
                  dtype="float32", checkpointing=("none", "blocks"), capacity_bytes=capacity)
    plans, rejected = result["plans"], result["rejected"]
    assert plans and rejected
    assert all(p["peak_memory_bytes"] <= capacity for p in plans)
    assert [p["tokens_per_s"] for p in plans] == sorted((p["tokens_per_s"] for p in plans), reverse=True)
    assert any("usable" in r["reason"] for r in rejected)
    assert all(p["parallel"]["dp"] * p["parallel"]["fsdp"] * p["parallel"]["tp"] * p["parallel"]["pp"] == 4
               for p in plans)


def test_plan_fast_path_is_the_plain_one():
    # plan shares one build cache per capture and takes the peak straight from the buffers
    # (MemoryModel.peak_at); each configuration gives what a build of its own and `largest` give
    from costmodel.hardware.catalog import load_hardware
    from costmodel.hardware.parallel_step import parallel_step
    from costmodel.memory import parallel
    from costmodel.plan import configurations
    os.chdir(ROOT)
    hw = load_hardware("a100-80gb")
    report = costmodel.analyze(GPT2, inputs=TOKENS, mode="train", device="cpu", hardware=hw)
    dims = {"batch": 2, "seq": 64}
    point = report.evaluate(**dims)
    blocks = find_blocks(report._loaded.module)
    shared, sizes, checked = {}, {}, 0
    for cfg in configurations(8, 8):
        options = report.options.with_(**cfg)
        try:
            plain = parallel.build(report.memory_model(), report.primary.captured, blocks, options)
        except CostModelError:         # tp = 8 does not divide the 4 heads, 8 stages > 4 blocks
            continue
        fast = parallel.build(report.memory_model(), report.primary.captured, blocks, options, shared)
        checked += 1
        stage, peak, _ = plain.largest(dims)
        assert fast.peak_at(dims, sizes) == (stage, peak.peak_bytes), cfg
        assert parallel_step(point, fast, hw, False, shared) == parallel_step(point, plain, hw, False), cfg
    assert checked > 20


def test_cli_parallel_json_keys(capsys):
    from costmodel.cli import main
    os.chdir(ROOT)
    code = main(["analyze", GPT2, "--input", TOKENS[0], "--mode", "train", "--dim", "batch=2", "--dim", "seq=64",
                 "--parallel", "fsdp=2,tp=2", "--hw", "a100-80gb", "--checkpointing", "blocks", "--format", "json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    point = out["points"][0] if "points" in out else out
    assert point["parallel"]["world_size"] == 4 and point["parallel"]["global_batch"] == 4
    assert {"stage", "peak_memory_bytes", "memory", "compute_time_s", "communication_time_s",
            "exposed_communication_time_s"} <= set(point["ranks"][0])
    assert {c["group"] for c in point["communication"]} == {"fsdp", "tp"}
    assert point["step_time_s"] > 0 and point["tokens_per_s"] > 0 and point["mfu"] > 0


def test_bad_parallel_usage_is_exit_2(capsys):
    from costmodel.cli import main
    assert main(["analyze", GPT2, "--input", TOKENS[0], "--parallel", "fsdp=2"]) == 2     # inference
    assert "--mode train" in capsys.readouterr().err
