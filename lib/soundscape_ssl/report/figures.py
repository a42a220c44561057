"""Saving figures the same way in every notebook: PNG for reading, PDF for the paper, the run in
the title, the same bytes every time, and the figure shown as an image where it is made.

`save_figure(figure, run_dir / "figures", name)` does four things:

* It puts the run into the figure's title: `<suptitle> · run <run id>` (the run id is the name of
  the folder holding `figures/`, as in `runs/<run_id>/figures`), so a PNG passed around on its own
  still says where it came from. The space a figure shows is the plotting function's or the
  notebook's part of the title.
* It writes `name.png` (150 dpi, no bbox cropping, so the pixel size is the figure's size times
  150) and `name.pdf` atomically, with fixed metadata: no software version in the PNG and no
  creation date in the PDF, so the same figure gives the same bytes on every run (the published
  set in `figures/` relies on it). The PNG is a 256-colour palette image: a spectrogram gallery
  drops from ~5 MB to ~1 MB (measured on the demo's 04_cluster_gallery) with no visible change,
  since every colour map has 256 entries anyway.
* It writes `name.json`: the final title and the run, which the report shows for figures its
  catalogue does not describe.
* It makes matplotlib figures display as embedded PNG images in an IPython kernel (JupyterLab,
  papermill). The kernel's backend, matplotlib-inline, registers its PNG formatter for `Figure`
  only when pyplot is imported; the library builds figures without pyplot (`Figure(...)`, no
  global state), so without this `display(fig)` printed `<Figure size 1260x760 with 7 Axes>` and
  executed notebooks held no image. `enable_inline_display` registers IPython's own formatter.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from ..core.stage import atomic_write, atomic_write_text

FIGURE_DPI = 150
PNG_COLOURS = 256
# Fixed metadata: matplotlib writes its version into PNGs and the time into PDFs by default.
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "Producer": None, "Creator": None}
# Notebook display: IPython's default figure dpi, so a 12.6 x 7.6 in figure is 1260 x 760 px.
DISPLAY_DPI = 100
TITLE_CHARS_PER_INCH = 11   # how long a title line may be before it wraps


def enable_inline_display() -> bool:
    """In an IPython kernel, show `matplotlib.figure.Figure` objects as PNG images (display(fig) or
    a cell's last expression). Returns whether a kernel was found; a no-op outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return False
    # A format chosen already (the inline backend's, or the user's `%config`) is kept.
    if any(Figure in formatter.type_printers for formatter in shell.display_formatter.formatters.values()):
        return True
    select_figure_formats(shell, {"png"}, dpi=DISPLAY_DPI)
    return True


def run_label_of(figures_dir: str | os.PathLike) -> str:
    """The run a figures folder belongs to: `runs/<run_id>/figures` -> run_id."""
    figures_dir = Path(figures_dir).resolve()
    return figures_dir.parent.name if figures_dir.name == "figures" else figures_dir.name


def _titled(title: str, stamp: str, width_in: float) -> str:
    """`title · stamp` on one line when it fits the width, else the stamp on a line of its own;
    a title longer than the width is wrapped."""
    width_chars = max(30, int(width_in * TITLE_CHARS_PER_INCH))
    lines = [wrapped for line in title.splitlines() for wrapped in textwrap.wrap(line, width_chars) or [""]]
    if lines and len(lines[-1]) + len(stamp) + 5 <= width_chars:
        lines[-1] = f"{lines[-1]}  ·  {stamp}"
    else:
        lines.append(stamp)
    return "\n".join(line for line in lines if line)


def stamp_run(figure: Figure, run_label: str) -> str:
    """Add `run <run_label>` to the figure's title; returns the title. The title is the suptitle;
    a figure without one whose only titled axes is its one panel gets it added to that panel's
    title, any other a suptitle. Idempotent: a title that names the run already is left alone."""
    title = figure.get_suptitle()
    stamp = f"run {run_label}"
    if stamp in title:
        return title
    titled = [axes for axes in figure.axes if axes.get_title()]
    if not title and len(titled) == 1:
        axes = titled[0]
        if stamp not in axes.get_title():
            width_in = figure.get_size_inches()[0] * axes.get_position().width
            axes.set_title(_titled(axes.get_title(), stamp, width_in))
        return axes.get_title()
    text = _titled(title, stamp, figure.get_size_inches()[0])
    # The suptitle is one of the figure's texts: change its words, keep its size and place.
    existing = [t for t in figure.texts if title and t.get_text() == title]
    if existing:
        existing[0].set_text(text)
    else:
        figure.suptitle(text)
    return text


def palette_png(figure: Figure, dpi: int = FIGURE_DPI, colours: int = PNG_COLOURS) -> bytes:
    """The figure as a palette PNG (`colours` colours, no dithering: the same bytes every time)."""
    from PIL import Image

    rendered = io.BytesIO()
    figure.savefig(rendered, dpi=dpi, format="png", metadata=PNG_METADATA)
    image = Image.open(rendered).convert("RGB")
    palette = image.quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    encoded = io.BytesIO()
    palette.save(encoded, format="png")
    return encoded.getvalue()


def save_figure(figure: Figure, figures_dir: str | os.PathLike, name: str,
                run_label: str | None = None) -> tuple[Path, Path]:
    """Stamp the run into the title, write `name`.png (150 dpi), `name`.pdf and `name`.json into
    `figures_dir` (see the module docstring) and make the figure display as an image in a
    notebook; returns the PNG and PDF paths. `run_label` defaults to `run_label_of(figures_dir)`."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    run_label = run_label or run_label_of(figures_dir)
    title = stamp_run(figure, run_label)
    png_path = figures_dir / f"{name}.png"
    pdf_path = figures_dir / f"{name}.pdf"
    png_bytes = palette_png(figure)
    with atomic_write(png_path, expected_bytes=len(png_bytes)) as tmp:
        tmp.write_bytes(png_bytes)
    with atomic_write(pdf_path) as tmp:
        figure.savefig(tmp, format="pdf", metadata=PDF_METADATA)
    atomic_write_text(figures_dir / f"{name}.json",
                      json.dumps({"name": name, "title": title, "run": run_label}, indent=2) + "\n")
    enable_inline_display()
    return png_path, pdf_path
