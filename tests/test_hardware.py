"""The device catalog: every file loads with a source per figure; lookups and user files fail clearly."""

import json
import tomllib
from pathlib import Path

import pytest

from costmodel.errors import UsageError
from costmodel.hardware.catalog import DTYPES, list_hardware, load_hardware, parse_hardware_list

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ("v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "a100-80gb-pcie", "h100-sxm",
           "h100-pcie", "h200", "l4", "t4", "a10g", "rtx-4090", "mi300x")
GIB = 1024**3

VALID = """
name = "my-gpu"
memory_bytes = 17_179_869_184
bandwidth_bytes_per_s = 1e12
[peak_flops_per_s]
float32 = 20e12
bfloat16 = 200e12
"""


def test_catalog_has_every_device():
    assert sorted(h.name for h in list_hardware()) == sorted(CATALOG)


@pytest.mark.parametrize("name", CATALOG)
def test_every_figure_has_a_source(name):
    hw = load_hardware(name)
    figures = ["memory_bytes", "bandwidth_bytes_per_s", "kernel_overhead_s"]
    figures += [f"peak_flops_per_s.{d}" for d in hw.peak_flops_per_s]
    figures += [f"efficiency.{k}" for k in hw.efficiency]
    for figure in figures:
        assert hw.sources.get(figure, "").strip(), f"{name}: no source for {figure}"
    assert "float32" in hw.peak_flops_per_s
    assert set(hw.peak_flops_per_s) <= set(DTYPES)
    # Capacity convention: a datasheet's "N GB" of device memory is N GiB.
    assert hw.memory_bytes % GIB == 0, hw.memory_bytes
    assert not hw.calibrated


@pytest.mark.parametrize("name", CATALOG)
def test_tensor_peaks_exceed_the_vector_peak(name):
    # Dense tensor-core rates are at least the CUDA-core float32 rate; storing a 2:4-sparse
    # figure by mistake would make bf16 4x (not 2x) tf32 on NVIDIA parts, which we check too.
    peaks = load_hardware(name).peak_flops_per_s
    for dtype, peak in peaks.items():
        assert peak >= peaks["float32"], (dtype, peak)
    if "tf32" in peaks and "bfloat16" in peaks:
        assert peaks["bfloat16"] == pytest.approx(2 * peaks["tf32"], rel=0.01)


def test_a100_80gb_figures():
    hw = load_hardware("a100-80gb")
    assert hw.memory_bytes == 80 * GIB                   # 80 * 1024**3 = 85_899_345_920
    assert hw.bandwidth_bytes_per_s == 2.039e12
    assert hw.peak_flops_per_s["bfloat16"] == 312e12      # dense; 624e12 is the sparse figure
    assert hw.ridge_point("bfloat16") == pytest.approx(153.0, abs=0.05)   # 312e12 / 2.039e12 = 153.02
    assert hw.ridge_point("float32") == pytest.approx(9.56, abs=0.01)     # 19.5e12 / 2.039e12 = 9.563


def test_h100_and_h200_store_dense_peaks():
    h100, h200 = load_hardware("h100-sxm"), load_hardware("h200")
    assert h100.peak_flops_per_s["bfloat16"] == 989.4e12   # datasheet headline 1,979 is sparse
    assert h200.peak_flops_per_s == h100.peak_flops_per_s | {"float32": 67e12}  # same die
    assert h200.bandwidth_bytes_per_s == 4.8e12
    assert h200.memory_bytes == 141 * GIB
    assert h200.ridge_point("bfloat16") == pytest.approx(206.1, abs=0.05)  # 989.4e12 / 4.8e12 = 206.125


def test_chips_without_a_dtype_leave_it_out():
    v100 = load_hardware("v100-32gb")
    assert set(v100.peak_flops_per_s) == {"float32", "float16"}
    with pytest.raises(UsageError, match="v100-32gb has no bfloat16 peak; it has float32, float16"):
        v100.peak_for("bfloat16")


def test_peak_for_tf32_and_aliases():
    hw = load_hardware("a100-80gb")
    assert hw.peak_for("float32") == 19.5e12
    assert hw.peak_for("float32", tf32=True) == 156e12
    assert hw.peak_for("torch.bfloat16") == hw.peak_for("bf16") == 312e12
    # A chip without tf32 runs float32 matmuls on CUDA cores even when tf32 is allowed.
    assert load_hardware("t4").peak_for("float32", tf32=True) == 8.1e12


def test_to_dict_has_contract_keys():
    d = json.loads(json.dumps(load_hardware("a100-80gb").to_dict()))
    for key in ("name", "memory_bytes", "bandwidth_bytes_per_s", "peak_flops_per_s", "ridge_point"):
        assert key in d
    assert set(d["ridge_point"]) == set(d["peak_flops_per_s"]) == {"float32", "tf32", "bfloat16", "float16"}
    assert d["ridge_point"]["bfloat16"] == pytest.approx(312e12 / 2.039e12)


