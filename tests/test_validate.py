"""Validation against real runs: measured peaks checked by an independent tracker (the CPU allocator's
events from the profiler), the predicted peak against the measured one, exponents, doubling ratios,
errors, OOM points, and every output (table, JSON, CSV, Markdown, plot, the command)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from costmodel import cli
from costmodel.hardware.calibrate import calibrate
from costmodel.errors import AnalysisError, UsageError
from costmodel.validate.engine import SERIES, ValidationResult, profiler_peak_bytes, validate
from costmodel.render.validation_plot import validation_figure, validation_plot
from tests.models import _hf, tiny_resnet

ROOT = Path(__file__).resolve().parent.parent
MODELS = str(ROOT / "tests" / "models.py")

# GPT-2 with SDPA attention, long enough for seq 1024.
gpt2_sdpa = _hf("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=1024)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Steps of these tiny models last milliseconds; on a CPU shared with other work, a second intra-op
    thread mostly waits for its partner at every barrier. One thread keeps the tests quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hw(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("hw") / "cpu.toml"
    calibrate("cpu", path, quick=True)
    return str(path)


@pytest.fixture(scope="module")
def transformer(hw) -> ValidationResult:
    return validate(gpt2_sdpa, ["input_ids:int64[batch,seq]"], dims={"batch": [1], "seq": [128, 256, 512, 1024]},
                    hardware=hw, repeats=2, progress=False, min_time_s=0)


@pytest.fixture(scope="module")
def convnet(hw) -> ValidationResult:
    return validate(tiny_resnet, ["pixel_values:float32[batch,3,size,size]"], dims={"batch": [2], "size": [32, 64, 128]},
                    hardware=hw, repeats=2, progress=False, min_time_s=0)


def _check_peaks(result: ValidationResult):
    for p in result.points:
        m = p.measured
        assert m["peak_memory_bytes"] == pytest.approx(m["independent_peak_memory_bytes"], rel=0.10), p
        assert abs(p.errors["measured_vs_independent_pct"]) <= 10, p
        # the memory model against the real run
        assert p.predicted["peak_memory_bytes"] == pytest.approx(m["peak_memory_bytes"], rel=0.10), p


def test_transformer_sdpa_over_seq(transformer):
    r = transformer
    assert [p.dims for p in r.points] == [{"batch": 1, "seq": s} for s in (128, 256, 512, 1024)]
    _check_peaks(r)
    for p in r.points:
        assert p.measured["time_s"] > 0 and p.predicted["time_s"] > 0 and p.predicted["flops"] > 0
        assert p.errors["time_pct"] == pytest.approx((p.predicted["time_s"] / p.measured["time_s"] - 1) * 100)
    assert r.swept == ["seq"]
    e = r.exponents["seq"]
    assert set(e) == set(SERIES)
    assert all(isinstance(v, float) and math.isfinite(v) for v in e.values()), e
    # FLOPs: linear layers (seq^1) plus attention scores (seq^2), so between 1 and 2
    assert 1.0 < e["flops"] < 2.0
    # peak: weights are constant, activations grow: below 1 overall but clearly growing
    assert 0.3 < e["memory"] < 1.5 and e["predicted_memory"] == pytest.approx(e["memory"], abs=0.1)
    assert r.classes["seq"]["flops"].startswith("O(seq")
    ratios = r.doubling_ratios["seq"]
    assert [(x["from"], x["to"]) for x in ratios] == [(128, 256), (256, 512), (512, 1024)]
    first = r.points[0].predicted["flops"], r.points[1].predicted["flops"]
    assert ratios[0]["flops"] == pytest.approx(first[1] / first[0])
    assert r.errors["time_mape"] == pytest.approx(sum(abs(p.errors["time_pct"]) for p in r.points) / 4)
    assert r.errors["peak_memory_mape"] <= 10
    assert r.errors["measured_vs_independent_max_pct"] <= 10
    assert r.errors["oom_points"] == 0
    # measured in glibc's settled heap (stats.settle_heap): what the step's memory pays in page faults besides
    assert all(p.measured["page_faults_per_step"] >= 0 for p in r.points)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_a_settled_heap_stops_a_fresh_process_faulting_its_heap_each_step():
    # a fresh process: freeing the first 2 MiB block sets glibc's trim threshold to 4 MiB, and a step
    # whose 16 MiB of 2 MiB tensors are all freed at its end hands them back to the kernel, to fault
    # in again next step; settle_heap raises the thresholds as a freed 32 MiB block does
    code = """
