"""Generate mode: the prefill and the decode step captured with the model's own KV cache, the decode
step summed over its context in closed form, checked against PyTorch running the same generation:
FlopCounterMode's count of the real greedy loop, the cache's real tensor bytes after it, the live
storage meter's peak over it; the roofline of the decode steps; the CLI's contract JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

import costmodel
from costmodel import cli
from costmodel.capture import generate as gen
from costmodel.errors import AnalysisError, UsageError
from costmodel.hardware.catalog import load_hardware
from costmodel.hardware.roofline import op_time, op_times
from costmodel.symbols import symbols_for
from costmodel.validate.meters import measure_generation
from tests.models import _hf

ROOT = Path(__file__).resolve().parent.parent
MODELS = str(ROOT / "tests" / "models.py")
batch, prompt, gen_ = symbols_for("batch", "prompt", "gen")

# The three decoders of the issue, with eager attention: FlopCounterMode counts their attention
# matmuls on the CPU (it counts CPU SDPA as 0).
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512)
DECODERS = {
    "llama-gqa": _hf("LlamaForCausalLM", "LlamaConfig", attention="eager", **LLAMA),
    "gpt2": _hf("GPT2LMHeadModel", "GPT2Config", attention="eager", n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                n_positions=512),
    "mistral-window-8": _hf("MistralForCausalLM", "MistralConfig", attention="eager", sliding_window=8, **LLAMA),
}
# (batch, prompt, gen): inside the window of 8, and a prompt past it with a generation that runs on
POINTS = [(2, 5, 7), (1, 12, 20)]


@pytest.fixture(scope="module")
def reports():
    return {name: costmodel.analyze(f, mode="generate", device="cpu") for name, f in DECODERS.items()}


def real_generation(model, b: int, p: int, g: int, device: str = "cpu", kv_dtype=None):
    """The greedy loop, as validate runs it: prefill, then g decode steps; returns (FLOPs, cache)."""
    ids = torch.randint(0, 256, (b, p), device=device)
    cache = gen.new_cache(model, kv_dtype)
    kwargs = gen.call_kwargs(model, cache)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tokens = ids
        for _ in range(g + 1):
            tokens = model(input_ids=tokens, **kwargs).logits[:, -1:].argmax(-1)
    return counter.get_total_flops(), cache


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in gen.cache_tensors(cache))


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("point", POINTS)
def test_whole_generation_matmul_flops_and_cache_against_pytorch(reports, name, point):
    """matmul_flops of the whole generation == FlopCounterMode over the real loop; kv_cache_bytes ==
    the bytes of the cache's tensors after it; the symbolic formulas give the point's figures."""
    b, p, g = point
    report = reports[name]
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    flops, cache = real_generation(model, b, p, g)
    result = report.evaluate(batch=b, prompt=p, gen=g)
    assert result.totals["matmul_flops"] == flops
    assert result.extra["generate"]["kv_cache_bytes"] == cache_bytes(cache)
    at = {batch: b, prompt: p, gen_: g}
    sym = report.symbolic
    assert int(sym.matmul_flops.xreplace(at)) == flops
    assert int(sym.kv_cache_bytes.xreplace(at)) == cache_bytes(cache)
    assert int(sym.flops.xreplace(at)) == result.totals["flops"]
    assert result.totals["flops"] == result.extra["generate"]["prefill"]["flops"] + result.extra["generate"]["decode"]["flops"]


def test_decode_sum_closed_form(reports):
    """The decode steps' attention, summed over ctx = prompt .. prompt + gen - 1 in closed form: per
    layer and step, Q K^T and P V each cost 2 * 4 heads * 16 * (ctx + 1) FLOPs per sequence; over 2
    layers, 2 * 2 * 2 * 4 * 16 = 512 per token of context, and sum_{ctx} (ctx + 1) = gen * prompt
    + gen * (gen + 1) / 2: 512 * batch * gen * prompt + 256 * batch * gen**2 + ..."""
    mm = sympy.Poly(reports["llama-gqa"].symbolic.matmul_flops, batch, prompt, gen_)
    assert mm.coeff_monomial(batch * gen_ * prompt) == 512
    assert mm.coeff_monomial(batch * gen_ ** 2) == 256
    # the cache: 2 layers x (keys, values) x 2 KV heads (GQA: 4 query heads share them) x 16 x 4 bytes
    assert sympy.expand(reports["llama-gqa"].symbolic.kv_cache_bytes - 512 * batch * (prompt + gen_)) == 0
    assert sympy.expand(reports["gpt2"].symbolic.kv_cache_bytes - 1024 * batch * (prompt + gen_)) == 0  # 4 heads


def test_sliding_window_caps_the_cache(reports):
    """A window of 8: the cache keeps the last 7 tokens per layer, 2 layers x 2 x 2 heads x 7 x 16 x 4
    bytes = 3584 per sequence however long the generation; the decode step changes form as the window
    fills, so it is captured in pieces over ctx, the last one open-ended."""
    report = reports["mistral-window-8"]
    pieces = report.decode_pieces
    assert pieces[0][0] == 2 and pieces[-1][1] is None and len(pieces) >= 2
    assert all(a[1] + 1 == b[0] for a, b in zip(pieces, pieces[1:]))
    assert report.evaluate(batch=3, prompt=12, gen=100).extra["generate"]["kv_cache_bytes"] == 3 * 3584
    assert report.evaluate(batch=1, prompt=2, gen=3).extra["generate"]["kv_cache_bytes"] == 512 * 5


@pytest.mark.parametrize("name", ["tiny_llama_gqa", "tiny_gpt2", "tiny_mistral_window"])
def test_peak_over_the_generation_against_the_meter(name):
    """The peak over prefill and decode steps against the live-storage meter over the real loop: a
    prompt-heavy point (the prefill's peak) and a generation-heavy one (the last decode step's, the
    cache at its largest)."""
    import tests.models as models
    factory = getattr(models, name)
    report = costmodel.analyze(factory, mode="generate", device="cpu")
    torch.manual_seed(0)
    model = factory()
    for b, p, g in [(1, 200, 8), (4, 8, 40)]:
        measured = measure_generation(model, ["input_ids:int64[batch,prompt]"], {"batch": b, "prompt": p, "gen": g})
        point = report.evaluate(batch=b, prompt=p, gen=g)
        assert point.totals["peak_memory_bytes"] == pytest.approx(measured.peak_bytes, rel=0.02), (b, p, g)
    # the generation-heavy point peaks in a decode step (not for the window, whose cache stays small)
    if name != "tiny_mistral_window":
        assert point.extra["memory"]["at"]["phase"].startswith("decode")


def test_kv_dtype(reports):
    """--kv-dtype bfloat16 with a float32 model: the cache stores 2 bytes per element (half of 512 *
    batch * tokens), dequantised on read; the real cache after the same loop agrees."""
    f = DECODERS["llama-gqa"]
    report = costmodel.analyze(f, mode="generate", device="cpu", kv_dtype="bfloat16")
    assert sympy.expand(report.symbolic.kv_cache_bytes - 256 * batch * (prompt + gen_)) == 0
    model = f().eval()
    flops, cache = real_generation(model, 2, 5, 7, kv_dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in gen.cache_tensors(cache))
    point = report.evaluate(batch=2, prompt=5, gen=7)
    assert point.extra["generate"]["kv_cache_bytes"] == cache_bytes(cache) == 256 * 2 * 12
    assert point.totals["matmul_flops"] == flops


def test_decode_is_memory_bound_on_the_roofline(reports):
    """At batch 1 every decode step streams the weights for one token (intensity about 1 FLOP per
    byte in float32 matmuls): memory-bound on an A100; the step reads the whole cache, so the last
    step takes at least as long as the first; tokens/s = batch * gen / the decode time."""
    point = reports["llama-gqa"].evaluate(batch=1, prompt=64, gen=32)
    point.apply_timing(load_hardware("a100-80gb"))
    g = point.extra["generate"]
    assert point.decode_memory_bound_share > 0.9
    assert g["decode"]["last_token_time_s"] >= g["decode"]["first_token_time_s"] > 0
    assert g["tokens_per_s"] == pytest.approx(1 * 32 / g["decode"]["time_s"])
    assert g["time_to_first_token_s"] == g["prefill"]["time_s"]
    assert point.totals["time_s"] == pytest.approx(g["prefill"]["time_s"] + g["decode"]["time_s"])
    decode_ops = [op for op in point.ops if op["phase"] == "decode" and op["category"] == "matmul"]
    assert decode_ops and all(op["bound"] == "memory" for op in decode_ops)


def test_repeated_blocks_give_the_inline_result():
    """A decoder layer given the KV cache writes it (the cache's update), which a copied block would
    not: capture.blocks traces such layers inline, on the cache as it was. The generation's formulas,
    peak and cache bytes equal those of a capture with every block traced (repeated_blocks=False)."""
    f = _hf("LlamaForCausalLM", "LlamaConfig", **{**LLAMA, "num_hidden_layers": 3})
    repeated, inline = (costmodel.analyze(f, mode="generate", device="cpu", repeated_blocks=rb) for rb in (True, False))
    for name in ("flops", "matmul_flops", "bytes", "peak_memory_bytes", "kv_cache_bytes"):
        assert sympy.simplify(getattr(repeated.symbolic, name) - getattr(inline.symbolic, name)) == 0, name
    for r in (repeated, inline):
        assert not r.primary.captured.copied and not r.decode.primary.captured.copied
    for c in (repeated.primary.captured, repeated.decode.primary.captured):     # and say why
        assert set(c.inline_blocks) == {f"model.layers.{i}" for i in range(3)}
        assert all("KV cache" in why for why in c.inline_blocks.values()), c.inline_blocks
    a, b = repeated.evaluate(batch=3, prompt=20, gen=9), inline.evaluate(batch=3, prompt=20, gen=9)
    assert a.totals == b.totals and a.extra["generate"] == b.extra["generate"]
    assert a.extra["generate"]["kv_cache_bytes"] == 3 * 768 * 29      # 3 layers x 256 bytes per token


def test_vectorised_roofline_is_op_time():
    hw = load_hardware("a100-80gb")
    flops = [0, 10, 2 * 8192 ** 3, 1e6, 0, 3e9]
    nbytes = [0, 100, 3 * 8192 ** 2 * 2, 1e3, 5e5, 4e6]
    t = op_times(flops, nbytes, "matmul", "bfloat16", hw)
    for i, (f, b) in enumerate(zip(flops, nbytes)):
        one = op_time(f, b, "matmul", "bfloat16", hw)
        assert t["time_s"][i] == pytest.approx(one.time_s, rel=1e-12)
        assert t["compute_time_s"][i] == pytest.approx(one.compute_time_s, rel=1e-12)
        assert bool(t["memory_bound"][i]) == (one.bound == "memory")


def test_models_without_a_cache_are_refused():
    with pytest.raises(UsageError, match="takes no `cache` or `past_key_values`"):
        costmodel.analyze(f"{MODELS}:sdpa_block", inputs=["input_ids:int64[batch,prompt]"], mode="generate")
    with pytest.raises(UsageError, match="encoder-decoder"):
        costmodel.analyze(f"{MODELS}:tiny_t5", mode="generate")
    with pytest.raises(AnalysisError, match="filled no key/value cache"):
        costmodel.analyze(f"{MODELS}:tiny_bert", mode="generate")
    with pytest.raises(UsageError, match="--kv-dtype .* takes --mode generate"):
        costmodel.analyze(f"{MODELS}:tiny_llama_gqa", kv_dtype="bfloat16")
    with pytest.raises(UsageError, match=r"one token input NAME:int64\[batch,prompt\]"):
        costmodel.analyze(f"{MODELS}:tiny_llama_gqa", inputs=["input_ids:int64[batch,seq]"], mode="generate")


def test_cli_json_has_the_contract_keys(capsys):
    code = cli.main(["analyze", f"{MODELS}:tiny_llama_gqa", "--mode", "generate", "--dim", "batch=2",
                     "--dim", "prompt=16", "--dim", "gen=8", "--hw", "a100-80gb", "--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    g = data["generate"]
    assert set(g) == {"prefill", "decode", "kv_cache_bytes", "time_to_first_token_s", "tokens_per_s"}
    assert set(g["prefill"]) == {"flops", "bytes", "time_s"}
    assert set(g["decode"]) == {"flops", "bytes", "time_s", "first_token_time_s", "last_token_time_s"}
    assert g["kv_cache_bytes"] == 512 * 2 * (16 + 8)          # 512 bytes per token per sequence
    kv = sympy.sympify(data["symbolic"]["kv_cache_bytes"], locals={"batch": batch, "prompt": prompt, "gen": gen_})
    assert sympy.expand(kv - 512 * batch * (prompt + gen_)) == 0
    assert data["totals"]["flops"] == g["prefill"]["flops"] + g["decode"]["flops"]
    assert data["mode"] == "generate" and data["dims"] == {"batch": 2, "prompt": 16, "gen": 8}


def test_cli_fit_generate(capsys):
    """fit --max gen stops at the context the config declares (prompt + gen <= 512), and says how far
    memory alone would go; fit --max batch is bounded by memory."""
    code = cli.main(["fit", f"{MODELS}:tiny_llama_gqa", "--mode", "generate", "--hw", "a100-80gb", "--max", "gen",
                     "--dim", "batch=1", "--dim", "prompt=32", "--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["max"] == {"gen": 480} and data["limit"]["kind"] == "model"      # 512 - 32
    code = cli.main(["fit", f"{MODELS}:tiny_llama_gqa", "--mode", "generate", "--hw", "a100-80gb", "--max", "batch",
                     "--dim", "prompt=32", "--dim", "gen=64", "--capacity", "10MiB"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "largest batch that fits" in out.out


def test_decode_steps_on_a_calibrated_device_are_priced_as_a_forward(reports, monkeypatch):
    """With measured kernel tables each decode step is the step's own Point priced from the tables
    (cold weights, module calls); past MAX_TIMED_STEPS steps the rest are linear in ctx between the
    priced ones."""
    from costmodel import generation
    from costmodel.hardware.catalog import Hardware
    from costmodel.hardware.kernels import KernelTable
    tables = {"matmul:float32": KernelTable("matmul", "float32", 3e-6, (1e4, 1e8), (1e11, 1e12),
                                            {"m": ((1.0, 0.3), (64.0, 1.0))}),
              "matmul.streamed:float32": KernelTable("matmul.streamed", "float32", 3e-6, (1.0, 4.0), (5e9, 2e10),
                                                     by="m"),
              "attention:float32": KernelTable("attention", "float32", 8e-6, (1e3, 1e8), (1e9, 2e10)),
              "pointwise": KernelTable("pointwise", None, 2e-6, (1e3, 1e7), (1e9, 1e10)),
              "view": KernelTable("view", None, 5e-7), "module": KernelTable("module", None, 1e-6)}
    # a slow memory: the decode step's products are bound by reading their weights
    hw = Hardware("cpu-tables", 1 << 34, 1e9, {"float32": 5e10}, kernels=tables, cache_bytes=1 << 14, calibrated=True)
    report = reports["llama-gqa"]
    p = report.evaluate(batch=2, prompt=5, gen=7)
    d = p.decode_timing(hw)
    steps = report.steps
    for i, ctx in enumerate(range(5, 12)):
        point = steps.step_point(p.pieces[0][2], 2, ctx)
        assert d.step_time_s[i] == pytest.approx(point.timing(hw)["summary"].time_s, rel=1e-9), ctx
    assert {t.kernel for t in d.op_times[0] if t.kernel and t.kernel.startswith("matmul")} == {"matmul.streamed"}
    t = p.timing(hw)
    assert t["summary"].time_s == pytest.approx(t["prefill"].time_s + d.time_s, rel=1e-9)
    # priced at 3 contexts only: the ends exact, the middle linear between them
    monkeypatch.setattr(generation, "MAX_TIMED_STEPS", 3)
    few = report.evaluate(batch=2, prompt=5, gen=7).decode_timing(hw)
    assert few.step_time_s[0] == pytest.approx(d.step_time_s[0])
    assert few.step_time_s[-1] == pytest.approx(d.step_time_s[-1])
    assert few.step_time_s[1] == pytest.approx((2 * few.step_time_s[0] + few.step_time_s[3]) / 3)
