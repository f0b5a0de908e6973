"""Dirichlet alpha x client_lr on digits: the partition's alpha changes the data
shapes, so each alpha value is its own task (the client_lr values inside it are
vectorized): 2 tasks of 3 points.

  fedjax-sim sweep --sweep_file=launch/sweeps/alpha_lr.py --workdir=runs/alpha_lr
"""


def get_sweep():
  return {
      "config": "fedavg_digits:smoke",
      "grid": {"data.alpha": [0.1, 1.0], "client_lr": [0.03, 0.1, 0.3]},
  }
