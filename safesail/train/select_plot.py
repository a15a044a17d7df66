"""The selection plot: per hook point, each SAE's safety specificity (I_CDF) against its sparsity."""

from __future__ import annotations

from pathlib import Path


def _sparsity(rec: dict) -> float:
    """L0 from the train metrics (active latents per token), else k, else active latents per pair query."""
    l0 = rec["train_metrics"].get("l0")
    if l0 is not None:
        return float(l0)
    if rec.get("k") is not None:
        return float(rec["k"])
    return float(rec["figures"].get("pair_query_l0", 0.0))


def plot_selection(selection: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(selection["chosen"])
    n = max(1, len(hooks))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, hook in zip(axes[0], hooks):
        recs = [r for r in selection["saes"] if r["hook"] == hook]
        for r in recs:
            macro = r["figures"].get("macro") or r["figures"]["all"]
            x, y = _sparsity(r), macro["i_cdf"]
            marker = "o" if r["eligible"] else "x"
            color = "tab:red" if r.get("chosen") else ("tab:blue" if r["eligible"] else "tab:gray")
            ax.scatter([x], [y], marker=marker, s=70 if r.get("chosen") else 40, color=color, zorder=3)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.margins(x=0.25, y=0.15)
        ax.set_title(hook, fontsize=9)
        ax.set_xlabel("sparsity: L0 (active latents per token)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("specificity: I_CDF (macro over domains)")
    fig.suptitle("SAE choice: red = chosen, blue = eligible, gray x = excluded by guardrails", fontsize=9)
    fig.tight_layout()
    from safesail.atomic import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