import torch
from costmodel.validate.stats import minor_faults, settle_heap
def step():
    tensors = [torch.ones(1 << 19) for _ in range(8)]
    del tensors
def faults_per_step():
    step()
    before = minor_faults()
    for _ in range(10):
        step()
    return (minor_faults() - before) / 10
fresh = faults_per_step()
settle_heap()
print(fresh, faults_per_step())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    fresh, settled = map(float, out.stdout.split())
    assert fresh > 200 and settled < 20, (fresh, settled)


def test_conv_net_over_image_size(convnet):
    r = convnet
    _check_peaks(r)
    e = r.exponents["size"]
    # every conv is linear in the pixel count: FLOPs ~ size^2; the activations too
    assert e["flops"] == pytest.approx(2.0, abs=0.1)
    assert r.classes["size"]["flops"] == "O(size^2)"
    assert e["predicted_memory"] > 1.0 and e["memory"] > 1.0


def test_train_step_is_the_contract_step(hw):
    # one steady-state AdamW step of an SDPA block: weights, grads and two moments resident at the peak
    r = validate(f"{MODELS}:sdpa_block", ["x:float32[batch,seq,32]"], dims={"batch": [2], "seq": [64, 128]},
                 mode="train", hardware=hw, repeats=1, progress=False, min_time_s=0)
    _check_peaks(r)
    params = sum(p.numel() for p in _sdpa_block().parameters()) * 4
    assert all(p.measured["peak_memory_bytes"] > 3 * params for p in r.points)   # weights + m + v at least


def _sdpa_block():
    from tests.models import sdpa_block
    return sdpa_block()


def test_contract_json(transformer):
    data = json.loads(transformer.to_json())
    assert {"points", "exponents", "errors", "doubling_ratios", "classes"} <= set(data)
    p = data["points"][0]
    assert set(p) == {"dims", "measured", "predicted", "errors"}
    assert {"time_s", "peak_memory_bytes"} <= set(p["measured"])
    assert set(p["predicted"]) == {"time_s", "peak_memory_bytes", "flops"}
    assert {"measured", "predicted", "flops", "memory"} <= set(data["exponents"]["seq"])
    assert {"time_mape", "peak_memory_mape"} <= set(data["errors"])


def test_table_markdown_csv(transformer):
    text = transformer.to_table()
    for needle in ("predicted", "Fitted exponents", "measured time", "O(seq", "128 -> 256", "time MAPE",
                   "peak memory MAPE", "allocator peak"):
        assert needle in text, needle
    assert transformer.to_table("github").count("|") > 20
    rows = transformer.to_csv().splitlines()
    assert rows[0].startswith("batch,seq,measured_time_s,measured_peak_memory_bytes")
    assert len(rows) == 5 and rows[1].startswith("1,128,")


def test_plot_files(transformer, convnet, tmp_path):
    for r, name in ((transformer, "t.png"), (convnet, "c.svg")):
        out = validation_plot(r, tmp_path / name)
        assert out.stat().st_size > 5000
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:2000]
    # the JSON form draws the same
    assert validation_plot(json.loads(transformer.to_json()), tmp_path / "j.png").stat().st_size > 5000


