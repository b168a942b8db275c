"""The roofline plot writes a real image file; bad output paths are usage errors."""

import pytest

pytest.importorskip("matplotlib")

from costmodel.errors import UsageError  # noqa: E402
from costmodel.hardware.catalog import load_hardware  # noqa: E402
from costmodel.hardware.roofline import op_time  # noqa: E402
from costmodel.render.roofline_plot import roofline_figure, roofline_plot  # noqa: E402

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


def _legend_texts(fig):
    from matplotlib.legend import Legend
    side = fig.axes[1]
    return [[t.get_text() for t in leg.get_texts()] for leg in side.get_children() if isinstance(leg, Legend)]


def _number_boxes(fig):
    renderer = fig.canvas.get_renderer()
    anns = [a for a in fig.axes[0].texts if a.get_gid() == "op-number"]
    return [(a.get_text(), a.get_bbox_patch().get_window_extent(renderer)) for a in anns]


def _crowd(n=40):
    """n matmuls crowded into less than a decade of intensity, each at its own point: a pile of labels."""
    points = []
    for i in range(n):
        m = 512 + 16 * i
        t = op_time(2 * m * m * 4096, 2 * (m * 4096 + 4096 * m + m * m), "matmul", "bfloat16", A100)
        points.append({"intensity": t.intensity, "flops_per_s": t.flops_per_s, "time_s": t.time_s,
                       "label": f"blocks.{i}.attention.output_projection_with_a_long_name", "bound": t.bound})
    return points


@pytest.mark.parametrize("top_n", [5, 12, 40])
def test_numbers_neither_overlap_nor_leave_the_axes(top_n):
    fig = roofline_figure(A100, _crowd(), "bfloat16", top_n=top_n)
    fig.canvas.draw()
    boxes = _number_boxes(fig)
    frame = fig.axes[0].get_window_extent(fig.canvas.get_renderer())
    numbered = sorted(int(n) for text, _ in boxes for n in text.split(","))
    table = _legend_texts(fig)[1]
    assert numbered == list(range(1, len(table) + 1))           # every table row has its number on the plot
    assert len(table) == top_n or (top_n == 40 and 12 <= len(table) < 40)  # 40 rows do not fit: the footnote says
    for i, (_, a) in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, (a, frame)
        for _, b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    if top_n == 40:
        assert any("do not fit here" in t.get_text() for t in fig.axes[1].texts)


def test_the_table_stays_inside_the_figure():
    from matplotlib.legend import Legend
    fig = roofline_figure(A100, _crowd(), "bfloat16", top_n=40)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    side = fig.axes[1]
    legends = [c for c in side.get_children() if isinstance(c, Legend)]
    assert len(legends) == 2                                     # the key and the table
    for artist in [t for leg in legends for t in (leg.get_title(), *leg.get_texts())] + side.texts:
        box = artist.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0 and box.y1 <= fig.bbox.y1, (artist, box)


def test_the_key_names_colours_roofs_and_units():
    fig = roofline_figure(A100, _points(), "bfloat16")
    fig.canvas.draw()
    key = _legend_texts(fig)[0]
    # A100 80GB: 312 TFLOP/s dense bf16, 2.039e12 B/s; ridge 312e12 / 2.039e12 = 153 FLOP/byte
    assert "bfloat16/float16 roof: 312 TFLOP/s (this model)" in key
    assert "float32 roof: 19.5 TFLOP/s" in key
    assert "slope: memory bandwidth 2.04 TB/s" in key
    assert "ridge point: 153 FLOP/byte" in key
    assert "compute-bound op" in key and "memory-bound op" in key
    ax = fig.axes[0]
    assert ax.get_xlabel() == "arithmetic intensity (FLOP/byte)"
    assert ax.get_ylabel() == "attained performance (FLOP/s)"
    assert any(t.get_text().endswith("TFLOP/s") for t in ax.get_yticklabels())
    assert ax.get_title() == "a100-80gb roofline, bfloat16"


def test_copies_of_a_layer_are_one_row():
    """Layers 0..3 at one point are one row: 4 x the time of one, and one number on the plot."""
    one = _points()[2]  # mm8192, the slowest
    points = [{**one, "label": f"layers.{i}.mlp.up_proj (mm)"} for i in range(4)] + _points()[:2]
    fig = roofline_figure(A100, points, "bfloat16", top_n=2)
    fig.canvas.draw()
    table = _legend_texts(fig)[1]
    each_ms = one["time_s"] * 1e3
    assert table[0].startswith("1  layers.*.mlp.up_proj (mm)\n")
    assert f"4 x {each_ms:.3g} ms = {4 * each_ms:.3g} ms" in table[0]
    assert len(table) == 2 and sorted(text for text, _ in _number_boxes(fig)) == ["1", "2"]


def test_cli_plot_labels_ops_by_module_and_op(tmp_path, monkeypatch):
    """analyze --plot names each point by its module and op (mm, sdpa) and titles the chart with the point."""
    from pathlib import Path

    import costmodel.render.roofline_plot
    from costmodel.cli import main
    seen = {}
    monkeypatch.setattr(costmodel.render.roofline_plot, "roofline_plot", lambda hw, points, path, dtype, **kw: seen.update(
        points=list(points), dtype=dtype, **kw))
    models = Path(__file__).resolve().parent / "models.py"
    assert main(["analyze", f"{models}:sdpa_block", "--input", "x:float32[batch,seq,32]", "--dim", "batch=2",
                 "--dim", "seq=64", "--hw", "a100-80gb", "--plot", str(tmp_path / "r.png")]) == 0
    labels = {p["label"] for p in seen["points"]}
    assert "(root) (sdpa)" in labels and "qkv (addmm)" in labels, labels
    assert seen["title"] == f"{models}:sdpa_block (inference, float32, batch=2, seq=64) on a100-80gb"
