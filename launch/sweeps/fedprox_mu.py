"""FedProx's mu (``fedprox.mu``) x client_lr on digits, 2 seeds: 16 points, ONE compiled program.

  fedjax-sim sweep --sweep_file=launch/sweeps/fedprox_mu.py --workdir=runs/fedprox_mu

Every swept key is a float hyperparameter (or the seed), so the local back end
vmaps all 16 points in one program. The base config is the digits smoke variant
(10 rounds); ``--config=...`` on the command line replaces it.
"""


def get_sweep():
  return {
      "config": "fedavg_digits:smoke",  # a shipped config name, or a path[:arg]
      "overrides": {"algorithm": "fedprox"},  # applied to every point
      "grid": {"fedprox.mu": [0.0, 0.001, 0.01, 0.1], "client_lr": [0.05, 0.1]},
      "seeds": [0, 1],
  }
