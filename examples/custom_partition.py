"""A custom partition: clients own contiguous label ranges ("sorted shards"), built
with the library's packing, then trained with FedAvg.

  .venv/bin/python examples/custom_partition.py
"""
import os

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sim import init_state, make_round
from fedjax_sim.client_data import pack, to_device
from fedjax_sim.data import load_digits, train_test_split_clients
from fedjax_sim.evaluation import make_evaluate, summarize
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.launch.experiment import build_experiment

SMOKE = bool(os.environ.get("FEDJAX_SIM_EXAMPLE_SMOKE"))


def sorted_shards(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Sort by label and cut into num_clients contiguous pieces (each example once)."""
  return [np.sort(p) for p in np.array_split(np.argsort(labels, kind="stable"), num_clients)]


cfg = get_base_config()
cfg.data.num_clients, cfg.clients_per_round = 30, 10
exp = build_experiment(cfg)  # the model, algorithm, sampler and mesh for this config

ds = load_digits()
parts = sorted_shards(ds.train_y, cfg.data.num_clients)
assert sorted(np.concatenate(parts).tolist()) == list(range(len(ds.train_y)))
train_idx, test_idx = train_test_split_clients(parts, 0.2, seed=0)
on_mesh = NamedSharding(exp.mesh, P())
train = to_device(pack([ds.train_x[i] for i in train_idx], [ds.train_y[i] for i in train_idx],
                       multiple=cfg.batch_size), on_mesh)
test = to_device(pack([ds.train_x[i] for i in test_idx], [ds.train_y[i] for i in test_idx]),
                 on_mesh)

state = init_state(exp.algorithm, exp.sampler, cfg.data.num_clients, seed=0, mesh=exp.mesh)
round_fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, rounds_per_call=10)
for _ in range(1 if SMOKE else 10):
  state, metrics = round_fn(state, train)
raw = make_evaluate(exp.algorithm)(state.server, state.clients, test, exp.data.test_x,
                                   exp.data.test_y)
out = summarize(raw, len(exp.data.test_y))
print(f"sorted shards, {int(state.round)} rounds: global test accuracy "
      f"{out['test_accuracy']:.3f}, worst-10% client accuracy {out['client_acc_worst10']:.3f}")
