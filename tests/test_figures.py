"""save_figure: the run in the title, the same bytes every time, and figures shown as images in a kernel."""

from __future__ import annotations

import base64
import json

import pytest
from matplotlib.figure import Figure

from soundscape_ssl.report import figures


def _figure(suptitle: str | None = "a map", fontsize: float = 9.0) -> Figure:
    figure = Figure(figsize=(5.0, 3.0), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot([0, 1, 2], [1, 0, 2])
    right.imshow([[0, 1], [2, 3]])
    if suptitle:
        figure.suptitle(suptitle, fontsize=fontsize)
    return figure


def test_saving_twice_gives_the_same_bytes_without_version_or_date(tmp_path) -> None:
    first = figures.save_figure(_figure(), tmp_path / "a" / "figures", "map", run_label="r1")
    second = figures.save_figure(_figure(), tmp_path / "b" / "figures", "map", run_label="r1")
    for one, other in zip(first, second):
        assert one.read_bytes() == other.read_bytes(), one.name
    png, pdf = first
    assert b"Software" not in png.read_bytes() and b"Matplotlib" not in png.read_bytes()
    from PIL import Image

    with Image.open(png) as image:                            # 256-colour palette, 150 dpi
        assert (image.mode, image.size) == ("P", (750, 450)) and len(image.getcolors()) <= 256
    assert b"CreationDate" not in pdf.read_bytes()
    assert json.loads((png.with_suffix(".json")).read_text()) == {"name": "map", "title": "a map  ·  run r1",
                                                                 "run": "r1"}


def test_the_run_goes_into_the_title_once(tmp_path) -> None:
    figure = _figure(fontsize=7.0)
    png, _ = figures.save_figure(figure, tmp_path / "runs" / "demo-7" / "figures", "map")
    assert figure.get_suptitle() == "a map  ·  run demo-7"          # the run folder's name by default
    assert [t.get_fontsize() for t in figure.texts] == [7.0]      # the suptitle kept its size
    assert figures.stamp_run(figure, "demo-7") == "a map  ·  run demo-7"   # idempotent
    untitled = _figure(suptitle=None)
    figures.stamp_run(untitled, "r2")
    assert untitled.get_suptitle() == "run r2"
    single = Figure(figsize=(4.0, 3.0))
    axes = single.subplots()
    axes.set_title("coverage")
    figures.stamp_run(single, "r3")
    assert axes.get_title() == "coverage  ·  run r3" and single.get_suptitle() == ""
    long = _figure(suptitle="x" * 80)
    assert "\n" in figures.stamp_run(long, "r4")                  # wrapped to the figure's width


def test_figures_display_as_png_in_an_ipython_kernel() -> None:
    """Without a registered formatter IPython shows a pyplot-free Figure as its repr text (what
    executed notebooks held); `enable_inline_display` makes it an image/png output."""
    from IPython.core.interactiveshell import InteractiveShell

    assert figures.enable_inline_display() is False              # no kernel: nothing to do
    shell = InteractiveShell.instance()
    try:
        formatter = shell.display_formatter
        for printers in formatter.formatters.values():
            printers.pop(Figure, None)
        data, _ = formatter.format(_figure())
        assert "image/png" not in data and data["text/plain"].startswith("<Figure size")
        assert figures.enable_inline_display() is True
        data, _ = formatter.format(_figure())
        assert base64.b64decode(data["image/png"]).startswith(b"\x89PNG\r\n")
    finally:
        InteractiveShell.clear_instance()


@pytest.mark.parametrize("folder, label", [("runs/r9/figures", "r9"), ("elsewhere", "elsewhere")])
def test_run_label_of_a_figures_folder(tmp_path, folder, label) -> None:
    assert figures.run_label_of(tmp_path / folder) == label
