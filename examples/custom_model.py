"""A custom Flax model (a 1-hidden-layer MLP with dropout-free tanh) trained with FedAdam.

  .venv/bin/python examples/custom_model.py
"""
import os

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim import init_state, make_round
from fedjax_sim.algorithms import fedavg, server_optimizer
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.launch.experiment import build_experiment

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

state = init_state(alg, exp.sampler, exp.data.num_clients, seed=0, mesh=exp.mesh)
round_fn = make_round(alg, exp.sampler, seed=0, mesh=exp.mesh, rounds_per_call=10)
for _ in range(1 if SMOKE else 10):
  state, metrics = round_fn(state, exp.data.train)
logits = apply_fn(state.server.params, exp.data.test_x)
acc = float(jnp.mean(jnp.argmax(logits, -1) == exp.data.test_y))
print(f"TanhNet + FedAdam, {int(state.round)} rounds: test accuracy {acc:.3f}")
