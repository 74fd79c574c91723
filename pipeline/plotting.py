"""matplotlib for the commands that draw (``--plot``): the optional ``plot`` extra, imported only
when a plot is asked for, off-screen."""

from __future__ import annotations

from pathlib import Path

from .errors import PipeError


def pyplot():
    """``matplotlib.pyplot`` on the off-screen Agg backend; one clear error when matplotlib is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipeError("--plot needs matplotlib: pip install 'pipe[plot]' (or pip install matplotlib)") from None
    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
