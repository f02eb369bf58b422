"""Figures with matplotlib, an optional dependency (extra ``plots``): one way to get it, save, and say it is missing."""

from __future__ import annotations

import sys
from pathlib import Path

from .atomic import atomic_write

INSTALL_HINT = "matplotlib is not installed: pip install 'refimpl[plots]'"


class PlottingUnavailable(RuntimeError):
    """A figure was asked for and matplotlib is not installed; the message is the install hint."""


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure, write it as a 120-dpi PNG atomically, and close it."""
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    import matplotlib.pyplot as plt  # installed: the figure was made with it

    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed (extra ``plots``)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def no_plot_note(path, numbers_in: str = "the CSV") -> None:
    """One line on stderr: ``path`` was not drawn for want of matplotlib."""
    print(f"matplotlib is not installed (pip install 'refimpl[plots]'): {path} not drawn; {numbers_in} has the numbers",
          file=sys.stderr)


def require_pyplot():
    """matplotlib.pyplot, or :class:`PlottingUnavailable`."""
    plt = pyplot()
    if plt is None:
        raise PlottingUnavailable(INSTALL_HINT)
    return plt
