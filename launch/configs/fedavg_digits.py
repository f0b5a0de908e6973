"""FedAvg on the embedded digits data: 100 clients, Dir(0.5), 20 per round (the default run).

  fedjax-sim run --config=launch/configs/fedavg_digits.py --workdir=runs/fedavg_digits

Smoke variant (seconds): ``--config=launch/configs/fedavg_digits.py:smoke``.
"""
from fedjax_sim.launch.configs.base import get_base_config


def get_config(arg: str = ""):
  c = get_base_config()
  c.algorithm = "fedavg"
  c.rounds = 200
  c.batch_size = 10
  c.client_lr = 0.1
  c.local_epochs = 1
  if arg == "smoke":
    c.rounds = 10
    c.eval_every = 5
    c.checkpoint_every = 5
    c.rounds_per_call = 5
  return c
