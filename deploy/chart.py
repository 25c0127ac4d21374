"""The demo's picture: host memory behind the guest over time, one line per reclaimer.

``write_png`` draws what ``deploy/demo`` measured in one run (aerate, the kernel's free page
reporting, no reclaim at all, each on a fresh guest of the same shape freeing the same
memory) so that a person sees at a glance which line falls, how far and how fast. It needs
matplotlib, the demo's optional extra (``pip install 'aerate-kvm[demo]'``; deploy/setup-host
installs it); without it the demo prints its table and says that no picture was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

#: One series: (seconds since the guest freed its memory, MiB of host memory behind its RAM).
Series = Sequence[tuple[float, float]]
#: Line colours by mode name; others get matplotlib's cycle.
COLOURS = {"aerate": "#1b7f3b", "kernel free page reporting": "#2f5fb3",
           "no reclaim": "#9a9a9a"}


class ChartUnavailable(RuntimeError):
    """No plotting library here: what to install."""


def write_png(path: Path, series: Mapping[str, Series], title: str, freed_mib: int) -> Path:
    """Draw ``series`` into a PNG at ``path`` (the line of each mode, a mark at the free)
    and return the path. Raises ChartUnavailable without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")   # no display: draw into memory, write a file
        from matplotlib import pyplot as plt
    except ImportError as e:
        raise ChartUnavailable(
            f"no picture: matplotlib is not installed ({e}); install the demo's extra: "
            ".venv/bin/python -m pip install -e '.[demo]'") from e
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    try:
        for mode, points in series.items():
            if not points:
                continue
            ax.plot([t for t, _ in points], [m for _, m in points], label=mode,
                    color=COLOURS.get(mode), linewidth=2.2)
        ax.axvline(0, color="#c0392b", linestyle="--", linewidth=1)
        ax.annotate(f"guest frees {freed_mib} MiB", xy=(0, 0), xycoords=("data", "axes fraction"),
                    xytext=(6, 8), textcoords="offset points", color="#c0392b")
        ax.set_xlabel("seconds after the guest freed its memory")
        ax.set_ylabel("host memory behind the guest's RAM (MiB)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
