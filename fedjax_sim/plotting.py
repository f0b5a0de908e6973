"""PNG plots of a run's history (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _legend(ax) -> None:
  """A legend when the axis has labeled lines (none: no matplotlib warning)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend()


def plot_history(history: list[dict], path: str, title: str = "") -> None:
  """Plots test accuracy, loss and per-client accuracy spread against rounds."""
  if not history:
    return
  rounds = [r["round"] for r in history]
  if "test_accuracy" not in history[0]:  # an algorithm's own metrics: one panel each
    keys = [k for k, v in history[0].items() if isinstance(v, float) and k not in (
        "round", "wall_s")][:6]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
      ax.plot(rounds, [r.get(k, float("nan")) for r in history])
      ax.set(xlabel="round", title=k)
      ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot(rounds, [r["test_accuracy"] for r in history], label="global test accuracy")
  if "client_acc_mean" in history[0]:
    mean = [r["client_acc_mean"] for r in history]
    worst = [r["client_acc_worst10"] for r in history]
    axes[0].plot(rounds, mean, label="client accuracy (mean)")
    axes[0].plot(rounds, worst, "--", label="client accuracy (worst 10%)")
  axes[0].set(xlabel="round", ylabel="accuracy", title="accuracy")
  _legend(axes[0])
  for key, label in (("train_loss", "train loss (clients)"), ("test_loss", "test loss")):
    rows = [r for r in history if key in r]  # training metrics start after round 0
    if rows:
      axes[1].plot([r["round"] for r in rows], [r[key] for r in rows], label=label)
  axes[1].set(xlabel="round", ylabel="cross-entropy", title="loss")
  _legend(axes[1])
  if "client_acc_std" in history[0]:
    axes[2].plot(rounds, [r["client_acc_std"] for r in history], label="client accuracy std")
    axes[2].plot(rounds, [r["d_cosine"] for r in history], label="D_Cosine (rad)")
  axes[2].set(xlabel="round", title="fairness")
  _legend(axes[2])
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