def _sweep(rows) -> dict:
    """A ValidationResult's dict for seq sweeps: (seq, measured s, predicted s, measured MiB, predicted MiB)."""
    mib = 2 ** 20
    return {"model": "gpt2", "mode": "inference", "dtype": "float32", "device": "cpu", "swept": ["seq"],
            "points": [{"dims": {"batch": 1, "seq": s}, "measured": {"time_s": t, "peak_memory_bytes": m * mib},
                        "predicted": {"time_s": pt, "peak_memory_bytes": pm * mib, "flops": 2.5e8 * s}, "errors": {}}
                       for s, t, pt, m, pm in rows],
            "exponents": {"seq": {"measured": _slope([(r[0], r[1]) for r in rows]), "predicted": None, "flops": None,
                                  "memory": _slope([(r[0], r[3]) for r in rows]), "predicted_memory": None}}}


def _slope(xy) -> float:
    """The least-squares slope of log y on log x, as the validator fits it."""
    lx, ly = [math.log(x) for x, _ in xy], [math.log(y) for _, y in xy]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _tick_labels(ax) -> list[str]:
    """The labelled major ticks inside the axis' view."""
    lo, hi = ax.get_ylim()
    return [t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi and t.get_text()]


def test_plot_ticks_on_a_range_short_of_a_decade():
    """The README's GPT-2 run: peaks from 500 to 674 MiB (a factor 1.35) and times from 0.8 to 5.7 s."""
    fig = validation_figure(_sweep([(128, .804, .628, 500, 500), (256, 1.36, 1.28, 525, 525),
                                    (512, 2.98, 2.67, 574, 574), (1024, 5.66, 5.79, 674, 674)]))
    fig.canvas.draw()
    time_ax, memory_ax = fig.axes
    assert _tick_labels(memory_ax) == ["500 MiB", "550 MiB", "600 MiB", "650 MiB"]   # steps of 50: (674 - 500) / 3 = 58
    assert _tick_labels(time_ax) == ["1 s", "2 s", "5 s"]
    assert [t.get_text() for t in memory_ax.get_xticklabels()] == ["128", "256", "512", "1024"]  # the sizes that ran
    assert [t.get_text() for t in memory_ax.get_legend().get_texts()] == ["measured peak, k=0.14", "predicted peak"]


@pytest.mark.parametrize("peaks, labels", [
    ((100.0, 100.2, 100.4, 100.6), ["100 MiB", "100.2 MiB", "100.4 MiB", "100.6 MiB"]),  # flat: 0.6 MiB apart
    ((3, 30, 300, 3000), ["4 MiB", "16 MiB", "64 MiB", "256 MiB", "1 GiB"]),             # 3 decades: powers of 4
])
def test_plot_memory_ticks_from_flat_to_wide(peaks, labels):
    fig = validation_figure(_sweep([(2 ** (7 + i), 0.01 * 2 ** i, 0.01 * 2 ** i, m, m) for i, m in enumerate(peaks)]))
    fig.canvas.draw()
    got = _tick_labels(fig.axes[1])
    assert len(got) >= 3 and set(labels) <= set(got), got


class OOMAbove(nn.Module):
    """Runs out of memory (simulated) when the sequence is longer than `limit`."""

    def __init__(self, limit: int = 64):
        super().__init__()
        self.limit = limit
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.device.type != "meta" and x.shape[1] > self.limit:   # only the real run, not the capture
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return self.lin(x)


def test_out_of_memory_is_a_measured_point(hw, tmp_path):
    r = validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": [16, 32, 64, 128]},
                 hardware=hw, repeats=1, progress=False, min_time_s=0, cross_check=False)
    last = r.points[-1]
    assert last.measured == {"oom": True, "error": "CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"}
    assert last.predicted["peak_memory_bytes"] > 0                 # set against the prediction
    assert last.errors["predicted_oom"] is False                   # the memory model said it fits
    assert r.errors["oom_points"] == 1 and r.errors["time_mape"] is not None
    assert r.exponents["seq"]["measured"] is not None              # fitted over the three that ran
    assert r.doubling_ratios["seq"][-1]["measured"] is None
    assert "OOM" in r.to_table() and "predicted to fit" in r.to_table()
    assert json.loads(r.to_json())["points"][-1]["measured"]["oom"] is True
    validation_plot(r, tmp_path / "oom.png")


