"""A custom partition in a few lines: register it, then name it in the data config.

"Sorted shards": sort the examples by label and cut them into contiguous
pieces, so each client sees one or two neighbouring labels. One decorator
registers the partitioner; its keyword parameters are its knobs, read from
``cfg.data`` by name (here ``shard_order``), and it checks them itself. The
library then trains FedAvg on it through the same path as the command line
(``train_and_evaluate``)::

  .venv/bin/python examples/custom_partition.py

This file is also a config file (``get_config`` below), so ``fedjax-sim run``
imports it, which registers the partitioner, and runs it::

  fedjax-sim run --config=examples/custom_partition.py
  fedjax-sim run --config=examples/custom_partition.py --config.data.shard_order=shuffled

Any other config file can use the partitioner the same way: import this module
and set ``c.data.partition = "sorted_shards"``.
"""
import os
import tempfile

import numpy as np

from fedjax_sim.data import PartitionError, register_partitioner
from fedjax_sim.launch.configs.base import get_base_config


@register_partitioner("sorted_shards")
def sorted_shards(labels, num_clients, seed, *, shard_order: str = "sorted"):
  """Sort by label, cut into num_clients contiguous pieces (each example once); with
  ``shard_order="shuffled"`` the pieces are dealt to the clients in a random order."""
  if shard_order not in ("sorted", "shuffled"):
    raise PartitionError(f"data.shard_order={shard_order!r} must be sorted or shuffled; set "
                         "--config.data.shard_order.")
  parts = [np.sort(p) for p in np.array_split(np.argsort(labels, kind="stable"), num_clients)]
  if shard_order == "shuffled":
    parts = [parts[i] for i in np.random.default_rng(seed).permutation(num_clients)]
  return parts


def get_config(arg: str = ""):
  c = get_base_config()
  c.data.partition = "sorted_shards"
  c.data.shard_order = "sorted"  # the partitioner's knob: --config.data.shard_order
  c.data.num_clients, c.clients_per_round = 30, 10
  c.rounds, c.eval_every = 20, 10
  return c


if __name__ == "__main__":
  from fedjax_sim.launch.experiment import train_and_evaluate

  cfg = get_config()
  cfg.progress = False
  if os.environ.get("FEDJAX_SIM_EXAMPLE_SMOKE"):
    cfg.rounds, cfg.eval_every, cfg.rounds_per_call = 2, 2, 2
  with tempfile.TemporaryDirectory() as workdir:
    out = train_and_evaluate(cfg, workdir)
  print(f"sorted shards, {cfg.rounds} rounds: global test accuracy {out['test_accuracy']:.3f}, "
        f"worst-10% client accuracy {out['client_acc_worst10']:.3f}")
