"""The sweep plot: L0 against FVU and against CE loss recovered, one line per (hook, architecture)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_sweep(rows: list[dict], path: str | Path) -> Path | None:
    """Write a PNG with two panels from sweep rows (hook, arch, l0, fvu, ce_loss_recovered). None if no rows."""
    rows = [r for r in rows if _num(r.get("l0")) and _num(r.get("fvu"))]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r.get("hook")), str(r.get("arch"))), []).append(r)
    for (hook, arch), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["l0"])
        label = f"{arch} @ {hook}"
        axes[0].plot([r["l0"] for r in rs], [r["fvu"] for r in rs], marker="o", label=label)
        ce = [(r["l0"], r.get("ce_loss_recovered")) for r in rs if _num(r.get("ce_loss_recovered"))]
        if ce:
            axes[1].plot([a for a, _ in ce], [b for _, b in ce], marker="o", label=label)
    axes[0].set(xlabel="L0 (active latents per token)", ylabel="FVU (lower is better)", xscale="log",
                title="Reconstruction")
    axes[1].set(xlabel="L0 (active latents per token)", ylabel="CE loss recovered (higher is better)",
                xscale="log", title="Language-model cost")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
