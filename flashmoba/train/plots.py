"""PNG plots of training and evaluation results (matplotlib, Agg backend: no display needed).

Every function takes ``{run name: results}`` so one figure compares several runs (the experiment's
variants); a single run is a one-entry dict.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_loss_curves", "plot_retrieval", "plot_position_perplexity"]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (sums[idx] - sums[np.maximum(0, idx - window)]) / np.minimum(idx, window)


def plot_loss_curves(logs: dict[str, list[dict]], path: Path, smooth: int = 10) -> None:
    """Training loss (moving average over ``smooth`` records) and validation loss against tokens seen."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(logs.items()):
        color = f"C{i}"
        tokens = np.array([r["tokens"] for r in records], dtype=float)
        ax.plot(tokens, _smooth(np.array([r["loss"] for r in records]), smooth), color=color, label=name, lw=1.2)
        val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o", color=color, ms=4)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token; dots: validation)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_retrieval(retrieval: dict[str, list[dict]], path: Path, train_context: int | None = None) -> None:
    """Accuracy vs length per task, one line per run, Wilson 95% intervals as error bars."""
    tasks = sorted({row["task"] for rows in retrieval.values() for row in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (name, rows) in enumerate(retrieval.items()):
            cells = sorted((r for r in rows if r["task"] == task), key=lambda r: r["length"])
            x = np.array([r["length"] for r in cells])
            y = np.array([r["accuracy"] for r in cells])
            err = np.array(
                [[r["accuracy"] - r["ci_low"] for r in cells], [r["ci_high"] - r["accuracy"] for r in cells]]
            )
            # A small horizontal offset per run keeps overlapping error bars readable.
            ax.errorbar(
                x * 1.04 ** (i - len(retrieval) / 2),
                y,
                yerr=err,
                marker="o",
                ms=3,
                capsize=2,
                lw=1,
                label=name,
                color=f"C{i}",
            )
        if train_context:
            ax.axvline(train_context, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("retrieval accuracy (95% CI)")
    axes[0][-1].legend(fontsize=7)
    if train_context:
        fig.suptitle(f"needle retrieval (dashed: training context {train_context})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_position_perplexity(perplexities: dict[str, dict], path: Path) -> None:
    """Validation perplexity per position bucket (position of the predicted token in its sequence)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, result) in enumerate(perplexities.items()):
        buckets = result["by_position"]
        ax.plot(
            [(b["start"] + b["end"]) / 2 for b in buckets],
            [b["ppl"] for b in buckets],
            marker="o",
            ms=3,
            label=f"{name} (all: {result['ppl']:.2f})",
            color=f"C{i}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in sequence (bucket centre)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
