"""The roofline plot writes a real image file; bad output paths are usage errors."""

import pytest

pytest.importorskip("matplotlib")

from costmodel.errors import UsageError  # noqa: E402
from costmodel.hardware.catalog import load_hardware  # noqa: E402
from costmodel.render.roofline_plot import roofline_plot  # noqa: E402
from costmodel.hardware.roofline import op_time  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A100 = load_hardware("a100-80gb")


def _points():
    ops = [(2 * n**3, 3 * n * n * 2, "matmul", f"mm{n}") for n in (64, 1024, 8192)]
    ops += [(5 * 2**27, 2**29, "norm", "layer_norm"), (0, 2**28, "copy", "copy"), (0, 0, "view", "view")]
    points = []
    for flops, bytes_, category, label in ops:
        t = op_time(flops, bytes_, category, "bfloat16", A100)
        points.append({"intensity": t.intensity, "flops_per_s": t.flops_per_s, "time_s": t.time_s,
                       "label": label, "bound": t.bound})
    return points


def test_png_is_written(tmp_path):
    out = roofline_plot(A100, _points(), tmp_path / "roof.png", "bfloat16")
    assert out == tmp_path / "roof.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_svg_and_no_points(tmp_path):
    out = roofline_plot(load_hardware("t4"), [], tmp_path / "roof.svg", "float16")
    assert out.read_text().lstrip().startswith("<?xml")


def test_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot write '.xyz' files; accepted: .*png"):
        roofline_plot(A100, _points(), tmp_path / "roof.xyz")
    with pytest.raises(UsageError, match="cannot write"):
        roofline_plot(A100, _points(), tmp_path / "no-such-dir" / "roof.png")


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match=r"matplotlib is needed for --plot; pip install 'costmodel\[plot\]'"):
        roofline_plot(A100, _points(), tmp_path / "roof.png")
