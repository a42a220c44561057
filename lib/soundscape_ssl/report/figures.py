"""Saving figures the same way in every notebook: PNG for reading, PDF for the paper."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..core.stage import atomic_write

FIGURE_DPI = 150


def save_figure(figure: Figure, figures_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `name`.png (150 dpi) and `name`.pdf into `figures_dir`; returns both paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    png_path = figures_dir / f"{name}.png"
    pdf_path = figures_dir / f"{name}.pdf"
    with atomic_write(png_path) as tmp:   # the temporary name has no suffix: say the format
        figure.savefig(tmp, dpi=FIGURE_DPI, format="png")
    with atomic_write(pdf_path) as tmp:
        figure.savefig(tmp, format="pdf")
    return png_path, pdf_path