class FailsAbove(OOMAbove):
    def forward(self, x):
        if x.device.type != "meta" and x.shape[1] > self.limit:
            raise ValueError("shape not supported")
        return self.lin(x)


def test_other_failures_name_the_point(hw):
    with pytest.raises(AnalysisError, match=r"seq=128 on cpu failed: ValueError: shape not supported"):
        validate(FailsAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": [16, 128]}, hardware=hw,
                 repeats=1, progress=False, min_time_s=0)


def test_no_sweep_no_exponents(hw):
    r = validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": 2, "seq": 8}, hardware=hw, repeats=1,
                 progress=False, min_time_s=0)
    assert r.swept == [] and r.exponents == {} and len(r.points) == 1
    assert "Fitted exponents" not in r.to_table()


def test_two_swept_dims_fit_jointly(hw):
    # Linear(8, 8) on [batch, seq, 8]: FLOPs = 2 * 8 * 8 * batch * seq (+ bias): exponent 1 in each
    r = validate(lambda: OOMAbove(limit=10**9), ["x:float32[batch,seq,8]"], dims={"batch": [1, 2], "seq": [16, 64]},
                 hardware=hw, repeats=1, progress=False, min_time_s=0, cross_check=False)
    assert len(r.points) == 4
    assert r.exponents["batch"]["flops"] == pytest.approx(1.0, abs=0.05)
    assert r.exponents["seq"]["flops"] == pytest.approx(1.0, abs=0.05)
    assert {row["at"]["seq"] for row in r.doubling_ratios["batch"]} == {16, 64}


class SlowWhileDisturbed(nn.Module):
    """A linear layer whose forward also burns CPU time while `disturbed` is set: another tenant."""
    disturbed = False

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if SlowWhileDisturbed.disturbed and x.device.type != "meta":
            start = time.thread_time()
            while time.thread_time() - start < 0.02:
                pass
        return self.lin(x)


def test_the_timing_is_spread_over_passes_and_a_disturbed_pass_is_outvoted(hw, monkeypatch):
    from costmodel.validate import engine
    again = engine._Runner.time_again
    passes = []

    def time_again(self, *args, **kwargs):   # the machine is disturbed during the second pass only
        passes.append(1)
        SlowWhileDisturbed.disturbed = len(passes) <= 2
        try:
            again(self, *args, **kwargs)
        finally:
            SlowWhileDisturbed.disturbed = False

    monkeypatch.setattr(engine._Runner, "time_again", time_again)
    r = validate(SlowWhileDisturbed, ["x:float32[batch,8]"], dims={"batch": [1, 2]}, hardware=hw, repeats=6,
                 rounds=3, progress=False, min_time_s=0, cross_check=False)
    assert r.rounds == 3 and json.loads(r.to_json())["rounds"] == 3
    assert len(passes) == 4                                  # two more passes over two points
    for p in r.points:
        m = p.measured
        assert len(m["pass_times_s"]) == 3 and m["samples"] >= 6
        assert m["pass_times_s"][1] > 0.02 > max(m["pass_times_s"][0], m["pass_times_s"][2])
        assert m["time_s"] < 0.01                            # four of six steps ran undisturbed
        assert m["time_min_s"] == min(m["time_min_s"], *m["pass_times_s"])
    # no more passes than timed steps; one pass when asked
    assert validate(SlowWhileDisturbed, ["x:float32[batch,8]"], dims={"batch": 2}, hardware=hw, repeats=2,
                    progress=False, min_time_s=0, cross_check=False).rounds == 2
    one = validate(SlowWhileDisturbed, ["x:float32[batch,8]"], dims={"batch": 2}, hardware=hw, repeats=2, rounds=1,
                   progress=False, min_time_s=0, cross_check=False)
    assert one.rounds == 1 and len(one.points[0].measured["pass_times_s"]) == 1
    with pytest.raises(UsageError, match="--rounds must be >= 1; got 0"):
        validate(SlowWhileDisturbed, ["x:float32[batch,8]"], dims={"batch": 2}, hardware=hw, rounds=0)


