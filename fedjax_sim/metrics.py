"""Per-client accuracy spread and fairness metrics (NumPy, host side).

Names as in ``SPEC.md``: ``client_acc_mean``, ``client_acc_std``,
``client_acc_worst10`` (mean of the worst 10% of clients), ``jain_index``
(Jain et al. 1984: (sum a)^2 / (n sum a^2)), ``d_cosine`` (angle in radians
between the per-client accuracy vector and the all-ones vector, FedMDFG's
fairness angle) and ``d_manhattan`` (sum_i |acc_i - mean acc| in percentage
points).
"""
from __future__ import annotations

import numpy as np


def accuracy_spread(acc: np.ndarray) -> dict[str, float]:
  """Summary of per-client accuracies.

  Args:
    acc: float [C'] accuracies in [0, 1] of the clients that have test data.

  Returns:
    dict of python floats (accuracies in [0, 1], d_cosine in radians,
    d_manhattan in percentage points).
  """
  acc = np.asarray(acc, np.float64)
  if acc.size == 0:
    return {}
  k = max(1, int(np.ceil(0.1 * acc.size)))
  norm = np.linalg.norm(acc)
  cos = acc.sum() / (np.sqrt(acc.size) * norm) if norm > 0 else 1.0
  return {
      "client_acc_mean": float(acc.mean()),
      "client_acc_std": float(acc.std()),
      "client_acc_worst10": float(np.sort(acc)[:k].mean()),
      "jain_index": float(acc.sum() ** 2 / (acc.size * np.sum(acc ** 2))) if norm > 0 else 1.0,
      "d_cosine": float(np.arccos(np.clip(cos, -1.0, 1.0))),
      "d_manhattan": float(np.sum(np.abs(acc - acc.mean())) * 100.0),
  }
