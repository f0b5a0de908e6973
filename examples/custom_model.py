"""A custom Flax model (a 1-hidden-layer MLP with dropout-free tanh) trained with FedAdam.

  .venv/bin/python examples/custom_model.py
"""
import os

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.algorithms import fedavg, server_optimizer
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.launch.experiment import build_experiment
from fedjax_sim.simulation import simulate

SMOKE = bool(os.environ.get("FEDJAX_SIM_EXAMPLE_SMOKE"))


class TanhNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(jnp.tanh(nn.Dense(128)(x)))


cfg = get_base_config()
exp = build_experiment(cfg)  # digits, 100 clients, Dir(0.5); we swap in our own model
model = TanhNet()
apply_fn = lambda params, x: model.apply({"params": params}, x)
init_params = lambda rng: model.init(rng, jnp.zeros((1, 8, 8, 1)))["params"]
alg = fedavg(apply_fn, init_params, client_lr=0.05, batch_size=10,
             server_opt=server_optimizer("adam", 0.01), name="fedadam_tanhnet")

rounds = 10 if SMOKE else 100
state, history, _ = simulate(alg, exp.sampler, exp.data, seed=0, rounds=rounds,
                             rounds_per_call=10, eval_every=rounds, mesh=exp.mesh)
print(f"TanhNet + FedAdam, {history[-1]['round']} rounds: test accuracy "
      f"{history[-1]['test_accuracy']:.3f}")
