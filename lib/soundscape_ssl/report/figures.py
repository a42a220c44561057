"""Saving figures the same way in every notebook: PNG for reading, PDF for the paper."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

FIGURE_DPI = 150


def save_figure(figure: Figure, figures_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `name`.png (150 dpi) and `name`.pdf into `figures_dir`; returns both paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    png_path = figures_dir / f"{name}.png"
    pdf_path = figures_dir / f"{name}.pdf"
    figure.savefig(png_path, dpi=FIGURE_DPI)
    figure.savefig(pdf_path)
    return png_path, pdf_path