def test_names_are_case_insensitive():
    assert load_hardware("A100-80GB") == load_hardware("a100-80gb")
    assert [h.name for h in parse_hardware_list(" a100-80gb, H100-SXM ,a100-80gb")] == ["a100-80gb", "h100-sxm"]


def test_unknown_device_lists_names_and_suggests_nearest():
    with pytest.raises(UsageError) as e:
        load_hardware("a100")
    message = str(e.value)
    assert message.startswith("unknown hardware 'a100' (did you mean a100-40gb, a100-80gb or a100-80gb-pcie?)")
    assert all(name in message for name in CATALOG)
    with pytest.raises(UsageError, match=r"did you mean rtx-4090\?"):
        load_hardware("rtx4090")
    with pytest.raises(UsageError, match="unknown hardware 'h100'"):
        parse_hardware_list("a100-80gb,h100")
    with pytest.raises(UsageError, match="expected one or more devices"):
        parse_hardware_list(" , ")


def test_user_toml_loads(tmp_path):
    path = tmp_path / "my-gpu.toml"
    path.write_text(VALID)
    hw = load_hardware(str(path))
    assert (hw.name, hw.memory_bytes, hw.path) == ("my-gpu", 16 * GIB, str(path))
    assert hw.kernel_overhead_s == 5e-6                   # the default when the file has none
    assert hw.ridge_point("bfloat16") == 200.0            # 200e12 / 1e12
    assert parse_hardware_list(f"a100-80gb,{path}")[1] == hw


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("memory_bytes = 17_179_869_184\n", ""),
     "missing field 'memory_bytes'; required: memory_bytes, bandwidth_bytes_per_s, peak_flops_per_s"),
    (lambda t: t.replace("bandwidth_bytes_per_s = 1e12", "bandwidth_bytes_per_s = -1e12"),
     "'bandwidth_bytes_per_s' must be a positive number, got -1000000000000.0"),
    (lambda t: t.replace("bandwidth_bytes_per_s", "bandwith_bytes_per_s"),
     "unknown field 'bandwith_bytes_per_s' \\(did you mean bandwidth_bytes_per_s\\?\\)"),
    (lambda t: t.replace("bfloat16 = 200e12", "bf16 = 200e12"),
     "unknown dtype 'peak_flops_per_s.bf16'.*accepted: float32, tf32, bfloat16, float16, float8"),
    (lambda t: t.replace("float32 = 20e12\n", ""), "missing field 'peak_flops_per_s.float32'"),
    (lambda t: t.replace("memory_bytes = 17_179_869_184", "memory_bytes = 16.5e9"),
     "'memory_bytes' must be an integer number of bytes"),
    (lambda t: t.replace("float32 = 20e12", "float32 = \"fast\""),
     "'peak_flops_per_s.float32' must be a positive number, got 'fast'"),
    (lambda t: t + "[efficiency]\nmatmul = 1.5\n", "'efficiency.matmul' is a fraction of the peak"),
    (lambda t: t + "[efficiency]\ncompute_ramp_s = -1\n", "'efficiency.compute_ramp_s' must be seconds >= 0"),
    (lambda t: t + "[efficiency]\nmatmull = 0.5\n", "unknown field 'efficiency.matmull' \\(did you mean matmul\\?\\)"),
    (lambda t: "calibrated = \"yes\"\n" + t, "'calibrated' must be true or false"),
    (lambda t: t.replace("name = ", "name = = "), "is not valid TOML"),
])
def test_user_toml_errors_say_what_is_wrong(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(VALID))
    with pytest.raises(UsageError, match=message):
        load_hardware(str(path))


def test_missing_user_file(tmp_path):
    with pytest.raises(UsageError, match="hardware file '.*nope.toml' does not exist"):
        load_hardware(str(tmp_path / "nope.toml"))


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "lab-gpu.toml"
    path.write_text(VALID.replace('name = "my-gpu"\n', ""))
    assert load_hardware(str(path)).name == "lab-gpu"


def test_pyproject_ships_the_catalog_and_every_subpackage():
    # The wheel installs hardware_specs/ as costmodel.hardware_specs; packages are listed, not
    # found, so a subpackage missing from the list would silently be left out of the wheel.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["costmodel.hardware_specs"] == "hardware_specs"
    assert setuptools["package-data"]["costmodel.hardware_specs"] == ["*.toml"]
    subpackages = {"costmodel." + ".".join(p.parent.relative_to(ROOT / "costmodel").parts)
                   for p in (ROOT / "costmodel").rglob("__init__.py") if p.parent != ROOT / "costmodel"}
    assert subpackages | {"costmodel", "costmodel.hardware_specs"} <= set(setuptools["packages"])
