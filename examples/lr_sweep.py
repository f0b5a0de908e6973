"""A client learning-rate sweep from a plain script, each point a full simulation.

  .venv/bin/python examples/lr_sweep.py

(`fedjax-sim sweep` does this from the shell, with resumable run directories and
a vectorized path that compiles the grid once; see docs/sweeps.md.)
"""
import os
import tempfile

from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.launch.experiment import train_and_evaluate

SMOKE = bool(os.environ.get("FEDJAX_SIM_EXAMPLE_SMOKE"))

results = {}
for lr in (0.03, 0.1, 0.3):
  cfg = get_base_config()
  cfg.client_lr = lr
  cfg.rounds, cfg.eval_every = (10, 10) if SMOKE else (100, 20)
  cfg.progress = False
  row = train_and_evaluate(cfg, tempfile.mkdtemp(prefix=f"lr{lr}_"))
  results[lr] = row["test_accuracy"]
print("client_lr  test_accuracy")
for lr, acc in results.items():
  print(f"{lr:<10} {acc:.3f}")