def test_usage_errors(hw):
    with pytest.raises(UsageError, match="accepted: cpu, cuda"):
        validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": [8]}, device="tpu")
    with pytest.raises(UsageError, match="has none"):
        validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": []}, hardware=hw)
    with pytest.raises(UsageError, match="repeats"):
        validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": [8]}, hardware=hw, repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA device"):
            validate(OOMAbove, ["x:float32[batch,seq,8]"], dims={"batch": [1], "seq": [8]}, device="cuda")


def test_profiler_peak_is_the_allocator_view():
    x = torch.zeros(1024)                                   # 4096 bytes, resident

    def fn():
        y = x + 1                                          # +4096
        z = y * 2                                          # +4096
        return z.sum()
    assert profiler_peak_bytes(fn, [x]) >= 3 * 4096
    assert profiler_peak_bytes(fn, [x]) < 3 * 4096 + 1024


# --- the command -----------------------------------------------------------------------------------

def test_cli_json_and_plot(hw, tmp_path, capsys):
    plot = tmp_path / "v.png"
    code = cli.main(["validate", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dim", "batch=2",
                     "--dim", "seq=32,64", "--device", "cpu", "--hw", hw, "--repeats", "1", "--format", "json",
                     "--plot", str(plot)])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert [p["dims"]["seq"] for p in data["points"]] == [32, 64]
    assert data["exponents"]["seq"]["flops"] > 0.9
    assert plot.stat().st_size > 5000


def test_cli_table(hw, capsys):
    code = cli.main(["validate", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dim", "batch=1",
                     "--dim", "seq=16,32", "--device", "cpu", "--hw", hw, "--repeats", "1", "--mode", "train"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sdpa_block (train, float32) on cpu" in out.out and "Fitted exponents" in out.out
    assert "USDT" not in out.err                               # the profiler's native log is kept quiet


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu", "--dim", "seq=8,16"], "invalid choice: 'tpu' (choose from 'cuda', 'cpu')"),
    (["--device", "cpu"], "--dim NAME=V1,V2"),
    (["--device", "cpu", "--dim", "seq=8,16", "--format", "xml"], "invalid choice: 'xml'"),
    (["--device", "cpu", "--dim", "seq=8,16", "--plot", "out.xyz"], "cannot write '.xyz'"),
    (["--device", "cpu", "--dim", "seq=8,16", "--plot", "/no/such/dir/v.png"], "does not exist"),
])
def test_cli_usage_errors(argv, message, capsys):
    code = cli.main(["validate", f"{MODELS}:sdpa_block", "--input", "x:float32[batch,seq,32]", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_validate_command_progress_off_for_json(monkeypatch, hw):
    seen = {}
    import costmodel.validate.engine as v

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise UsageError("stop")
    monkeypatch.setattr(v, "validate", fake)
    args = cli.build_parser().parse_args(["validate", "m.py:f", "--device", "cpu", "--dim", "seq=1,2",
                                          "--format", "json"])
    with pytest.raises(UsageError):
        cli.cmd_validate(args)
    assert seen["progress"] is False and seen["dims"] == {"seq": [1, 2]}


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from costmodel.validate.engine import _progress
    assert _progress(3, "x", enabled=False) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert _progress(3, "x", enabled=True) is None


def test_calibration_is_cached_per_session(monkeypatch, tmp_path):
    import costmodel.validate.engine as v
    calls = []

    def fake_calibrate(device, out_path=None, **kw):
        calls.append(device)
        return calibrate(device, out_path, quick=True)
    monkeypatch.setattr("costmodel.hardware.calibrate.calibrate_apart", fake_calibrate)
    monkeypatch.setattr(v.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(v, "_CALIBRATED", {})
    a = v.calibrated_hardware("cpu")
    monkeypatch.setattr(v, "_CALIBRATED", {})            # a new process in the same session: the file
    b = v.calibrated_hardware("cpu")
    assert calls == ["cpu"] and a.peak_flops_per_s == b.peak_flops_per_s
    assert list(tmp_path.rglob("calibrated-cpu-*.toml"))


# --- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_validation_bf16_train():
    r = validate(gpt2_sdpa, ["input_ids:int64[batch,seq]"], dims={"batch": [4], "seq": [256, 512, 1024]},
                 device="cuda", dtype="bfloat16", mode="train", hardware="h100-sxm", repeats=3, progress=False, min_time_s=0)
    for p in r.points:
        assert p.measured["time_s"] > 0
        assert p.predicted["peak_memory_bytes"] == pytest.approx(p.measured["peak_memory_bytes"], rel=0.25), p
    assert r.exponents["seq"]["memory"] > 0


def test_gpu_check_dry_run(tmp_path, monkeypatch, capsys):
    """scripts/gpu_check.py's pipeline on the CPU (its --dry-run, here with one tiny run to keep the
    test short): the JSON, the Markdown report and one PDF of plots appear (at most 8 files, as the
    device tool brings back); a failing run is recorded."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)     # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "dry_plan", lambda: [
        gpu_check.Run("linear", OOMAbove, {"batch": [1], "seq": [8, 16]}, inputs=["x:float32[batch,seq,8]"],
                      dtype="float32"),
        gpu_check.Run("broken", FailsAbove, {"batch": [1], "seq": [8, 128]}, inputs=["x:float32[batch,seq,8]"],
                      dtype="float32")])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    linear, broken = data["runs"]
    assert [p["dims"]["seq"] for p in linear["result"]["points"]] == [8, 16]
    assert "shape not supported" in broken["error"]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| linear" in report and "shape not supported" in report
    assert (tmp_path / "gpu_check_plots.pdf").read_bytes().startswith(b"%PDF")
    assert len(list(tmp_path.iterdir())) <= 8
    assert "| linear" in capsys.readouterr().out


def test_validate_times_this_cpu_against_the_calibration_that_prices_it(transformer):
    calibration = transformer.environment["calibration"]
    assert calibration["threads"] == 1 and calibration["path"].endswith("cpu.toml")
    speed = calibration["machine_vs_calibration"]
    assert set(speed) == {"matmul", "add", "copy", "small"}
    # the probes are what the calibration measured, on the same machine minutes later: near 1, not 10x off
    assert all(0.2 < v < 5 for v in speed.values()), speed
    assert "this CPU against it: matmul" in transformer.to_table()
    assert json.loads(transformer.to_json())["environment"]["calibration"]["machine_vs_calibration"] == speed


def test_a_stale_or_foreign_calibration_is_named_in_a_warning(hw, monkeypatch):
    import costmodel.hardware.calibrate as calibrate_module
    from costmodel.hardware.catalog import load_hardware
    from costmodel.validate.engine import _calibration_check
    measured = load_hardware(hw)
    monkeypatch.setattr(calibrate_module, "machine_speed", lambda _hw: {"matmul": 1.02, "add": 0.98, "copy": 0.61,
                                                                         "small": 1.3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _calibration_check(measured, "cpu")
    said = [str(w.message) for w in caught]
    assert out["machine_vs_calibration"]["copy"] == 0.61
    assert len(said) == 1 and "copy 0.61x, small 1.30x" in said[0] and hw in said[0], said
    assert "matmul" not in said[0]

    monkeypatch.setattr(calibrate_module, "machine_speed", lambda _hw: {"matmul": 1.0})
    other = dataclasses.replace(measured, threads=4, description="Some Other CPU (64 logical CPUs), measured")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calibration_check(other, "cpu")
    said = " | ".join(str(w.message) for w in caught)
    assert "calibrated at 4 CPU threads and this run uses 1" in said and "OMP_NUM_THREADS=1" in said
    assert "calibrated on Some Other CPU (64 logical CPUs); this machine is" in said
    # a catalog device is another machine on purpose: nothing to check
    assert _calibration_check(load_hardware("h100-sxm"), "cpu") is None
